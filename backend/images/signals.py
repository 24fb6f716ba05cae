"""What the images app announces (Django signals). Higher apps subscribe in ``AppConfig.ready()``;
images never imports them. The list of events and their subscribers is in docs/architecture.md."""
from __future__ import annotations

from django.dispatch import Signal

# An annotation version was stored (not a bulk import) or reviewed, after its transaction
# committed. Arguments: ``annotation`` (the Annotation). Subscribers: ml (queue, correction
# effort, auto-retrain).
annotation_saved = Signal()
