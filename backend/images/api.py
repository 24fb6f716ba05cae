from __future__ import annotations

import numpy as np
from django.core.cache import cache
from django.http import HttpResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import generics, status
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from backend.common.errors import InvalidUpload
from backend.common.storage import encode_png, read_label_map
from backend.projects.models import Role
from backend.projects.permissions import project_for, require_role

from . import services
from .models import Annotation, AnnotationSource, Image, Tile
from .pixels import read_tile_rgb, tile_png
from .rendering import overlay
from .selectors import latest_annotation, tiles_with_status
from .serializers import (
    AnnotationCreateSerializer,
    AnnotationSerializer,
    ImageSerializer,
    ReviewSerializer,
    TileSerializer,
    UploadResultSerializer,
    UploadSerializer,
)
from .validation import decode_mask, decode_upload


def png_response(data: bytes) -> HttpResponse:
    response = HttpResponse(data, content_type="image/png")
    response["Cache-Control"] = "private, max-age=60"
    return response


class ImageListView(generics.ListAPIView):
    serializer_class = ImageSerializer
    parser_classes = [MultiPartParser, FormParser]

    def get_queryset(self):
        project = project_for(user=self.request.user, project_id=self.kwargs["project_id"], minimum=Role.VIEWER)
        return Image.objects.filter(project=project).select_related("uploaded_by")

    @extend_schema(request=UploadSerializer, responses={201: UploadResultSerializer})
    def post(self, request, project_id: int):
        project = project_for(user=request.user, project_id=project_id, minimum=Role.ADMIN)
        if "file" not in request.FILES:
            raise InvalidUpload("attach the image (or zip) as the multipart field 'file'", code="missing_file")
        serializer = UploadSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        upload = serializer.validated_data["file"]
        decoded = decode_upload(upload.name, upload.read())
        results = services.ingest_images(
            project=project, images=decoded, uploaded_by=request.user,
            microns_per_pixel=serializer.validated_data.get("microns_per_pixel"), background=True,
        )
        created = sum(r.created for r in results)
        body = {
            "images": ImageSerializer([r.image for r in results], many=True).data,
            "created": created,
            "duplicates": len(results) - created,
        }
        return Response(body, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


class ImageDetailView(generics.RetrieveAPIView):
    serializer_class = ImageSerializer

    def get_object(self):
        image = get_object_or_404(Image, pk=self.kwargs["image_id"])
        require_role(user=self.request.user, project=image.project, minimum=Role.VIEWER)
        return image


class TileListView(generics.ListAPIView):
    serializer_class = TileSerializer

    def get_queryset(self):
        project = project_for(user=self.request.user, project_id=self.kwargs["project_id"], minimum=Role.VIEWER)
        return tiles_with_status(project=project).order_by("id")


def tile_for(request, tile_id: int, minimum: Role = Role.VIEWER) -> Tile:
    tile = get_object_or_404(Tile.objects.select_related("project", "image"), pk=tile_id)
    require_role(user=request.user, project=tile.project, minimum=minimum)
    return tile


class TileDetailView(generics.RetrieveAPIView):
    serializer_class = TileSerializer

    def get_object(self):
        tile = tile_for(self.request, self.kwargs["tile_id"])
        return tiles_with_status(project=tile.project).get(pk=tile.pk)


class TileImageView(APIView):
    @extend_schema(responses={(200, "image/png"): OpenApiTypes.BINARY})
    def get(self, request, tile_id: int):
        tile = tile_for(request, tile_id)
        # A tile's pixels never change (same image bytes, same grid cell, same working resolution):
        # encode the PNG once and share it between web processes through the cache.
        key = f"tile-png:{tile.image.sha256}:{tile.x}:{tile.y}:{tile.w}:{tile.h}:{tile.project.working_mpp}"
        data = cache.get(key)
        if data is None:
            data = tile_png(tile)
            cache.set(key, data, timeout=24 * 3600)
        return png_response(data)


class TileOverlayView(APIView):
    @extend_schema(
        parameters=[OpenApiParameter("annotation", int, description="annotation version id (default: latest)")],
        responses={(200, "image/png"): OpenApiTypes.BINARY},
    )
    def get(self, request, tile_id: int):
        tile = tile_for(request, tile_id)
        if "annotation" in request.query_params:
            try:
                annotation_id = int(request.query_params["annotation"])
            except ValueError:
                raise InvalidUpload("annotation must be an id", code="invalid_parameter") from None
            annotation = get_object_or_404(Annotation, pk=annotation_id, tile=tile)
        else:
            annotation = latest_annotation(tile=tile)
        rgb = read_tile_rgb(tile)
        if annotation is None:
            instances, classes = np.zeros(rgb.shape[:2], np.int32), {}
        else:
            instances, classes = read_label_map(annotation.mask.name), annotation.classes
        colors = {c["id"]: c["color"] for c in tile.project.nucleus_classes}
        default = tile.project.nucleus_classes[0]["color"]
        return png_response(encode_png(overlay(rgb, instances, classes=classes, class_colors=colors, default_color=default)))


class AnnotationListView(generics.ListAPIView):
    serializer_class = AnnotationSerializer
    parser_classes = [MultiPartParser, FormParser]

    def get_queryset(self):
        tile = tile_for(self.request, self.kwargs["tile_id"])
        return tile.annotations.select_related("author", "reviewed_by").order_by("-version")

    @extend_schema(request=AnnotationCreateSerializer, responses={201: AnnotationSerializer})
    def post(self, request, tile_id: int):
        tile = tile_for(request, tile_id, minimum=Role.ANNOTATOR)
        if "mask" not in request.FILES:
            raise InvalidUpload("attach the label map as the multipart field 'mask'", code="missing_file")
        serializer = AnnotationCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        instances = decode_mask(data["mask"].name, data["mask"].read(), width=tile.w, height=tile.h)
        parent = None
        if data.get("parent") is not None:
            parent = Annotation.objects.filter(pk=data["parent"], tile=tile).first()
            if parent is None:
                raise InvalidUpload("parent must be an annotation version of this tile", code="invalid_parent")
        classes = data.get("classes") or None
        if classes is not None and not (
            isinstance(classes, dict) and all(str(k).isdigit() and isinstance(v, int) for k, v in classes.items())
        ):
            raise InvalidUpload('classes must map instance ids to class ids, e.g. {"1": 1}', code="invalid_classes")
        if classes:
            known = {c["id"] for c in tile.project.nucleus_classes}
            unknown = sorted({v for v in classes.values() if v not in known})
            if unknown:
                raise InvalidUpload(f"unknown nucleus class ids: {unknown}", code="invalid_classes")
        annotation, _ = services.create_annotation(
            tile=tile, instances=instances, author=request.user, source=AnnotationSource.MANUAL,
            status=data["status"], parent=parent, classes=classes,
        )
        return Response(AnnotationSerializer(annotation).data, status=status.HTTP_201_CREATED)


def annotation_for(request, annotation_id: int, minimum: Role = Role.VIEWER) -> Annotation:
    annotation = get_object_or_404(Annotation.objects.select_related("tile__project"), pk=annotation_id)
    require_role(user=request.user, project=annotation.tile.project, minimum=minimum)
    return annotation


class AnnotationDetailView(generics.RetrieveAPIView):
    serializer_class = AnnotationSerializer

    def get_object(self):
        return annotation_for(self.request, self.kwargs["annotation_id"])


class AnnotationMaskView(APIView):
    @extend_schema(responses={(200, "image/png"): OpenApiTypes.BINARY})
    def get(self, request, annotation_id: int):
        annotation = annotation_for(request, annotation_id)
        with annotation.mask.open("rb") as fh:
            return png_response(fh.read())


class AnnotationReviewView(APIView):
    @extend_schema(request=ReviewSerializer, responses=AnnotationSerializer)
    def post(self, request, annotation_id: int):
        annotation = annotation_for(request, annotation_id, minimum=Role.REVIEWER)
        serializer = ReviewSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        annotation = services.review_annotation(
            annotation=annotation, reviewer=request.user, accept=serializer.validated_data["decision"] == "accept",
            comment=serializer.validated_data["comment"],
        )
        return Response(AnnotationSerializer(annotation).data)
