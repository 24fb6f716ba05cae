"""Login throttling: failed sign-ins are counted per username and per client address.

DRF throttles on Django's cache (Redis in production, files under var/ in the embedded default,
so every web process sees the same counts). Only failures count: a person who signs in
correctly is never slowed down, and 40 wrong passwords in a row are refused after the first
few (HTTP 429 with Retry-After) until the window has passed.
"""
from __future__ import annotations

import hashlib

from rest_framework.throttling import SimpleRateThrottle


class _FailedLoginThrottle(SimpleRateThrottle):
    def username(self, request) -> str:
        data = getattr(request, "data", None)
        if data is None:  # a plain Django request (the sign-in page)
            data = request.POST
        value = data.get("username") if hasattr(data, "get") else None
        return value.strip().lower()[:150] if isinstance(value, str) else ""

    def allow_request(self, request, view) -> bool:
        # Like SimpleRateThrottle.allow_request, but the attempt is not recorded here: only
        # record_failure() adds to the history.
        if self.rate is None:
            return True
        self.key = self.get_cache_key(request, view)
        if self.key is None:
            return True
        self.now = self.timer()
        self.history = [t for t in self.cache.get(self.key, []) if t > self.now - self.duration]
        return len(self.history) < self.num_requests

    def record_failure(self, request) -> None:
        key = self.get_cache_key(request, None)
        if key is None or self.rate is None:
            return
        now = self.timer()
        history = [t for t in self.cache.get(key, []) if t > now - self.duration]
        self.cache.set(key, [now, *history], self.duration)


class LoginUsernameThrottle(_FailedLoginThrottle):
    scope = "login"

    def get_cache_key(self, request, view):
        name = self.username(request)
        # Hashed: a username may hold any characters, a cache key may not.
        ident = hashlib.sha256(name.encode()).hexdigest()[:32]
        return self.cache_format % {"scope": self.scope, "ident": ident} if name else None


class LoginAddressThrottle(_FailedLoginThrottle):
    scope = "login_address"

    def get_cache_key(self, request, view):
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


LOGIN_THROTTLES = (LoginUsernameThrottle, LoginAddressThrottle)


def login_wait(request) -> float | None:
    """Seconds to wait before the next sign-in attempt, or None when one is allowed now."""
    waits = []
    for throttle_class in LOGIN_THROTTLES:
        throttle = throttle_class()
        if not throttle.allow_request(request, None):
            waits.append(throttle.wait() or 1.0)
    return max(waits) if waits else None


def record_failed_login(request) -> None:
    for throttle_class in LOGIN_THROTTLES:
        throttle_class().record_failure(request)
