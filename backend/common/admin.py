"""Read-mostly Django admin for operators: Karyo's own pages and API are where data changes
(they keep annotation versions append-only, publish events and enforce roles); the admin
site lets operators look things up and fix the odd field."""
from __future__ import annotations

from django.contrib import admin


class ReadOnlyAdmin(admin.ModelAdmin):
    """Lists, searches and shows every field; adds, changes and deletes nothing.
    ``editable`` names the few fields an operator may change."""

    editable: tuple[str, ...] = ()
    list_per_page = 50

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in self.model._meta.fields if f.name not in self.editable]

    def has_add_permission(self, request) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return bool(self.editable) and super().has_change_permission(request, obj)
