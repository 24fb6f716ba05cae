from django.contrib import admin

from backend.common.admin import ReadOnlyAdmin

from .models import Annotation, Image


@admin.register(Image)
class ImageAdmin(ReadOnlyAdmin):
    list_display = ["name", "project", "width", "height", "format", "split", "uploaded_by", "created_at"]
    list_filter = ["project", "split", "format"]
    search_fields = ["name", "project__name"]


@admin.register(Annotation)
class AnnotationAdmin(ReadOnlyAdmin):
    list_display = ["__str__", "tile", "source", "status", "nucleus_count", "author", "reviewed_by", "created_at"]
    list_filter = ["status", "source", "tile__project"]
    search_fields = ["author__username", "tile__image__name"]
    raw_id_fields = ["tile", "parent", "prediction"]
