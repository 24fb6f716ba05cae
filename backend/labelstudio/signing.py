"""Image URLs for Label Studio tasks: the browser of whoever opens the task loads them.

Local storage: a Karyo URL carrying a signed, expiring token (no login: Label Studio's users
are not Karyo sessions). S3 storage: a presigned URL on the public S3 endpoint. Both expire
after ``URL_MAX_AGE``; the reconcile task re-signs task URLs past half of it.
"""
from __future__ import annotations

import datetime as dt

from django.conf import settings
from django.core import signing
from django.core.files.storage import default_storage
from django.urls import reverse

from backend.images.models import Tile

URL_MAX_AGE = dt.timedelta(days=7)  # the longest a SigV4 presigned S3 URL may live
SALT = "karyo.labelstudio.tile"


def tile_token(tile: Tile) -> str:
    return signing.TimestampSigner(salt=SALT).sign(str(tile.pk))


def tile_from_token(token: str) -> int:
    """Tile id of a valid token; raises ``signing.BadSignature`` (or ``SignatureExpired``)."""
    value = signing.TimestampSigner(salt=SALT).unsign(token, max_age=URL_MAX_AGE)
    return int(value)


def _s3_public_url(name: str) -> str | None:
    storage = default_storage
    if storage.__class__.__name__ != "S3Storage":
        return None
    import boto3
    from botocore.config import Config

    endpoint = storage.endpoint_url
    # The configured bucket is reached by browsers through the public endpoint; a bucket set up
    # elsewhere (tests) is reached where the storage itself reaches it.
    if endpoint == settings.S3_ENDPOINT and settings.S3_PUBLIC_ENDPOINT:
        endpoint = settings.S3_PUBLIC_ENDPOINT
    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=storage.access_key, aws_secret_access_key=storage.secret_key,
        region_name=storage.region_name or "us-east-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    return client.generate_presigned_url(
        "get_object", Params={"Bucket": storage.bucket_name, "Key": name},
        ExpiresIn=int(URL_MAX_AGE.total_seconds()),
    )


def tile_image_url(tile: Tile) -> str:
    # Legacy tiles kept a PNG in the bucket; others are rendered from their slide by Karyo.
    presigned = _s3_public_url(tile.file.name) if tile.file else None
    if presigned:
        return presigned
    path = reverse("labelstudio-tile-image", kwargs={"token": tile_token(tile)})
    return settings.KARYO_PUBLIC_URL.rstrip("/") + path
