"""The browser UI's own API endpoints (under /api/, role-checked like every other).

* ``tiles/<id>/regions/``: GET the polygons the correction workspace opens (the active
  model's prediction, or the latest annotation); POST the pathologist's edits, stored as a new
  annotation version.
* ``tiles/<id>/prediction.png`` and ``tiles/<id>/uncertainty.png``: queue thumbnails.
* ``annotations/<id>/diff/`` and ``diff.png``: an annotation against the prediction it corrected.
* ``projects/<id>/summary/``, ``projects/<id>/tiles-by-image/``, ``projects/<id>/review/``:
  dashboard and review lists. ``system/status/``: is a worker answering.
"""
from __future__ import annotations

import numpy as np
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import generics, serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from backend.common.errors import KaryoError
from backend.common.storage import read_label_map
from backend.images.api import png_response, tile_for
from backend.images.models import Annotation, AnnotationStatus
from backend.images.pixels import read_tile_rgb
from backend.images.rendering import overlay
from backend.images.serializers import AnnotationSerializer
from backend.projects.models import Role
from backend.projects.permissions import project_for, require_role
from backend.projects.selectors import role_of

from . import editing, services


def _size(request) -> int | None:
    value = request.query_params.get("size")
    if value in (None, ""):
        return None
    try:
        size = int(value)
    except ValueError:
        raise KaryoError("size must be a number of pixels", code="invalid_parameter") from None
    if not 16 <= size <= 4096:
        raise KaryoError("size must lie between 16 and 4096", code="invalid_parameter")
    return size


class EditSerializer(serializers.Serializer):
    base = serializers.DictField(help_text='what the editor was opened from: {"kind": "prediction"|"annotation"|"empty", "id": ...}')
    regions = serializers.ListField(child=serializers.DictField(), required=False, default=list,
                                    help_text="Label Studio polygonlabels results of the changed and new nuclei")
    deleted = serializers.ListField(required=False, default=list, help_text="instance ids (or region ids) removed")
    merges = serializers.ListField(child=serializers.ListField(), required=False, default=list,
                                   help_text="groups of region ids that become one nucleus")
    # A plain string (checked below): an enum here would collide with AnnotationCreate's in the schema.
    status = serializers.CharField(default=AnnotationStatus.SUBMITTED, help_text="submitted (default) or draft")
    frame = serializers.DictField(required=False, help_text="{x, y, w, h} of the context frame the editor was opened "
                                  "in (the GET's frame): the regions are percentages of it, and the version keeps the "
                                  "nuclei the tile owns, whole. Absent: percentages of the tile box.")
    seconds_spent = serializers.IntegerField(required=False, min_value=0, max_value=86400,
                                             help_text="time the page had this tile open before this save (member activity)")

    def validate_status(self, value: str) -> str:
        if value not in (AnnotationStatus.SUBMITTED, AnnotationStatus.DRAFT):
            raise serializers.ValidationError("status is submitted or draft")
        return value


class TileRegionsView(APIView):
    @extend_schema(
        parameters=[OpenApiParameter("source", str, enum=["auto", "prediction", "annotation", "empty"]),
                    OpenApiParameter("annotation", int, description="open this annotation version")],
        responses=OpenApiTypes.OBJECT,
    )
    def get(self, request, tile_id: int):
        tile = tile_for(request, tile_id)
        annotation_id = request.query_params.get("annotation")
        try:
            annotation_id = int(annotation_id) if annotation_id not in (None, "") else None
        except ValueError:
            raise KaryoError("annotation must be an id", code="invalid_parameter") from None
        payload = services.editor_payload(tile, source=request.query_params.get("source") or "auto",
                                          annotation_id=annotation_id)
        return Response(payload)

    @extend_schema(request=EditSerializer, responses={201: AnnotationSerializer})
    def post(self, request, tile_id: int):
        tile = tile_for(request, tile_id, minimum=Role.ANNOTATOR)
        serializer = EditSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        annotation, result, server_ms = services.submit_edits(tile=tile, user=request.user, data=serializer.validated_data)
        body = dict(AnnotationSerializer(annotation).data)
        body["edit"] = {"changed": result.changed, "deleted": result.deleted, "merged": result.merged,
                        "untouched": result.untouched, "server_ms": round(server_ms, 1)}
        return Response(body, status=status.HTTP_201_CREATED)


class TilePredictionOverlayView(APIView):
    @extend_schema(parameters=[OpenApiParameter("size", int, description="longest side of a thumbnail")],
                   responses={(200, "image/png"): OpenApiTypes.BINARY})
    def get(self, request, tile_id: int):
        """The tile with the active model's prediction drawn on it (the plain tile when there is none;
        the ``X-Karyo-Prediction`` header then says ``none``)."""
        tile = tile_for(request, tile_id)
        size = _size(request)
        prediction = services.active_prediction(tile)
        rgb = read_tile_rgb(tile)
        if prediction is not None:
            color = tile.project.nucleus_classes[0]["color"]
            rgb = overlay(rgb, read_label_map(prediction.mask.name), default_color=color, alpha=0.3)
        response = png_response(services.png_of(rgb, size=size))
        response["X-Karyo-Prediction"] = str(prediction.model_version_id) if prediction else "none"
        return response


class TileContextView(APIView):
    @extend_schema(parameters=[OpenApiParameter("size", int, description="longest side of a thumbnail"),
                               OpenApiParameter("editor", bool, description="the editor's backdrop: only the nuclei "
                                                "other tiles own are outlined (cyan)")],
                   responses={(200, "image/png"): OpenApiTypes.BINARY})
    def get(self, request, tile_id: int):
        """The tile with ``context_margin`` pixels of its image around it (dimmed) and the image's
        stitched nuclei outlined whole (those crossing the tile's border in cyan). The header
        ``X-Karyo-Context`` gives the frame in the image: ``x,y,w,h,margin``."""
        from .context import tile_context

        tile = tile_for(request, tile_id)
        picture, meta = tile_context(tile=tile, for_editor=request.query_params.get("editor") in ("1", "true"))
        response = png_response(services.png_of(picture, size=_size(request)))
        response["X-Karyo-Context"] = f"{meta['x']},{meta['y']},{meta['w']},{meta['h']},{meta['margin']}"
        return response


class TileUncertaintyView(APIView):
    @extend_schema(parameters=[OpenApiParameter("size", int)], responses={(200, "image/png"): OpenApiTypes.BINARY})
    def get(self, request, tile_id: int):
        """The prediction's per-pixel uncertainty as a transparent heat map (RGBA) to lay over the tile."""
        tile = tile_for(request, tile_id)
        prediction = services.active_prediction(tile)
        heat = services.uncertainty_map(prediction) if prediction is not None else None
        if heat is None:
            raise KaryoError("no uncertainty map for this tile: it has no prediction by the current model yet",
                             code="no_uncertainty_map", status_code=404)
        return png_response(services.png_of(editing.heat_overlay(heat), size=_size(request)))


def annotation_for(request, annotation_id: int) -> Annotation:
    annotation = get_object_or_404(
        Annotation.objects.select_related("tile__project", "tile__image", "prediction__model_version", "parent", "author"),
        pk=annotation_id,
    )
    require_role(user=request.user, project=annotation.tile.project, minimum=Role.VIEWER)
    return annotation


class AnnotationDiffView(APIView):
    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request, annotation_id: int):
        """How this version differs from the prediction it corrected (or its parent version)."""
        annotation = annotation_for(request, annotation_id)
        reference = services.diff_reference(annotation)
        body = {"annotation": AnnotationSerializer(annotation).data, "tile": {
            "id": annotation.tile_id, "image_name": annotation.tile.image.name, "w": annotation.tile.w, "h": annotation.tile.h}}
        if reference is None:
            body.update(reference=None, diff=None)
            return Response(body)
        kind, obj, ref = reference
        body["reference"] = (
            {"kind": kind, "id": obj.pk, "label": f"prediction of model v{obj.model_version.version}",
             "model_version": obj.model_version_id}
            if kind == "prediction" else {"kind": kind, "id": obj.pk, "label": f"version {obj.version}"}
        )
        body["diff"] = editing.compare(read_label_map(annotation.mask.name), ref)
        return Response(body)


class AnnotationDiffImageView(APIView):
    @extend_schema(parameters=[OpenApiParameter("size", int)], responses={(200, "image/png"): OpenApiTypes.BINARY})
    def get(self, request, annotation_id: int):
        annotation = annotation_for(request, annotation_id)
        reference = services.diff_reference(annotation)
        mask = read_label_map(annotation.mask.name)
        ref = reference[2] if reference else np.zeros_like(mask)
        image = editing.diff_image(read_tile_rgb(annotation.tile), mask, ref)
        return png_response(services.png_of(image, size=_size(request)))


class ReviewItemSerializer(AnnotationSerializer):
    status = serializers.CharField(read_only=True, help_text="draft, submitted, reviewed or rejected")
    image_name = serializers.CharField(source="tile.image.name", read_only=True)
    tile_w = serializers.IntegerField(source="tile.w", read_only=True)
    tile_h = serializers.IntegerField(source="tile.h", read_only=True)

    class Meta(AnnotationSerializer.Meta):
        fields = [*AnnotationSerializer.Meta.fields, "image_name", "tile_w", "tile_h"]
        read_only_fields = fields


class ReviewListView(generics.ListAPIView):
    """The newest version of each tile by status (default ``submitted``: awaiting review)."""

    serializer_class = ReviewItemSerializer

    @extend_schema(parameters=[OpenApiParameter("status", str, enum=["submitted", "reviewed", "rejected", "draft", "any"])])
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    def get_queryset(self):
        project = project_for(user=self.request.user, project_id=self.kwargs["project_id"], minimum=Role.VIEWER)
        return services.review_queryset(project=project, status=self.request.query_params.get("status") or "submitted")


class ProjectSummaryView(APIView):
    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request, project_id: int):
        project = project_for(user=request.user, project_id=project_id, minimum=Role.VIEWER)
        role = role_of(user=request.user, project=project)
        return Response(services.project_summary(project=project, role=role.value if role else None))


class ImageTilesView(APIView):
    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request, project_id: int):
        project = project_for(user=request.user, project_id=project_id, minimum=Role.VIEWER)
        return Response({"images": services.image_tiles(project=project)})


class SystemStatusView(APIView):
    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request):
        """Is a worker answering (training, predictions and exports need one)? Is Label Studio connected?"""
        from backend.labelstudio.client import is_configured

        return Response({"worker": services.worker_status(refresh=request.query_params.get("refresh") == "1"),
                         "label_studio": {"configured": is_configured()}})
