from __future__ import annotations

from rest_framework import serializers

from .models import Annotation, AnnotationStatus, Image, Tile


class ImageSerializer(serializers.ModelSerializer):
    tile_count = serializers.SerializerMethodField()
    uploaded_by = serializers.CharField(source="uploaded_by.username", default=None, read_only=True)

    class Meta:
        model = Image
        fields = ["id", "project", "name", "sha256", "format", "width", "height", "microns_per_pixel",
                  "uploaded_by", "created_at", "tile_count"]
        read_only_fields = fields

    def get_tile_count(self, image: Image) -> int:
        return image.tiles.count()


class UploadSerializer(serializers.Serializer):
    file = serializers.FileField(allow_empty_file=True, help_text="PNG, JPEG, TIFF, or a zip of them.")
    microns_per_pixel = serializers.FloatField(required=False, min_value=0.01, max_value=100.0)


class UploadResultSerializer(serializers.Serializer):
    images = ImageSerializer(many=True)
    created = serializers.IntegerField()
    duplicates = serializers.IntegerField()


class TileSerializer(serializers.ModelSerializer):
    image_name = serializers.CharField(source="image.name", read_only=True)
    latest_annotation_id = serializers.IntegerField(read_only=True, default=None)
    latest_version = serializers.IntegerField(read_only=True, default=None)
    annotation_status = serializers.CharField(read_only=True, default=None)

    class Meta:
        model = Tile
        fields = ["id", "project", "image", "image_name", "x", "y", "w", "h",
                  "latest_annotation_id", "latest_version", "annotation_status"]
        read_only_fields = fields


class AnnotationSerializer(serializers.ModelSerializer):
    author = serializers.CharField(source="author.username", default=None, read_only=True)
    reviewed_by = serializers.CharField(source="reviewed_by.username", default=None, read_only=True)

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
