from __future__ import annotations

from django.db.models import Count
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import generics, serializers, status
from rest_framework.exceptions import PermissionDenied
from rest_framework.response import Response
from rest_framework.views import APIView

from backend.projects.permissions import method_role, project_for

from . import services
from .invitations import invite_member
from .models import Membership, Role
from .selectors import projects_visible_to
from .serializers import (
    InvitationResultSerializer,
    InvitationSerializer,
    MembershipSerializer,
    ProjectSerializer,
    RoleSerializer,
)


class MeSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    username = serializers.CharField()
    email = serializers.EmailField()
    is_staff = serializers.BooleanField()
    is_superuser = serializers.BooleanField()
    roles = serializers.DictField(child=serializers.CharField(), help_text="project id -> role")


class MeView(APIView):
    @extend_schema(responses=MeSerializer)
    def get(self, request):
        user = request.user
        roles = {m.project_id: m.role for m in user.memberships.all()}
        return Response(
            {"id": user.pk, "username": user.username, "email": user.email, "is_staff": user.is_staff,
             "is_superuser": user.is_superuser, "roles": roles}
        )


class ProjectListView(generics.ListCreateAPIView):
    serializer_class = ProjectSerializer

    def get_queryset(self):
        return projects_visible_to(user=self.request.user).annotate(
            image_count=Count("images", distinct=True), tile_count=Count("tiles", distinct=True)
        )

    def perform_create(self, serializer):
        if not self.request.user.is_staff:
            raise PermissionDenied("only platform staff can create projects")
        data = dict(serializer.validated_data)
        serializer.instance = services.create_project(name=data.pop("name"), created_by=self.request.user, **data)


class ProjectDetailView(generics.RetrieveUpdateAPIView):
    serializer_class = ProjectSerializer
    http_method_names = ["get", "patch", "head", "options"]

    def get_object(self):
        return project_for(user=self.request.user, project_id=self.kwargs["project_id"], minimum=method_role(self.request))

    def perform_update(self, serializer):
        services.ensure_not_archived(project=serializer.instance)
        serializer.save()


class ProjectArchiveView(APIView):
    """POST archives the project (read-only, listed apart); DELETE restores it. Admins."""

    @extend_schema(request=None, responses=ProjectSerializer)
    def post(self, request, project_id: int):
        project = project_for(user=request.user, project_id=project_id, minimum=Role.ADMIN)
        project = services.archive_project(project=project)
        return Response(ProjectSerializer(project, context={"request": request}).data)

    @extend_schema(request=None, responses=ProjectSerializer)
    def delete(self, request, project_id: int):
        project = project_for(user=request.user, project_id=project_id, minimum=Role.ADMIN)
        project = services.restore_project(project=project)
        return Response(ProjectSerializer(project, context={"request": request}).data)


class MembershipListView(generics.ListCreateAPIView):
    serializer_class = MembershipSerializer
    pagination_class = None

    def get_project(self):
        return project_for(user=self.request.user, project_id=self.kwargs["project_id"], minimum=method_role(self.request))

    def get_queryset(self):
        return Membership.objects.filter(project=self.get_project()).select_related("user")

    @extend_schema(request=InvitationSerializer, responses={201: InvitationResultSerializer})
    def create(self, request, *args, **kwargs):
        """Invite by username or e-mail: an unknown person gets an account and a one-time
        set-password link (e-mailed when SMTP is configured, otherwise returned here and logged)."""
        project = self.get_project()
        serializer = InvitationSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        invitation = invite_member(project=project, username=data.get("username", ""), email=data.get("email", ""),
                                   role=data["role"], invited_by=request.user)
        body = {**MembershipSerializer(invitation.membership).data, "account_created": invitation.account_created,
                "emailed": invitation.emailed, "set_password_url": invitation.set_password_url}
        return Response(body, status=status.HTTP_201_CREATED)


class MembershipDetailView(APIView):
    def get_membership(self, request, project_id: int, membership_id: int) -> Membership:
        project = project_for(user=request.user, project_id=project_id, minimum=Role.ADMIN)
        return get_object_or_404(Membership, pk=membership_id, project=project)

    @extend_schema(request=RoleSerializer, responses=MembershipSerializer)
    def patch(self, request, project_id: int, membership_id: int):
        membership = self.get_membership(request, project_id, membership_id)
        serializer = RoleSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        membership = services.change_role(membership=membership, role=serializer.validated_data["role"])
        return Response(MembershipSerializer(membership).data)

    @extend_schema(responses={204: None})
    def delete(self, request, project_id: int, membership_id: int):
        services.remove_member(membership=self.get_membership(request, project_id, membership_id))
        return Response(status=status.HTTP_204_NO_CONTENT)
