"""``POST /api/auth/token/``: DRF's token login with failed-attempt throttling and a bounded JSON parser."""
from __future__ import annotations

import math

from rest_framework import exceptions
from rest_framework.authtoken.models import Token
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.response import Response

from backend.common.parsers import BoundedJSONParser
from backend.common.throttling import login_wait, record_failed_login


class TokenLoginView(ObtainAuthToken):
    parser_classes = (BoundedJSONParser, FormParser, MultiPartParser)
    throttle_classes = ()  # checked in post(): only failed attempts count

    def post(self, request, *args, **kwargs):
        wait = login_wait(request)
        if wait is not None:
            raise exceptions.Throttled(wait=math.ceil(wait), detail="too many failed sign-in attempts; try again later")
        serializer = self.get_serializer(data=request.data)
        if not serializer.is_valid():
            record_failed_login(request)
            raise exceptions.ValidationError(serializer.errors)
        token, _created = Token.objects.get_or_create(user=serializer.validated_data["user"])
        return Response({"token": token.key})
