"""Which editor is smoother for a 300-nucleus 512x512 tile: Label Studio 1.4.0 embedded in our
page (what Karyo uses) or the task page of a Label Studio server (1.23, installed by
`make labelstudio-install`)? Opt-in, since it starts a Label Studio server:

    KARYO_BENCH_EDITORS=1 KARYO_VAR_DIR=$PWD/var/test-web .venv/bin/python -m pytest \
        tests/browser/test_editor_benchmark.py -s -p no:cacheprovider

Both open the same tile with the same nuclei; the server page is measured with the exact
polygons the Label Studio sync sends (backend.labelstudio.conversions) and with the simplified
ones the embedded editor gets. Results: test-artifacts/browser-timings.json ("editor_benchmark").
"""
from __future__ import annotations

import base64
import json
import os
import socket
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from backend.common.storage import read_label_map
from backend.labelstudio import conversions
from backend.ml.models import Prediction
from backend.web import editing
from tests.browser import editor
from tests.browser.conftest import ROOT, record_timings
from tests.browser.scenario import PASSWORD, make_users, ui_project

LS_HOME = Path(os.environ.get("KARYO_LABEL_STUDIO_HOME", Path.home() / ".cache/karyo/label-studio-1.23.2"))
pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(os.environ.get("KARYO_BENCH_EDITORS") != "1", reason="opt-in benchmark: set KARYO_BENCH_EDITORS=1"),
]
RUNS = 4


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def label_studio(tmp_path):
    if not (LS_HOME / "venv/bin/label-studio").exists():
        pytest.fail(f"Label Studio is not installed in {LS_HOME}: make labelstudio-install")
    port, token, password = _port(), "b" * 40, "bench-password-123"
    env = {**os.environ, "LABEL_STUDIO_PORT": str(port), "LABEL_STUDIO_DATA_DIR": str(tmp_path / "ls"),
           "LABEL_STUDIO_USERNAME": "bench@karyo.local", "LABEL_STUDIO_PASSWORD": password, "LABEL_STUDIO_USER_TOKEN": token}
    log = open(tmp_path / "ls.log", "w")
    process = subprocess.Popen([str(ROOT / "infra/labelstudio/start.sh")], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Label Studio did not start:\n{(tmp_path / 'ls.log').read_text()[-3000:]}")
            time.sleep(1)
    yield {"url": url, "token": token, "email": "bench@karyo.local", "password": password}
    process.terminate()
    process.wait(timeout=30)
    log.close()


def ls_api(ls, method, path, body):
    request = urllib.request.Request(ls["url"] + path, method=method, data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Token {ls['token']}", "Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(request, timeout=60))


def test_embedded_editor_versus_the_label_studio_task_page(make_user, open_session, browser, label_studio):
    staff = make_user("staff", is_staff=True, password=PASSWORD)
    project, _version, truths = ui_project(name="Bench", creator=staff, kind="he", images=1, size=512, tile_size=512,
                                           nuclei=300, radius=(5, 9), seed=3)
    make_users(make_user, project, roles=("annotator",))
    [tile_id] = truths
    prediction = Prediction.objects.get(tile_id=tile_id)
    instances = read_label_map(prediction.mask.name)
    classes = project.nucleus_classes
    exact = conversions.prediction_result(instances, classes=None, nucleus_classes=classes)
    simplified = editing.editor_regions(instances, classes=None, nucleus_classes=classes)
    points = {"exact": sum(len(r["value"]["points"]) for r in exact),
              "simplified": sum(len(r["value"]["points"]) for r in simplified)}

    # The Label Studio server's task page gets the same tile (as a data URL) and config.
    ls = label_studio
    from backend.images.models import Tile

    png = Tile.objects.get(pk=tile_id).file.open("rb").read()
    ls_project = ls_api(ls, "POST", "/api/projects", {"title": "bench", "label_config": editing.editor_config(classes)})
    for name in ("exact", "simplified"):
        ls_api(ls, "POST", f"/api/projects/{ls_project['id']}/import",
               [{"data": {"image": "data:image/png;base64," + base64.b64encode(png).decode(), "variant": name}}])
    request = urllib.request.Request(f"{ls['url']}/api/tasks?project={ls_project['id']}",
                                     headers={"Authorization": f"Token {ls['token']}"})
    tasks = {}
    for task in json.load(urllib.request.urlopen(request, timeout=60))["tasks"]:
        name = task["data"]["variant"]
        tasks[name] = task["id"]
        ls_api(ls, "POST", f"/api/tasks/{task['id']}/annotations/", {"result": exact if name == "exact" else simplified})

    s = open_session("annotator", PASSWORD)  # Karyo's page, Label Studio 1.4.0 embedded
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    page.goto(f"{ls['url']}/user/login/")
    page.fill("input[name=email]", ls["email"])
    page.fill("input[name=password]", ls["password"])
    with page.expect_navigation():
        page.click("button[type=submit]")
    cdp = {id(s.page): s.context.new_cdp_session(s.page), id(page): context.new_cdp_session(page)}
    for session in cdp.values():
        session.send("Performance.enable")

    def main_thread_ms(p) -> float:
        metrics = {m["name"]: m["value"] for m in cdp[id(p)].send("Performance.getMetrics")["metrics"]}
        return metrics["TaskDuration"] * 1000

    def measure(p, url: str, ready) -> tuple[int, int]:
        started = time.perf_counter()
        p.goto(url)
        ready(p)
        p.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        # Chromium's counters restart with each document: this is the new page's main-thread time.
        return round((time.perf_counter() - started) * 1000), round(main_thread_ms(p))

    n = len(exact)
    server_ready = lambda p: p.wait_for_function(  # noqa: E731
        "() => { const s = window.Htx; const a = s && s.annotationStore && s.annotationStore.selected;"
        f" return a && a.regionStore && a.regionStore.regions.length >= {n - 5}; }}", timeout=180_000, polling=50)
    variants = {
        "embedded_1.4.0": (s.page, f"{s.base}/projects/{project.pk}/tiles/{tile_id}/", editor.wait_ready),
        "server_1.23_exact": (page, f"{ls['url']}/projects/{ls_project['id']}/data?task={tasks['exact']}", server_ready),
        "server_1.23_simplified": (page, f"{ls['url']}/projects/{ls_project['id']}/data?task={tasks['simplified']}", server_ready),
    }
    wall: dict[str, list[int]] = {k: [] for k in variants}
    cpu: dict[str, list[int]] = {k: [] for k in variants}
    for run in range(RUNS + 1):  # interleaved, so that the machine's load hits all alike; run 0 warms caches
        for name, (p, url, ready) in variants.items():
            w, c = measure(p, url, ready)
            if run:
                wall[name].append(w)
                cpu[name].append(c)
    page.screenshot(path=str(ROOT / "test-artifacts/screenshots/15-label-studio-server-task-page.png"))
    context.close()
    results = {
        "nuclei": int(len(np.unique(instances)) - 1), "points": points, "runs": RUNS,
        "navigation_to_ready_ms": wall, "main_thread_busy_ms": cpu,
        "median_navigation_to_ready_ms": {k: statistics.median(v) for k, v in wall.items()},
        "median_main_thread_busy_ms": {k: statistics.median(v) for k, v in cpu.items()},
        "load_average": os.getloadavg(),
    }
    record_timings("editor_benchmark", results)
    print(json.dumps(results, indent=2))
