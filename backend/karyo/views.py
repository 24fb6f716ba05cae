from __future__ import annotations

from django.db import connection
from django.http import JsonResponse


def healthz(request):
    """Liveness for load balancers and compose health checks: the database answers."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok"})


def index(request):
    from django.db.models import Count
    from django.shortcuts import render

    from backend.projects.selectors import projects_visible_to

    projects = projects_visible_to(user=request.user).annotate(
        image_count=Count("images", distinct=True), tile_count=Count("tiles", distinct=True)
    )
    return render(request, "index.html", {"projects": projects})
