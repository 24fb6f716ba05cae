"""`make run`: set up the embedded platform and run every process it needs in the foreground.

Idempotent: migrations, the admin account and the demo projects are created only when missing.
Ctrl-C (or any child dying) stops every process this started.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
VAR = Path(os.environ.get("KARYO_VAR_DIR", ROOT / "var")).resolve()


def manage(*args: str) -> None:
    subprocess.run([PY, "manage.py", *args], cwd=ROOT, check=True)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "backend.karyo.settings")
    host = os.environ.get("KARYO_HOST", "127.0.0.1")
    port = int(os.environ.get("KARYO_PORT", "8000"))
    if not port_is_free(host, port):
        print(f"error: {host}:{port} is in use; stop what runs there or set KARYO_PORT", file=sys.stderr)
        return 2
    started = time.monotonic()
    print("karyo: migrating the database ...", flush=True)
    manage("migrate", "--noinput", "-v0")
    manage("ensure_admin")
    print("karyo: seeding demo projects (first run only) ...", flush=True)
    manage("seed_demo")
    manage("collectstatic", "--noinput", "-v0")

    # Label Studio, when installed: Karyo's processes get its URL, token and webhook secret.
    from backend.labelstudio.embedded import plan as label_studio_plan

    label_studio, label_studio_note = label_studio_plan(var_dir=VAR)
    print(f"karyo: {label_studio_note}", flush=True)
    if label_studio is not None:
        os.environ.update(label_studio.karyo_env)
        os.environ.setdefault("KARYO_PUBLIC_URL", f"http://{host}:{port}")

    commands = {
        "web": [PY, "-m", "daphne", "-b", host, "-p", str(port), "backend.karyo.asgi:application"],
        "worker": [PY, "-m", "celery", "-A", "backend.karyo", "worker", "-Q", "gpu,cpu", "--concurrency", "1",
                   "--hostname", "embedded@%h", "-l", "INFO", "--without-gossip", "--without-mingle",
                   # Embedded beat: periodic checks (stale runs) without one more process.
                   "--beat", "--schedule", str(VAR / "celerybeat-schedule")],
    }
    children: dict[str, subprocess.Popen] = {}
    for name, command in commands.items():
        # A new process group, so that Ctrl-C reaches us once and we stop children in order.
        children[name] = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
    if label_studio is not None:
        children["label-studio"] = subprocess.Popen(label_studio.command, cwd=ROOT, env=label_studio.env,
                                                    start_new_session=True)

    stopping = False

    def stop(*_args) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    deadline = time.monotonic() + 60
    while not stopping and port_is_free(host, port) and time.monotonic() < deadline:
        if children["web"].poll() is not None:
            break
        time.sleep(0.2)
    print(f"\nkaryo: ready in {time.monotonic() - started:.0f}s at http://{host}:{port}/  "
          f"(API docs: /api/docs/, admin: /admin/). Ctrl-C stops everything.\n", flush=True)
    exit_code = 0
    try:
        while not stopping:
            for name, child in list(children.items()):
                if child.poll() is not None and name == "label-studio":  # optional: Karyo goes on
                    print(f"karyo: Label Studio exited with code {child.returncode}; Karyo goes on without it",
                          file=sys.stderr)
                    del children[name]
                elif child.poll() is not None:
                    print(f"karyo: {name} exited with code {child.returncode}; stopping the rest", file=sys.stderr)
                    exit_code = 1
                    stopping = True
            time.sleep(0.3)
    finally:
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for child in children.values():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
        print("karyo: stopped", flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
