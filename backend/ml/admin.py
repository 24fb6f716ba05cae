from django.contrib import admin

from backend.common.admin import ReadOnlyAdmin

from .models import ModelVersion, TrainingRun


@admin.register(TrainingRun)
class TrainingRunAdmin(ReadOnlyAdmin):
    list_display = ["pk", "project", "architecture", "status", "progress", "trigger", "started_by", "created_at"]
    list_filter = ["status", "architecture", "project"]
    search_fields = ["project__name", "error"]


@admin.register(ModelVersion)
class ModelVersionAdmin(ReadOnlyAdmin):
    list_display = ["__str__", "project", "version", "architecture", "status", "promoted_at", "created_at"]
    list_filter = ["status", "architecture", "project"]
    search_fields = ["project__name", "status_reason"]
