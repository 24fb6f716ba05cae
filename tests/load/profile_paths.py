"""Profile the annotator's hot paths in process (no server): queries, wall and CPU time, and the time
spent holding the database write transaction, per request, for lease / tile image / regions / submit.

    .venv/bin/python -m tests.load.profile_paths --rounds 20 [--cprofile submit] [--database-url postgres://...]

A fresh temporary var folder is seeded like ``tests.load.annotators`` (SQLite by default; with
``--database-url`` a Postgres database that must exist and be empty). Not a test: it prints figures.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path


class WriteClock:
    """Seconds between each BEGIN (or first write under autocommit) and its COMMIT/ROLLBACK."""

    def __init__(self, connection) -> None:
        self.connection = connection
        self.total = 0.0
        self.opened: float | None = None

    def __call__(self, execute, sql, params, many, context):
        head = sql.lstrip()[:12].upper()
        if head.startswith("BEGIN") or (self.opened is None and head.startswith(("INSERT", "UPDATE", "DELETE"))
                                        and not self.connection.in_atomic_block):
            started = time.perf_counter()
            try:
                return execute(sql, params, many, context)
            finally:
                if head.startswith("BEGIN"):
                    self.opened = started
                else:  # an autocommit write holds the lock for its own statement only
                    self.total += time.perf_counter() - started
        return execute(sql, params, many, context)

    def install(self) -> None:
        self.connection.execute_wrappers.append(self)
        clock = self
        original_commit, original_rollback = self.connection.commit, self.connection.rollback
        original_start = getattr(self.connection, "_start_transaction_under_autocommit", None)

        def closing(method):
            def wrapped(*args, **kwargs):
                try:
                    return method(*args, **kwargs)
                finally:
                    if clock.opened is not None:
                        clock.total += time.perf_counter() - clock.opened
                        clock.opened = None
            return wrapped

        self.connection.commit = closing(original_commit)
        self.connection.rollback = closing(original_rollback)
        if original_start is None or self.connection.vendor != "sqlite":
            # Postgres: psycopg opens the transaction implicitly; count from the first statement of
            # an atomic block (set_autocommit(False)) to the commit.
            original_set_autocommit = self.connection.set_autocommit

            def set_autocommit(autocommit, *args, **kwargs):
                if not autocommit:
                    clock.opened = time.perf_counter()
                return original_set_autocommit(autocommit, *args, **kwargs)

            self.connection.set_autocommit = set_autocommit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--images", type=int, default=12, help="512x512 images of 64 px tiles (12: the load benchmark)")
    parser.add_argument("--cprofile", choices=["queue/next", "tile image", "tile regions", "submit"], action="append",
                        default=[])
    parser.add_argument("--database-url")
    parser.add_argument("--var")
    args = parser.parse_args()
    var = Path(args.var or tempfile.mkdtemp(prefix="karyo-profile-"))
    os.environ.update(KARYO_VAR_DIR=str(var), DJANGO_SETTINGS_MODULE="backend.karyo.settings")
    for key in ("DATABASE_URL", "KARYO_REDIS_URL", "CELERY_BROKER_URL"):
        os.environ.pop(key, None)
    if args.database_url:
        os.environ["DATABASE_URL"] = args.database_url

    from tests.load.annotators import empty_mask_png, prepare

    project_id, tokens = prepare(clients=args.clients, images=args.images, image_size=512, tile_size=64)
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from rest_framework.test import APIClient

    clock = WriteClock(connection)
    clock.install()
    mask = empty_mask_png(64)
    figures: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    profiles = {label: cProfile.Profile() for label in args.cprofile}
    clients = []
    for token in tokens:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
        clients.append(client)

    def timed(label: str, call):
        clock.total = 0.0
        profile = profiles.get(label)
        with CaptureQueriesContext(connection) as queries:
            started, cpu = time.perf_counter(), time.process_time()
            if profile is not None:
                profile.enable()
            response = call()
            if profile is not None:
                profile.disable()
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        assert response.status_code < 400, (label, response.status_code, getattr(response, "data", None))
        figures[label]["ms"].append(1000 * elapsed)
        figures[label]["cpu ms"].append(1000 * cpu)
        figures[label]["queries"].append(len(queries))
        figures[label]["write ms"].append(1000 * clock.total)
        if os.environ.get("KARYO_PROFILE_SQL") and len(figures[label]["ms"]) == 3:
            print(f"--- {label}")
            for q in queries.captured_queries:
                print("   ", q["time"], q["sql"][:300])
        return response

    for _ in range(args.rounds):
        for client in clients:
            leased = timed("queue/next", lambda c=client: c.post(f"/api/projects/{project_id}/queue/next/"))
            tile = leased.json()["tile"]
            timed("tile image", lambda c=client, t=tile: c.get(f"/api/tiles/{t}/image.png"))
            timed("tile regions", lambda c=client, t=tile: c.get(f"/api/tiles/{t}/regions/"))
            timed("submit", lambda c=client, t=tile: c.post(f"/api/tiles/{t}/annotations/", {"mask": _upload(mask)},
                                                            format="multipart"))
    print(f"{connection.vendor}, {args.rounds} rounds x {args.clients} annotators, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'endpoint':<14} {'queries':>8} {'p50 ms':>7} {'mean ms':>8} {'CPU ms (p50)':>13} "
          f"{'write-lock ms (p50)':>20} {'(mean)':>7}")
    for label, values in figures.items():
        print(f"{label:<14} {max(values['queries']):>8.0f} {statistics.median(values['ms']):>7.1f} "
              f"{statistics.fmean(values['ms']):>8.1f} {statistics.median(values['cpu ms']):>13.1f} "
              f"{statistics.median(values['write ms']):>20.2f} {statistics.fmean(values['write ms']):>7.2f}")
    for label, profile in profiles.items():
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats(os.environ.get("KARYO_PROFILE_SORT", "cumulative")).print_stats(45)
        print(f"\n=== cProfile {label}\n{out.getvalue()}")
    return 0


def _upload(data: bytes):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile("m.png", data, content_type="image/png")


if __name__ == "__main__":
    sys.exit(main())
