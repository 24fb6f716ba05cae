"""Load benchmark: N concurrent annotators against a real Karyo server on loopback.

Not a timed test: a script that prints its figures. Each simulated annotator loops for a fixed
time: lease the next tile (``POST queue/next/``), read the tile image and the regions the
editor opens, and submit an annotation; requests are timed one by one. With ``--think 0`` (the
default) every annotator sends its next request as soon as the last is answered, which saturates
the server: then the mean latency is clients / throughput (Little's law), whatever the code.

    .venv/bin/python -m tests.load.annotators --clients 50 --seconds 30 [--think 1] [--processes 2]

``--server gunicorn`` (default) is the production web server of ``make run`` and docker-compose
(``backend.karyo.runner.web_command``: ``--processes`` uvicorn workers under gunicorn);
``--server daphne`` one Daphne process (what ``make run`` used before issue 13). The client is
aiohttp on one event loop in this process; it shares the machine's cores with the server, and
its CPU time is printed. Everything lives in a fresh temporary var folder (SQLite, local files)
unless ``--var`` is given; ``--database-url`` serves from an empty Postgres database instead
(files, cache and channel layer stay in the var folder). The script stops by itself: every
client loop is bounded by the deadline and by ``--max-requests``.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
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
        from backend.karyo.runner import web_command

        return web_command(bind=f"127.0.0.1:{port}", processes=processes), None
    raise SystemExit(f"unknown server {kind}")


def empty_mask_png(size: int) -> bytes:
    import numpy as np
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.fromarray(np.zeros((size, size), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


async def annotator(session, base: str, project_id: int, token: str, deadline: float, max_requests: int,
                    mask: bytes, timings: dict, errors: dict, think: float = 0.0, measure_from: float = 0.0,
                    seed: int = 0) -> None:
    import aiohttp

    headers = {"Authorization": f"Token {token}"}
    sent = 0
    rng = random.Random(seed)
    if think:
        await asyncio.sleep(rng.uniform(0, think))  # annotators do not start in step

    async def call(label: str, method: str, url: str, **kwargs):
        nonlocal sent
        sent += 1
        counted = time.monotonic() >= measure_from  # requests of the warm-up are not counted
        started = time.perf_counter()
        try:
            async with session.request(method, base + url, headers=headers, **kwargs) as response:
                body = await response.read()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:  # counted, not fatal
            if counted:
                errors[f"{label}: {type(exc).__name__}"] += 1
            return None, None
        if counted:
            timings[label].append(time.perf_counter() - started)
            if response.status >= 400:
                errors[f"{label}: HTTP {response.status}"] += 1
        if think and time.monotonic() < deadline:  # exponential pauses: as from independent people, not in lockstep
            await asyncio.sleep(rng.expovariate(1 / think))
        return response.status, body

    while time.monotonic() < deadline and sent < max_requests:
        status, body = await call("queue/next", "POST", f"/api/projects/{project_id}/queue/next/")
        if status != 200:
            if status == 204:
                timings["(queue empty)"].append(0.0)  # counted apart below: a dry queue inflates req/s
            await asyncio.sleep(0.05)
            continue
        tile = json.loads(body)["tile"]
        await call("tile image", "GET", f"/api/tiles/{tile}/image.png")
        await call("tile regions", "GET", f"/api/tiles/{tile}/regions/")
        if time.monotonic() >= deadline:
            break
        form = aiohttp.FormData()
        form.add_field("mask", mask, filename="m.png", content_type="image/png")
        await call("submit", "POST", f"/api/tiles/{tile}/annotations/", data=form)


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


async def drive(base: str, project_id: int, tokens: list[str], seconds: float, max_requests: int, tile_size: int,
                think: float = 0.0, warmup: float = 0.0, server_pid: int | None = None):
    """Runs the annotators for ``warmup`` + ``seconds``; returns what the last ``seconds`` measured:
    timings, errors, elapsed seconds, and the server's and this process's CPU seconds meanwhile."""
    import aiohttp

    timings: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    mask = empty_mask_png(tile_size)
    cpu: dict[str, float] = {}

    async def snapshot_after_warmup() -> None:
        await asyncio.sleep(warmup)
        cpu["server"] = cpu_seconds(server_pid) if server_pid else 0.0
        cpu["client"] = time.process_time()

    # One connection per annotator at most, kept alive (the server keeps idle ones for 75 s).
    connector = aiohttp.TCPConnector(limit=len(tokens) + 5, keepalive_timeout=30)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        measure_from = time.monotonic() + warmup
        deadline = measure_from + seconds
        await asyncio.gather(snapshot_after_warmup(),
                             *(annotator(session, base, project_id, t, deadline, max_requests, mask, timings, errors,
                                         think, measure_from, seed=i) for i, t in enumerate(tokens)))
        elapsed = time.monotonic() - measure_from
    server_cpu = (cpu_seconds(server_pid) if server_pid else 0.0) - cpu["server"]
    return timings, errors, elapsed, server_cpu, time.process_time() - cpu["client"]


def report(timings: dict, errors: dict, elapsed: float, args) -> None:
    empty = len(timings.pop("(queue empty)", []))
    every = [t for values in timings.values() for t in values]
    total = len(every) + sum(errors.values()) - sum(v for k, v in errors.items() if "HTTP" in k)
    from django.db import connection

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{args.clients} clients, {elapsed:.1f} s, server={args.server}"
          f"{'' if args.server == 'daphne' else f' x{args.processes}'}, database={connection.vendor}, "
          f"cpus={os.cpu_count()}, think time {args.think:g} s, after {args.warmup:g} s of warm-up, "
          f"load average at the end {load}")
    print(f"{'endpoint':<14} {'requests':>8} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7}")
    for label, values in sorted(timings.items()):
        print(f"{label:<14} {len(values):>8} {len(values) / elapsed:>7.1f} {1000 * percentile(values, 0.5):>7.0f} "
              f"{1000 * percentile(values, 0.99):>7.0f}")
    print(f"{'all':<14} {total:>8} {total / elapsed:>7.1f} {1000 * percentile(every, 0.5):>7.0f} "
          f"{1000 * percentile(every, 0.99):>7.0f}")
    print(f"errors: {sum(errors.values())} {dict(errors) if errors else ''}")
    if empty:
        print(f"WARNING: {empty} leases found the queue empty (204); the figures include them: seed more tiles")
    print(f"mean {1000 * statistics.fmean(every):.0f} ms; {TARGET}; baseline (issue 13, daphne x1, 2-core machine): "
          "81.6 req/s, p50 572 ms, p99 942 ms, 0 errors")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--server", choices=["daphne", "gunicorn"], default="gunicorn")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=1024,
                        help="12 images of 1024 px hold 3,072 tiles of 64 px: the queue never runs dry in 30 s")
    parser.add_argument("--tile-size", type=int, default=64)
    parser.add_argument("--max-requests", type=int, default=10_000, help="per client")
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="seconds of load before the measured --seconds (first reads of each image, new "
                             "connections): not counted")
    parser.add_argument("--think", type=float, default=0.0,
                        help="mean seconds each annotator pauses after every response, exponentially distributed "
                             "(default 0: as fast as the server answers, which saturates it; a pathologist spends "
                             "seconds to minutes on a tile)")
    parser.add_argument("--var", help="var folder (default: a fresh temporary one)")
    parser.add_argument("--database-url", help="an empty database to seed and serve from instead of the var "
                        "folder's SQLite file, e.g. postgres://postgres@127.0.0.1:5432/karyo_load (created beforehand)")
    args = parser.parse_args()
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
        timings, errors, elapsed, server_cpu, client_cpu = asyncio.run(drive(
            base, project_id, tokens, args.seconds, args.max_requests, args.tile_size, args.think, args.warmup,
            server.pid))
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
              "(every web process; comparable across machine loads, unlike the latencies); "
              f"the load generator used {client_cpu:.1f} s of CPU on the same 2 cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
