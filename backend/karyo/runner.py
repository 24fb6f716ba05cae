"""`make run`: set up the embedded platform and supervise every process it needs in the foreground.

Idempotent: migrations, the admin account and the demo projects are created only when missing.

Processes: the web server (gunicorn with ``KARYO_WEB_PROCESSES`` uvicorn workers, HTTP and
WebSocket, each on its own ``SO_REUSEPORT`` socket so that the kernel spreads connections over them;
the runner first checks that the port is free, so a port held by someone else, another ``make run``
included, is reported at once), a ``gpu`` worker (train, predict, rank: one task at a time), a
``cpu`` worker (ingest, exports, Label Studio, periodic checks: never waits behind training), one
beat (a lock file under the var folder means never two), and Label Studio when installed.

A crashed process is restarted; one that keeps crashing stops everything. Ctrl-C (or SIGTERM)
stops every process and its children: all get SIGTERM at once; web and beat are killed if still
there after a few seconds; a worker finishes its warm shutdown and leaves without the
interpreter's slow teardown (idle: about 5 s in all on the shared 2-core machine, was 9 s). A
training run in progress is stopped at its next step and left ``failed`` with the reason (the gpu
worker's shutdown handler in ``backend.ml.tasks``). ``KARYO_SEED_DEMO=0`` skips the demo projects.
"""
from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
VAR = Path(os.environ.get("KARYO_VAR_DIR", ROOT / "var")).resolve()
RESTART_LIMIT = 5  # restarts of one process within RESTART_WINDOW before the runner gives up
RESTART_WINDOW = 120.0
STOP_GRACE_SECONDS = 30.0


def manage(*args: str) -> None:
    subprocess.run([PY, "manage.py", *args], cwd=ROOT, check=True)


def check_port_free(host: str, port: int) -> None:
    """Raises OSError when ``host:port`` is taken. A plain bind (no SO_REUSEPORT) fails against any
    listener there, another Karyo's web workers included; it is released at once so that the web
    workers can bind their own sockets."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))


def take_var_lock(var: Path):
    """One runner per var folder: two would run two beats and race on the same SQLite files."""
    var.mkdir(parents=True, exist_ok=True)
    handle = open(var / "runner.lock", "w")  # noqa: SIM115 - held open (locked) for the runner's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


@dataclass
class Service:
    name: str
    command: list[str]
    optional: bool = False  # Label Studio: Karyo goes on without it
    env: dict[str, str] | None = None
    pass_fds: tuple[int, ...] = ()
    process: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self) -> None:
        # A new session (process group): Ctrl-C reaches only the runner, which stops children in order,
        # and killpg reaches a worker's own children (prefork pool) too.
        self.process = subprocess.Popen(self.command, cwd=ROOT, env=self.env, pass_fds=self.pass_fds,
                                        start_new_session=True)
        print(f"karyo: started {self.name} (pid {self.process.pid})", flush=True)

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def signal_group(self, sig: int) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def web_command(*, bind: str, processes: int, graceful_timeout: int = 10) -> list[str]:
    """The production web server (``make run``, the load benchmark, the fuzzing test; docker-compose
    spells the same flags). gunicorn keeps ``processes`` uvicorn workers (HTTP and WebSocket) and
    replaces one that dies. ``--reuse-port``: one socket per worker, so the kernel spreads
    connections; on one shared socket the first worker to wake accepted nearly all of a burst (up
    to all 50 clients' connections, tests/load/RESULTS.md). Idle connections are kept 75 s, longer
    than clients keep theirs, so a client never reuses one the server is closing."""
    return [PY, "-m", "gunicorn", "backend.karyo.asgi:application", "-k", "uvicorn_worker.UvicornWorker",
            "-w", str(processes), "--bind", bind, "--reuse-port", "--keep-alive", "75", "--no-control-socket",
            "--graceful-timeout", str(graceful_timeout), "--timeout", "120", "--log-level", "warning"]


def services(*, host: str, port: int, web_processes: int, label_studio) -> list[Service]:
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    celery = [PY, "-m", "celery", "-A", "backend.karyo"]
    quiet = ["--without-gossip", "--without-mingle"]
    # A worker leaves as soon as its warm shutdown is done (backend.karyo.celery), skipping seconds of
    # interpreter teardown.
    worker_env = {**os.environ, "KARYO_WORKER_FAST_EXIT": "1"}
    out = [
        Service("web", web_command(bind=bind, processes=web_processes, graceful_timeout=3)),
    ]
    out += [
        # Solo pool: one task at a time in the worker's own process, so the shutdown handler reaches
        # the training loop (a prefork child would not see it) and PyTorch is never forked.
        Service("worker-gpu", [*celery, "worker", "-Q", "gpu", "--pool", "solo", "--hostname", "gpu@%h", "-l", "INFO",
                               *quiet], env=worker_env),
        Service("worker-cpu", [*celery, "worker", "-Q", "cpu", "--concurrency", "2", "--hostname", "cpu@%h",
                               "-l", "INFO", *quiet], env=worker_env),
        # celery's pidfile refuses a second beat on the same var folder, and removes a stale one.
        Service("beat", [*celery, "beat", "-l", "INFO", "--schedule", str(VAR / "celerybeat-schedule"),
                         "--pidfile", str(VAR / "celerybeat.pid")]),
    ]
    if label_studio is not None:
        out.append(Service("label-studio", label_studio.command, optional=True, env=label_studio.env))
    return out


def wait_until_serving(url: str, web: list[Service], timeout: float, stopping) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stopping():
        if all(s.exited() for s in web):
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


# How long each kind of process may take to stop after SIGTERM before it is killed. The web server
# and beat have nothing to finish (gunicorn's own --graceful-timeout gives requests in flight a
# moment); a worker's warm shutdown finishes the task it is running, and a training run stops at
# its next step (the gpu worker's shutdown handler), so an idle worker is gone in a second or two.
STOP_GRACE = {"web": 5.0, "beat": 3.0}


def stop_all(running: list[Service]) -> dict[str, float]:
    """SIGTERM to every process at once, then wait for each within its grace period (``STOP_GRACE``,
    else ``STOP_GRACE_SECONDS``); whatever is left in a process group when its leader is gone (a
    prefork child, a gunicorn worker) is killed: no orphans. Prints and returns seconds per process."""
    began = time.monotonic()
    pending = [s for s in running if s.process is not None]
    for service in pending:
        if service.process.poll() is None:
            service.process.send_signal(signal.SIGTERM)
    took: dict[str, float] = {}
    while pending:
        now = time.monotonic()
        for service in list(pending):
            grace = STOP_GRACE.get(service.name, STOP_GRACE_SECONDS)
            if service.process.poll() is None and now - began < grace:
                continue
            if service.process.poll() is None:
                print(f"karyo: {service.name} did not stop in {grace:.0f}s; killing it", file=sys.stderr)
            service.signal_group(signal.SIGKILL)
            try:
                service.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            took[service.name] = time.monotonic() - began
            pending.remove(service)
        time.sleep(0.05)
    if took:
        print(f"karyo: stopped in {time.monotonic() - began:.1f}s ("
              + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in took.items()) + ")", flush=True)
    return took


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "backend.karyo.settings")
    host = os.environ.get("KARYO_HOST", "127.0.0.1")
    port = int(os.environ.get("KARYO_PORT", "8000"))
    web_processes = max(1, int(os.environ.get("KARYO_WEB_PROCESSES", "2")))
    lock = take_var_lock(VAR)
    if lock is None:
        print(f"error: another `make run` is using {VAR} (see {VAR / 'runner.lock'}); stop it first",
              file=sys.stderr)
        return 2
    try:
        check_port_free(host, port)
    except OSError as exc:
        print(f"error: {host}:{port} is taken ({exc.strerror}); stop what runs there or set KARYO_PORT",
              file=sys.stderr)
        return 2
    started = time.monotonic()
    print("karyo: migrating the database ...", flush=True)
    manage("migrate", "--noinput", "-v0")
    manage("ensure_admin")
    if os.environ.get("KARYO_SEED_DEMO", "1") != "0":  # 0: no demo projects (and no demo training runs)
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

    stopping = False

    def stop(*_args) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    running = services(host=host, port=port, web_processes=web_processes, label_studio=label_studio)
    for service in running:
        service.start()
    exit_code = 0
    try:
        web = [s for s in running if s.name == "web"]
        url_host = f"[{host}]" if ":" in host else host
        if not wait_until_serving(f"http://{url_host}:{port}/healthz", web, 120, lambda: stopping):
            if not stopping:
                print(f"karyo: the web server did not answer on {host}:{port}; stopping", file=sys.stderr)
                return 1
        else:
            print(f"\nkaryo: ready in {time.monotonic() - started:.0f}s at http://{url_host}:{port}/  "
                  f"(API docs: /api/docs/, admin: /admin/). Ctrl-C stops everything.\n", flush=True)
        while not stopping:
            for service in list(running):
                if not service.exited():
                    continue
                code = service.process.returncode
                if service.optional:
                    print(f"karyo: {service.name} exited with code {code}; Karyo goes on without it", file=sys.stderr)
                    running.remove(service)
                    continue
                now = time.monotonic()
                service.restarts = [t for t in service.restarts if now - t < RESTART_WINDOW] + [now]
                if len(service.restarts) > RESTART_LIMIT:
                    print(f"karyo: {service.name} exited with code {code} {RESTART_LIMIT} times within "
                          f"{RESTART_WINDOW:.0f}s; stopping everything", file=sys.stderr)
                    exit_code, stopping = 1, True
                    break
                print(f"karyo: {service.name} exited with code {code}; restarting it", file=sys.stderr, flush=True)
                service.signal_group(signal.SIGKILL)  # its children, if any survived it
                service.start()
            time.sleep(0.3)
    finally:
        stop_all(running)
        lock.close()
        print("karyo: stopped", flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
