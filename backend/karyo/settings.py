"""Karyo settings: one module, configured entirely from environment variables.

With nothing set, Karyo runs on the *embedded default*: SQLite (WAL) and media files under
``var/``, and a Celery broker that needs no server (kombu's filesystem transport). Production
sets ``DATABASE_URL``, ``KARYO_REDIS_URL`` and the ``KARYO_S3_*`` variables (see README).
"""
from __future__ import annotations

import secrets
from pathlib import Path

import dj_database_url
from PIL import Image as _PILImage

from .env import ConfigError, env_bool, env_int, env_list, env_str, env_url

BASE_DIR = Path(__file__).resolve().parents[2]
VAR_DIR = Path(env_str("KARYO_VAR_DIR", str(BASE_DIR / "var"))).resolve()
KARYO_VERSION = "0.1.0"


def _secret_key() -> str:
    configured = env_str("KARYO_SECRET_KEY")
    if configured:
        if len(configured) < 32:
            raise ConfigError("KARYO_SECRET_KEY must be at least 32 characters")
        return configured
    # Embedded default: a per-installation key kept on disk, so sessions survive restarts.
    key_file = VAR_DIR / "secret_key"
    if key_file.exists():
        return key_file.read_text().strip()
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(50)
    key_file.write_text(key)
    key_file.chmod(0o600)
    return key


SECRET_KEY = _secret_key()
DEBUG = env_bool("KARYO_DEBUG", False)
ALLOWED_HOSTS = env_list("KARYO_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("KARYO_CSRF_TRUSTED_ORIGINS", [])
KARYO_PUBLIC_URL = env_url("KARYO_PUBLIC_URL", "http://127.0.0.1:8000", schemes={"http", "https"})

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "backend.projects",
    "backend.images",
    "backend.ml",
    "backend.exports",
    "backend.labelstudio",
    # The project package on top of the apps (docs/architecture.md): commands that wire several apps.
    "backend.karyo",
]

MIDDLEWARE = [
    # Outermost: refuses oversized bodies before anything reads them, and turns every error under
    # /api/ (Django's own 404/405/500 pages included) into the JSON error shape.
    "backend.common.middleware.ApiErrorMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "backend.karyo.urls"
WSGI_APPLICATION = "backend.karyo.wsgi.application"
ASGI_APPLICATION = "backend.karyo.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "frontend" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database --------------------------------------------------------------------------
DATABASE_URL = env_url(
    "DATABASE_URL",
    f"sqlite:///{VAR_DIR / 'karyo.sqlite3'}",
    schemes={"sqlite", "postgres", "postgresql", "pgsql"},
)
# Web threads are long-lived (backend/karyo/asgi.py) and keep their connection between requests;
# the health check replaces one the database closed meanwhile.
_db = dj_database_url.parse(DATABASE_URL, conn_max_age=env_int("KARYO_DB_CONN_MAX_AGE", 60, minimum=0),
                            conn_health_checks=True)
if _db["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the web server read while the worker writes; IMMEDIATE transactions take the
    # write lock up front, so two processes never deadlock upgrading a read lock.
    _db["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
    }
    if _db["NAME"] and _db["NAME"] != ":memory:":
        Path(_db["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    # A file, not :memory:, so that worker processes started by tests share the test database.
    _db["TEST"] = {"NAME": str(VAR_DIR / "test-db.sqlite3")}
DATABASES = {"default": _db}
# Threads per web process serving HTTP (backend/karyo/asgi.py); each keeps one database connection,
# so Postgres sees up to KARYO_WEB_PROCESSES x KARYO_WEB_THREADS of them from the web.
KARYO_WEB_THREADS = env_int("KARYO_WEB_THREADS", 4, minimum=1)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Storage ---------------------------------------------------------------------------
MEDIA_ROOT = Path(env_str("KARYO_MEDIA_ROOT", str(VAR_DIR / "media"))).resolve()
MEDIA_URL = "/media/"
STATIC_URL = "/static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # whitenoise warns on every request otherwise
STATICFILES_DIRS = [d for d in [BASE_DIR / "frontend" / "dist", BASE_DIR / "frontend" / "static"] if d.exists()]

S3_ENDPOINT = env_url("KARYO_S3_ENDPOINT", None, schemes={"http", "https"})
S3_PUBLIC_ENDPOINT = env_url("KARYO_S3_PUBLIC_ENDPOINT", S3_ENDPOINT, schemes={"http", "https"})
S3_BUCKET = env_str("KARYO_S3_BUCKET", "karyo")
S3_ACCESS_KEY = env_str("KARYO_S3_ACCESS_KEY")
S3_SECRET_KEY = env_str("KARYO_S3_SECRET_KEY")
S3_REGION = env_str("KARYO_S3_REGION", "us-east-1")
if S3_ENDPOINT and not (S3_ACCESS_KEY and S3_SECRET_KEY):
    raise ConfigError("KARYO_S3_ENDPOINT is set: KARYO_S3_ACCESS_KEY and KARYO_S3_SECRET_KEY are required")


def s3_storage_options(endpoint: str, bucket: str, access_key: str, secret_key: str, region: str) -> dict:
    return {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "endpoint_url": endpoint,
            "bucket_name": bucket,
            "access_key": access_key,
            "secret_key": secret_key,
            "region_name": region,
            "addressing_style": "path",
            "signature_version": "s3v4",
            "file_overwrite": False,
            "querystring_auth": True,
            "querystring_expire": 3600,
        },
    }


STORAGES = {
    "default": (
        s3_storage_options(S3_ENDPOINT, S3_BUCKET, S3_ACCESS_KEY, S3_SECRET_KEY, S3_REGION)
        if S3_ENDPOINT
        else {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(MEDIA_ROOT)}}
    ),
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

# --- Uploads ---------------------------------------------------------------------------
KARYO_MAX_IMAGE_PIXELS = env_int("KARYO_MAX_IMAGE_PIXELS", 100_000_000, minimum=1)
# Tiled slide pyramids are only ever decoded a tile at a time, so their limit (samples over every
# level) can be far higher: the default admits a 150k x 150k RGB slide with its pyramid (~90 G).
KARYO_MAX_SLIDE_PIXELS = env_int("KARYO_MAX_SLIDE_PIXELS", 200_000_000_000, minimum=1)
# Pillow's decompression-bomb limit (89.5 M pixels by default) follows Karyo's, in every process
# that loads these settings (web, workers): an image Karyo accepts is never refused by Pillow.
_PILImage.MAX_IMAGE_PIXELS = KARYO_MAX_IMAGE_PIXELS
KARYO_MAX_UPLOAD_BYTES = env_int("KARYO_MAX_UPLOAD_MB", 1024, minimum=1) * 1024 * 1024
KARYO_MAX_ZIP_MEMBERS = env_int("KARYO_MAX_ZIP_MEMBERS", 10_000, minimum=1)
# Slides (issue 11): chunked uploads up to this size; per-process caches of open slide readers and
# decoded tiles (backend/images/pixels.py); tiles per prediction chunk (one Celery task each).
KARYO_MAX_SLIDE_BYTES = env_int("KARYO_MAX_SLIDE_MB", 20 * 1024, minimum=1) * 1024 * 1024
KARYO_UPLOAD_CHUNK_BYTES = env_int("KARYO_UPLOAD_CHUNK_BYTES", 8 * 1024 * 1024, minimum=64 * 1024)
KARYO_SLIDE_READERS = env_int("KARYO_SLIDE_READERS", 16, minimum=1)
KARYO_TILE_CACHE_MB = env_int("KARYO_TILE_CACHE_MB", 256, minimum=1)
KARYO_PREDICT_CHUNK_TILES = env_int("KARYO_PREDICT_CHUNK_TILES", 256, minimum=1)
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024

# --- Redis, Celery, Channels -----------------------------------------------------------
REDIS_URL = env_url("KARYO_REDIS_URL", None, schemes={"redis", "rediss"})
BROKER_DIR = VAR_DIR / "broker"
CELERY_BROKER_URL = env_url(
    "CELERY_BROKER_URL", REDIS_URL or "filesystem://", schemes={"redis", "rediss", "amqp", "filesystem"}
)
if CELERY_BROKER_URL == "filesystem://":
    for sub in ("in", "processed", "control"):
        (BROKER_DIR / sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR / "in"),
        "data_folder_out": str(BROKER_DIR / "in"),
        "processed_folder": str(BROKER_DIR / "processed"),
        "control_folder": str(BROKER_DIR / "control"),
        "store_processed": False,
        # The default 1 s poll adds a second to every task; 25 ms costs little CPU.
        "polling_interval": 0.025,
    }
    # kombu's filesystem transport with messages renamed into place whole (backend/karyo/broker.py).
    CELERY_BROKER_TRANSPORT = "backend.karyo.broker:Transport"
else:
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 6 * 3600}
if REDIS_URL:
    CELERY_RESULT_BACKEND = REDIS_URL
else:
    (VAR_DIR / "results").mkdir(parents=True, exist_ok=True)
    CELERY_RESULT_BACKEND = f"file://{VAR_DIR / 'results'}"
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "cpu"
# Declared explicitly so that purge and inspection cover both queues, not just the default.
CELERY_TASK_QUEUES = {"cpu": {"routing_key": "cpu"}, "gpu": {"routing_key": "gpu"}}
CELERY_TASK_ROUTES = {
    "karyo.gpu.*": {"queue": "gpu"},
    "karyo.cpu.*": {"queue": "cpu"},
}
CELERY_TASK_TIME_LIMIT = env_int("KARYO_TASK_TIME_LIMIT", 12 * 3600, minimum=10)
CELERY_TASK_SOFT_TIME_LIMIT = CELERY_TASK_TIME_LIMIT - 5
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULE = {
    "fail-stale-training-runs": {"task": "karyo.cpu.check_stale_runs", "schedule": 60.0},
}
KARYO_HEARTBEAT_TIMEOUT_SECONDS = env_int("KARYO_HEARTBEAT_TIMEOUT_SECONDS", 120, minimum=5)
KARYO_QUEUE_LEASE_SECONDS = env_int("KARYO_QUEUE_LEASE_SECONDS", 15 * 60, minimum=10)

if REDIS_URL:
    # redis-py 8 defaults to a 5 s socket timeout, the same as channels-redis's 5 s BZPOPMIN:
    # the read races the timeout and idle WebSockets die with 1011. Give reads room.
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 30, "socket_connect_timeout": 5}]},
        }
    }
else:
    # Web and worker are separate processes: an SQLite file carries events between them.
    CHANNEL_LAYERS = {
        "default": {"BACKEND": "backend.common.sqlite_layer.SQLiteChannelLayer", "CONFIG": {"path": str(VAR_DIR / "channels.sqlite3")}}
    }

# --- Label Studio ----------------------------------------------------------------------
LABEL_STUDIO_URL = env_url("LABEL_STUDIO_URL", None, schemes={"http", "https"})
LABEL_STUDIO_TOKEN = env_str("LABEL_STUDIO_TOKEN")
LABEL_STUDIO_WEBHOOK_SECRET = env_str("KARYO_LABEL_STUDIO_WEBHOOK_SECRET")
# Pull what changed in Label Studio (missed webhooks, Label Studio down); a no-op when unset.
CELERY_BEAT_SCHEDULE["labelstudio-reconcile"] = {"task": "karyo.cpu.labelstudio_reconcile", "schedule": 60.0}

# --- Cache -----------------------------------------------------------------------------
# Shared by every process (login throttling counts across web processes): Redis in services
# mode and production, files under var/ in the embedded default.
if REDIS_URL:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL,
                          "KEY_PREFIX": "karyo", "TIMEOUT": 300}}
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
                          "LOCATION": str(VAR_DIR / "cache"), "TIMEOUT": 300}}

# --- API -------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "backend.common.pagination.StrictLimitOffsetPagination",
    "PAGE_SIZE": 100,
    "EXCEPTION_HANDLER": "backend.common.errors.json_exception_handler",
    "DEFAULT_PARSER_CLASSES": [
        "backend.common.parsers.BoundedJSONParser",  # nesting limit: no RecursionError on [[[[...
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    # Login and token requests: failed attempts are counted per client address and per username
    # (backend.common.throttling); the counters live in the cache, shared by every web process.
    "DEFAULT_THROTTLE_RATES": {
        "login": env_str("KARYO_LOGIN_RATE", "10/min"),
        "login_address": env_str("KARYO_LOGIN_ADDRESS_RATE", "30/min"),
    },
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Karyo API",
    "DESCRIPTION": "Nuclei annotation with active learning.",
    "VERSION": KARYO_VERSION,
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # Served from our own static files: the docs page must work without internet access.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Distinct names for choice sets that share a field name (`--fail-on-warn` refuses collisions).
    "ENUM_NAME_OVERRIDES": {
        "AnnotationSourceEnum": "backend.images.models.AnnotationSource",
        # Training runs and encoder pretrainings share one status set (queued ... cancelled).
        "RunStatusEnum": "backend.ml.models.RunStatus",
        "NucleusSourceEnum": ["annotation", "prediction"],
        "MixedNucleusSourceEnum": ["annotation", "prediction", "mixed"],
    },
    # Every operation documents the error shape (backend.common.schema adds 400/401/403/404/413/429/500).
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "backend.common.schema.document_errors",
    ],
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 8}},
]
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
LOGIN_URL = "/admin/login/"

# Invitations (backend/projects/invitations.py) send the set-password link by e-mail when an SMTP
# server is configured; without one (the embedded default) the link is logged and shown to the
# inviting admin instead.
EMAIL_HOST = env_str("KARYO_EMAIL_HOST", "") or ""
EMAIL_PORT = env_int("KARYO_EMAIL_PORT", 587, minimum=1)
EMAIL_HOST_USER = env_str("KARYO_EMAIL_USER", "") or ""
EMAIL_HOST_PASSWORD = env_str("KARYO_EMAIL_PASSWORD", "") or ""
EMAIL_USE_TLS = env_bool("KARYO_EMAIL_USE_TLS", True)
DEFAULT_FROM_EMAIL = env_str("KARYO_EMAIL_FROM", "karyo@localhost")
EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend" if EMAIL_HOST else "django.core.mail.backends.dummy.EmailBackend"
KARYO_EMAIL_CONFIGURED = bool(EMAIL_HOST)
PASSWORD_RESET_TIMEOUT = env_int("KARYO_INVITATION_SECONDS", 7 * 24 * 3600, minimum=60)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("KARYO_LOG_LEVEL", "INFO")},
    "loggers": {"django.request": {"level": "ERROR"}},
}
