"""API of big uploads and slide pixels: chunked uploads, Deep Zoom tiles, thumbnails.

Thin views: the rules live in ``uploads.py``, ``ingest.py`` and ``pixels.py``.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from django.http import HttpResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.parsers import BaseParser
from rest_framework.response import Response
from rest_framework.views import APIView

from backend.common.errors import Conflict, InvalidUpload
from backend.projects.models import Role
from backend.projects.permissions import project_for, require_role

from . import uploads
from .models import Image, ImageState, Upload
from .serializers import (
    ChunkedUploadCreateSerializer,
    ChunkedUploadSerializer,
    ImageSerializer,
    PartUrlsRequestSerializer,
    UploadCompleteSerializer,
)

SLIDE_MAX_AGE = 3600  # a ready image's pixels never change (content-addressed file)
_deepzooms: OrderedDict[tuple, object] = OrderedDict()
_deepzoom_lock = threading.Lock()


def upload_body(upload: Upload) -> dict:
    parts = uploads.received_parts(upload)
    return {"id": str(upload.pk), "filename": upload.filename, "size": upload.size, "chunk_size": upload.chunk_size,
            "mode": upload.mode, "received": parts, "bytes_received": uploads.bytes_received(upload, parts),
            "state": upload.state}


def upload_for(request, upload_id) -> Upload:
    upload = get_object_or_404(Upload.objects.select_related("project"), pk=upload_id)
    require_role(user=request.user, project=upload.project, minimum=Role.ADMIN)
    return upload


class RawBytesParser(BaseParser):
    """Leaves the body unread: the view streams it to disk in blocks."""

    media_type = "*/*"

    def parse(self, stream, media_type=None, parser_context=None):
        return {}


class UploadCreateView(APIView):
    @extend_schema(request=ChunkedUploadCreateSerializer, responses={201: ChunkedUploadSerializer})
    def post(self, request, project_id: int):
        """Start a chunked, resumable upload of one file (a slide of up to several GB)."""
        project = project_for(user=request.user, project_id=project_id, minimum=Role.ADMIN)
        serializer = ChunkedUploadCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        upload = uploads.create_upload(project=project, filename=serializer.validated_data["filename"],
                                       size=serializer.validated_data["size"], user=request.user)
        return Response(upload_body(upload), status=status.HTTP_201_CREATED)


class UploadDetailView(APIView):
    @extend_schema(responses=ChunkedUploadSerializer)
    def get(self, request, upload_id):
        """Which parts have arrived (ask after a dropped connection, then send the others)."""
        return Response(upload_body(upload_for(request, upload_id)))


class UploadChunkView(APIView):
    parser_classes = (RawBytesParser,)

    @extend_schema(request={"application/octet-stream": OpenApiTypes.BINARY}, responses={204: None})
    def put(self, request, upload_id, n: int):
        """Part ``n`` (0-based) of a local-mode upload, raw bytes; sending it again replaces it."""
        upload = upload_for(request, upload_id)
        length = request.META.get("CONTENT_LENGTH")
        try:
            content_length = int(length) if length not in (None, "") else None
        except ValueError:
            raise InvalidUpload("Content-Length must be a number", code="invalid_part") from None
        uploads.receive_part(upload=upload, n=n, stream=request._request, content_length=content_length)
        return Response(status=status.HTTP_204_NO_CONTENT)


class UploadPartUrlsView(APIView):
    @extend_schema(request=PartUrlsRequestSerializer, responses={200: OpenApiTypes.OBJECT})
    def post(self, request, upload_id):
        """Presigned S3 URLs the browser PUTs parts to (s3 mode)."""
        upload = upload_for(request, upload_id)
        serializer = PartUrlsRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        urls = uploads.part_urls(upload=upload, parts=serializer.validated_data["parts"])
        return Response({"urls": {str(n): url for n, url in urls.items()}})


class UploadCompleteView(APIView):
    @extend_schema(request=UploadCompleteSerializer, responses={201: OpenApiTypes.OBJECT})
    def post(self, request, upload_id):
        """Assemble and check the file; answers at once with the image ``ingesting``."""
        upload = upload_for(request, upload_id)
        serializer = UploadCompleteSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        image = uploads.complete_upload(upload=upload, parts=serializer.validated_data.get("parts"))
        return Response({"image": ImageSerializer(image).data}, status=status.HTTP_201_CREATED)


def image_for(request, image_id: int, *, ready: bool = True) -> Image:
    image = get_object_or_404(Image.objects.select_related("project"), pk=image_id)
    require_role(user=request.user, project=image.project, minimum=Role.VIEWER)
    if ready and image.state != ImageState.READY:
        raise Conflict(f"image {image.pk} is {image.state}" + (f": {image.state_reason}" if image.state_reason else ""),
                       code=f"image_{image.state}")
    return image


def cached_response(data: bytes, content_type: str) -> HttpResponse:
    response = HttpResponse(data, content_type=content_type)
    response["Cache-Control"] = f"private, max-age={SLIDE_MAX_AGE}"
    return response


def deepzoom_for(image: Image):
    """(DeepZoom, reader lock) of ``image``, cached with its reader."""
    from ml_worker.deepzoom import DeepZoom

    from .pixels import _storage_key, open_image_reader

    reader, reader_lock = open_image_reader(image)
    key = (_storage_key(), image.file.name, id(reader))
    with _deepzoom_lock:
        zoom = _deepzooms.get(key)
        if zoom is None:
            zoom = DeepZoom(reader, tile_size=254, overlap=1, format="jpeg")
            _deepzooms[key] = zoom
            while len(_deepzooms) > 32:
                _deepzooms.popitem(last=False)
        else:
            _deepzooms.move_to_end(key)
    return zoom, reader_lock


class SlideDziView(APIView):
    @extend_schema(responses={(200, "application/xml"): OpenApiTypes.STR})
    def get(self, request, image_id: int):
        """The Deep Zoom descriptor of a ready image (tiles at ``slide_files/<level>/<col>_<row>.jpeg``)."""
        zoom, _lock = deepzoom_for(image_for(request, image_id))
        return cached_response(zoom.dzi_xml().encode(), "application/xml")


class SlideTileView(APIView):
    @extend_schema(responses={(200, "image/jpeg"): OpenApiTypes.BINARY})
    def get(self, request, image_id: int, level: int, col: int, row: int):
        zoom, reader_lock = deepzoom_for(image_for(request, image_id))
        try:
            with reader_lock:
                data = zoom.tile(level, col, row)
        except (KeyError, ValueError):
            raise InvalidUpload(f"no Deep Zoom tile {level}/{col}_{row} in this image", code="invalid_tile",
                                status_code=404) from None
        return cached_response(data, "image/jpeg")


class ThumbnailView(APIView):
    @extend_schema(responses={(200, "image/jpeg"): OpenApiTypes.BINARY})
    def get(self, request, image_id: int):
        image = image_for(request, image_id, ready=False)
        if not image.thumbnail:
            raise Conflict(f"image {image.pk} has no thumbnail yet ({image.state})", code="no_thumbnail")
        with image.thumbnail.open("rb") as fh:
            return cached_response(fh.read(), "image/jpeg")
