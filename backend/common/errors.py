"""One JSON error shape for the whole API: ``{"error": {"code", "message", "details"}}``."""
from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.http import Http404, JsonResponse
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler, set_rollback

log = logging.getLogger("backend.errors")


class KaryoError(exceptions.APIException):
    """A domain error with a stable machine code and a message meant for people."""

    status_code = status.HTTP_400_BAD_REQUEST
    default_code = "invalid"

    def __init__(self, message: str, *, code: str | None = None, status_code: int | None = None, details: Any = None):
        super().__init__(detail=message, code=code or self.default_code)
        if status_code is not None:
            self.status_code = status_code
        self.code = code or self.default_code
        self.details = details


class InvalidUpload(KaryoError):
    default_code = "invalid_upload"


class UnsupportedFormat(KaryoError):
    status_code = status.HTTP_415_UNSUPPORTED_MEDIA_TYPE
    default_code = "unsupported_format"


class Conflict(KaryoError):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"


class RequestTooLarge(KaryoError):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "request_too_large"


def error_body(code: str, message: str, details: Any = None) -> dict:
    return {"error": {"code": code, "message": message, "details": details}}


def error_response(status_code: int, code: str, message: str, details: Any = None) -> JsonResponse:
    """The documented error shape outside DRF (middleware, Django-level errors)."""
    return JsonResponse(error_body(code, message, details), status=status_code)


def _message(detail: Any) -> str:
    # Iterative, not recursive: a validation error about deeply nested input must not recurse.
    path: list[str] = []
    for _ in range(64):
        if isinstance(detail, list) and detail:
            detail = detail[0]
        elif isinstance(detail, dict) and detail:
            key, detail = next(iter(detail.items()))
            if key != "non_field_errors":
                path.append(str(key))
        else:
            break
    text = str(detail)
    return ": ".join([*path, text])


def json_exception_handler(exc: Exception, context: dict) -> Response | None:
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    elif isinstance(exc, RequestDataTooBig):
        exc = RequestTooLarge(f"the request body is too large ({exc})")
    elif isinstance(exc, RecursionError):
        exc = exceptions.ParseError("the request is nested too deeply")
    elif isinstance(exc, SuspiciousOperation):
        exc = KaryoError("the request was refused as malformed", code="bad_request")
    response = exception_handler(exc, context)
    if response is None:
        # A bug, not the caller's fault: the details go to the server log, the caller gets the shape.
        view = context.get("view")
        log.error("unhandled error in %s", type(view).__name__ if view else "a view", exc_info=exc)
        set_rollback()
        return Response(error_body("server_error", "internal server error; the server log has the details"),
                        status=status.HTTP_500_INTERNAL_SERVER_ERROR)
    if isinstance(exc, KaryoError):
        code, message, details = exc.code, str(exc.detail), exc.details
    elif isinstance(exc, exceptions.ValidationError):
        code, message, details = "validation_error", _message(exc.detail), exc.detail
    else:
        detail = getattr(exc, "detail", str(exc))
        code = getattr(detail, "code", None) or getattr(exc, "default_code", "error")
        message, details = _message(detail), None
    response.data = {"error": {"code": code, "message": message, "details": details}}
    return response
