from __future__ import annotations

from django.db import transaction
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import generics, serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from backend.projects.models import Role
from backend.projects.permissions import project_for, require_role
from backend.projects.services import ensure_not_archived
from ml_worker import catalog

from . import services, tasks
from .models import EncoderPretraining, ModelVersion, ProjectEvent, QueueEntry, TrainingRun


class ModelVersionSerializer(serializers.ModelSerializer):
    correction_effort = serializers.SerializerMethodField(
        help_text="What pathologists changed in this version's predictions: shares of nuclei added/redrawn and deleted."
    )

    class Meta:
        model = ModelVersion
        fields = ["id", "project", "version", "architecture", "init_kwargs", "metrics", "classes", "training_run", "status",
                  "status_reason", "created_at", "promoted_at", "correction_effort"]
        read_only_fields = fields

    def get_correction_effort(self, obj: ModelVersion) -> dict | None:
        efforts = self.context.get("efforts")
        if efforts is None:
            efforts = services.effort_by_model_version(project=obj.project)
        return efforts.get(obj.pk)


class TrainingRunSerializer(serializers.ModelSerializer):
    started_by = serializers.CharField(source="started_by.username", default=None, read_only=True)

    class Meta:
        model = TrainingRun
        fields = ["id", "project", "architecture", "config", "status", "progress", "epoch_metrics", "error", "trigger",
                  "started_by", "model_version", "warm_start", "init_weights", "cancel_requested", "heartbeat_at",
                  "created_at", "started_at", "finished_at"]
        read_only_fields = fields


class PretrainingSerializer(serializers.ModelSerializer):
    started_by = serializers.CharField(source="started_by.username", default=None, read_only=True)

    class Meta:
        model = EncoderPretraining
        fields = ["id", "project", "architecture", "config", "status", "progress", "error", "trigger", "started_by",
                  "checkpoint_sha256", "info", "cancel_requested", "heartbeat_at", "created_at", "started_at",
                  "finished_at"]
        read_only_fields = fields


class PretrainingCreateSerializer(serializers.Serializer):
    config = serializers.DictField(required=False, default=dict,
                                   help_text="options: " + ", ".join(o.name for o in catalog.SSL_OPTIONS)
                                   + " (GET /api/catalog/, ssl_options)")


def catalog_checked(check, value):
    """``check(value)`` from ml_worker.catalog, its error as a 400 that names the valid values."""
    try:
        return check(value)
    except catalog.CatalogError as exc:
        raise serializers.ValidationError(str(exc)) from None


class TrainingRunCreateSerializer(serializers.Serializer):
    architecture = serializers.CharField(required=False,
                                         help_text=f"one of: {', '.join(catalog.architecture_names())}")
    config = serializers.DictField(required=False, default=dict,
                                   help_text=f"options: {', '.join(catalog.run_option_names())} (GET /api/catalog/)")

    def validate_architecture(self, value):
        return catalog_checked(catalog.validate_architecture, value)


class QueueEntrySerializer(serializers.ModelSerializer):
    leased_by = serializers.CharField(source="leased_by.username", default=None, read_only=True)
    image = serializers.IntegerField(source="tile.image_id", read_only=True)

    class Meta:
        model = QueueEntry
        fields = ["tile", "image", "rank", "score", "strategy", "model_version", "leased_by", "lease_expires_at"]
        read_only_fields = fields


class RankSerializer(serializers.Serializer):
    strategy = serializers.CharField(required=False, help_text=f"one of: {', '.join(catalog.strategy_names())}")

    def validate_strategy(self, value):
        return catalog_checked(catalog.validate_strategy, value)


class EventSerializer(serializers.ModelSerializer):
    actor = serializers.CharField(source="actor.username", default=None, read_only=True)

    class Meta:
        model = ProjectEvent
        fields = ["id", "kind", "message", "data", "actor", "created_at"]
        read_only_fields = fields


class ModelVersionListView(generics.ListAPIView):
    serializer_class = ModelVersionSerializer

    def get_project(self):
        return project_for(user=self.request.user, project_id=self.kwargs["project_id"], minimum=Role.VIEWER)

    def get_queryset(self):
        return ModelVersion.objects.filter(project=self.get_project())

    def get_serializer_context(self):
        return {**super().get_serializer_context(), "efforts": services.effort_by_model_version(project=self.get_project())}


def model_version_for(request, model_version_id: int, minimum: Role) -> ModelVersion:
    model_version = get_object_or_404(ModelVersion.objects.select_related("project"), pk=model_version_id)
    require_role(user=request.user, project=model_version.project, minimum=minimum)
    return model_version


class PromoteView(APIView):
    @extend_schema(request=None, responses=ModelVersionSerializer)
    def post(self, request, model_version_id: int):
        model_version = model_version_for(request, model_version_id, Role.ADMIN)
        model_version = services.promote(model_version=model_version, reason=f"promoted by {request.user.username}",
                                         by=request.user)
        services.after_promotion(project=model_version.project, model_version=model_version)
        return Response(ModelVersionSerializer(model_version).data)


class RollbackView(APIView):
    @extend_schema(request=None, responses=ModelVersionSerializer)
    def post(self, request, project_id: int):
        project = project_for(user=request.user, project_id=project_id, minimum=Role.ADMIN)
        model_version = services.rollback(project=project, by=request.user)
        services.after_promotion(project=project, model_version=model_version)
        return Response(ModelVersionSerializer(model_version).data)


class TrainingRunListView(generics.ListAPIView):
    serializer_class = TrainingRunSerializer

    def get_queryset(self):
        project = project_for(user=self.request.user, project_id=self.kwargs["project_id"], minimum=Role.VIEWER)
        services.fail_stale_runs(project=project)
        return TrainingRun.objects.filter(project=project).select_related("started_by")

    @extend_schema(request=TrainingRunCreateSerializer, responses={202: TrainingRunSerializer})
    def post(self, request, project_id: int):
        project = project_for(user=request.user, project_id=project_id, minimum=Role.ADMIN)
        serializer = TrainingRunCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        run = services.start_training_run(
            project=project, architecture=serializer.validated_data.get("architecture"),
            config=serializer.validated_data.get("config"), started_by=request.user,
        )
        return Response(TrainingRunSerializer(run).data, status=status.HTTP_202_ACCEPTED)


def run_for(request, run_id: int, minimum: Role) -> TrainingRun:
    run = get_object_or_404(TrainingRun.objects.select_related("project"), pk=run_id)
    require_role(user=request.user, project=run.project, minimum=minimum)
    return run


class TrainingRunDetailView(generics.RetrieveAPIView):
    serializer_class = TrainingRunSerializer

    def get_object(self):
        return run_for(self.request, self.kwargs["run_id"], Role.VIEWER)


class TrainingRunCancelView(APIView):
    @extend_schema(request=None, responses=TrainingRunSerializer)
    def post(self, request, run_id: int):
        run = services.cancel_run(run=run_for(request, run_id, Role.ADMIN), by=request.user)
        return Response(TrainingRunSerializer(run).data)


class PretrainingListView(generics.ListAPIView):
    """A project's self-supervised encoder pretrainings (setting ``ssl_pretrain``); admins start one."""

    serializer_class = PretrainingSerializer

    def get_queryset(self):
        project = project_for(user=self.request.user, project_id=self.kwargs["project_id"], minimum=Role.VIEWER)
        services.fail_stale_pretrainings(project=project)
        return EncoderPretraining.objects.filter(project=project).select_related("started_by")

    @extend_schema(request=PretrainingCreateSerializer, responses={202: PretrainingSerializer})
    def post(self, request, project_id: int):
        project = project_for(user=request.user, project_id=project_id, minimum=Role.ADMIN)
        serializer = PretrainingCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        pretraining = services.start_pretraining(project=project, config=serializer.validated_data.get("config"),
                                                 started_by=request.user)
        return Response(PretrainingSerializer(pretraining).data, status=status.HTTP_202_ACCEPTED)


class PretrainingCancelView(APIView):
    @extend_schema(request=None, responses=PretrainingSerializer)
    def post(self, request, pretraining_id: int):
        pretraining = get_object_or_404(EncoderPretraining.objects.select_related("project"), pk=pretraining_id)
        require_role(user=request.user, project=pretraining.project, minimum=Role.ADMIN)
        pretraining = services.cancel_pretraining(pretraining=pretraining, by=request.user)
        return Response(PretrainingSerializer(pretraining).data)


class QueueView(generics.ListAPIView):
    serializer_class = QueueEntrySerializer

    def get_queryset(self):
        project = project_for(user=self.request.user, project_id=self.kwargs["project_id"], minimum=Role.VIEWER)
        return QueueEntry.objects.filter(project=project).select_related("leased_by", "tile").order_by("rank")


class QueueNextView(APIView):
    @extend_schema(request=None, responses={200: QueueEntrySerializer, 204: None})
    def post(self, request, project_id: int):
        project = project_for(user=request.user, project_id=project_id, minimum=Role.ANNOTATOR)
        ensure_not_archived(project=project)
        entry = services.next_tile(project=project, user=request.user)
        if entry is None:
            # No body: HTTP forbids one on a 204, and a client reusing the connection would read
            # it as the start of the next response.
            return Response(status=status.HTTP_204_NO_CONTENT)
        return Response(QueueEntrySerializer(entry).data)


class QueueReleaseView(APIView):
    @extend_schema(request=None, responses={204: None})
    def post(self, request, project_id: int):
        project = project_for(user=request.user, project_id=project_id, minimum=Role.ANNOTATOR)
        services.release_lease(project=project, user=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class RankView(APIView):
    @extend_schema(request=RankSerializer, responses={202: None})
    def post(self, request, project_id: int):
        project = project_for(user=request.user, project_id=project_id, minimum=Role.ADMIN)
        serializer = RankSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        strategy = serializer.validated_data.get("strategy") or project.al_strategy
        catalog_checked(catalog.validate_strategy, strategy)  # a project saved before the catalog checked it
        services.check_rank_scores(project=project, strategy=strategy)  # mc_dropout / tta need their extra pass
        transaction.on_commit(lambda: tasks.rank.delay(project.pk, strategy))
        return Response({"queued": True, "strategy": strategy}, status=status.HTTP_202_ACCEPTED)


class CatalogView(APIView):
    """The engine's vocabulary (ml_worker.catalog): architectures, losses, training options with
    their bounds, strategies... each with a one-line explanation. Any signed-in user may read it."""

    @extend_schema(responses={200: dict})
    def get(self, request):
        return Response(catalog.as_dict())


class EventListView(generics.ListAPIView):
    serializer_class = EventSerializer

    def get_queryset(self):
        project = project_for(user=self.request.user, project_id=self.kwargs["project_id"], minimum=Role.VIEWER)
        return ProjectEvent.objects.filter(project=project).select_related("actor")
