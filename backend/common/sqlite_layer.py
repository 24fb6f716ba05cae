"""A Channels layer on an SQLite file, for the embedded default.

The web server (Daphne) and the Celery worker are separate processes, so the in-memory layer
cannot carry a worker's progress to a browser. Redis does in production; without a server,
an SQLite file in WAL mode does: ``send``/``group_send`` insert rows, ``receive`` polls for
its channel (every 20 ms by default) and deletes what it takes. Messages are JSON, not pickle.
"""
from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    channel TEXT NOT NULL,
    body TEXT NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_channel ON messages (channel, id);
CREATE TABLE IF NOT EXISTS groups (
    name TEXT NOT NULL,
    channel TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (name, channel)
);
"""


# Seconds between two removals of expired group memberships (by one process).
GROUP_EXPIRY_INTERVAL = 60.0


class SQLiteChannelLayer(BaseChannelLayer):
    extensions = ["groups", "flush"]

    def __init__(self, path: str, expiry: int = 60, group_expiry: int = 86400, capacity: int = 1000,
                 poll_interval: float = 0.02, **kwargs):
        super().__init__(expiry=expiry, capacity=capacity, **kwargs)
        self.path = str(path)
        self.group_expiry = group_expiry
        self.poll_interval = poll_interval
        self._local = threading.local()
        self._groups_expired_at = 0.0
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    # --- blocking helpers, run in a thread -------------------------------------------------
    def _send_many(self, channels: list[str], message: dict) -> None:
        body = json.dumps(message)
        now = time.time()
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for channel in channels:
                queued = conn.execute(
                    "SELECT COUNT(*) FROM messages WHERE channel = ? AND expires > ?", (channel, now)
                ).fetchone()[0]
                if queued >= self.get_capacity(channel):
                    if len(channels) == 1:
                        raise ChannelFull(channel)
                    continue  # group sends drop for a full member, as the Redis layer does
                conn.execute("INSERT INTO messages (channel, body, expires) VALUES (?, ?, ?)", (channel, body, now + self.expiry))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _take(self, channel: str) -> dict | None:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(
                "SELECT id, body FROM messages WHERE channel = ? AND expires > ? ORDER BY id LIMIT 1", (channel, time.time())
            ).fetchone()
            if row is not None:
                conn.execute("DELETE FROM messages WHERE id = ?", (row[0],))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return json.loads(row[1]) if row else None

    def _group_members(self, group: str) -> list[str]:
        now = time.time()
        conn = self._conn()
        if now - self._groups_expired_at >= GROUP_EXPIRY_INTERVAL:
            # A write takes the file's lock, which every other publisher waits for: expired
            # memberships are removed once in a while, not on every send (the query skips them).
            self._groups_expired_at = now
            conn.execute("DELETE FROM groups WHERE expires <= ?", (now,))
        return [r[0] for r in conn.execute("SELECT channel FROM groups WHERE name = ? AND expires > ?", (group, now))]

    def group_send_blocking(self, group: str, message: dict) -> None:
        """``group_send`` for synchronous callers (a view, a task): the same rows written, without
        an event loop and a thread hop around them. Publishing with no member writes nothing."""
        assert self.require_valid_group_name(group)
        members = self._group_members(group)
        if members:
            self._send_many(members, message)

    def _expire(self) -> None:
        self._conn().execute("DELETE FROM messages WHERE expires <= ?", (time.time(),))

    # --- the channel layer API --------------------------------------------------------------
    async def send(self, channel: str, message: dict) -> None:
        assert isinstance(message, dict), "message is not a dict"
        assert self.require_valid_channel_name(channel), "channel name not valid"
        await asyncio.to_thread(self._send_many, [channel], message)

    async def receive(self, channel: str) -> dict:
        assert self.require_valid_channel_name(channel)
        polls = 0
        while True:
            message = await asyncio.to_thread(self._take, channel)
            if message is not None:
                return message
            polls += 1
            if polls % 500 == 0:
                await asyncio.to_thread(self._expire)
            await asyncio.sleep(self.poll_interval)

    async def new_channel(self, prefix: str = "specific") -> str:
        return f"{prefix}.sqlite!{uuid.uuid4().hex}"

    async def group_add(self, group: str, channel: str) -> None:
        assert self.require_valid_group_name(group) and self.require_valid_channel_name(channel)

        def add() -> None:
            self._conn().execute(
                "INSERT OR REPLACE INTO groups (name, channel, expires) VALUES (?, ?, ?)",
                (group, channel, time.time() + self.group_expiry),
            )

        await asyncio.to_thread(add)

    async def group_discard(self, group: str, channel: str) -> None:
        await asyncio.to_thread(
            lambda: self._conn().execute("DELETE FROM groups WHERE name = ? AND channel = ?", (group, channel))
        )

    async def group_send(self, group: str, message: dict) -> None:
        assert self.require_valid_group_name(group)

        await asyncio.to_thread(self.group_send_blocking, group, message)

    async def flush(self) -> None:
        await asyncio.to_thread(lambda: self._conn().executescript("DELETE FROM messages; DELETE FROM groups;"))
