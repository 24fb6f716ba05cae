from __future__ import annotations

from django.db import connection
from django.http import JsonResponse


def healthz(request):
    """Liveness for load balancers and compose health checks: the database answers."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok"})


def _error_page(request, status: int, title: str, message: str):
    from django.shortcuts import render

    from backend.web.assets import entry_assets

    context = {"status": status, "title": title, "message": message, "assets": entry_assets()}
    return render(request, "error.html", context, status=status)


def not_found(request, exception=None):
    """JSON for API clients, Karyo's styled page elsewhere (unknown URLs, projects the caller is not in)."""
    if request.path.startswith("/api/"):
        return JsonResponse(
            {"error": {"code": "not_found", "message": f"no API endpoint at {request.path}", "details": None}}, status=404
        )
    return _error_page(request, 404, "Page not found",
                       "There is nothing here, or it belongs to a project you are not a member of.")


def forbidden(request, exception=None):
    """A page the caller's role does not open (the reason, when the view gave one, is shown)."""
    if request.path.startswith("/api/"):
        return JsonResponse({"error": {"code": "permission_denied", "message": "forbidden", "details": None}}, status=403)
    reason = str(exception) if exception is not None and str(exception) else "Your role does not open this page."
    return _error_page(request, 403, "Not allowed", reason)
