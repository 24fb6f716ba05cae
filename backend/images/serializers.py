from __future__ import annotations

from django.urls import reverse
from rest_framework import serializers

from .models import Annotation, AnnotationStatus, Image, Tile


class ImageSerializer(serializers.ModelSerializer):
    tile_count = serializers.SerializerMethodField()
    uploaded_by = serializers.CharField(source="uploaded_by.username", default=None, read_only=True)
    thumbnail_url = serializers.SerializerMethodField()

    class Meta:
        model = Image
        fields = ["id", "project", "name", "sha256", "format", "width", "height", "microns_per_pixel",
                  "uploaded_by", "created_at", "tile_count", "state", "state_reason", "ingest_progress", "kind",
                  "levels", "tiles_grid", "tiles_kept", "thumbnail_url"]
        read_only_fields = fields

    def get_tile_count(self, image: Image) -> int:
        return image.tiles.count()

    def get_thumbnail_url(self, image: Image) -> str | None:
        if not image.thumbnail:
            return None
        return reverse("image-thumbnail", kwargs={"image_id": image.pk})


class UploadSerializer(serializers.Serializer):
    file = serializers.FileField(allow_empty_file=True, help_text="PNG, JPEG, TIFF, or a zip of them.")
    microns_per_pixel = serializers.FloatField(required=False, min_value=0.01, max_value=100.0)


class UploadResultSerializer(serializers.Serializer):
    images = ImageSerializer(many=True)
    created = serializers.IntegerField()
    duplicates = serializers.IntegerField()


class TileSerializer(serializers.ModelSerializer):
    image_name = serializers.CharField(source="image.name", read_only=True)
    latest_annotation_id = serializers.IntegerField(read_only=True, default=None, allow_null=True)
    latest_version = serializers.IntegerField(read_only=True, default=None, allow_null=True)
    annotation_status = serializers.CharField(read_only=True, default=None, allow_null=True)

    class Meta:
        model = Tile
        fields = ["id", "project", "image", "image_name", "x", "y", "w", "h",
                  "latest_annotation_id", "latest_version", "annotation_status"]
        read_only_fields = fields


class AnnotationSerializer(serializers.ModelSerializer):
    author = serializers.CharField(source="author.username", default=None, read_only=True)
    reviewed_by = serializers.CharField(source="reviewed_by.username", default=None, read_only=True, allow_null=True)

    class Meta:
        model = Annotation
        fields = ["id", "tile", "version", "source", "status", "author", "parent", "prediction", "nucleus_count",
                  "classes", "reviewed_by", "reviewed_at", "review_comment", "created_at"]
        read_only_fields = fields


class AnnotationCreateSerializer(serializers.Serializer):
    mask = serializers.FileField(allow_empty_file=True, help_text="16-bit (or 8-bit) PNG instance label map of the tile.")
    status = serializers.ChoiceField(choices=[AnnotationStatus.DRAFT, AnnotationStatus.SUBMITTED], default=AnnotationStatus.SUBMITTED)
    parent = serializers.IntegerField(required=False)
    classes = serializers.JSONField(required=False, help_text='{"<instance id>": <class id>}')


class ReviewSerializer(serializers.Serializer):
    decision = serializers.ChoiceField(choices=["accept", "reject"])
    comment = serializers.CharField(required=False, allow_blank=True, default="")


class ChunkedUploadCreateSerializer(serializers.Serializer):
    filename = serializers.CharField(max_length=255)
    size = serializers.IntegerField(min_value=1)
    microns_per_pixel = serializers.FloatField(required=False, min_value=0.01, max_value=100.0)


class ChunkedUploadSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    filename = serializers.CharField()
    size = serializers.IntegerField()
    chunk_size = serializers.IntegerField()
    mode = serializers.ChoiceField(choices=["local", "s3"])
    received = serializers.ListField(child=serializers.IntegerField())
    bytes_received = serializers.IntegerField()
    state = serializers.CharField()


class PartUrlsRequestSerializer(serializers.Serializer):
    parts = serializers.ListField(child=serializers.IntegerField(min_value=0), max_length=10_000)


class CompletedPartSerializer(serializers.Serializer):
    n = serializers.IntegerField(min_value=0)
    etag = serializers.CharField(max_length=200)


class UploadCompleteSerializer(serializers.Serializer):
    parts = CompletedPartSerializer(many=True, required=False)


class SlideTileSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    x = serializers.IntegerField()
    y = serializers.IntegerField()
    w = serializers.IntegerField()
    h = serializers.IntegerField()
    status = serializers.CharField()
    score = serializers.FloatField(allow_null=True)


class NucleusSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    tile_id = serializers.IntegerField()
    class_id = serializers.IntegerField()
    source = serializers.ChoiceField(choices=["annotation", "prediction"])
    polygon = serializers.ListField(child=serializers.ListField(child=serializers.FloatField()))


class NucleiSerializer(serializers.Serializer):
    source = serializers.ChoiceField(choices=["annotation", "prediction", "mixed"], allow_null=True)
    nuclei = NucleusSerializer(many=True)
    truncated = serializers.BooleanField()
