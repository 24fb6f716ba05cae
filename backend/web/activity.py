"""Per-member activity in a project, for the dashboard (reviewers and admins see it)."""
from __future__ import annotations

from django.db.models import Count, Q

from backend.projects.models import Membership, Project

SUBMITTED_EVENT = "annotation.submitted"


def member_activity(*, project: Project) -> list[dict]:
    """Each member's tiles submitted (any non-draft version they authored), how many of their
    versions were accepted or rejected in review, and the time they spent in the correction
    workspace (seconds the page measured from opening a tile to submitting it)."""
    from backend.images.models import Annotation, AnnotationStatus
    from backend.ml.models import ProjectEvent

    authored = (
        Annotation.objects.filter(tile__project=project, author__isnull=False).exclude(status=AnnotationStatus.DRAFT)
        .values("author_id")
        .annotate(
            tiles=Count("tile", distinct=True),
            accepted=Count("id", filter=Q(status=AnnotationStatus.REVIEWED)),
            rejected=Count("id", filter=Q(status=AnnotationStatus.REJECTED)),
        )
    )
    by_user = {row["author_id"]: row for row in authored}
    seconds: dict[int, int] = {}
    for actor_id, data in ProjectEvent.objects.filter(project=project, kind=SUBMITTED_EVENT).values_list("actor_id", "data"):
        value = (data or {}).get("seconds")
        if actor_id is not None and isinstance(value, (int, float)):
            seconds[actor_id] = seconds.get(actor_id, 0) + int(value)
    rows = []
    for membership in Membership.objects.filter(project=project).select_related("user").order_by("user__username"):
        row = by_user.get(membership.user_id, {})
        rows.append({
            "user_id": membership.user_id, "username": membership.user.username, "role": membership.role,
            "tiles_submitted": row.get("tiles", 0), "accepted": row.get("accepted", 0), "rejected": row.get("rejected", 0),
            "seconds_spent": seconds.get(membership.user_id, 0),
        })
    return rows
