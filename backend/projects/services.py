from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

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
    announce_members_changed(project=membership.project)
    return membership


@transaction.atomic
def remove_member(*, membership: Membership) -> None:
    if membership.role == Role.ADMIN:
        _ensure_another_admin(membership)
    project = membership.project
    membership.delete()
    announce_members_changed(project=project)


def _ensure_another_admin(membership: Membership) -> None:
    others = Membership.objects.filter(project=membership.project, role=Role.ADMIN).exclude(pk=membership.pk)
    if not others.exists():
        raise Conflict("a project must keep at least one admin")


def assign_class_ids(*, classes: list[dict], previous: list[dict] | None = None) -> list[dict]:
    """Karyo owns class ids: a class that keeps its id (an edit) keeps it, every other class gets
    the next id never used in this project, so stored label maps never change meaning."""
    previous = previous or []
    known = {c["id"] for c in previous}
    next_id = max(known | {0}) + 1
    result = []
    for item in classes:
        kept = item.get("id")
        if isinstance(kept, int) and kept in known:
            result.append({"id": kept, "name": item["name"], "color": item["color"]})
            known.discard(kept)
        else:
            result.append({"id": next_id, "name": item["name"], "color": item["color"]})
            next_id += 1
    return result


def removed_classes_in_use(*, project: Project, classes: list[dict]) -> list[str]:
    """Names of the project's classes missing from ``classes`` that stored data still uses
    (asked through ``signals.class_usage``: the images app answers for annotations)."""
    from .signals import class_usage

    kept = {c["id"] for c in classes}
    removed = {c["id"] for c in project.nucleus_classes if c["id"] not in kept}
    if not removed:
        return []
    used: set[int] = set()
    for _receiver, answer in class_usage.send(sender=Project, project=project, class_ids=removed):
        used |= set(answer or ())
    return [c["name"] for c in project.nucleus_classes if c["id"] in used]


def ensure_not_archived(*, project: Project) -> None:
    """Archived projects are read-only: no settings changes, no new work served, no training."""
    if project.archived_at is not None:
        raise Conflict(f"project {project.name!r} is archived: an admin restores it on its settings page to change it",
                       code="project_archived")


def archive_project(*, project: Project) -> Project:
    if project.archived_at is None:
        project.archived_at = timezone.now()
        project.save(update_fields=["archived_at"])
    return project


def restore_project(*, project: Project) -> Project:
    if project.archived_at is not None:
        project.archived_at = None
        project.save(update_fields=["archived_at"])
    return project


def announce_members_changed(*, project: Project) -> None:
    """Tell the apps above (labelstudio) once the change has committed."""
    from .signals import members_changed

    transaction.on_commit(lambda: members_changed.send(sender=Project, project=project))
