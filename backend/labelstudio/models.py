"""The link between a Karyo project and its Label Studio project, and what the sync remembers.

Karyo is the source of truth; Label Studio is the editing surface. Every id Label Studio gave
us is kept here, so that a sync can be repeated at any time without creating duplicates.
"""
from __future__ import annotations

from django.conf import settings
from django.db import models

from backend.images.models import Annotation, Tile
from backend.ml.models import Prediction
from backend.projects.models import Project


class LabelStudioLink(models.Model):
    """One Label Studio project per Karyo project, with its webhook, ML backend and sync state."""

    project = models.OneToOneField(Project, on_delete=models.CASCADE, related_name="label_studio")
    ls_project_id = models.PositiveIntegerField(null=True, blank=True, unique=True)
    webhook_id = models.PositiveIntegerField(null=True, blank=True)
    ml_backend_id = models.PositiveIntegerField(null=True, blank=True)
    label_config_sha = models.CharField(max_length=64, blank=True)
    model_version = models.CharField(max_length=64, blank=True, help_text="Model version shown as pre-annotations.")
    reconciled_until = models.DateTimeField(
        null=True, blank=True, help_text="Label Studio's task updated_at up to which annotations were pulled."
    )
    last_synced_at = models.DateTimeField(null=True, blank=True)
    sync_lock_until = models.DateTimeField(null=True, blank=True, help_text="Lease of the running sync.")
    last_error = models.TextField(blank=True)
    last_error_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.project} <-> Label Studio project {self.ls_project_id}"


class TaskLink(models.Model):
    """A tile as a Label Studio task."""

    link = models.ForeignKey(LabelStudioLink, on_delete=models.CASCADE, related_name="tasks")
    tile = models.ForeignKey(Tile, on_delete=models.CASCADE, related_name="+")
    ls_task_id = models.PositiveIntegerField()
    url_signed_at = models.DateTimeField(help_text="When the image URL in the task data was signed.")
    ls_updated_at = models.DateTimeField(
        null=True, blank=True, help_text="The task's updated_at in Label Studio when the reconcile last read its annotations."
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["link", "tile"], name="unique_task_per_tile"),
            models.UniqueConstraint(fields=["link", "ls_task_id"], name="unique_ls_task"),
        ]


class PushedPrediction(models.Model):
    """The Label Studio prediction that shows a Karyo prediction on a task (one per task)."""

    task = models.OneToOneField(TaskLink, on_delete=models.CASCADE, related_name="pushed")
    prediction = models.ForeignKey(Prediction, null=True, on_delete=models.SET_NULL, related_name="+")
    ls_prediction_id = models.PositiveIntegerField()
    model_version = models.CharField(max_length=64)
    score = models.FloatField()
    nucleus_count = models.PositiveIntegerField(default=0)
    pushed_at = models.DateTimeField(auto_now=True)


class AnnotationSync(models.Model):
    """A Label Studio annotation and the last state of it that Karyo stored."""

    link = models.ForeignKey(LabelStudioLink, on_delete=models.CASCADE, related_name="annotations")
    task = models.ForeignKey(TaskLink, on_delete=models.CASCADE, related_name="annotations")
    ls_annotation_id = models.PositiveIntegerField()
    digest = models.CharField(max_length=64, help_text="sha256 of the annotation's result JSON.")
    ls_updated_at = models.DateTimeField(null=True, blank=True)
    annotation = models.ForeignKey(Annotation, null=True, on_delete=models.SET_NULL, related_name="+")
    deleted = models.BooleanField(default=False)
    synced_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["link", "ls_annotation_id"], name="unique_ls_annotation")]


class SyncError(models.Model):
    """Something that went wrong while syncing a project; shown per project until resolved."""

    link = models.ForeignKey(LabelStudioLink, on_delete=models.CASCADE, related_name="errors")
    operation = models.CharField(max_length=32)
    message = models.TextField()
    details = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]


class LabelStudioAccount(models.Model):
    """The Label Studio user Karyo created for a member (same username), so that what they save
    there is attributed to them here."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="label_studio_account")
    ls_user_id = models.PositiveIntegerField(unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.user} = Label Studio user {self.ls_user_id}"
