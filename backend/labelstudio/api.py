"""Thin views: the per-project sync status, Label Studio's webhook, the ML-backend protocol and
the signed tile images Label Studio's editor loads."""
from __future__ import annotations

from django.conf import settings
from django.core import signing
from django.http import HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.http import require_GET
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from backend.images.models import Tile
from backend.images.pixels import tile_png
from backend.projects.permissions import method_role, project_for

from . import selectors, services
from . import signing as tile_signing
from .authentication import IsLabelStudio, SharedSecretAuthentication
from .client import is_configured


class SyncErrorSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    operation = serializers.CharField()
    message = serializers.CharField()
    created_at = serializers.DateTimeField()
    resolved_at = serializers.DateTimeField(allow_null=True)


class SyncStatusSerializer(serializers.Serializer):
    configured = serializers.BooleanField()
    linked = serializers.BooleanField()
    label_studio_project = serializers.IntegerField(allow_null=True)
    label_studio_url = serializers.CharField(allow_null=True)
    webhook = serializers.BooleanField()
    ml_backend = serializers.BooleanField()
    model_version = serializers.CharField()
    tasks = serializers.IntegerField()
    pushed_predictions = serializers.IntegerField()
    synced_annotations = serializers.IntegerField()
    last_synced_at = serializers.DateTimeField(allow_null=True)
    reconciled_until = serializers.DateTimeField(allow_null=True)
    last_error = serializers.CharField()
    errors = SyncErrorSerializer(many=True)


class SyncStatusView(APIView):
    """GET: the project's Label Studio sync state and its unresolved errors (viewers).
    POST: sync now, on the cpu queue (admins)."""

    @extend_schema(responses=SyncStatusSerializer)
    def get(self, request, project_id: int):
        project = project_for(user=request.user, project_id=project_id, minimum=method_role(request))
        return Response(SyncStatusSerializer(selectors.sync_status(project=project)).data)

    @extend_schema(request=None, responses={202: OpenApiTypes.OBJECT})
    def post(self, request, project_id: int):
        project = project_for(user=request.user, project_id=project_id, minimum=method_role(request))
        if not is_configured():
            return Response(
                {"error": {"code": "not_configured", "message": "Label Studio is not configured (LABEL_STUDIO_URL, "
                           "LABEL_STUDIO_TOKEN)", "details": None}}, status=status.HTTP_409_CONFLICT,
            )
        from . import tasks

        tasks.sync_project.delay(project.pk)
        return Response({"status": "queued", "project": project.pk}, status=status.HTTP_202_ACCEPTED)


class LabelStudioView(APIView):
    """Called by Label Studio with the shared secret, never by a user session or token."""

    authentication_classes = [SharedSecretAuthentication]
    permission_classes = [IsLabelStudio]


class WebhookView(LabelStudioView):
    """Label Studio's ANNOTATION_CREATED / ANNOTATION_UPDATED / ANNOTATIONS_DELETED webhook."""

    @extend_schema(request=OpenApiTypes.OBJECT, responses=OpenApiTypes.OBJECT)
    def post(self, request):
        payload = request.data if isinstance(request.data, dict) else {}
        return Response(services.handle_webhook(payload=payload))


class MLHealthView(LabelStudioView):
    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request):
        return Response({"status": "UP", "model_class": "Karyo", "karyo_version": settings.KARYO_VERSION})


class MLSetupView(LabelStudioView):
    @extend_schema(request=OpenApiTypes.OBJECT, responses=OpenApiTypes.OBJECT)
    def post(self, request):
        return Response(services.ml_setup(ls_project=request.data.get("project")))


class MLVersionsView(LabelStudioView):
    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request):
        return Response(services.ml_versions(ls_project=request.query_params.get("project") or request.data.get("project")))


class MLPredictView(LabelStudioView):
    @extend_schema(request=OpenApiTypes.OBJECT, responses=OpenApiTypes.OBJECT)
    def post(self, request):
        tasks = request.data.get("tasks") or []
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            return Response({"error": {"code": "invalid", "message": "tasks must be a list of tasks", "details": None}},
                            status=status.HTTP_400_BAD_REQUEST)
        return Response(services.ml_predict(ls_project=request.data.get("project"), tasks=tasks))


class MLWebhookView(LabelStudioView):
    @extend_schema(request=OpenApiTypes.OBJECT, responses=OpenApiTypes.OBJECT)
    def post(self, request):
        payload = request.data if isinstance(request.data, dict) else {}
        return Response(services.ml_webhook(payload=payload))


@require_GET
def signed_tile_image(request, token: str):
    """A tile's PNG for a valid, unexpired signed token; no login (Label Studio's browser)."""
    try:
        tile_id = tile_signing.tile_from_token(token)
    except signing.SignatureExpired:
        return JsonResponse(
            {"error": {"code": "expired", "message": "this image link has expired", "details": None}}, status=410
        )
    except (signing.BadSignature, ValueError):
        return JsonResponse({"error": {"code": "not_found", "message": "no such image", "details": None}}, status=404)
    tile = get_object_or_404(Tile, pk=tile_id)
    response = HttpResponse(tile_png(tile), content_type="image/png")
    # The token is the credential (no cookies), so any origin may read it: Label Studio's editor
    # loads it cross-origin.
    response["Access-Control-Allow-Origin"] = "*"
    response["Cache-Control"] = "private, max-age=3600"
    response["X-Content-Type-Options"] = "nosniff"
    return response
