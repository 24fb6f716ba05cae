from __future__ import annotations

from rest_framework import generics, serializers

from backend.common.permissions import project_for
from backend.projects.models import Role

from .models import ModelVersion, TrainingRun


class ModelVersionSerializer(serializers.ModelSerializer):
    class Meta:
        model = ModelVersion
        fields = ["id", "project", "version", "architecture", "init_kwargs", "metrics", "training_run", "status",
                  "status_reason", "created_at", "promoted_at"]
        read_only_fields = fields


class TrainingRunSerializer(serializers.ModelSerializer):
    started_by = serializers.CharField(source="started_by.username", default=None, read_only=True)

    class Meta:
        model = TrainingRun
        fields = ["id", "project", "architecture", "config", "status", "progress", "epoch_metrics", "error", "trigger",
                  "started_by", "created_at", "started_at", "finished_at"]
        read_only_fields = fields


class ModelVersionListView(generics.ListAPIView):
    serializer_class = ModelVersionSerializer

    def get_queryset(self):
        project = project_for(user=self.request.user, project_id=self.kwargs["project_id"], minimum=Role.VIEWER)
        return ModelVersion.objects.filter(project=project)


class TrainingRunListView(generics.ListAPIView):
    serializer_class = TrainingRunSerializer

    def get_queryset(self):
        project = project_for(user=self.request.user, project_id=self.kwargs["project_id"], minimum=Role.VIEWER)
        return TrainingRun.objects.filter(project=project).select_related("started_by")
