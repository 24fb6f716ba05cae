from django.contrib import admin

from backend.common.admin import ReadOnlyAdmin

from .models import Export


@admin.register(Export)
class ExportAdmin(ReadOnlyAdmin):
    list_display = ["pk", "project", "format", "status", "progress", "created_by", "created_at", "finished_at"]
    list_filter = ["format", "status", "project"]
    search_fields = ["project__name", "error"]
