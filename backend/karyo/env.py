"""Typed readers for environment variables that fail loudly on bad values.

Settings are the only place that reads the environment; a typo in production configuration
must stop the process at start-up with a message naming the variable, not surface later as
a confusing runtime error.
"""
from __future__ import annotations

import os
from urllib.parse import urlparse


class ConfigError(RuntimeError):
    """A configuration variable is set to a value Karyo cannot use."""


def env_str(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value


def env_bool(name: str, default: bool = False) -> bool:
    raw = env_str(name)
    if raw is None:
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = env_str(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = env_str(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_url(name: str, default: str | None = None, *, schemes: set[str]) -> str | None:
    raw = env_str(name, default)
    if raw is None:
        return None
    parsed = urlparse(raw)
    if parsed.scheme not in schemes:
        allowed = ", ".join(sorted(schemes))
        raise ConfigError(f"{name}={raw!r} must be a URL with one of the schemes: {allowed}")
    if parsed.scheme not in {"sqlite", "file", "filesystem"} and not parsed.hostname:
        raise ConfigError(f"{name}={raw!r} has no host")
    return raw
