"""What the projects app asks of the apps above it (Django signals; they subscribe in
``AppConfig.ready()``, projects never imports them)."""
from __future__ import annotations

from django.dispatch import Signal

# An admin is about to remove nucleus classes. Arguments: ``project``, ``class_ids`` (set of
# ints). Each receiver returns the subset its data still uses (images: annotation class maps);
# a class in use is not removed.
class_usage = Signal()

# A project's members changed (added, invited, role changed, removed), after the change committed.
# Arguments: ``project``. Subscribers: labelstudio (a Label Studio user per editing member).
members_changed = Signal()
