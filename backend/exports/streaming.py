"""Read a stored file as a stream: S3 objects straight from the HTTP body (django-storages'
S3File would first download the whole object into memory), local files as they are."""
from __future__ import annotations

from django.core.files.storage import default_storage


def open_stream(name: str):
    """-> (binary file-like object, size in bytes or None)."""
    storage = default_storage
    bucket = getattr(storage, "bucket", None)
    if bucket is not None and hasattr(storage, "_normalize_name"):
        from storages.utils import clean_name

        response = bucket.Object(storage._normalize_name(clean_name(name))).get()
        return response["Body"], int(response["ContentLength"])
    return storage.open(name, "rb"), storage.size(name)
