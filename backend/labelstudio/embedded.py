"""`make run`'s Label Studio: started next to Karyo on loopback when it is installed.

Imported by the runner before Django is set up: no Django imports here. The admin account,
its API token and the webhook secret are generated once and kept (0600) under the var folder;
Karyo's processes get ``LABEL_STUDIO_URL``, ``LABEL_STUDIO_TOKEN`` and
``KARYO_LABEL_STUDIO_WEBHOOK_SECRET`` from them. An external Label Studio (``LABEL_STUDIO_URL``
already set) is used as it is and nothing is started.
"""
from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VERSION = "1.23.2"
START = ROOT / "infra" / "labelstudio" / "start.sh"


def label_studio_home() -> Path:
    return Path(os.environ.get("KARYO_LABEL_STUDIO_HOME", Path.home() / ".cache" / "karyo" / f"label-studio-{VERSION}"))


def installed() -> bool:
    return (label_studio_home() / "venv" / "bin" / "label-studio").exists()


@dataclass(frozen=True)
class EmbeddedLabelStudio:
    command: list[str]
    env: dict[str, str]  # for the Label Studio process
    karyo_env: dict[str, str]  # for Karyo's web server and worker
    url: str
    username: str
    password: str


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _read_env_file(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def _credentials(data_dir: Path) -> dict[str, str]:
    """The same file start.sh reads; written here first so Karyo knows the token up front."""
    path = data_dir / "karyo-credentials.env"
    stored = _read_env_file(path)
    defaults = {
        "LABEL_STUDIO_USERNAME": lambda: "admin@karyo.local",
        "LABEL_STUDIO_PASSWORD": lambda: secrets.token_urlsafe(18),
        "LABEL_STUDIO_USER_TOKEN": lambda: secrets.token_hex(20),
        "KARYO_LABEL_STUDIO_WEBHOOK_SECRET": lambda: secrets.token_urlsafe(32),
    }
    wanted = {key: os.environ.get(key) or stored.get(key) or make() for key, make in defaults.items()}
    if wanted != stored:
        data_dir.mkdir(parents=True, exist_ok=True)
        data_dir.chmod(0o700)
        path.write_text("".join(f"{k}={v}\n" for k, v in wanted.items()))
        path.chmod(0o600)
    return wanted


def plan(*, var_dir: Path) -> tuple[EmbeddedLabelStudio | None, str]:
    """What to start, or None and why not (said to the user)."""
    if os.environ.get("LABEL_STUDIO_URL"):
        return None, f"using the Label Studio at {os.environ['LABEL_STUDIO_URL']} (LABEL_STUDIO_URL)"
    if not installed():
        return None, ("Label Studio is not installed, so Karyo runs without it (the embedded editor works as "
                      "before). Install it once with `make labelstudio-install` (about 1 GB, two minutes).")
    port = int(os.environ.get("LABEL_STUDIO_PORT", "8080"))
    data_dir = var_dir / "label-studio"
    url = f"http://127.0.0.1:{port}"
    if not _port_is_free(port):
        stored = _read_env_file(data_dir / "karyo-credentials.env")
        if stored.get("LABEL_STUDIO_USER_TOKEN") and _answers(url):  # `make labelstudio` in another terminal
            karyo_env = {"LABEL_STUDIO_URL": url, "LABEL_STUDIO_TOKEN": stored["LABEL_STUDIO_USER_TOKEN"],
                         "KARYO_LABEL_STUDIO_WEBHOOK_SECRET": stored.get("KARYO_LABEL_STUDIO_WEBHOOK_SECRET", "")}
            os.environ.update({k: v for k, v in karyo_env.items() if v})
            return None, f"using the Label Studio already running at {url}"
        return None, f"127.0.0.1:{port} is in use, so Label Studio was not started; set LABEL_STUDIO_PORT"
    creds = _credentials(data_dir)
    env = {**os.environ, "LABEL_STUDIO_PORT": str(port), "LABEL_STUDIO_DATA_DIR": str(data_dir),
           **{k: v for k, v in creds.items() if k.startswith("LABEL_STUDIO_")}}
    karyo_env = {"LABEL_STUDIO_URL": url, "LABEL_STUDIO_TOKEN": creds["LABEL_STUDIO_USER_TOKEN"],
                 "KARYO_LABEL_STUDIO_WEBHOOK_SECRET": creds["KARYO_LABEL_STUDIO_WEBHOOK_SECRET"]}
    return (
        EmbeddedLabelStudio(command=["bash", str(START)], env=env, karyo_env=karyo_env, url=url,
                            username=creds["LABEL_STUDIO_USERNAME"], password=creds["LABEL_STUDIO_PASSWORD"]),
        f"Label Studio at {url} (login {creds['LABEL_STUDIO_USERNAME']} / {creds['LABEL_STUDIO_PASSWORD']})",
    )
