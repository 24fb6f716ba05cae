from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from backend.projects.models import Project


class Split(models.TextChoices):
    UNASSIGNED = "", "Unassigned"
    TRAIN = "train", "Train"
    VAL = "val", "Validation"


class ImageState(models.TextChoices):
    INGESTING = "ingesting", "Ingesting"
    READY = "ready", "Ready"
    FAILED = "failed", "Failed"


class ImageKind(models.TextChoices):
    SLIDE = "slide", "Whole-slide image (pyramid)"
    IMAGE = "image", "Single image"


class Image(models.Model):
    """An uploaded slide or image region. Files are content-addressed, so the same bytes are stored once.

    ``width``/``height`` are level-0 pixels (0 until ingest has read the header). Tiles are cut in
    the background (``state``): their pixels are read from ``file`` on demand (``pixels.py``).
    """

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="images")
    name = models.CharField(max_length=255)
    file = models.FileField(max_length=255)
    sha256 = models.CharField(max_length=64, db_index=True)
    format = models.CharField(max_length=8)
    width = models.PositiveIntegerField(default=0)
    height = models.PositiveIntegerField(default=0)
    microns_per_pixel = models.FloatField(
        null=True, blank=True, help_text="Level-0 resolution from the file's metadata (or the uploader); "
        "None: taken to be the project's working resolution."
    )
    state = models.CharField(max_length=16, choices=ImageState.choices, default=ImageState.READY)
    state_reason = models.CharField(max_length=500, blank=True, default="")
    ingest_progress = models.FloatField(default=1.0)
    kind = models.CharField(max_length=8, choices=ImageKind.choices, default=ImageKind.IMAGE)
    levels = models.PositiveIntegerField(default=1)
    tiles_grid = models.PositiveIntegerField(default=0, help_text="Tiles in the whole grid over the image.")
    tiles_kept = models.PositiveIntegerField(default=0, help_text="Grid tiles with enough tissue to become Tile rows.")
    thumbnail = models.FileField(max_length=255, blank=True, default="")
    split = models.CharField(max_length=8, choices=Split.choices, default=Split.UNASSIGNED, blank=True)
    uploaded_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "sha256"], name="unique_image_bytes_per_project")]
        ordering = ["id"]

    def __str__(self) -> str:
        return self.name


class Tile(models.Model):
    """A region of an image that is annotated and predicted as one unit.

    ``x``, ``y``: the tile's origin in level-0 pixels of the image. ``w``, ``h``: its size in pixels
    at the project's working resolution (the shape of its pixel array and of its annotation masks).
    On an image whose level-0 resolution equals the working one (every image without MPP metadata)
    the two grids coincide; otherwise the tile covers ``w * working_mpp / image_mpp`` level-0 pixels.
    """

    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="tiles")
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="tiles")
    x = models.PositiveIntegerField()
    y = models.PositiveIntegerField()
    w = models.PositiveIntegerField()
    h = models.PositiveIntegerField()
    file = models.FileField(
        max_length=255, blank=True, default="",
        help_text="Legacy: tiles cut before slides were read on demand kept their pixels as a PNG here. "
        "New tiles leave it empty; read pixels with backend.images.pixels.read_tile_rgb.",
    )

    class Meta:
        constraints = [models.UniqueConstraint(fields=["image", "x", "y", "w", "h"], name="unique_tile_region")]
        ordering = ["image_id", "y", "x"]

    def __str__(self) -> str:
        return f"{self.image.name}[{self.x},{self.y} {self.w}x{self.h}]"


class AnnotationSource(models.TextChoices):
    MANUAL = "manual", "Manual"
    CORRECTED_PREDICTION = "corrected_prediction", "Corrected prediction"
    IMPORTED = "imported", "Imported"


class AnnotationStatus(models.TextChoices):
    DRAFT = "draft", "Draft"
    SUBMITTED = "submitted", "Submitted"
    REVIEWED = "reviewed", "Reviewed"
    REJECTED = "rejected", "Rejected"


class AppendOnlyViolation(Exception):
    """Raised when code tries to change the pixels or lineage of a stored annotation version."""


class Annotation(models.Model):
    """One version of a tile's nucleus instance label map (16-bit PNG in storage).

    Append-only: a correction creates a new version whose ``parent`` is the one it corrects.
    Only the review fields may change after creation; nothing is deleted.
    """

    REVIEW_FIELDS = frozenset({"status", "reviewed_by", "reviewed_at", "review_comment"})

    tile = models.ForeignKey(Tile, on_delete=models.CASCADE, related_name="annotations")
    version = models.PositiveIntegerField()
    mask = models.FileField(max_length=255, help_text="The version's label map over the tile's own box (h, w).")
    # Issue 12: a version made in the workspace's context frame keeps the nuclei the tile owns
    # (centroid inside the tile) whole, including their parts in the margin. Empty on older rows
    # (and imports): the version is its tile box only.
    context_mask = models.FileField(
        max_length=255, blank=True, default="",
        help_text="The owned nuclei whole: a label map whose origin is (context_x, context_y) from the tile's origin; "
        "empty: the version covers the tile box only (mask).",
    )
    context_x = models.IntegerField(default=0, help_text="context_mask's left edge minus the tile's (working px, <= 0).")
    context_y = models.IntegerField(default=0, help_text="context_mask's top edge minus the tile's (working px, <= 0).")
    classes = models.JSONField(default=dict, blank=True, help_text="Instance id -> nucleus class id.")
    nucleus_count = models.PositiveIntegerField(default=0)
    source = models.CharField(max_length=24, choices=AnnotationSource.choices)
    status = models.CharField(max_length=16, choices=AnnotationStatus.choices, default=AnnotationStatus.SUBMITTED)
    author = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="annotations")
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT, related_name="children")
    prediction = models.ForeignKey(
        "ml.Prediction", null=True, blank=True, on_delete=models.SET_NULL, related_name="corrections"
    )
    external_id = models.CharField(
        max_length=128, blank=True, default="", help_text="Id in an external tool (Label Studio), for idempotent sync."
    )
    reviewed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    reviewed_at = models.DateTimeField(null=True, blank=True)
    review_comment = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tile", "version"], name="unique_annotation_version"),
            models.UniqueConstraint(
                fields=["tile", "external_id"], condition=~models.Q(external_id=""), name="unique_external_annotation"
            ),
        ]
        ordering = ["tile_id", "version"]

    def __str__(self) -> str:
        return f"annotation v{self.version} of tile {self.tile_id}"

    def save(self, *args, **kwargs) -> None:
        if self.pk is not None:
            update_fields = kwargs.get("update_fields")
            if update_fields is None or not set(update_fields) <= self.REVIEW_FIELDS | {"updated_at"}:
                raise AppendOnlyViolation(
                    "annotation versions are append-only: save(update_fields=...) may only change review fields"
                )
            kwargs["update_fields"] = set(update_fields) | {"updated_at"}
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise AppendOnlyViolation("annotation versions are never deleted")


class UploadState(models.TextChoices):
    RECEIVING = "receiving", "Receiving"
    COMPLETE = "complete", "Complete"


class Upload(models.Model):
    """A chunked, resumable upload of one file: parts land under ``uploads/<id>/`` (local storage)
    or in an S3 multipart upload, and ``complete`` assembles them into an Image."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="uploads")
    filename = models.CharField(max_length=255)
    size = models.PositiveBigIntegerField()
    chunk_size = models.PositiveIntegerField()
    mode = models.CharField(max_length=8, default="local")
    s3_key = models.CharField(max_length=512, blank=True, default="")
    s3_upload_id = models.CharField(max_length=512, blank=True, default="")
    state = models.CharField(max_length=16, choices=UploadState.choices, default=UploadState.RECEIVING)
    image = models.ForeignKey(Image, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at"]

    @property
    def chunk_count(self) -> int:
        return max(1, -(-self.size // self.chunk_size))
