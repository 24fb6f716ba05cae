"""Limit/offset pagination that refuses bad parameters instead of guessing.

DRF's LimitOffsetPagination silently ignores ``limit=abc`` or ``offset=null`` and passes a
20-digit limit to the database (a 500 on SQLite). Here each is one non-negative integer within
bounds, or a 400 that names the parameter.
"""
from __future__ import annotations

from rest_framework.exceptions import ValidationError
from rest_framework.pagination import LimitOffsetPagination

MAX_OFFSET = 10**9


class StrictLimitOffsetPagination(LimitOffsetPagination):
    max_limit = 1000

    def _integer(self, request, name: str, *, default: int, minimum: int, maximum: int) -> int:
        values = request.query_params.getlist(name)
        if not values:
            return default
        if len(values) > 1:
            raise ValidationError({name: f"give {name} once"})
        value = values[0].strip()
        if not value.isdigit() or len(value) > 10 or not minimum <= int(value) <= maximum:
            raise ValidationError({name: f"{name} must be an integer from {minimum} to {maximum}"})
        return int(value)

    def get_limit(self, request) -> int:
        return self._integer(request, self.limit_query_param, default=self.default_limit, minimum=1,
                             maximum=self.max_limit)

    def get_offset(self, request) -> int:
        return self._integer(request, self.offset_query_param, default=0, minimum=0, maximum=MAX_OFFSET)
