"""The embedded broker never hands a consumer a message that is still being written."""
from __future__ import annotations

import pytest
from kombu import Connection

from backend.karyo import broker
from tests.conftest import SERVICES

pytestmark = pytest.mark.skipif(SERVICES, reason="the embedded broker runs without KARYO_TEST_SERVICES")


def test_the_app_uses_the_whole_message_transport():
    from backend.karyo.celery import app

    with app.connection_for_write() as connection:
        assert isinstance(connection.default_channel, broker.Channel)


def test_a_consumer_listing_the_folder_mid_write_sees_no_message_then_the_whole_one(tmp_path, monkeypatch):
    options = {"data_folder_in": str(tmp_path), "data_folder_out": str(tmp_path), "store_processed": False}
    with Connection("filesystem://", transport=broker.Transport, transport_options=options) as connection:
        channel = connection.default_channel
        seen = []
        real_dumps = broker.dumps

        def dumps_while_a_consumer_polls(payload):
            # The moment between the producer opening its file and writing it: kombu's own
            # transport showed the consumer an empty file here, and its JSON error stopped the worker.
            try:
                seen.append(channel._get("q"))
            except Exception as exc:  # noqa: BLE001 - the kind of failure is what the test looks at
                seen.append(type(exc).__name__)
            return real_dumps(payload)

        monkeypatch.setattr(broker, "dumps", dumps_while_a_consumer_polls)
        channel._put("q", {"body": "hello"})
        assert seen == ["Empty"]
        assert channel._get("q") == {"body": "hello"}
        assert list(tmp_path.iterdir()) == []
