"""Chunked, resumable uploads of big files (slides of several GB) in bounded memory.

Protocol (project admins): ``create_upload`` answers an id and a chunk size; the client sends
0-based parts of ``chunk_size`` bytes (the last one shorter) in any order, as often as it likes
(a part is replaced whole, so resending is harmless), asks which parts arrived after a dropped
connection, and calls ``complete_upload``.

- local storage (the embedded default): parts are streamed to files under
  ``<storage>/uploads/<id>/`` in 1 MiB blocks, never held whole in memory;
- S3 storage: an S3 multipart upload; the browser PUTs each part to a presigned URL and reports
  the ETags on completion. Karyo's web process never sees the bytes until completion, when it
  streams the object once to hash it.

Completion hashes the file incrementally (sha256), refuses the same file twice in a project
(409), refuses zip archives (upload slides one by one: a zip would have to be unpacked to disk
and each member ingested alone; the existing image upload takes zips of small images), checks
that a slide reader can open the file and that its decoded size (every level, sample and plane)
is within ``KARYO_MAX_IMAGE_PIXELS``, then stores it content-addressed and starts ingest. A
refused upload leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import unicodedata
from pathlib import Path

from django.conf import settings
from django.core.files.storage import default_storage
from django.db import transaction

from backend.common.errors import Conflict, InvalidUpload, KaryoError, UnsupportedFormat
from backend.projects.models import Project

from .ingest import enqueue_ingest
from .models import Image, ImageState, Upload, UploadState

log = logging.getLogger(__name__)
S3_MIN_PART = 5 * 1024 * 1024  # S3's minimum size of every part but the last
BLOCK = 1024 * 1024
ZIP_MAGIC = b"PK\x03\x04"
MULTI_FILE_FORMATS = {".mrxs": "MIRAX (.mrxs) slides are a file plus a folder of the same name",
                      ".vms": "Hamamatsu .vms slides are several files"}


def max_upload_bytes() -> int:
    return int(getattr(settings, "KARYO_MAX_SLIDE_BYTES", 20 * 1024**3))


def storage_mode() -> str:
    return "s3" if default_storage.__class__.__name__ == "S3Storage" else "local"


def _parts_dir(upload: Upload) -> Path:
    return Path(default_storage.path(f"uploads/{upload.pk}"))


def expected_part_size(upload: Upload, n: int) -> int:
    if not 0 <= n < upload.chunk_count:
        raise InvalidUpload(f"part {n} is out of range: this upload has parts 0..{upload.chunk_count - 1}",
                            code="invalid_part")
    return min(upload.chunk_size, upload.size - n * upload.chunk_size)


def _is_file_name(name: str) -> bool:
    """Not empty, not a path step, no control character (an S3 key or an XML answer cannot carry
    them), and encodable as UTF-8 (JSON admits lone surrogates; databases and S3 do not)."""
    if name in ("", ".", "..") or any(unicodedata.category(c) == "Cc" for c in name):
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def create_upload(*, project: Project, filename: str, size: int, user) -> Upload:
    name = Path(filename.replace("\\", "/")).name
    if not _is_file_name(name):
        raise InvalidUpload(f"{filename!r} is not a file name (empty, a path step, or control characters)",
                            code="invalid_filename")
    suffix = Path(name.lower()).suffix
    if suffix == ".zip":
        raise UnsupportedFormat(
            f"{name}: zip archives are not taken by the chunked upload; upload the slides one by one "
            "(a folder can be dropped whole), or use the image upload for a zip of small images"
        )
    if suffix in MULTI_FILE_FORMATS:
        raise UnsupportedFormat(f"{name}: {MULTI_FILE_FORMATS[suffix]}; convert the slide to a single-file "
                                "format (pyramidal TIFF / OME-TIFF) or import its folder with manage.py import_images")
    if size > max_upload_bytes():
        raise InvalidUpload(f"{name}: {size:,} bytes exceeds the upload limit of {max_upload_bytes():,} bytes",
                            code="upload_too_large")
    mode = storage_mode()
    chunk_size = int(settings.KARYO_UPLOAD_CHUNK_BYTES)
    if mode == "s3":
        chunk_size = max(chunk_size, S3_MIN_PART)
    with transaction.atomic():  # no Upload row without its S3 multipart upload
        upload = Upload.objects.create(project=project, filename=name, size=size, chunk_size=chunk_size, mode=mode,
                                       created_by=user)
        if upload.mode == "s3":
            from botocore.exceptions import BotoCoreError, ClientError

            client, bucket = _s3()
            # The key never holds the client's file name (kept in the row): only what S3 takes as it is.
            upload.s3_key = f"uploads/{upload.pk}/upload{suffix if suffix.isascii() and suffix[1:].isalnum() else ''}"
            try:
                upload.s3_upload_id = client.create_multipart_upload(Bucket=bucket, Key=upload.s3_key)["UploadId"]
            except (BotoCoreError, ClientError) as exc:
                log.error("S3 refused a multipart upload for %s", upload.s3_key, exc_info=True)
                raise KaryoError("the file store did not accept the upload; try again later",
                                 code="storage_unavailable", status_code=503) from exc
            upload.save(update_fields=["s3_key", "s3_upload_id"])
    return upload


def received_parts(upload: Upload) -> list[int]:
    """Parts that arrived whole (a part cut off mid-transfer is not listed and is sent again)."""
    if upload.state == UploadState.COMPLETE:
        return list(range(upload.chunk_count))
    if upload.mode == "s3":
        client, bucket = _s3()
        found, marker = [], 0
        while True:
            page = client.list_parts(Bucket=bucket, Key=upload.s3_key, UploadId=upload.s3_upload_id,
                                     PartNumberMarker=marker)
            found += [p["PartNumber"] - 1 for p in page.get("Parts", [])
                      if p["Size"] == expected_part_size(upload, p["PartNumber"] - 1)]
            if not page.get("IsTruncated"):
                return sorted(found)
            marker = page["NextPartNumberMarker"]
    folder = _parts_dir(upload)
    if not folder.is_dir():
        return []
    out = []
    for path in folder.glob("*.part"):
        n = int(path.stem)
        if 0 <= n < upload.chunk_count and path.stat().st_size == expected_part_size(upload, n):
            out.append(n)
    return sorted(out)


def bytes_received(upload: Upload, parts: list[int]) -> int:
    return sum(expected_part_size(upload, n) for n in parts)


def receive_part(*, upload: Upload, n: int, stream, content_length: int | None) -> None:
    """Stream part ``n`` from ``stream`` to disk in blocks; replaces an earlier copy atomically."""
    if upload.state != UploadState.RECEIVING:
        raise Conflict("this upload is already complete")
    if upload.mode != "local":
        raise Conflict("this upload goes to S3: PUT the parts to the presigned URLs", code="wrong_mode")
    expected = expected_part_size(upload, n)
    if content_length is not None and content_length != expected:
        raise InvalidUpload(f"part {n} must be {expected:,} bytes, not {content_length:,}", code="invalid_part")
    folder = _parts_dir(upload)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{n:06d}.{os.getpid()}.tmp"
    written = 0
    try:
        with open(tmp, "wb") as fh:
            while written <= expected:
                block = stream.read(min(BLOCK, expected + 1 - written))
                if not block:
                    break
                fh.write(block)
                written += len(block)
        if written != expected:
            raise InvalidUpload(f"part {n} must be {expected:,} bytes; {written:,} arrived", code="invalid_part")
        tmp.replace(folder / f"{n:06d}.part")
    finally:
        tmp.unlink(missing_ok=True)


def part_urls(*, upload: Upload, parts: list[int]) -> dict[int, str]:
    if upload.mode != "s3":
        raise Conflict("this upload is stored locally: PUT the parts to /api/uploads/<id>/chunks/<n>/",
                       code="wrong_mode")
    client, bucket = _s3(public=True)
    urls = {}
    for n in parts:
        expected_part_size(upload, n)
        urls[n] = client.generate_presigned_url(
            "upload_part", ExpiresIn=6 * 3600,
            Params={"Bucket": bucket, "Key": upload.s3_key, "UploadId": upload.s3_upload_id, "PartNumber": n + 1},
        )
    return urls


def _s3(*, public: bool = False):
    import boto3
    from botocore.config import Config

    storage = default_storage
    endpoint = storage.endpoint_url
    if public and endpoint == settings.S3_ENDPOINT and settings.S3_PUBLIC_ENDPOINT:
        endpoint = settings.S3_PUBLIC_ENDPOINT
    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=storage.access_key, aws_secret_access_key=storage.secret_key,
        region_name=storage.region_name or "us-east-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    return client, storage.bucket_name


def discard_upload(upload: Upload) -> None:
    """Remove an upload's received data (parts, assembled file, S3 multipart upload) and its row."""
    if upload.mode == "s3":
        from botocore.exceptions import ClientError

        client, bucket = _s3()
        try:
            client.abort_multipart_upload(Bucket=bucket, Key=upload.s3_key, UploadId=upload.s3_upload_id)
        except ClientError:  # already completed or aborted
            log.debug("multipart upload %s was already closed", upload.s3_upload_id)
        try:
            client.delete_object(Bucket=bucket, Key=upload.s3_key)
        except Exception:
            log.warning("could not delete %s", upload.s3_key, exc_info=True)
    else:
        shutil.rmtree(_parts_dir(upload), ignore_errors=True)
    upload.delete()


def _assemble_local(upload: Upload) -> tuple[Path, str, bytes]:
    """Concatenate the parts into one file next to them, hashing as it goes: (path, sha256, head)."""
    folder = _parts_dir(upload)
    target = folder / "assembled" / upload.filename  # readers name the file in their messages
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    head = b""
    with open(target, "wb") as out:
        for n in range(upload.chunk_count):
            with open(folder / f"{n:06d}.part", "rb") as part:
                while block := part.read(BLOCK):
                    if len(head) < 16:
                        head += block[:16]
                    digest.update(block)
                    out.write(block)
    return target, digest.hexdigest(), head


def _hash_s3(upload: Upload) -> tuple[str, bytes]:
    client, bucket = _s3()
    body = client.get_object(Bucket=bucket, Key=upload.s3_key)["Body"]
    digest, head = hashlib.sha256(), b""
    for block in body.iter_chunks(BLOCK):
        if len(head) < 16:
            head += block[:16]
        digest.update(block)
    return digest.hexdigest(), head


def _check_readable(path: Path, name: str) -> str:
    """Open the slide's header (cheap: nothing is decoded) -> its format; SlideError -> a clear 400."""
    from ml_worker.slides import SlideError, open_slide

    try:
        with open_slide(path, max_pixels=settings.KARYO_MAX_IMAGE_PIXELS,
                       max_tiled_pixels=settings.KARYO_MAX_SLIDE_PIXELS) as reader:
            return str(reader.format)
    except SlideError as exc:
        message = str(exc)
        raise InvalidUpload(message if name in message else f"{name}: {message}", code="unreadable_slide") from None


def complete_upload(*, upload: Upload, parts: list[dict] | None = None) -> Image:
    """Assemble, hash, check and store the upload; returns the new Image (``ingesting``).

    Refused uploads (missing parts excepted, which can still be sent) leave nothing behind.
    """
    if upload.state == UploadState.COMPLETE and upload.image_id:
        return upload.image
    missing = sorted(set(range(upload.chunk_count)) - set(received_parts(upload)))
    if missing:
        raise InvalidUpload(f"{upload.filename}: {len(missing)} part(s) have not arrived yet: {missing[:20]}",
                            code="incomplete_upload", details={"missing": missing})
    try:
        image = _store(upload=upload, parts=parts)
    except KaryoError:
        discard_upload(upload)
        raise
    return image


def _store(*, upload: Upload, parts: list[dict] | None) -> Image:
    name = upload.filename
    suffix = Path(name.lower()).suffix or ".bin"
    local_tmp = None
    if upload.mode == "s3":
        client, bucket = _s3()
        listed = {p["n"]: p["etag"] for p in (parts or [])}
        if not listed:
            page = client.list_parts(Bucket=bucket, Key=upload.s3_key, UploadId=upload.s3_upload_id)
            listed = {p["PartNumber"] - 1: p["ETag"] for p in page.get("Parts", [])}
        client.complete_multipart_upload(
            Bucket=bucket, Key=upload.s3_key, UploadId=upload.s3_upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n + 1, "ETag": listed[n]} for n in sorted(listed)]},
        )
        sha256, head = _hash_s3(upload)
    else:
        local_tmp, sha256, head = _assemble_local(upload)
    if head.startswith(ZIP_MAGIC):
        raise UnsupportedFormat(f"{name}: this is a zip archive; upload the slides in it one by one")
    duplicate = Image.objects.filter(project=upload.project, sha256=sha256).exclude(state=ImageState.FAILED).first()
    if duplicate is not None:
        raise Conflict(f"{name}: this file is already in the project as image {duplicate.pk} ({duplicate.name})",
                       code="duplicate_image", details={"image_id": duplicate.pk})
    final = f"images/{sha256[:2]}/{sha256}{suffix}"
    if upload.mode == "s3":
        from .pixels import local_path

        if not default_storage.exists(final):
            client.copy({"Bucket": bucket, "Key": upload.s3_key}, bucket, final)
        try:
            slide_format = _check_readable(local_path(final), name)
        except KaryoError:
            if not Image.objects.filter(file=final).exists():
                default_storage.delete(final)
            raise
    else:
        slide_format = _check_readable(local_tmp, name)
        target = Path(default_storage.path(final))
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local_tmp, target)
    with transaction.atomic():
        Image.objects.filter(project=upload.project, sha256=sha256, state=ImageState.FAILED).delete()
        image = Image.objects.create(
            project=upload.project, name=name, file=final, sha256=sha256, format=short_format(slide_format, name),
            uploaded_by=upload.created_by, state=ImageState.INGESTING, ingest_progress=0.0,
        )
        upload.state, upload.image = UploadState.COMPLETE, image
        upload.save(update_fields=["state", "image"])
        enqueue_ingest(image)
    if upload.mode == "s3":
        client.delete_object(Bucket=bucket, Key=upload.s3_key)
    else:
        shutil.rmtree(_parts_dir(upload), ignore_errors=True)
    return image


def import_file(*, project: Project, path: Path, user=None) -> Image:
    """Store a local slide or image file as a new Image (``ingesting``; ingest enqueued on commit).

    The ``import_images`` command's path: the same checks as a completed upload (zip refused,
    same file twice -> Conflict, header readable and within the pixel limit), streamed in blocks.
    """
    path = Path(path)
    name = path.name
    suffix = path.suffix.lower()
    if suffix == ".zip" or zipfile_magic(path):
        raise UnsupportedFormat(f"{name}: zip archives are not imported; unpack it and import the folder")
    if suffix in MULTI_FILE_FORMATS:
        raise UnsupportedFormat(f"{name}: {MULTI_FILE_FORMATS[suffix]}; convert it to a single-file pyramidal TIFF")
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(BLOCK):
            digest.update(block)
    sha256 = digest.hexdigest()
    duplicate = Image.objects.filter(project=project, sha256=sha256).exclude(state=ImageState.FAILED).first()
    if duplicate is not None:
        raise Conflict(f"{name}: this file is already in the project as image {duplicate.pk} ({duplicate.name})",
                       code="duplicate_image", details={"image_id": duplicate.pk})
    slide_format = _check_readable(path, name)
    final = f"images/{sha256[:2]}/{sha256}{suffix or '.bin'}"
    from django.core.files import File

    written = None
    if not default_storage.exists(final):
        with open(path, "rb") as fh:
            written = default_storage.save(final, File(fh, name=name))
    try:
        with transaction.atomic():
            Image.objects.filter(project=project, sha256=sha256, state=ImageState.FAILED).delete()
            image = Image.objects.create(
                project=project, name=name, file=written or final, sha256=sha256, format=short_format(slide_format, name),
                uploaded_by=user, state=ImageState.INGESTING, ingest_progress=0.0,
            )
            enqueue_ingest(image)
    except BaseException:
        if written:
            default_storage.delete(written)
        raise
    return image


def zipfile_magic(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == ZIP_MAGIC


SHORT_FORMATS = {"aperio": "svs", "hamamatsu": "ndpi", "leica": "scn", "ventana": "bif", "philips": "tiff",
                 "generic-tiff": "tiff", "mirax": "mrxs", "sakura": "svslide", "synthetic": "tiff"}


def short_format(reader_format: str, name: str) -> str:
    """A reader's format ("openslide:aperio", "tifffile:ome", "pillow:png") as a short file kind."""
    kind = reader_format.split(":", 1)[-1].lower()
    if reader_format.startswith("tifffile:"):
        return "ome-tiff" if kind == "ome" else "tiff"
    return SHORT_FORMATS.get(kind, kind)[:8] or Path(name).suffix.lstrip(".")[:8]
