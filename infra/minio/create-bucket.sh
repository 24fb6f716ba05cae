#!/bin/sh
# Creates Karyo's bucket once MinIO is healthy; safe to run again.
set -eu
mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing "local/${KARYO_S3_BUCKET}"
mc anonymous set none "local/${KARYO_S3_BUCKET}"
