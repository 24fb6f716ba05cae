"""What the ml app announces (Django signals). Higher apps subscribe in ``AppConfig.ready()``;
ml never imports them. The list of events and their subscribers is in docs/architecture.md."""
from __future__ import annotations

from django.dispatch import Signal

# The ranked queue of a project was rebuilt. Sent inside the ranking transaction, so a subscriber
# that enqueues work uses ``transaction.on_commit``. Arguments: ``project``, ``strategy``,
# ``model_version`` (None for the random order before a first model). Subscribers: labelstudio
# (push the new order to Label Studio as prediction scores).
queue_ranked = Signal()
