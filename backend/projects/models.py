from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models

from ml_worker import catalog


def default_nucleus_classes() -> list[dict]:
    return [{"id": 1, "name": "nucleus", "color": "#e6194b"}]


def validate_nucleus_classes(value: object) -> None:
    if not isinstance(value, list) or not value:
        raise ValidationError("nucleus_classes must be a non-empty list")
    seen_ids: set[int] = set()
    seen_names: set[str] = set()
    for item in value:
        if not isinstance(item, dict) or not {"id", "name", "color"} <= item.keys():
            raise ValidationError("each nucleus class needs id, name and color")
        if not isinstance(item["id"], int) or not 1 <= item["id"] <= 255:
            raise ValidationError("class ids are integers from 1 to 255 (0 is background)")
        color = str(item["color"])
        if len(color) != 7 or not color.startswith("#") or any(c not in "0123456789abcdefABCDEF" for c in color[1:]):
            raise ValidationError(f"class colour {color!r} is not #rrggbb")
        if item["id"] in seen_ids or item["name"] in seen_names:
            raise ValidationError("class ids and names must be unique")
        seen_ids.add(item["id"])
        seen_names.add(item["name"])


def engine_setting_errors(**fields: Any) -> dict[str, str]:
    """``{field: message}`` for the given project fields that the engine catalog refuses
    (``default_architecture``, ``al_strategy``, ``stain_normalization``, ``training_defaults``);
    each message names the valid values. Training defaults are checked against the default
    architecture when it is given and valid."""
    checks = {
        "default_architecture": catalog.validate_architecture,
        "al_strategy": catalog.validate_strategy,
        "stain_normalization": catalog.validate_stain_normalizer,
    }
    errors: dict[str, str] = {}
    for name, check in checks.items():
        if name in fields:
            try:
                check(fields[name], field=name)
            except catalog.CatalogError as exc:
                errors[name] = str(exc)
    if "training_defaults" in fields:
        arch = fields.get("default_architecture")
        arch = arch if arch in catalog.architecture_names() else None
        try:
            catalog.validate_training_options(fields["training_defaults"], architecture=arch)
        except catalog.CatalogError as exc:
            errors["training_defaults"] = str(exc)
    return errors


class Role(models.TextChoices):
    VIEWER = "viewer", "Viewer"
    ANNOTATOR = "annotator", "Annotator"
    REVIEWER = "reviewer", "Reviewer"
    ADMIN = "admin", "Admin"


ROLE_RANK = {Role.VIEWER: 0, Role.ANNOTATOR: 1, Role.REVIEWER: 2, Role.ADMIN: 3}


# The engine catalog's normalisers (a new one there needs a migration here: the choices are stored in it).
StainNormalization = models.TextChoices(
    "StainNormalization", [(choice.name.upper(), (choice.name, choice.label)) for choice in catalog.STAIN_NORMALIZERS]
)


class Project(models.Model):
    name = models.CharField(max_length=200, unique=True)
    description = models.TextField(blank=True)
    nucleus_classes = models.JSONField(default=default_nucleus_classes, validators=[validate_nucleus_classes])
    tile_size = models.PositiveIntegerField(default=256)
    tile_overlap = models.PositiveIntegerField(default=0)
    stain_normalization = models.CharField(max_length=16, choices=StainNormalization.choices, default=StainNormalization.NONE)
    auto_retrain_threshold = models.PositiveIntegerField(
        default=20, help_text="Newly accepted annotations that start a training run by themselves (0 = off)."
    )
    default_architecture = models.CharField(max_length=32, default=catalog.DEFAULT_ARCHITECTURE)
    al_strategy = models.CharField(max_length=32, default=catalog.DEFAULT_STRATEGY)
    ssl_pretrain = models.BooleanField(
        default=False,
        help_text="Pretrain the model's encoder self-supervised on the project's own unlabelled tiles (SimSiam): "
        "its features rank the first queue and its weights start the first training run.",
    )
    require_review = models.BooleanField(
        default=False, help_text="Train only on reviewed annotations (otherwise submitted ones count too)."
    )
    licence = models.CharField(max_length=200, blank=True)
    context_margin = models.PositiveIntegerField(
        default=64, help_text="Pixels of surrounding image shown around a tile in the workspace."
    )
    working_mpp = models.FloatField(
        default=0.5,
        help_text="Working resolution in microns per pixel: slides scanned at another resolution are resampled to it; "
        "images without a resolution in their metadata are taken to be at this one.",
    )
    min_tissue_fraction = models.FloatField(
        default=0.05, help_text="A tile becomes a unit of work only when at least this fraction of it is tissue."
    )
    archived_at = models.DateTimeField(null=True, blank=True, help_text="When the project was archived (read-only).")
    training_defaults = models.JSONField(
        default=dict, blank=True, help_text="TrainConfig overrides used by every run of this project (epochs, width, ...)."
    )
    validation_frozen_at = models.DateTimeField(
        null=True, blank=True, help_text="When the by-image validation split was frozen (first training run)."
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if self.tile_size < 32 or self.tile_size > 4096:
            raise ValidationError({"tile_size": "tile size must be between 32 and 4096 pixels"})
        if self.tile_overlap >= self.tile_size:
            raise ValidationError({"tile_overlap": "overlap must be smaller than the tile size"})
        if self.context_margin > 1024:
            raise ValidationError({"context_margin": "context margin must be between 0 and 1024 pixels"})
        if not 0.05 <= self.working_mpp <= 20:
            raise ValidationError({"working_mpp": "working resolution must be between 0.05 and 20 microns per pixel"})
        if not 0 <= self.min_tissue_fraction <= 1:
            raise ValidationError({"min_tissue_fraction": "minimum tissue fraction must be between 0 and 1"})
        errors = engine_setting_errors(
            default_architecture=self.default_architecture, al_strategy=self.al_strategy,
            stain_normalization=self.stain_normalization, training_defaults=self.training_defaults,
        )
        if errors:
            raise ValidationError(errors)


class Membership(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "project"], name="unique_membership")]
        ordering = ["project_id", "user_id"]

    def __str__(self) -> str:
        return f"{self.user} is {self.role} of {self.project}"
