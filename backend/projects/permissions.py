"""Project-role checks shared by every API view (here, not in ``common``: they are about projects,
and ``common`` imports no app).

Outsiders get 404 rather than 403 so that project, image and tile ids do not leak; members
whose role is too low get 403 with the role they would need.
"""
from __future__ import annotations

from django.shortcuts import get_object_or_404
from rest_framework.exceptions import NotFound, PermissionDenied

from .models import ROLE_RANK, Project, Role
from .selectors import role_of


def require_role(*, user, project: Project, minimum: Role) -> Role:
    role = role_of(user=user, project=project)
    if role is None:
        raise NotFound("not found")
    if ROLE_RANK[role] < ROLE_RANK[minimum]:
        raise PermissionDenied(f"this action needs the {minimum.value} role in project {project.name!r}; you are {role.value}")
    return role


def project_for(*, user, project_id: int, minimum: Role) -> Project:
    project = get_object_or_404(Project, pk=project_id)
    require_role(user=user, project=project, minimum=minimum)
    return project


def method_role(request, *, read: Role = Role.VIEWER, write: Role = Role.ADMIN) -> Role:
    return read if request.method in ("GET", "HEAD", "OPTIONS") else write
