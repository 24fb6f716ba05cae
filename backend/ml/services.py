"""Active-learning business logic: training runs, gated promotion, the ranked queue, auto-retrain."""
from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.db.models import Exists, OuterRef, Q, Subquery
from django.utils import timezone

from backend.common.errors import Conflict, KaryoError
from backend.common.jobs import enqueue_on_commit
from backend.images.models import Annotation, Image, Split, Tile
from backend.images.services import accepted_statuses
from backend.projects.models import Project
from backend.projects.services import ensure_not_archived
from ml_worker import catalog

from . import events, lifecycle
from .models import (
    CorrectionEffort,
    EncoderPretraining,
    ModelStatus,
    ModelVersion,
    Prediction,
    ProjectEvent,
    QueueEntry,
    RunStatus,
    TrainingRun,
)

VAL_FRACTION = 0.2


def validate_run_config(*, config: dict[str, Any] | None, architecture: str | None = None,
                        source: str = "config") -> dict[str, Any]:
    """A training run's options checked against the engine catalog (names, types, bounds and,
    given the architecture, what depends on it); a 400 naming the option and its valid values."""
    try:
        return catalog.validate_training_options(config or {}, architecture=architecture)
    except catalog.CatalogError as exc:
        raise KaryoError(f"{source}: {exc}", code="invalid_config", details=exc.details()) from None


def validate_architecture(*, architecture: str) -> str:
    try:
        return catalog.validate_architecture(architecture)
    except catalog.CatalogError as exc:
        raise KaryoError(str(exc), code="invalid_architecture", details=exc.details()) from None


# --- validation split ------------------------------------------------------------------------

def freeze_validation_split(*, project: Project, seed: int = 0) -> None:
    """Freeze the by-image validation split once, at the project's first run, so that every
    later model version is compared on the same images. Images annotated later join training."""
    if project.validation_frozen_at is not None:
        Image.objects.filter(project=project, split=Split.UNASSIGNED).update(split=Split.TRAIN)
        return
    annotated = sorted(
        set(
            Annotation.objects.filter(tile__project=project, status__in=accepted_statuses(project))
            .values_list("tile__image_id", flat=True)
        )
    )
    rng = random.Random(seed)
    rng.shuffle(annotated)
    n_val = max(1, round(len(annotated) * VAL_FRACTION)) if len(annotated) >= 2 else 0
    val = set(annotated[:n_val])
    Image.objects.filter(project=project, pk__in=val).update(split=Split.VAL)
    Image.objects.filter(project=project).exclude(pk__in=val).update(split=Split.TRAIN)
    project.validation_frozen_at = timezone.now()
    project.save(update_fields=["validation_frozen_at"])


# --- training runs ---------------------------------------------------------------------------

def fail_stale_runs(*, project: Project | None = None, timeout_seconds: int | None = None) -> int:
    """Runs whose worker stopped sending heartbeats are failed, so nothing stays `running` forever."""
    failed = lifecycle.fail_stale(
        TrainingRun, project=project, timeout_seconds=timeout_seconds,
        reason=lambda run: (f"the worker stopped responding (last heartbeat "
                            f"{run.heartbeat_at or run.started_at:%Y-%m-%d %H:%M:%S} UTC); "
                            "the run was marked failed so a new one can start"))
    for run in failed:
        events.record(run.project_id, "run.failed", f"training run {run.pk} lost its worker", run=run.pk)
    return len(failed)


def start_training_run(
    *, project: Project, architecture: str | None = None, config: dict[str, Any] | None = None, started_by=None,
    trigger: str = "manual",
) -> TrainingRun:
    ensure_not_archived(project=project)
    architecture = validate_architecture(architecture=architecture or project.default_architecture)
    defaults = validate_run_config(config=project.training_defaults, source="the project's training defaults")
    clean = validate_run_config(config={**defaults, **(config or {})}, architecture=architecture)
    fail_stale_runs(project=project)
    if not Annotation.objects.filter(tile__project=project, status__in=accepted_statuses(project)).exists():
        raise Conflict("the project has no accepted annotations to train on yet")
    active = ModelVersion.objects.filter(project=project, status=ModelStatus.ACTIVE).first()
    try:
        with transaction.atomic():
            freeze_validation_split(project=project)
            run = TrainingRun.objects.create(
                project=project, architecture=architecture, config=clean, started_by=started_by, trigger=trigger,
                warm_start=active if active is not None and active.architecture == architecture else None,
            )
            enqueue_on_commit("karyo.gpu.train", run.pk)  # ml.tasks.train
    except IntegrityError:
        live = TrainingRun.objects.filter(project=project, status__in=[RunStatus.QUEUED, RunStatus.RUNNING]).first()
        raise Conflict(f"training run {live.pk if live else '?'} is already in progress for this project") from None
    events.record(project.pk, "run.queued", f"training run {run.pk} ({architecture}) queued ({trigger})", actor=started_by,
                  run=run.pk)
    return run


def cancel_run(*, run: TrainingRun, by=None) -> TrainingRun:
    # A queued run is cancelled at once; a running one stops at its next step.
    run = lifecycle.request_cancel(TrainingRun, run, label=f"run {run.pk}")
    events.record(run.project_id, "run.cancel", f"training run {run.pk} cancelled", actor=by, run=run.pk)
    return run


def maybe_auto_retrain(*, project: Project) -> TrainingRun | None:
    """Start a run when N accepted annotations arrived since the last run started."""
    threshold = project.auto_retrain_threshold
    if not threshold:
        return None
    fail_stale_runs(project=project)
    if TrainingRun.objects.filter(project=project, status__in=[RunStatus.QUEUED, RunStatus.RUNNING]).exists():
        return None
    last = TrainingRun.objects.filter(project=project).order_by("-created_at").first()
    new = Annotation.objects.filter(tile__project=project, status__in=accepted_statuses(project))
    if last is not None:
        new = new.filter(Q(created_at__gt=last.created_at) | Q(reviewed_at__gt=last.created_at))
    if new.count() < threshold:
        return None
    try:
        return start_training_run(project=project, trigger="auto")
    except Conflict:
        return None  # another submission won the race: one run, not many
    except KaryoError as exc:
        # Settings stored before the catalog checked them must not fail the annotation that crossed
        # the threshold: no run starts, and the activity feed says why.
        events.record(project.pk, "run.refused", f"automatic training run not started: {exc.detail}", code=exc.code)
        return None


def on_annotation_saved(*, annotation: Annotation) -> None:
    """Called after an annotation version is stored or reviewed: release its lease, maybe retrain."""
    tile = annotation.tile
    if annotation.status != "draft" and annotation.source != "imported":
        # Reads two label maps and matches their nuclei: a cpu task, not the submitting request.
        enqueue_on_commit("karyo.cpu.correction_effort", annotation.pk)  # ml.tasks.correction_effort
    if annotation.status in ("submitted", "reviewed"):
        # Submitted work leaves the annotators' queue even while it waits for review.
        QueueEntry.objects.filter(project=tile.project, tile=tile).delete()
        events.publish(tile.project_id, "queue.changed", tile=tile.pk, reason="annotated")
    if annotation.status in accepted_statuses(tile.project):
        maybe_auto_retrain(project=tile.project)
    elif annotation.author_id:
        QueueEntry.objects.filter(project=tile.project, tile=tile, leased_by_id=annotation.author_id).update(
            leased_by=None, lease_expires_at=None
        )


def record_correction_effort(*, annotation: Annotation) -> CorrectionEffort | None:
    """Compare a stored correction with the prediction its author was shown (the one it names,
    else the newest prediction of the tile made before it) and keep the effort figures."""
    from backend.common.storage import read_label_map
    from ml_worker.active_learning import correction_effort

    if CorrectionEffort.objects.filter(annotation=annotation).exists() or annotation.source == "imported":
        return None
    prediction = annotation.prediction or (
        Prediction.objects.filter(tile=annotation.tile, created_at__lte=annotation.created_at)
        .select_related("model_version").order_by("-created_at").first()
    )
    if prediction is None:
        return None
    effort = correction_effort(read_label_map(prediction.mask.name), read_label_map(annotation.mask.name))
    return CorrectionEffort.objects.create(
        annotation=annotation, prediction=prediction, model_version=prediction.model_version,
        n_true=effort["n_true"], n_pred=effort["n_pred"], n_added=effort["n_added"], n_redrawn=effort["n_redrawn"],
        n_deleted=effort["n_deleted"], added_or_redrawn_share=effort["added_or_redrawn_share"],
        deleted_share=effort["deleted_share"],
    )


def effort_by_model_version(*, project: Project) -> dict[int, dict[str, float]]:
    """Per model version: nuclei-weighted shares over every correction of its predictions."""
    from django.db.models import Count, Sum

    rows = CorrectionEffort.objects.filter(model_version__project=project).values("model_version").annotate(
        corrections=Count("id"), n_true=Sum("n_true"), n_pred=Sum("n_pred"), n_added=Sum("n_added"),
        n_redrawn=Sum("n_redrawn"), n_deleted=Sum("n_deleted"),
    )
    return {
        r["model_version"]: {
            "corrections": r["corrections"],
            "added_or_redrawn_share": (r["n_added"] + r["n_redrawn"]) / r["n_true"] if r["n_true"] else 0.0,
            "deleted_share": r["n_deleted"] / r["n_pred"] if r["n_pred"] else 0.0,
        }
        for r in rows
    }


# --- self-supervised encoder pretraining (project setting ssl_pretrain) ------------------------

def validate_ssl_config(*, config: dict[str, Any] | None) -> dict[str, Any]:
    """Pretraining options over the catalog's defaults; a 400 naming the option otherwise."""
    try:
        return catalog.validate_ssl_options(config or {})
    except catalog.CatalogError as exc:
        raise KaryoError(f"config: {exc}", code="invalid_config", details=exc.details()) from None


def ready_encoder(*, project: Project) -> EncoderPretraining | None:
    """The project's newest finished encoder pretraining when the project uses SSL (else None)."""
    if not project.ssl_pretrain:
        return None
    return (EncoderPretraining.objects.filter(project=project, status=RunStatus.SUCCEEDED)
            .exclude(checkpoint="").order_by("-finished_at", "-pk").first())


def start_pretraining(*, project: Project, config: dict[str, Any] | None = None, started_by=None,
                      trigger: str = "manual") -> EncoderPretraining:
    """Queue a pretraining of the project's encoder (its default architecture and width) on its
    own unlabelled tiles (task ``karyo.gpu.pretrain``). One live pretraining per project."""
    ensure_not_archived(project=project)
    if not project.ssl_pretrain:
        raise Conflict("self-supervised pretraining is off for this project (setting ssl_pretrain)")
    architecture = validate_architecture(architecture=project.default_architecture)
    clean = validate_ssl_config(config=config)
    fail_stale_pretrainings(project=project)
    if not Tile.objects.filter(project=project).exists():
        raise Conflict("the project has no tiles to pretrain on yet")
    try:
        with transaction.atomic():
            pretraining = EncoderPretraining.objects.create(
                project=project, architecture=architecture, config=clean, started_by=started_by, trigger=trigger)
            enqueue_on_commit("karyo.gpu.pretrain", pretraining.pk)  # ml.tasks.pretrain
    except IntegrityError:
        live = EncoderPretraining.objects.filter(project=project, status__in=[RunStatus.QUEUED, RunStatus.RUNNING]).first()
        raise Conflict(f"encoder pretraining {live.pk if live else '?'} is already in progress for this project") from None
    events.record(project.pk, "ssl.queued", f"encoder pretraining {pretraining.pk} queued ({trigger})",
                  actor=started_by, pretraining=pretraining.pk)
    return pretraining


def maybe_start_pretraining(*, project: Project) -> EncoderPretraining | None:
    """With ``ssl_pretrain`` on and no finished or live pretraining: start one (else None)."""
    if not project.ssl_pretrain or project.archived_at is not None:
        return None
    fail_stale_pretrainings(project=project)
    if ready_encoder(project=project) is not None or EncoderPretraining.objects.filter(
            project=project, status__in=[RunStatus.QUEUED, RunStatus.RUNNING]).exists():
        return None
    try:
        return start_pretraining(project=project, trigger="auto")
    except KaryoError:
        return None  # no tiles yet, or another caller won the race


def cancel_pretraining(*, pretraining: EncoderPretraining, by=None) -> EncoderPretraining:
    """A queued pretraining is cancelled at once; a running one stops at its next step and
    writes nothing."""
    pretraining = lifecycle.request_cancel(EncoderPretraining, pretraining,
                                           label=f"encoder pretraining {pretraining.pk}")
    events.record(pretraining.project_id, "ssl.cancel", f"encoder pretraining {pretraining.pk} cancelled", actor=by,
                  pretraining=pretraining.pk)
    return pretraining


def fail_stale_pretrainings(*, project: Project | None = None, timeout_seconds: int | None = None) -> int:
    """Pretrainings whose worker stopped sending heartbeats are failed (as training runs are)."""
    failed = lifecycle.fail_stale(
        EncoderPretraining, project=project, timeout_seconds=timeout_seconds,
        reason=lambda _: "the worker stopped responding; the pretraining was marked failed so a new one can start")
    for run in failed:
        events.record(run.project_id, "ssl.failed", f"encoder pretraining {run.pk} lost its worker", pretraining=run.pk)
    return len(failed)


# --- model versions --------------------------------------------------------------------------

def gate(*, candidate: dict[str, float], active: dict[str, float] | None) -> tuple[bool, str]:
    """Promote only if validation Dice and AJI are at least the active model's (same frozen split)."""
    if active is None:
        return True, "first model of the project"
    worse = [m for m in ("dice", "aji") if candidate.get(m, 0.0) < active.get(m, 0.0)]
    if worse:
        detail = ", ".join(f"{m} {candidate.get(m, 0):.4f} < {active.get(m, 0):.4f}" for m in worse)
        return False, f"kept as candidate: validation {detail} of the active model"
    return True, (f"validation dice {candidate.get('dice', 0):.4f} >= {active.get('dice', 0):.4f} and "
                  f"aji {candidate.get('aji', 0):.4f} >= {active.get('aji', 0):.4f} of the active model")


@transaction.atomic
def promote(*, model_version: ModelVersion, reason: str, by=None) -> ModelVersion:
    if model_version.status == ModelStatus.ACTIVE:
        raise Conflict(f"model version {model_version.version} is already active")
    if not model_version.weights:
        raise Conflict("this model version has no weights")
    ModelVersion.objects.filter(project=model_version.project, status=ModelStatus.ACTIVE).update(status=ModelStatus.RETIRED)
    model_version.status = ModelStatus.ACTIVE
    model_version.status_reason = reason
    model_version.promoted_at = timezone.now()
    model_version.save(update_fields=["status", "status_reason", "promoted_at"])
    project_id = model_version.project_id
    transaction.on_commit(lambda: events.record(
        project_id, "model.promoted", f"model v{model_version.version} is active: {reason}", actor=by,
        model_version=model_version.pk,
    ))
    return model_version


def rollback(*, project: Project, by=None) -> ModelVersion:
    """Re-activate the most recently retired version (the one active before the current)."""
    previous = ModelVersion.objects.filter(project=project, status=ModelStatus.RETIRED).order_by("-promoted_at", "-version").first()
    if previous is None:
        raise Conflict("there is no earlier model version to roll back to")
    return promote(model_version=previous, reason=f"rolled back by {getattr(by, 'username', 'system')}", by=by)


def after_promotion(*, project: Project, model_version: ModelVersion) -> None:
    """Predict every tile with the new active model, then re-rank (chained on the gpu queue)."""
    enqueue_on_commit("karyo.gpu.predict", project.pk, model_version.pk, None, True)  # ml.tasks.predict


# --- the queue -------------------------------------------------------------------------------

def next_tile(*, project: Project, user) -> QueueEntry | None:
    """Lease the top-ranked tile nobody else holds. Asking again returns the caller's own lease."""
    now = timezone.now()
    # A tile whose newest version is submitted or reviewed is done for annotators, even if its
    # queue entry has not been removed yet (the removal runs after the submitting transaction).
    latest_status = Annotation.objects.filter(tile=OuterRef("tile")).order_by("-version").values("status")[:1]
    open_entries = QueueEntry.objects.annotate(latest_status=Subquery(latest_status)).filter(
        Q(latest_status__isnull=True) | Q(latest_status__in=["draft", "rejected"])
    )
    free = Q(leased_by__isnull=True) | Q(lease_expires_at__lte=now)
    lease = {"leased_by": user, "lease_expires_at": now + timedelta(seconds=settings.KARYO_QUEUE_LEASE_SECONDS)}
    if not connection_supports_skip_locked():
        return _lease_in_one_update(project=project, user=user, open_entries=open_entries, free=free,
                                    lease=lease, now=now)
    for _ in range(5):
        with transaction.atomic():
            # One lease at a time per user: two tabs asking at once would otherwise each find no
            # lease of their own and take a tile each (SKIP LOCKED hands them different rows).
            list(get_user_model().objects.select_for_update(no_key=True).filter(pk=user.pk).values_list("pk", flat=True))
            own = (
                open_entries.select_for_update()
                .filter(project=project, leased_by=user, lease_expires_at__gt=now)
                .order_by("rank")
                .first()
            )
            if own is not None:
                return QueueEntry.objects.select_related("tile", "leased_by").get(pk=own.pk)
            entry = open_entries.filter(project=project).filter(free).order_by("rank").select_for_update(
                skip_locked=True
            ).first()
            if entry is None:
                return None
            # Compare-and-set: only one of two concurrent callers wins this row.
            won = QueueEntry.objects.filter(pk=entry.pk).filter(free).update(**lease)
            if won:
                # One query for what the response shows (tile, image, who holds it), and the event after
                # commit, outside the transaction.
                entry = QueueEntry.objects.select_related("tile", "leased_by").get(pk=entry.pk)
                transaction.on_commit(lambda: events.publish(project.pk, "queue.leased", tile=entry.tile_id,
                                                             user=user.username))
                return entry
    return None


def _lease_in_one_update(*, project: Project, user, open_entries, free: Q, lease: dict, now) -> QueueEntry | None:
    """SQLite: one database write lock for every writer of every process. The caller's own live
    lease is read without it (WAL readers do not wait); without one, a single UPDATE leases the
    first free open entry in rank order, its WHERE re-checking that the caller holds no other
    live lease (two tabs asking at once). SQLite runs the statement under the write lock, so the
    entry it picks is free at that moment: no read-then-write race, and 50 annotators asking at
    once cost 50 UPDATEs, not the dozens of failed attempts each that a read of the candidates
    followed by a compare-and-set cost when they all tried the same top entries. Each statement
    walks an index and stops at its first rows (``queue_leased_by_project``,
    ``queue_project_rank``)."""
    mine = Q(leased_by=user, lease_expires_at__gt=now)

    def own_lease() -> QueueEntry | None:
        # No ORDER BY: with one, SQLite walks the whole queue by rank instead of the caller's leases
        # (at most one: the UPDATE below sees to it).
        own = next(iter(open_entries.filter(project=project).filter(mine).select_related("tile").order_by()[:1]), None)
        if own is not None:
            own.leased_by = user
        return own

    own = own_lease()
    if own is not None:
        return own
    first_free = open_entries.filter(project=project).filter(free).order_by("rank").values("pk")[:1]
    holds_one = Exists(open_entries.filter(project=project).filter(mine))
    leased = QueueEntry.objects.filter(pk=Subquery(first_free)).filter(~holds_one).update(**lease)
    entry = own_lease()  # ours now, or the one another tab of the caller took meanwhile, or none left
    if leased and entry is not None:
        events.publish(project.pk, "queue.leased", tile=entry.tile_id, user=user.username)
    return entry


def release_lease(*, project: Project, user) -> int:
    return QueueEntry.objects.filter(project=project, leased_by=user).update(leased_by=None, lease_expires_at=None)


def connection_supports_skip_locked() -> bool:
    from django.db import connection

    return connection.features.has_select_for_update_skip_locked


@transaction.atomic
def replace_queue(*, project: Project, ordered: list[tuple[int, float]], strategy: str, model_version: ModelVersion | None,
                  strategies: list[str] | None = None) -> int:
    """Rebuild the queue from ``(tile_id, score)`` pairs, most valuable first; live leases are kept.
    ``strategies``: per entry, the rule that picked it (default: ``strategy`` for all)."""
    now = timezone.now()
    leases = {
        e.tile_id: (e.leased_by_id, e.lease_expires_at)
        for e in QueueEntry.objects.filter(project=project, leased_by__isnull=False, lease_expires_at__gt=now)
    }
    QueueEntry.objects.filter(project=project).delete()
    QueueEntry.objects.bulk_create([
        QueueEntry(
            project=project, tile_id=tile_id, rank=i, score=score, model_version=model_version,
            strategy=strategies[i] if strategies is not None else strategy,
            leased_by_id=leases.get(tile_id, (None, None))[0], lease_expires_at=leases.get(tile_id, (None, None))[1],
        )
        for i, (tile_id, score) in enumerate(ordered)
    ])
    return len(ordered)


def unlabelled_tiles(*, project: Project):
    accepted = Annotation.objects.filter(tile__project=project, status__in=accepted_statuses(project)).values("tile_id")
    return Tile.objects.filter(project=project).exclude(pk__in=accepted)


def check_rank_scores(*, project: Project, strategy: str) -> None:
    """A strategy that ranks by a score only an extra analysis pass computes (``mc_dropout``,
    ``tta``) needs the active model's predictions of the unlabelled tiles to carry that score;
    the pass runs when tiles are predicted for a project whose own strategy needs it. A 400
    naming the score, how many predictions lack it and the strategies they do support, instead
    of a ranking task that fails in the worker. No active model: nothing to check (the queue is
    ordered without model scores: typicality, or the random baseline)."""
    passes = {need for score in catalog.SCORES for need in score.needs}  # the extra analysis passes
    needs = passes & set(catalog.strategy(strategy).needs)
    active = ModelVersion.objects.filter(project=project, status=ModelStatus.ACTIVE).first()
    if not needs or active is None:
        return
    key = catalog.score_key(strategy)
    predictions = Prediction.objects.filter(model_version=active, tile__in=unlabelled_tiles(project=project))
    lacking = predictions.exclude(uncertainty__has_key=key).count()
    if not lacking:
        return
    total = predictions.count()
    stored = set().union(*(set(u) for u in predictions.values_list("uncertainty", flat=True)[:50]))
    usable = [s.name for s in catalog.STRATEGIES if s.score_key in stored]  # the score each ranks by is there
    raise KaryoError(
        f"strategy {strategy!r} ranks by the {key!r} score, which {lacking} of the {total} predictions of "
        f"model v{active.version} lack: that extra pass runs when tiles are predicted for a project whose strategy "
        f"needs it (theirs was not {strategy!r}). Set the project's strategy to {strategy!r} so the next promoted "
        f"model's predictions carry it, or rank now with one of: {', '.join(usable) or 'none'}",
        code="missing_scores",
        details={"field": "strategy", "score": key, "lacking": lacking, "predictions": total, "valid": usable},
    )


def recent_events(*, project: Project, limit: int = 50):
    return ProjectEvent.objects.filter(project=project).select_related("actor")[:limit]
