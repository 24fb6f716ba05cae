"""Every response under ``/api/`` that is an error is JSON in the documented shape.

DRF's exception handler covers exceptions inside API views; this middleware covers the rest:
Django-level 404/405/500 pages, a body over the size limits (refused before it is read, 413),
and errors raised outside DRF views. Tracebacks go to the server log only.
"""
from __future__ import annotations

import logging

from django.conf import settings
from django.core.exceptions import RequestDataTooBig

from .errors import error_response

log = logging.getLogger("backend.errors")
API_PREFIX = "/api/"
CODES = {400: "bad_request", 401: "not_authenticated", 403: "permission_denied", 404: "not_found",
         405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type", 429: "throttled"}
MESSAGES = {400: "the request is malformed", 404: "not found", 405: "this method is not allowed here",
            413: "the request body is too large", 500: "internal server error; the server log has the details"}


def body_limit(content_type: str) -> int:
    """Bytes a request body may have: uploads (multipart, raw bytes) up to the upload limit, the rest
    (JSON, forms) up to Django's DATA_UPLOAD_MAX_MEMORY_SIZE."""
    if content_type.startswith(("multipart/", "application/octet-stream", "application/zip", "image/")):
        return settings.KARYO_MAX_UPLOAD_BYTES + 1024 * 1024  # the file plus the multipart envelope
    return settings.DATA_UPLOAD_MAX_MEMORY_SIZE


class ApiErrorMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if not request.path.startswith(API_PREFIX):
            return self.get_response(request)
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return error_response(400, "bad_request", "Content-Length is not a number")
        limit = body_limit(request.META.get("CONTENT_TYPE", ""))
        if length > limit:
            return error_response(413, "request_too_large",
                                  f"the request body has {length:,} bytes; the limit for this kind is {limit:,}",
                                  {"limit": limit})
        response = self.get_response(request)
        return self._as_json(request, response)

    def process_exception(self, request, exception):
        if not request.path.startswith(API_PREFIX):
            return None
        if isinstance(exception, RequestDataTooBig):
            return error_response(413, "request_too_large", "the request body is too large")
        log.error("unhandled error on %s %s", request.method, request.path, exc_info=exception)
        return error_response(500, "server_error", MESSAGES[500])

    @staticmethod
    def _as_json(request, response):
        if response.status_code < 400 or response.get("Content-Type", "").startswith("application/json"):
            return response
        status = response.status_code
        if status >= 500:
            message = MESSAGES[500]
        else:
            message = MESSAGES.get(status, "the request failed")
            if status == 405:
                message = f"{request.method} is not allowed here; allowed: {response.get('Allow', 'none')}"
        converted = error_response(status, CODES.get(status, "server_error" if status >= 500 else "error"), message)
        for header in ("Allow", "Retry-After", "WWW-Authenticate"):
            if header in response:
                converted[header] = response[header]
        return converted
