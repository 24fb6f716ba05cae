"""Label Studio's calls (webhooks, the ML-backend protocol) carry a shared secret, not a user.

Two carriers, both compared in constant time with ``KARYO_LABEL_STUDIO_WEBHOOK_SECRET``: the
``X-Karyo-Webhook-Secret`` header (webhooks: Label Studio sends the headers Karyo registered)
and HTTP Basic authentication whose password is the secret (ML backends: Label Studio's
"Basic auth" connection). No secret, a wrong one, or no secret configured: 401.
"""
from __future__ import annotations

import base64
import binascii
import hmac

from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions

SECRET_HEADER = "HTTP_X_KARYO_WEBHOOK_SECRET"
REALM = 'Basic realm="karyo-label-studio"'


class LabelStudioCaller(AnonymousUser):
    """The request's user: Label Studio itself, proven by the shared secret."""

    @property
    def is_authenticated(self) -> bool:  # for DRF's throttles and logging; no project role
        return True


def _offered_secret(request) -> str | None:
    header = request.META.get(SECRET_HEADER)
    if header is not None:
        return header
    auth = request.META.get("HTTP_AUTHORIZATION", "")
    if auth[:6].lower() == "basic ":
        try:
            decoded = base64.b64decode(auth[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise exceptions.AuthenticationFailed("malformed Basic authorization header") from None
        return decoded.partition(":")[2]
    return None


class SharedSecretAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request):
        offered = _offered_secret(request)
        if offered is None:
            return None
        expected = settings.LABEL_STUDIO_WEBHOOK_SECRET
        if not expected:
            raise exceptions.AuthenticationFailed("the Label Studio integration has no secret configured")
        if not hmac.compare_digest(offered.encode(), expected.encode()):
            raise exceptions.AuthenticationFailed("wrong Label Studio secret")
        return LabelStudioCaller(), "label-studio-secret"

    def authenticate_header(self, request) -> str:
        return REALM


class IsLabelStudio(permissions.BasePermission):
    message = "this endpoint is for Label Studio: send the shared secret"

    def has_permission(self, request, view) -> bool:
        return request.auth == "label-studio-secret"



class SharedSecretScheme(OpenApiAuthenticationExtension):
    """Documents the scheme in the OpenAPI schema (registered when this module is imported)."""

    target_class = SharedSecretAuthentication
    name = "labelStudioSecret"

    def get_security_definition(self, auto_schema):
        return {
            "type": "apiKey", "in": "header", "name": "X-Karyo-Webhook-Secret",
            "description": "KARYO_LABEL_STUDIO_WEBHOOK_SECRET (or HTTP Basic with it as the password)",
        }
