"""Configuration: environment parsing fails loudly, and docker-compose matches the settings."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KARYO_SERVICES = ["web", "worker-gpu", "worker-cpu", "scheduler"]
PRODUCTION_VARS = {
    "DATABASE_URL", "KARYO_REDIS_URL", "KARYO_SECRET_KEY", "KARYO_ALLOWED_HOSTS", "KARYO_S3_ENDPOINT",
    "KARYO_S3_BUCKET", "KARYO_S3_ACCESS_KEY", "KARYO_S3_SECRET_KEY", "LABEL_STUDIO_URL", "LABEL_STUDIO_TOKEN",
    "KARYO_LABEL_STUDIO_WEBHOOK_SECRET",
}
NOT_SETTINGS = {"CUDA_VISIBLE_DEVICES"}  # read by torch, not Django


def settings_variables() -> set[str]:
    source = (ROOT / "backend/karyo/settings.py").read_text()
    return set(re.findall(r'env_(?:str|bool|int|list|url)\(\s*"([A-Z0-9_]+)"', source))


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def interpolate(value: str) -> str:
    """Resolve compose's ${VAR:-default} and ${VAR:?error} as compose would with a filled .env."""
    def sub(match: re.Match) -> str:
        name, op, rest = match.group(1), match.group(2), match.group(3)
        if op == ":-":
            return rest
        return {"KARYO_SECRET_KEY": "x" * 50}.get(name, f"test-{name.lower()}")

    return re.sub(r"\$\{([A-Z0-9_]+)(:-|:\?)([^}]*)\}", sub, str(value))


def load_settings(env: dict[str, str]) -> subprocess.CompletedProcess:
    code = (
        "import json, django; from django.conf import settings as s; "
        "print(json.dumps({'db': s.DATABASES['default']['ENGINE'], 'broker': s.CELERY_BROKER_URL, "
        "'storage': s.STORAGES['default']['BACKEND'], 'layer': s.CHANNEL_LAYERS['default']['BACKEND'], "
        "'hosts': s.ALLOWED_HOSTS}))"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KARYO_", "DATABASE_URL", "LABEL_STUDIO", "CELERY_"))}
    clean["DJANGO_SETTINGS_MODULE"] = "backend.karyo.settings"
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_every_compose_service_sets_only_variables_the_settings_read():
    known = settings_variables()
    services = compose()["services"]
    for name in KARYO_SERVICES:
        env = services[name]["environment"]
        unknown = set(env) - known - NOT_SETTINGS
        assert not unknown, f"{name} sets variables the settings never read: {sorted(unknown)}"
        missing = PRODUCTION_VARS - set(env)
        assert not missing, f"{name} lacks production variables: {sorted(missing)}"


def test_the_compose_environment_configures_postgres_redis_and_s3(tmp_path):
    env = {k: interpolate(v) for k, v in compose()["services"]["web"]["environment"].items()}
    result = load_settings({**env, "KARYO_VAR_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["db"] == "django.db.backends.postgresql"
    assert loaded["broker"].startswith("redis://")
    assert loaded["storage"] == "storages.backends.s3.S3Storage"
    assert loaded["layer"] == "channels_redis.core.RedisChannelLayer"


def test_the_gpu_worker_reserves_a_gpu_and_consumes_only_the_gpu_queue():
    service = compose()["services"]["worker-gpu"]
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    command = service["command"]
    # One task at a time, in the worker's own process (the solo pool): the shutdown handler reaches training.
    assert command[command.index("-Q") + 1] == "gpu" and command[command.index("--pool") + 1] == "solo"
    cpu = compose()["services"]["worker-cpu"]["command"]
    assert cpu[cpu.index("-Q") + 1] == "cpu"


def test_the_web_server_runs_several_processes_and_one_beat_runs_with_a_pidfile():
    web = compose()["services"]["web"]["command"][-1]
    assert "gunicorn" in web and "uvicorn_worker.UvicornWorker" in web and "-w $${KARYO_WEB_PROCESSES:-4}" in web
    # One socket per process (the kernel spreads connections), idle connections outlast the clients'.
    assert "--reuse-port" in web and "--keep-alive 75" in web
    scheduler = compose()["services"]["scheduler"]
    assert "--pidfile" in scheduler["command"] and scheduler["deploy"]["replicas"] == 1


def test_every_service_has_a_health_check_or_is_a_one_shot_job():
    for name, service in compose()["services"].items():
        assert "healthcheck" in service or name in {"minio-init", "scheduler"}, name


def test_the_embedded_default_needs_no_server(tmp_path):
    result = load_settings({"KARYO_VAR_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["db"] == "django.db.backends.sqlite3"
    assert loaded["broker"] == "filesystem://"
    assert loaded["storage"] == "django.core.files.storage.FileSystemStorage"


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"DATABASE_URL": "mysql://db/karyo"}, "DATABASE_URL"),
        ({"KARYO_DEBUG": "maybe"}, "KARYO_DEBUG"),
        ({"KARYO_MAX_IMAGE_PIXELS": "lots"}, "KARYO_MAX_IMAGE_PIXELS"),
        ({"KARYO_SECRET_KEY": "short"}, "KARYO_SECRET_KEY"),
        ({"KARYO_S3_ENDPOINT": "http://minio:9000"}, "KARYO_S3_ACCESS_KEY"),
        ({"KARYO_REDIS_URL": "localhost:6379"}, "KARYO_REDIS_URL"),
    ],
)
def test_a_bad_value_stops_start_up_naming_the_variable(tmp_path, env, needle):
    result = load_settings({**env, "KARYO_VAR_DIR": str(tmp_path)})
    assert result.returncode != 0
    assert "ConfigError" in result.stderr and needle in result.stderr
