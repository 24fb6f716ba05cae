from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction

from backend.common.errors import Conflict, KaryoError

from .models import Membership, Project, Role


@transaction.atomic
def create_project(*, name: str, created_by, **fields: Any) -> Project:
    """Create a project and make its creator its admin."""
    if Project.objects.filter(name=name).exists():
        raise Conflict(f"a project named {name!r} already exists")
    project = Project(name=name, created_by=created_by, **fields)
    project.full_clean()
    project.save()
    if created_by is not None:
        Membership.objects.create(user=created_by, project=project, role=Role.ADMIN)
    return project


def add_member(*, project: Project, username: str, role: str) -> Membership:
    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        raise KaryoError(f"no user named {username!r}", code="unknown_user")
    if role not in Role.values:
        raise KaryoError(f"unknown role {role!r}; use one of {', '.join(Role.values)}", code="invalid_role")
    membership, created = Membership.objects.get_or_create(user=user, project=project, defaults={"role": role})
    if not created:
        raise Conflict(f"{username} is already a member of {project.name}")
    return membership


@transaction.atomic
def change_role(*, membership: Membership, role: str) -> Membership:
    if role not in Role.values:
        raise KaryoError(f"unknown role {role!r}; use one of {', '.join(Role.values)}", code="invalid_role")
    if membership.role == Role.ADMIN and role != Role.ADMIN:
        _ensure_another_admin(membership)
    membership.role = role
    membership.save(update_fields=["role"])
    return membership


@transaction.atomic
def remove_member(*, membership: Membership) -> None:
    if membership.role == Role.ADMIN:
        _ensure_another_admin(membership)
    membership.delete()


def _ensure_another_admin(membership: Membership) -> None:
    others = Membership.objects.filter(project=membership.project, role=Role.ADMIN).exclude(pk=membership.pk)
    if not others.exists():
        raise Conflict("a project must keep at least one admin")
