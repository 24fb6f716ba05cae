"""Exports and imports of curated data sets.

Who may do what: admins start exports and import archives; reviewers and admins list, inspect
and download exports (an export is the whole curated data set of a project, so viewers and
annotators, who work tile by tile, do not get it in bulk).
"""
from __future__ import annotations

from pathlib import Path

from django.http import FileResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import generics, status
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from backend.common.errors import Conflict, InvalidUpload
from backend.projects.models import Role
from backend.projects.permissions import project_for, require_role

from . import services
from .models import Export, ExportStatus
from .selectors import project_exports
from .serializers import ExportCreateSerializer, ExportSerializer, ImportResultSerializer, ImportSerializer
from .streaming import open_stream


class ExportListView(generics.ListAPIView):
    serializer_class = ExportSerializer

    def get_queryset(self):
        project = project_for(user=self.request.user, project_id=self.kwargs["project_id"], minimum=Role.REVIEWER)
        return project_exports(project=project)

    @extend_schema(request=ExportCreateSerializer, responses={202: ExportSerializer})
    def post(self, request, project_id: int):
        project = project_for(user=request.user, project_id=project_id, minimum=Role.ADMIN)
        serializer = ExportCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        export = services.start_export(
            project=project, format=serializer.validated_data["format"],
            filters=serializer.validated_data["filters"], created_by=request.user,
        )
        return Response(ExportSerializer(export).data, status=status.HTTP_202_ACCEPTED)


def export_for(request, export_id: int) -> Export:
    export = get_object_or_404(Export.objects.select_related("project", "created_by"), pk=export_id)
    require_role(user=request.user, project=export.project, minimum=Role.REVIEWER)
    return export


class ExportDetailView(generics.RetrieveAPIView):
    serializer_class = ExportSerializer

    def get_object(self):
        return export_for(self.request, self.kwargs["export_id"])


class ExportDownloadView(APIView):
    @extend_schema(responses={(200, "application/zip"): OpenApiTypes.BINARY})
    def get(self, request, export_id: int):
        export = export_for(request, export_id)
        if export.status != ExportStatus.SUCCEEDED or not export.file:
            raise Conflict(f"export {export.pk} is {export.status}; it can be downloaded once it has succeeded",
                           code="export_not_ready")
        stream, size = open_stream(export.file.name)
        response = FileResponse(stream, as_attachment=True, filename=Path(export.file.name).name,
                                content_type="application/zip")
        if size is not None:
            response["Content-Length"] = str(size)
        return response


class DatasetImportView(APIView):
    parser_classes = [MultiPartParser, FormParser]

    @extend_schema(request=ImportSerializer, responses={201: ImportResultSerializer, 200: ImportResultSerializer})
    def post(self, request, project_id: int):
        project = project_for(user=request.user, project_id=project_id, minimum=Role.ADMIN)
        if "file" not in request.FILES:
            raise InvalidUpload("attach the zip as the multipart field 'file'", code="missing_file")
        serializer = ImportSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        if data.get("onto_images"):
            answer = services.import_image_upload(project=project, upload=data["file"], status=data["status"],
                                                  author=request.user)
            return Response(answer, status=status.HTTP_201_CREATED)
        summary = services.import_upload(project=project, upload=data["file"], format=data.get("format"),
                                         status=data["status"], author=request.user)
        return Response(summary.as_dict(), status=status.HTTP_201_CREATED if summary.images else status.HTTP_200_OK)
