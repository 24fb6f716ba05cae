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


def not_found(request, exception=None):
    """JSON for API clients, plain text elsewhere (DEBUG=False page for unknown URLs)."""
    from django.http import HttpResponseNotFound

    if request.path.startswith("/api/"):
        return JsonResponse(
            {"error": {"code": "not_found", "message": f"no API endpoint at {request.path}", "details": None}}, status=404
        )
    return HttpResponseNotFound("Not found")
