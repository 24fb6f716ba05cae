"""The built frontend (``frontend/dist``, written by ``make frontend``): which files the pages
load, from the build's ``manifest.json`` (module and stylesheet URLs carry a hash of the sources)."""
from __future__ import annotations

import json
from pathlib import Path

from django.conf import settings
from django.templatetags.static import static

DIST = Path(settings.BASE_DIR) / "frontend" / "dist"
LABEL_STUDIO_VERSION = "1.4.0"
_cache: dict[str, object] = {"mtime": None, "value": None}


def manifest() -> dict | None:
    path = DIST / "manifest.json"
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    if _cache["mtime"] != mtime:
        _cache.update(mtime=mtime, value=json.loads(path.read_text()))
    return _cache["value"]  # type: ignore[return-value]


def entry_assets() -> dict | None:
    """``{"js": url, "css": [urls]}`` of the app, or None when the frontend is not built."""
    built = manifest()
    if not built:
        return None
    return {"js": static(built["entry"]), "css": [static(c) for c in built.get("css", [])], "version": built["version"]}


def label_studio_assets() -> dict:
    built = manifest() or {}
    ls = built.get("label_studio") or {
        "version": LABEL_STUDIO_VERSION,
        "js": f"vendor/label-studio-{LABEL_STUDIO_VERSION}/main.js",
        "css": f"vendor/label-studio-{LABEL_STUDIO_VERSION}/main.css",
    }
    return {"js": static(ls["js"]), "css": static(ls["css"]), "version": ls["version"]}
