"""Zip archives on disk, never whole in memory: :class:`ZipSink` writes an export member by
member (hashing as it goes); :func:`extract_archive` unpacks an upload after checking every
member, so a bad archive is rejected before anything is imported."""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

from django.conf import settings

from backend.common.archives import payload_members, reject_unsafe_members
from backend.common.errors import InvalidUpload

CHUNK = 1024 * 1024
_STORED_SUFFIXES = (".png", ".jpg", ".jpeg", ".zip")


def work_dir() -> Path:
    """Scratch space for exports and imports: on disk under KARYO_VAR_DIR (not a tmpfs)."""
    path = Path(settings.VAR_DIR) / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


class ZipSink:
    """Writes members into a zip file on disk and records the sha256 and size of each."""

    def __init__(self, path: Path, scratch: Path):
        self.path = Path(path)
        self.scratch = Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.zip = zipfile.ZipFile(self.path, "w", allowZip64=True)
        self.files: dict[str, dict] = {}
        self._temp_count = 0

    def _compression(self, arcname: str) -> int:
        return zipfile.ZIP_STORED if arcname.lower().endswith(_STORED_SUFFIXES) else zipfile.ZIP_DEFLATED

    def _check(self, arcname: str) -> None:
        if arcname in self.files:
            raise ValueError(f"{arcname} written twice")

    def write(self, arcname: str, data: bytes | str) -> None:
        self._check(arcname)
        if isinstance(data, str):
            data = data.encode("utf-8")
        info = zipfile.ZipInfo(arcname, date_time=(2000, 1, 1, 0, 0, 0))
        info.compress_type = self._compression(arcname)
        info.external_attr = 0o644 << 16
        self.zip.writestr(info, data)
        self.files[arcname] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    def write_json(self, arcname: str, obj) -> None:
        self.write(arcname, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")

    def temp_path(self, suffix: str = "") -> Path:
        """A scratch file for a member built incrementally (JSON arrays, .npy); add it with add_file."""
        self._temp_count += 1
        return self.scratch / f"part-{self._temp_count}{suffix}"

    def add_file(self, arcname: str, path: Path, *, remove: bool = True) -> None:
        """Copy a file into the archive in chunks (no full copy in memory)."""
        self._check(arcname)
        info = zipfile.ZipInfo(arcname, date_time=(2000, 1, 1, 0, 0, 0))
        info.compress_type = self._compression(arcname)
        info.external_attr = 0o644 << 16
        digest, size = hashlib.sha256(), 0
        with open(path, "rb") as src, self.zip.open(info, "w", force_zip64=True) as dst:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                dst.write(chunk)
                size += len(chunk)
        self.files[arcname] = {"sha256": digest.hexdigest(), "bytes": size}
        if remove:
            Path(path).unlink(missing_ok=True)

    def close(self) -> None:
        self.zip.close()


def _members(archive: zipfile.ZipFile, label: str) -> list[zipfile.ZipInfo]:
    infos = archive.infolist()
    reject_unsafe_members(infos, label=label)
    members = payload_members(infos)
    if not members:
        raise InvalidUpload(f"{label}: the archive holds no files", code="empty_upload")
    if len(members) > settings.KARYO_MAX_ZIP_MEMBERS:
        raise InvalidUpload(f"{label}: more than {settings.KARYO_MAX_ZIP_MEMBERS} files in one archive", code="archive_too_large")
    seen: dict[str, str] = {}
    duplicates = []
    for info in members:
        key = info.filename.replace("\\", "/").lower()
        if key in seen:
            duplicates.append(info.filename)
        seen[key] = info.filename
    if duplicates:
        raise InvalidUpload(
            f"{label}: duplicate file names in the archive: {', '.join(sorted(set(duplicates))[:10])}",
            code="duplicate_names", details=sorted(set(duplicates)),
        )
    total = sum(i.file_size for i in members)
    if total > settings.KARYO_MAX_UPLOAD_BYTES:
        raise InvalidUpload(f"{label}: the archive unpacks to {total:,} bytes, over the upload limit", code="archive_too_large")
    return members


def extract_archive(source, dest: Path, *, label: str = "upload") -> Path:
    """Check and unpack a zip (a path or a binary file object) into ``dest``; return the data set
    root (the single top-level folder when everything is inside one)."""
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError):
        raise InvalidUpload(f"{label}: not a valid zip archive", code="corrupt_archive") from None
    with archive:
        members = _members(archive, label)
        dest = Path(dest)
        for info in members:
            target = dest / info.filename.replace("\\", "/")
            if not target.resolve().is_relative_to(dest.resolve()):  # belt and braces after reject_unsafe_members
                raise InvalidUpload(f"{label}: {info.filename} escapes the archive root", code="unsafe_archive")
            written = 0
            try:
                # Inside the try: a member whose folder is also a file in the archive (or the other way
                # round) is a corrupt upload, not a server error.
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(target, "wb") as dst:
                    while chunk := src.read(CHUNK):
                        written += len(chunk)
                        if written > info.file_size:  # a member that lies about its size
                            raise InvalidUpload(f"{label}: {info.filename} is larger than its header says", code="corrupt_archive")
                        dst.write(chunk)
            except (NotADirectoryError, IsADirectoryError, FileExistsError):
                raise InvalidUpload(f"{label}: {info.filename} clashes with a file or folder of the same name",
                                    code="corrupt_archive") from None
            except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
                raise InvalidUpload(f"{label}: {info.filename} is corrupt ({exc})", code="corrupt_archive") from None
    return dataset_root(dest)


_LAYOUT_FOLDERS = {"images", "masks", "classes", "annotations", "geojson", "splits", "train", "val", "test"}


def dataset_root(folder: Path) -> Path:
    """Descend through a lone wrapper folder (``cpm15/images/...`` -> ``cpm15``)."""
    folder = Path(folder)
    entries = [p for p in folder.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX"]
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name.lower() not in _LAYOUT_FOLDERS:
        return dataset_root(entries[0])
    return folder


def copy_stream(src, dst) -> int:
    copied = 0
    while chunk := src.read(CHUNK):
        dst.write(chunk)
        copied += len(chunk)
    return copied
