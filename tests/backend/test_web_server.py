"""The production web server as clients meet it (issue 13's load benchmark): gunicorn with two uvicorn
worker processes, HTTP handed to Django's WSGI handler on long-lived threads (backend/karyo/asgi.py),
spoken to over raw sockets so that what is on the wire is what is checked."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from rest_framework.authtoken.models import Token

from backend.projects.models import Membership, Role
from backend.projects.services import create_project

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _read_response(sock: socket.socket, buffer: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response from ``sock`` (Content-Length framing); what follows stays in ``buffer``."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection; read so far: {bytes(buffer)!r}"
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection in the middle of a body"
        rest += chunk
    buffer[:] = rest[length:]
    return status, headers, rest[:length]


def test_an_empty_queue_answers_204_without_a_body_and_the_kept_alive_connection_stays_usable(
        make_user, production_server):
    owner, annotator = make_user("owner", is_staff=True), make_user("annotator")
    project = create_project(name="Empty queue", created_by=owner, tile_size=64)
    Membership.objects.create(user=annotator, project=project, role=Role.ANNOTATOR)
    token = Token.objects.create(user=annotator).key
    lease = (f"POST /api/projects/{project.pk}/queue/next/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
             f"Authorization: Token {token}\r\nContent-Length: 0\r\n\r\n")
    # Two requests pipelined on one connection, as a client reusing a kept-alive connection sends them:
    # a body after the 204 (HTTP forbids one) would be read as the start of the second response.
    with socket.create_connection(_address(production_server.url), timeout=20) as sock:
        sock.sendall((lease + "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").encode())
        buffer = bytearray()
        status, headers, body = _read_response(sock, buffer)
        assert status == 204 and body == b"" and headers.get("content-length", "0") == "0", (headers, body)
        status, _, body = _read_response(sock, buffer)
        assert status == 200 and b'"ok"' in body
        assert not buffer, f"bytes left over after the second response: {bytes(buffer)!r}"


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _established_inodes(port: int) -> set[str]:
    """Inodes of the server side of connections established to ``port`` on loopback (IPv4)."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01":  # ESTABLISHED
            out.add(fields[9])
    return out


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc")
def test_a_burst_of_connections_is_spread_over_the_web_processes(production_server):
    host, port = _address(production_server.url)
    children = Path(f"/proc/{production_server.process.pid}/task/{production_server.process.pid}/children")
    workers = [int(pid) for pid in children.read_text().split()]
    assert len(workers) == 2, workers
    # 40 clients connect at once and each sends one request, keeping its connection open.
    connections = [socket.create_connection((host, port), timeout=20) for _ in range(40)]
    try:
        for sock in connections:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        for sock in connections:
            status, _, _ = _read_response(sock, bytearray())
            assert status == 200
        established = _established_inodes(port)
        held = {pid: len(_socket_inodes(pid) & established) for pid in workers}
        assert sum(held.values()) == 40, held
        # On one shared listening socket the first worker to wake took most of a burst (all 50 of the
        # load benchmark's clients in one run); with a socket per worker (--reuse-port) the kernel
        # hashes connections over them: 20 +- 3 each here, so 8 is a generous floor.
        assert min(held.values()) >= 8, f"connections per web process: {held}"
    finally:
        for sock in connections:
            sock.close()


def test_http_is_served_by_the_wsgi_handler_on_long_lived_threads():
    from a2wsgi import WSGIMiddleware
    from django.conf import settings

    from backend.karyo.asgi import application

    http = application.application_mapping["http"]
    assert isinstance(http, WSGIMiddleware)
    assert http.executor._max_workers == settings.KARYO_WEB_THREADS
    # The threads keep their database connections between requests.
    from django.db import connection

    assert connection.settings_dict["CONN_MAX_AGE"] > 0 and connection.settings_dict["CONN_HEALTH_CHECKS"]
