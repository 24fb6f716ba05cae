from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import QuerySet

from .models import ROLE_RANK, Membership, Project, Role


def role_of(*, user: AbstractBaseUser | AnonymousUser, project: Project) -> Role | None:
    """The caller's role in ``project``; superusers are admins everywhere, outsiders get None."""
    if not user.is_authenticated:
        return None
    if user.is_superuser:
        return Role.ADMIN
    role = Membership.objects.filter(user=user, project=project).values_list("role", flat=True).first()
    return Role(role) if role else None


def has_role(*, user, project: Project, minimum: Role) -> bool:
    role = role_of(user=user, project=project)
    return role is not None and ROLE_RANK[role] >= ROLE_RANK[minimum]


def projects_visible_to(*, user) -> QuerySet[Project]:
    if not user.is_authenticated:
        return Project.objects.none()
    if user.is_superuser:
        return Project.objects.all()
    return Project.objects.filter(memberships__user=user).distinct()
