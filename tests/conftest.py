"""Shared test set-up.

``KARYO_TEST_SERVICES=1`` (set by ``.ci/run``) means the real services must be used and a
missing one is a failure: the Makefile points DATABASE_URL and KARYO_REDIS_URL at the local
Postgres and Redis, and the fixtures below put every file on a real S3-compatible server
(moto in server mode on loopback) instead of the local disk.
"""
from __future__ import annotations

import os

SERVICES = os.environ.get("KARYO_TEST_SERVICES") == "1"


def pytest_report_header(config):
    return f"karyo services mode: {'ON (Postgres, Redis, S3)' if SERVICES else 'off (SQLite, local files)'}"
