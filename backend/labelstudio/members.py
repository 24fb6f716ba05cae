"""Members in Label Studio: each Karyo member who edits gets a Label Studio user (same username),
so what they save there is attributed to them in Karyo; and what they save in Karyo appears in
Label Studio as an annotation of that user (not only as a prediction).

Roles: Label Studio's community edition has no per-project roles (every member of its
organisation may open every project), so the mapping is what it can express: annotators,
reviewers and admins get an account; viewers get none (they cannot edit in Label Studio at all).
A removed member's Label Studio user is left as it is (it may belong to other projects); their
later saves there are not attributed (``ingest`` finds no membership and stores no author).
"""
from __future__ import annotations

from django.db.models import OuterRef, Subquery

from backend.common.storage import read_label_map
from backend.images.models import Annotation, AnnotationStatus
from backend.projects.models import Membership, Role

from . import conversions
from .client import LabelStudioClient
from .models import AnnotationSync, LabelStudioAccount, LabelStudioLink, TaskLink

EDITING_ROLES = (Role.ANNOTATOR, Role.REVIEWER, Role.ADMIN)


def account_for(*, client: LabelStudioClient, user) -> int:
    """The user's Label Studio id, creating the Label Studio user when needed."""
    known = LabelStudioAccount.objects.filter(user=user).values_list("ls_user_id", flat=True).first()
    if known:
        return known
    email = user.email or f"{user.username}@users.karyo.invalid"  # Label Studio needs an e-mail
    ls_id = client.ensure_user(username=user.username, email=email, first_name=user.first_name or user.username)
    LabelStudioAccount.objects.update_or_create(user=user, defaults={"ls_user_id": ls_id})
    return ls_id


def sync_members(*, link: LabelStudioLink, client: LabelStudioClient) -> int:
    """Accounts for the project's editing members; returns how many were created."""
    members = Membership.objects.filter(project=link.project, role__in=EDITING_ROLES).select_related("user")
    missing = [m.user for m in members if not LabelStudioAccount.objects.filter(user=m.user).exists()]
    for user in missing:
        account_for(client=client, user=user)
    return len(missing)


def karyo_user_for(ls_user_id) -> object | None:
    """The Karyo user behind a Label Studio user Karyo created (None for any other)."""
    if not ls_user_id:
        return None
    account = LabelStudioAccount.objects.filter(ls_user_id=int(ls_user_id)).select_related("user").first()
    return account.user if account else None


def push_annotations(*, link: LabelStudioLink, client: LabelStudioClient) -> int:
    """Each tile's newest annotation made in Karyo (submitted or accepted) as a Label Studio
    annotation by its author; a newer Karyo version updates that annotation. Versions that came
    from Label Studio are not sent back. Returns how many annotations were created or updated."""
    tasks = {t.tile_id: t for t in TaskLink.objects.filter(link=link)}
    newest = Annotation.objects.filter(tile=OuterRef("tile")).exclude(status=AnnotationStatus.DRAFT).order_by("-version")
    latest = (
        Annotation.objects.filter(tile__project=link.project, external_id="", tile_id__in=list(tasks))
        .exclude(status__in=[AnnotationStatus.DRAFT, AnnotationStatus.REJECTED])
        .filter(pk=Subquery(newest.values("pk")[:1]))
        .select_related("author", "tile")
    )
    pushed = 0
    for annotation in latest:
        task = tasks[annotation.tile_id]
        mine = AnnotationSync.objects.filter(link=link, task=task, annotation__external_id="").order_by("-pk").first()
        if mine is not None and mine.annotation_id == annotation.pk:
            continue
        result = conversions.prediction_result(
            read_label_map(annotation.mask.name), classes=annotation.classes or None,
            nucleus_classes=link.project.nucleus_classes,
        )
        if mine is not None:
            stored = client.update_annotation(annotation_id=mine.ls_annotation_id, result=result)
        else:
            author = account_for(client=client, user=annotation.author) if annotation.author_id else None
            stored = client.create_annotation(task_id=task.ls_task_id, result=result, completed_by=author)
        # The digest of what Label Studio stored: the reconcile reading it back stores nothing.
        AnnotationSync.objects.update_or_create(
            link=link, ls_annotation_id=stored.id,
            defaults={"task": task, "digest": conversions.result_digest(stored.result), "ls_updated_at": stored.updated_at,
                      "annotation": annotation, "deleted": False},
        )
        pushed += 1
    return pushed


def push_member_annotations(*, project) -> int:
    """The worker side of an annotation saved in Karyo: send it to Label Studio now (the periodic
    sync does it too when Label Studio was unreachable or another sync held the project)."""
    from .links import get_link, lease, record_error, resolve_errors
    from .client import LabelStudioError, is_configured

    if not is_configured():
        return 0
    link = get_link(project=project)
    if link.ls_project_id is None:
        return 0
    with lease(link):
        try:
            pushed = push_annotations(link=link, client=LabelStudioClient())
        except LabelStudioError as exc:
            record_error(link=link, operation="push", error=exc)
            raise
    resolve_errors(link=link, operations=("push",))
    return pushed


def schedule_annotation_push(*, annotation) -> None:
    """After an annotation made in Karyo commits: push it from a worker (cpu queue)."""
    from backend.common.jobs import enqueue_on_commit

    from .client import is_configured

    if is_configured() and not annotation.external_id and annotation.status != AnnotationStatus.DRAFT:
        enqueue_on_commit("karyo.cpu.labelstudio_push_annotations", annotation.tile.project_id)


def sync_project_members(*, project) -> int:
    """Accounts for a project's editing members, outside a full sync (its members changed)."""
    from .client import LabelStudioError, is_configured
    from .links import get_link, record_error

    if not is_configured():
        return 0
    link = get_link(project=project)
    if link.ls_project_id is None:
        return 0  # the first sync creates the Label Studio project and the accounts
    try:
        return sync_members(link=link, client=LabelStudioClient())
    except LabelStudioError as exc:
        record_error(link=link, operation="members", error=exc)
        raise
