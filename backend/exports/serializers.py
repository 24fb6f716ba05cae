from __future__ import annotations

from django.urls import reverse
from rest_framework import serializers

from backend.images.models import AnnotationStatus

from .models import Export, ExportFormat, ExportStatus


class ExportSerializer(serializers.ModelSerializer):
    created_by = serializers.CharField(source="created_by.username", default=None, read_only=True)
    download_url = serializers.SerializerMethodField()

    class Meta:
        model = Export
        fields = ["id", "project", "format", "filters", "status", "progress", "error", "manifest", "created_by",
                  "created_at", "finished_at", "download_url"]
        read_only_fields = fields

    def get_download_url(self, export: Export) -> str | None:
        if export.status != ExportStatus.SUCCEEDED or not export.file:
            return None
        return reverse("export-download", kwargs={"export_id": export.pk})


class ExportCreateSerializer(serializers.Serializer):
    format = serializers.ChoiceField(choices=ExportFormat.choices)
    filters = serializers.JSONField(
        required=False, default=dict,
        help_text='{"status": "reviewed"|"submitted"|"any", "annotators": [...], "date_from": "YYYY-MM-DD", '
                  '"date_to": "YYYY-MM-DD", "classes": [names or ids], "images": [ids or names], '
                  '"split": null | "frozen" | {"train": 0.7, "val": 0.15, "test": 0.15, "seed": 1, "stratify": false}, '
                  '"options": {"object_type": "annotation"|"detection", "image_url_prefix": "...", "tissue": "..."}}',
    )

    def validate_filters(self, value):
        if not isinstance(value, dict):
            raise serializers.ValidationError("filters must be an object")
        return value


class ImportSerializer(serializers.Serializer):
    file = serializers.FileField(allow_empty_file=True, help_text="A zip of a data set in any supported format.")
    format = serializers.ChoiceField(choices=ExportFormat.choices, required=False, allow_null=True, default=None,
                                     help_text="Default: detected from the archive.")
    status = serializers.ChoiceField(choices=[AnnotationStatus.SUBMITTED, AnnotationStatus.REVIEWED],
                                     default=AnnotationStatus.REVIEWED)
    onto_images = serializers.BooleanField(
        default=False, help_text="The zip holds QuPath GeoJSON / COCO nuclei in image coordinates for images already "
        "in the project (matched by checksum or name): they become versions of the tiles they cover.")


class ImportResultSerializer(serializers.Serializer):
    images = serializers.IntegerField()
    duplicates = serializers.IntegerField()
    tiles = serializers.IntegerField()
    annotations = serializers.IntegerField()
    nuclei = serializers.IntegerField()
    format = serializers.CharField()
    project = serializers.CharField()
    created_project = serializers.BooleanField()
