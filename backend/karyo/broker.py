"""The embedded Celery broker: kombu's filesystem transport, with each message written under a
hidden name and renamed into place once complete.

kombu's own ``_put`` creates the message file, then takes an advisory lock and writes it, while
``_get`` renames and reads any file it lists, lock or not. A consumer that lists the folder
between the two reads an empty file, and the JSON error stops the worker (``make run`` restarts
it; the message is gone). On a loaded machine this happened within the first minute of the
loop-latency benchmark (tests/load/loop_latency.py). A rename is atomic on one filesystem:
readers see a whole message or none. Hidden names (``.<name>.part``) are skipped by ``_get``,
whose filter wants ``<anything>.<queue>.msg`` after the first dot.

Selected by ``CELERY_BROKER_TRANSPORT`` in settings when the broker URL is ``filesystem://``.
"""
from __future__ import annotations

import os
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        """Put ``payload`` onto ``queue``: written whole under a hidden name, then renamed."""
        filename = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, filename)
        partial = os.path.join(self.data_folder_out, f".{filename}.part")
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            try:
                os.remove(partial)
            except OSError:
                pass
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel
