from __future__ import annotations

from django.db import connection
from django.http import JsonResponse


def healthz(request):
    """Liveness for load balancers and compose health checks: the database answers."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok"})


def not_found(request, exception=None):
    """JSON for API clients, plain text elsewhere (DEBUG=False page for unknown URLs)."""
    from django.http import HttpResponseNotFound

    if request.path.startswith("/api/"):
        return JsonResponse(
            {"error": {"code": "not_found", "message": f"no API endpoint at {request.path}", "details": None}}, status=404
        )
    return HttpResponseNotFound("Not found")
