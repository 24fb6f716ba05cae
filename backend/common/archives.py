"""Zip-archive safety shared by every upload that unpacks one (images, data set imports).

A member is unsafe when its path could land outside the folder it is unpacked into (absolute,
a drive letter, a ``..`` part, with either slash) or when it is a symbolic link. One unsafe
member rejects the whole archive, before anything is read or written.
"""
from __future__ import annotations

import posixpath
import stat
import zipfile
from collections.abc import Iterable

from backend.common.errors import InvalidUpload


def is_unsafe_member(info: zipfile.ZipInfo) -> bool:
    """Could unpacking this member write outside the target folder (or create a link)?"""
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return True
    if any(part == ".." for part in name.split("/")):
        return True
    return stat.S_ISLNK(info.external_attr >> 16)


def reject_unsafe_members(infos: Iterable[zipfile.ZipInfo], *, label: str) -> None:
    """Raise :class:`InvalidUpload` (``unsafe_archive``, the offending paths in ``details``) when
    any member is unsafe."""
    unsafe = [i.filename for i in infos if is_unsafe_member(i)]
    if unsafe:
        raise InvalidUpload(
            f"{label}: archive paths escape the upload folder: {', '.join(unsafe[:10])}", code="unsafe_archive", details=unsafe
        )


def payload_members(infos: Iterable[zipfile.ZipInfo]) -> list[zipfile.ZipInfo]:
    """The members that carry data: no folders, no macOS resource forks, no hidden files."""
    return [
        i for i in infos
        if not i.is_dir() and not i.filename.startswith("__MACOSX/") and not posixpath.basename(i.filename).startswith(".")
    ]
