"""Load benchmark: N concurrent annotators against a real Karyo server on loopback.

Not a timed test: a script that prints its figures. Each simulated annotator loops for a fixed
time: lease the next tile (``POST queue/next/``), read the tile image and the regions the
editor opens, and submit an annotation; requests are timed one by one.

    .venv/bin/python -m tests.load.annotators --clients 50 --seconds 30 --server gunicorn --processes 2

``--server daphne`` serves with one Daphne process (what ``make run`` used before issue 13);
``--server gunicorn`` with ``--processes`` uvicorn workers under gunicorn (docker-compose), and
``--server runner`` with Daphne processes sharing one socket (``make run``). Everything lives in
a fresh temporary var folder (SQLite, local files) unless ``--var`` is given; ``--database-url``
serves from an empty Postgres database instead (files, cache and channel layer stay in the var folder). The script stops by
itself: every client loop is bounded by the deadline and by ``--max-requests``.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGET = "target: 50 clients, 0 errors, p99 < 100 ms"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare(*, clients: int, images: int, image_size: int, tile_size: int) -> tuple[int, list[str]]:
    """Migrate a fresh database and seed one project with ``clients`` annotators; returns (project id, tokens)."""
    import django

    django.setup()
    import numpy as np
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from PIL import Image as PILImage
    from rest_framework.authtoken.models import Token

    from backend.images.services import ingest_images
    from backend.images.validation import decode_image
    from backend.ml.workflows import run_ranking
    from backend.projects.models import Membership, Role
    from backend.projects.services import create_project

    call_command("migrate", "--noinput", verbosity=0)
    User = get_user_model()
    admin = User.objects.create_user("bench-admin", is_staff=True)
    project = create_project(name="Load benchmark", created_by=admin, tile_size=tile_size, auto_retrain_threshold=0)
    rng = np.random.default_rng(0)
    for i in range(images):
        buffer = io.BytesIO()
        PILImage.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)).save(buffer, "PNG")
        ingest_images(project=project, images=[decode_image(f"bench-{i}.png", buffer.getvalue())], uploaded_by=admin)
    run_ranking(project_id=project.pk)
    tokens = []
    for i in range(clients):
        user = User.objects.create_user(f"annotator-{i}")  # token auth only: no password hashing (1 s each here)
        Membership.objects.create(user=user, project=project, role=Role.ANNOTATOR)
        tokens.append(Token.objects.create(user=user).key)
    return project.pk, tokens


def server_command(kind: str, port: int, processes: int) -> tuple[list[str], socket.socket | None]:
    py = sys.executable
    if kind == "daphne":
        return [py, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "backend.karyo.asgi:application"], None
    if kind == "gunicorn":
        return [py, "-m", "gunicorn", "backend.karyo.asgi:application", "-k", "uvicorn_worker.UvicornWorker",
                "-w", str(processes), "-b", f"127.0.0.1:{port}", "--log-level", "warning"], None
    raise SystemExit(f"unknown server {kind}")


def empty_mask_png(size: int) -> bytes:
    import numpy as np
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.fromarray(np.zeros((size, size), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


async def annotator(client, base: str, project_id: int, token: str, deadline: float, max_requests: int,
                    mask: bytes, timings: dict, errors: dict) -> None:
    import httpx

    headers = {"Authorization": f"Token {token}"}
    sent = 0

    async def call(label: str, method: str, url: str, **kwargs):
        nonlocal sent
        sent += 1
        started = time.perf_counter()
        try:
            response = await client.request(method, base + url, headers=headers, **kwargs)
        except (httpx.HTTPError, OSError) as exc:  # a refused or reset connection is counted, not fatal
            errors[f"{label}: {type(exc).__name__}"] += 1
            return None
        timings[label].append(time.perf_counter() - started)
        if response.status_code >= 400:
            errors[f"{label}: HTTP {response.status_code}"] += 1
        return response

    while time.monotonic() < deadline and sent < max_requests:
        leased = await call("queue/next", "POST", f"/api/projects/{project_id}/queue/next/")
        if leased is None or leased.status_code != 200:
            await asyncio.sleep(0.05)
            continue
        tile = leased.json()["tile"]
        await call("tile image", "GET", f"/api/tiles/{tile}/image.png")
        await call("tile regions", "GET", f"/api/tiles/{tile}/regions/")
        if time.monotonic() >= deadline:
            break
        await call("submit", "POST", f"/api/tiles/{tile}/annotations/", files={"mask": ("m.png", mask, "image/png")})


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of ``pid`` and its children, from /proc (Linux); 0 where unreadable.
    Unlike latencies, this hardly depends on what else the machine runs."""
    total, todo, seen = 0.0, [pid], set()
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return total


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def drive(base: str, project_id: int, tokens: list[str], seconds: float, max_requests: int, tile_size: int):
    import httpx

    timings: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    mask = empty_mask_png(tile_size)
    limits = httpx.Limits(max_connections=len(tokens) + 5, max_keepalive_connections=len(tokens) + 5)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        started = time.monotonic()
        deadline = started + seconds
        await asyncio.gather(*(annotator(client, base, project_id, t, deadline, max_requests, mask, timings, errors)
                               for t in tokens))
        elapsed = time.monotonic() - started
    return timings, errors, elapsed


def report(timings: dict, errors: dict, elapsed: float, args) -> None:
    every = [t for values in timings.values() for t in values]
    total = len(every) + sum(errors.values()) - sum(v for k, v in errors.items() if "HTTP" in k)
    from django.db import connection

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{args.clients} clients, {elapsed:.1f} s, server={args.server}"
          f"{'' if args.server == 'daphne' else f' x{args.processes}'}, database={connection.vendor}, "
          f"cpus={os.cpu_count()}, load average at the end {load}")
    print(f"{'endpoint':<14} {'requests':>8} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7}")
    for label, values in sorted(timings.items()):
        print(f"{label:<14} {len(values):>8} {len(values) / elapsed:>7.1f} {1000 * percentile(values, 0.5):>7.0f} "
              f"{1000 * percentile(values, 0.99):>7.0f}")
    print(f"{'all':<14} {total:>8} {total / elapsed:>7.1f} {1000 * percentile(every, 0.5):>7.0f} "
          f"{1000 * percentile(every, 0.99):>7.0f}")
    print(f"errors: {sum(errors.values())} {dict(errors) if errors else ''}")
    print(f"mean {1000 * statistics.fmean(every):.0f} ms; {TARGET}; baseline (issue 13, daphne x1, 2-core machine): "
          "81.6 req/s, p50 572 ms, p99 942 ms, 0 errors")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--server", choices=["daphne", "gunicorn"], default="gunicorn")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--tile-size", type=int, default=64)
    parser.add_argument("--max-requests", type=int, default=10_000, help="per client")
    parser.add_argument("--var", help="var folder (default: a fresh temporary one)")
    parser.add_argument("--database-url", help="an empty database to seed and serve from instead of the var "
                        "folder's SQLite file, e.g. postgres://postgres@127.0.0.1:5432/karyo_load (created beforehand)")
    args = parser.parse_args()
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)

    var = Path(args.var or tempfile.mkdtemp(prefix="karyo-load-"))
    os.environ.update(KARYO_VAR_DIR=str(var), DJANGO_SETTINGS_MODULE="backend.karyo.settings")
    for key in ("DATABASE_URL", "KARYO_REDIS_URL", "CELERY_BROKER_URL"):
        os.environ.pop(key, None)
    if args.database_url:
        os.environ["DATABASE_URL"] = args.database_url
    t0 = time.monotonic()
    project_id, tokens = prepare(clients=args.clients, images=args.images, image_size=args.image_size,
                                 tile_size=args.tile_size)
    print(f"seeded project {project_id} with {args.clients} annotators in {time.monotonic() - t0:.0f}s ({var})")
    port = free_port()
    command, _ = server_command(args.server, port, args.processes)
    server = subprocess.Popen(command, cwd=ROOT, env=os.environ.copy(), stdout=subprocess.DEVNULL,
                              stderr=open(var / "server.log", "w"))  # noqa: SIM115 - lives as long as the server
    try:
        base = f"http://127.0.0.1:{port}"
        import urllib.request

        for _ in range(300):
            try:
                urllib.request.urlopen(base + "/healthz", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(f"the server exited: {(var / 'server.log').read_text()[-2000:]}") from None
                time.sleep(0.2)
        server_cpu = cpu_seconds(server.pid)
        timings, errors, elapsed = asyncio.run(drive(base, project_id, tokens, args.seconds, args.max_requests,
                                                     args.tile_size))
        server_cpu = cpu_seconds(server.pid) - server_cpu
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    report(timings, errors, elapsed, args)
    served = sum(len(v) for v in timings.values())
    if served:
        print(f"server CPU: {server_cpu:.1f} s in all, {1000 * server_cpu / served:.1f} ms per request "
              "(every web process; comparable across machine loads, unlike the latencies)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
