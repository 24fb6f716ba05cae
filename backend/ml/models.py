from __future__ import annotations

from django.conf import settings
from django.db import models

from backend.images.models import Tile
from backend.projects.models import Project


class RunStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


class TrainingRun(models.Model):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="training_runs")
    architecture = models.CharField(max_length=32)
    config = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.QUEUED)
    progress = models.FloatField(default=0.0)
    epoch_metrics = models.JSONField(default=list, blank=True)
    error = models.TextField(blank=True)
    trigger = models.CharField(max_length=16, default="manual")
    started_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    celery_task_id = models.CharField(max_length=64, blank=True)
    cancel_requested = models.BooleanField(default=False)
    model_version = models.ForeignKey(
        "ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
        help_text="The version this run produced.",
    )
    warm_start = models.ForeignKey(
        "ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
        help_text="The active version whose weights this run started from.",
    )
    init_weights = models.JSONField(
        default=dict, blank=True,
        help_text="Where the run's starting weights came from: {source: 'model_version' or 'ssl', id, sha256} "
        "(sha256 of the checkpoint file); empty: a fresh initialisation.",
    )
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            # One live run per project: a burst of submissions cannot start several runs.
            models.UniqueConstraint(
                fields=["project"], condition=models.Q(status__in=["queued", "running"]), name="one_live_run_per_project"
            )
        ]

    @property
    def is_live(self) -> bool:
        return self.status in (RunStatus.QUEUED, RunStatus.RUNNING)


class ModelStatus(models.TextChoices):
    CANDIDATE = "candidate", "Candidate"
    ACTIVE = "active", "Active"
    RETIRED = "retired", "Retired"


class ModelVersion(models.Model):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="model_versions")
    version = models.PositiveIntegerField()
    architecture = models.CharField(max_length=32)
    init_kwargs = models.JSONField(default=dict, blank=True)
    weights = models.FileField(max_length=255, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    classes = models.JSONField(
        default=list, blank=True,
        help_text="The model's nucleus classes in its output order (model class i+1 = entry i): "
        "[{id: project class id, name}]. Empty: a binary model (every nucleus the project's first class).",
    )
    training_run = models.ForeignKey(TrainingRun, null=True, blank=True, on_delete=models.SET_NULL, related_name="model_versions")
    status = models.CharField(max_length=16, choices=ModelStatus.choices, default=ModelStatus.CANDIDATE)
    status_reason = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    promoted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "version"], name="unique_model_version"),
            models.UniqueConstraint(
                fields=["project"], condition=models.Q(status="active"), name="one_active_model_per_project"
            ),
        ]
        ordering = ["project_id", "-version"]


class Prediction(models.Model):
    tile = models.ForeignKey(Tile, on_delete=models.CASCADE, related_name="predictions")
    model_version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="predictions")
    mask = models.FileField(max_length=255, help_text="The predicted label map over the tile's own box (h, w).")
    # Issue 12: the nuclei the tile owns (centroid inside it) whole, including their parts in the
    # context margin (inferred on the tile with its margin). Empty on older rows: tile box only.
    context_mask = models.FileField(max_length=255, blank=True, default="")
    context_x = models.IntegerField(default=0, help_text="context_mask's left edge minus the tile's (working px, <= 0).")
    context_y = models.IntegerField(default=0, help_text="context_mask's top edge minus the tile's (working px, <= 0).")
    nucleus_count = models.PositiveIntegerField(default=0)
    uncertainty = models.JSONField(
        default=dict, blank=True,
        help_text="Score name -> score (higher = less certain): the ml_worker.catalog.SCORES keys this prediction's "
        "analysis computed (entropy, margin, boundary, expected_fixes; mc_dropout, mc_mutual_info, tta and "
        "instance_flips only when its project's strategy needed that extra pass). A strategy ranks by one of them.",
    )
    embedding = models.JSONField(default=list, blank=True, help_text="Pooled encoder features (diversity sampling).")
    classes = models.JSONField(
        default=dict, blank=True,
        help_text="Instance id -> [project nucleus class id, class confidence in 0..1]; empty for a binary model.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tile", "model_version"], name="unique_prediction")]
        ordering = ["tile_id", "-created_at"]

    def class_ids(self) -> dict[str, int]:
        """Instance id -> project nucleus class id (empty: a binary model's prediction, every
        nucleus of the project's first class)."""
        return {str(k): int(v[0]) for k, v in (self.classes or {}).items()
                if isinstance(v, list) and v and isinstance(v[0], int)}

    def class_confidences(self) -> dict[str, float]:
        """Instance id -> the model's confidence in that nucleus' class (0..1)."""
        return {str(k): float(v[1]) for k, v in (self.classes or {}).items()
                if isinstance(v, list) and len(v) > 1 and isinstance(v[1], int | float)}


class QueueEntry(models.Model):
    """One tile in a project's ranked annotation queue; a lease keeps two annotators apart."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="queue")
    tile = models.ForeignKey(Tile, on_delete=models.CASCADE, related_name="queue_entries")
    rank = models.PositiveIntegerField()
    score = models.FloatField()
    strategy = models.CharField(max_length=32)
    model_version = models.ForeignKey(ModelVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    leased_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "tile"], name="unique_queue_tile")]
        # The lease walks the queue in rank order and stops at the first free entries; it finds the
        # caller's own lease by user and project (SQLite, without statistics, otherwise walks the
        # whole queue for it).
        indexes = [models.Index(fields=["project", "rank"], name="queue_project_rank"),
                   models.Index(fields=["leased_by", "project"], name="queue_leased_by_project")]
        ordering = ["project_id", "rank"]


class ProjectEvent(models.Model):
    """What happened in a project (runs, promotions, rankings, submissions): the activity feed."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=32)
    message = models.TextField()
    data = models.JSONField(default=dict, blank=True)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]


class CorrectionEffort(models.Model):
    """How much a pathologist changed the prediction they were shown (same figures as al_sim)."""

    annotation = models.OneToOneField("images.Annotation", on_delete=models.CASCADE, related_name="effort")
    prediction = models.ForeignKey(Prediction, on_delete=models.CASCADE, related_name="efforts")
    model_version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="efforts")
    n_true = models.PositiveIntegerField()
    n_pred = models.PositiveIntegerField()
    n_added = models.PositiveIntegerField()
    n_redrawn = models.PositiveIntegerField()
    n_deleted = models.PositiveIntegerField()
    added_or_redrawn_share = models.FloatField()
    deleted_share = models.FloatField()
    created_at = models.DateTimeField(auto_now_add=True)


class EncoderPretraining(models.Model):
    """Self-supervised pretraining of a project's encoder on its own unlabelled tiles (SimSiam,
    ``ml_worker.ssl``; project setting ``ssl_pretrain``). Its checkpoint gives the cold-start
    embeddings before the first model and the starting weights of the first training run."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="pretrainings")
    architecture = models.CharField(max_length=32)
    config = models.JSONField(default=dict, blank=True, help_text="The SSLConfig the run used (ml_worker.ssl).")
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.QUEUED)
    progress = models.FloatField(default=0.0)
    error = models.TextField(blank=True)
    trigger = models.CharField(max_length=16, default="auto")
    started_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    celery_task_id = models.CharField(max_length=64, blank=True)
    cancel_requested = models.BooleanField(default=False)
    checkpoint = models.FileField(max_length=255, blank=True)
    checkpoint_sha256 = models.CharField(max_length=64, blank=True)
    info = models.JSONField(default=dict, blank=True, help_text="Loss first/last, steps, tiles, seconds.")
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["project"], condition=models.Q(status__in=["queued", "running"]),
                                    name="one_live_pretraining_per_project")
        ]

    @property
    def is_live(self) -> bool:
        return self.status in (RunStatus.QUEUED, RunStatus.RUNNING)
