"""Whole-slide images in the browser (issue 11): a project admin uploads a generated SVS-like
slide on the upload page (chunked upload, one chunk's connection dropped on the way), a real
Celery worker ingests it while the page shows progress, the slide appears in the image list
with its thumbnail, and the slide viewer shows it with the nuclei outlined over it; a click on
a tile opens the correction workspace.

The outlines are a prediction the test stores for every tile (dark blobs of the tile's own pixels,
read through the same pyramid reader as everything else), as tests/browser/scenario.py does for
the other pages: no model is trained here.
"""
from __future__ import annotations

import os
import re
import time

import numpy as np
import pytest
from scipy import ndimage

from backend.common.storage import StagedWrites, encode_png
from backend.images.models import Image, ImageState, Tile
from backend.ml.models import ModelStatus, ModelVersion, Prediction, QueueEntry
from backend.projects.services import create_project
from ml_worker.slides import write_pyramidal_tiff
from tests.browser.conftest import record_timings
from tests.browser.scenario import PASSWORD, make_users

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def slide_project(make_user):
    staff = make_user("staff", is_staff=True, password=PASSWORD)
    project = create_project(name="Slides (browser)", created_by=staff, tile_size=256)
    users = make_users(make_user, project, roles=("admin", "annotator"))
    return {"project": project, "users": users}


def dark_blobs(rgb: np.ndarray) -> np.ndarray:
    """Instance labels of the tile's dark (haematoxylin-stained) blobs."""
    from skimage.filters import threshold_otsu

    gray = rgb.astype(np.float32).mean(axis=2)
    if gray.max() - gray.min() < 10:
        return np.zeros(gray.shape, np.int32)
    labels, _ = ndimage.label(ndimage.binary_opening(gray < threshold_otsu(gray) * 0.9, iterations=1))
    sizes = np.bincount(labels.ravel())
    keep = np.flatnonzero(sizes >= 20)
    keep = keep[keep > 0]
    lut = np.zeros(labels.max() + 1, np.int32)
    lut[keep] = np.arange(1, len(keep) + 1)
    return lut[labels]


def predict_every_tile(project, image) -> ModelVersion:
    from backend.images.pixels import read_tile_rgb

    version = ModelVersion.objects.create(project=project, version=1, architecture="unet", weights="models/fake.pt",
                                          status=ModelStatus.ACTIVE, metrics={"dice": 0.8}, status_reason="test model")
    tiles = list(Tile.objects.filter(image=image).order_by("pk"))
    scores = []
    for tile in tiles:
        labels = dark_blobs(read_tile_rgb(tile))
        with StagedWrites() as staged:
            name = staged.save(f"predictions/{version.pk}/{tile.pk}.png", encode_png(labels))
        count = int(labels.max())
        score = round(1.0 / (1 + count) + (tile.pk % 7) / 20, 4)  # varied, so the uncertainty colours differ
        Prediction.objects.create(tile=tile, model_version=version, mask=name, nucleus_count=count,
                                  uncertainty={"entropy": score})
        scores.append((tile.pk, score))
    scores.sort(key=lambda item: -item[1])
    QueueEntry.objects.bulk_create([QueueEntry(project=project, tile_id=t, rank=i, score=s, strategy="entropy",
                                               model_version=version) for i, (t, s) in enumerate(scores)])
    return version


def human_bytes(n: float) -> str:
    """Sizes as the upload page writes them (frontend/src/pages/images.js humanBytes)."""
    units = ["B", "KB", "MB", "GB", "TB"]
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n /= 1000
        i += 1
    return f"{n} {units[i]}" if i == 0 else f"{n:.{2 if n < 10 else 1}f} {units[i]}"


def canvas_ink(page) -> int:
    """Pixels of the overlay canvas that something was drawn on."""
    return page.evaluate("""() => {
        const c = document.querySelector('[data-testid=slide-overlay]');
        const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 3; i < data.length; i += 4) if (data[i] > 0) n += 1;
        return n;
    }""")


def test_an_admin_uploads_a_slide_watches_it_ingest_and_browses_it_with_nuclei(slide_project, open_session, start_worker,
                                                                               tmp_path):
    project = slide_project["project"]
    path = tmp_path / "generated-slide.svs"
    write_pyramidal_tiff(path, width=2400, height=1800, mpp=0.5, tile=256, seed=5, tissue_fraction=0.5)
    worker = start_worker(queues="cpu")

    s = open_session("admin", PASSWORD)
    s.goto(f"/projects/{project.pk}/upload/")
    s.page.wait_for_selector("[data-testid=drop-zone]")
    # The first PUT of chunk 0 loses its connection; the uploader must retry it by itself.
    puts = {"chunk0": 0}

    def drop_first(route):
        puts["chunk0"] += 1
        if puts["chunk0"] == 1:
            route.abort("connectionreset")
        else:
            route.continue_()

    s.page.route("**/api/uploads/*/chunks/0/", drop_first)
    started = time.perf_counter()
    s.page.set_input_files("[data-testid=file-input]", str(path))
    s.page.wait_for_selector("[data-testid=upload-row]")
    s.page.wait_for_function(
        "document.querySelector('[data-testid=upload-row] [role=progressbar]')?.getAttribute('aria-valuenow') === '100'",
        timeout=60_000)
    uploaded = time.perf_counter() - started
    assert puts["chunk0"] >= 2, "the dropped chunk was not sent again"
    detail = s.page.inner_text("[data-testid=upload-detail]")
    size = human_bytes(path.stat().st_size)
    assert f"{size} of {size}" in detail, detail
    try:
        s.page.wait_for_selector("[data-testid=upload-row][data-state=ready], [data-testid=upload-row][data-state=failed]",
                                 timeout=180_000)
        assert s.page.get_attribute("[data-testid=upload-row]", "data-state") == "ready"
    except Exception:
        images = list(Image.objects.filter(project=project).values("id", "state", "state_reason", "ingest_progress"))
        pytest.fail(f"ingest did not finish: {images}; row: {s.page.inner_text('[data-testid=upload-row]')}\n"
                    f"worker:\n{worker.output()[-4000:]}")
    ingested = time.perf_counter() - started
    image = Image.objects.get(project=project)
    assert image.state == ImageState.READY
    assert 0 < image.tiles_kept < image.tiles_grid, (image.tiles_kept, image.tiles_grid)
    row = s.page.inner_text("[data-testid=upload-row]")
    assert f"{image.tiles_kept} of {image.tiles_grid} grid tiles kept" in row, row
    # The slide is in the list below, with its thumbnail.
    card = s.page.locator(f"[data-testid=image-card][data-image-id='{image.pk}'][data-state=ready]")
    card.wait_for()
    s.page.wait_for_function(
        f"(() => {{ const i = document.querySelector(\"[data-image-id='{image.pk}'] img\"); return i && i.complete && i.naturalWidth > 0; }})()")
    s.shot("16-upload")
    record_timings("slide_upload", {"bytes": path.stat().st_size, "upload_s": round(uploaded, 2),
                                    "upload_to_ingested_s": round(ingested, 2)})

    predict_every_tile(project, image)
    # The dashboard's grid puts each kept tile in its own cell of the slide's grid (holes where
    # background was dropped) and links the name to the viewer.
    s.goto(f"/projects/{project.pk}/")
    s.page.wait_for_selector(".tile-cell")
    assert s.page.locator(".tile-cell").count() == image.tiles_kept
    rows = s.page.evaluate("Math.max(...[...document.querySelectorAll('.tile-cell')].map(c => Number(c.style.gridRowStart)))")
    cols = s.page.evaluate("Math.max(...[...document.querySelectorAll('.tile-cell')].map(c => Number(c.style.gridColumnStart)))")
    assert (rows, cols) == (-(-image.height // 256), -(-image.width // 256))
    assert s.page.get_attribute("a.image-name", "href") == f"/projects/{project.pk}/images/{image.pk}/"
    s.shot("17b-dashboard-slide")
    s.goto(f"/projects/{project.pk}/images/")
    s.page.wait_for_selector(f"[data-testid=image-card][data-image-id='{image.pk}'] img")
    s.shot("17-images")

    with s.page.expect_navigation():
        s.page.click(f"[data-testid=image-card][data-image-id='{image.pk}']")
    s.page.wait_for_function("window.karyoViewer && window.karyoViewer.world.getItemCount() === 1"
                             " && window.karyoViewer.world.getItemAt(0).getFullyLoaded()", timeout=60_000)
    overlay = "[data-testid=slide-overlay]"
    s.page.wait_for_function(f"Number(document.querySelector('{overlay}')?.dataset.nuclei || 0) > 0", timeout=30_000)
    assert s.page.get_attribute(overlay, "data-mode") == "outlines"
    assert int(s.page.get_attribute(overlay, "data-tiles")) == image.tiles_kept
    assert canvas_ink(s.page) > 5000
    assert "active model's prediction" in s.page.inner_text("[data-testid=overlay-status]")
    s.shot("15-slide-viewer", full_page=False)

    s.page.click("[data-testid=grid-uncertainty]")
    s.page.wait_for_timeout(300)
    s.shot("18-slide-viewer-uncertainty", full_page=False)

    # Zoomed in on one tile: only the tiles in view are drawn.
    tile = Tile.objects.filter(image=image, predictions__nucleus_count__gt=3).order_by("pk").first()
    s.page.evaluate(f"""() => {{
        const v = window.karyoViewer;
        const r = v.viewport.imageToViewportRectangle({tile.x}, {tile.y}, {tile.w}, {tile.h});
        v.viewport.fitBounds(r, true);
    }}""")
    s.page.wait_for_function(f"Number(document.querySelector('{overlay}').dataset.tiles) < {image.tiles_kept}")
    s.page.wait_for_function("window.karyoViewer.world.getItemAt(0).getFullyLoaded()", timeout=30_000)
    s.page.wait_for_timeout(400)
    assert int(s.page.get_attribute(overlay, "data-nuclei")) > 0
    s.shot("19-slide-viewer-zoomed", full_page=False)

    # A click on the tile opens it in the correction workspace.
    x, y = s.page.evaluate(f"""() => {{
        const v = window.karyoViewer;
        const p = v.viewport.imageToViewerElementCoordinates(new OpenSeadragon.Point({tile.x + tile.w / 2}, {tile.y + tile.h / 2}));
        const box = v.element.getBoundingClientRect();
        return [box.left + p.x, box.top + p.y];
    }}""")
    with s.page.expect_navigation():
        s.page.mouse.click(x, y)
    assert s.page.url.endswith(f"/projects/{project.pk}/tiles/{tile.pk}/"), s.page.url
    s.page.wait_for_selector("[data-testid=tile-id]")
    assert s.page.inner_text("[data-testid=tile-id]").strip() == str(tile.pk)


def test_an_interrupted_upload_resumes_after_a_reload_sending_only_the_missing_chunks(slide_project, open_session, tmp_path):
    from backend.images import uploads
    from backend.images.models import Upload

    project = slide_project["project"]
    path = tmp_path / "interrupted.svs"
    write_pyramidal_tiff(path, width=2000, height=1500, mpp=0.5, tile=256, seed=8, tissue_fraction=0.5)
    s = open_session("admin", PASSWORD)
    s.goto(f"/projects/{project.pk}/upload/")
    s.page.wait_for_selector("[data-testid=drop-zone]")
    # The network goes down for good after the first chunks: the uploader keeps retrying.
    cut = re.compile(r"/api/uploads/[^/]+/chunks/([2-9]|\d\d+)/$")
    s.page.route(cut, lambda route: route.abort("connectionrefused"))
    s.page.set_input_files("[data-testid=file-input]", str(path))
    s.page.wait_for_selector("[data-testid=upload-row][data-state=offline]", timeout=30_000)
    upload = Upload.objects.get(project=project)
    parts = upload.chunk_count
    assert parts >= 3, f"{parts} parts: the server's chunk size is not the browser tests' 256 KiB"
    deadline = time.monotonic() + 20
    while uploads.received_parts(upload) != [0, 1] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert uploads.received_parts(upload) == [0, 1]

    # The page asks "leave the page?" while an upload runs (Chromium only after a real user gesture).
    s.page.on("dialog", lambda dialog: dialog.accept())
    s.page.reload()
    s.page.unroute(cut)  # after the reload: the old page's retries must not get through
    s.page.wait_for_selector("[data-testid=interrupted]")
    s.page.wait_for_selector("[data-testid=interrupted] >> text=uploaded)")
    expected = f"{path.name} ({human_bytes(2 * upload.chunk_size)} of {human_bytes(path.stat().st_size)} uploaded)"
    assert expected in s.page.inner_text("[data-testid=interrupted]")
    s.shot("16b-upload-interrupted")
    sent = []
    s.page.on("request", lambda r: sent.append(int(r.url.rstrip("/").split("/")[-1]))
              if r.method == "PUT" and "/chunks/" in r.url else None)
    s.page.set_input_files("[data-testid=file-input]", str(path))
    s.page.wait_for_selector("[data-testid=upload-row][data-state=ingesting]", timeout=60_000)
    assert sorted(sent) == list(range(2, parts)), sent
    assert "resumed at" in s.page.inner_text("[data-testid=upload-detail]")
    assert s.page.get_attribute("[data-testid=upload-row] [role=progressbar]", "aria-valuenow") == "100"
    image = Image.objects.get(project=project)
    assert image.state == ImageState.INGESTING and image.name == path.name
    assert s.page.locator("[data-testid=interrupted]").count() == 0


def test_files_that_are_not_slides_are_skipped_or_refused_with_the_reason_and_the_list_shows_each_state(
        slide_project, open_session, tmp_path):
    project = slide_project["project"]
    fake = tmp_path / "scan.svs"
    fake.write_bytes(b"this is not a slide\n" * 5000)
    notes = tmp_path / "notes.txt"
    notes.write_text("slide notes")
    s = open_session("admin", PASSWORD)
    s.goto(f"/projects/{project.pk}/upload/")
    s.page.wait_for_selector("[data-testid=drop-zone]")
    s.page.set_input_files("[data-testid=file-input]", [str(fake), str(notes)])
    assert "notes.txt (not a slide or image format Karyo reads)" in s.page.inner_text("[data-testid=skipped]")
    s.page.wait_for_selector("[data-testid=upload-row][data-state=failed]", timeout=30_000)
    message = s.page.inner_text("[data-testid=upload-row] [data-testid=upload-state]")
    assert "scan.svs" in message and len(message) > 30, message
    assert not Image.objects.filter(project=project).exists()
    s.shot("16c-upload-refused")

    # What the list shows for an image still ingesting and one whose ingest failed.
    common = {"project": project, "format": "svs", "file": "images/x.svs", "width": 40000, "height": 30000, "kind": "slide"}
    Image.objects.create(name="big-slide.svs", sha256="a" * 64, state=ImageState.INGESTING, ingest_progress=0.4, **common)
    Image.objects.create(name="broken.svs", sha256="b" * 64, state=ImageState.FAILED,
                         state_reason="broken.svs: the file is cut short (truncated after 1.2 GB)", **common)
    # The server trusts a worker that answered for 10 s: the previous test's worker may still be
    # remembered. Ask it to check again now that no worker runs.
    assert s.page.evaluate("fetch('/api/system/status/?refresh=1').then(r => r.json())")["worker"]["online"] is False
    s.goto(f"/projects/{project.pk}/images/")
    s.page.wait_for_selector("[data-testid=image-ingesting]")
    assert "ingesting 40%" in s.page.inner_text("[data-testid=image-ingesting]")
    assert "truncated after 1.2 GB" in s.page.inner_text("[data-testid=image-failed]")
    s.page.wait_for_selector("[data-testid=ingest-waits]")  # no worker in this test
    s.shot("17c-images-ingesting-and-failed")


def test_only_project_admins_see_the_upload_page(slide_project, open_session):
    project = slide_project["project"]
    s = open_session("annotator", PASSWORD)
    s.goto(f"/projects/{project.pk}/images/")
    s.page.wait_for_selector("[data-testid=empty-state]")
    assert s.page.locator("[data-testid=upload-link]").count() == 0
    response = s.page.goto(s.base + f"/projects/{project.pk}/upload/")
    assert response.status == 403


OVERLAY_BENCH = """async () => {
    const base = document.querySelector('script[type=module]').src;
    const m = await import(new URL('lib/overlay.js', base).href);
    const side = 20480, size = 256;
    const tiles = [];
    for (let y = 0, id = 1; y < side; y += size) for (let x = 0; x < side; x += size) tiles.push({id: id++, x, y, w: size, h: size});
    let s = 12345;
    const rand = () => ((s = (s * 1664525 + 1013904223) >>> 0) / 2 ** 32);
    const nuclei = [];
    for (let i = 0; i < 100000; i++) {
        const t = tiles[Math.floor(rand() * tiles.length)], r = 4 + rand() * 5;
        const cx = t.x + r + rand() * (size - 2 * r), cy = t.y + r + rand() * (size - 2 * r);
        const polygon = [];
        for (let k = 0; k < 10; k++) polygon.push([cx + r * Math.cos(k * Math.PI / 5), cy + r * Math.sin(k * Math.PI / 5)]);
        nuclei.push({id: i + 1, tile_id: t.id, class_id: 1 + (i % 3), polygon});
    }
    const started = performance.now();
    const cache = new m.NucleusCache(tiles, {maxNuclei: 200000});
    cache.add({x: 0, y: 0, w: side, h: side}, {nuclei, truncated: false});
    const indexMs = performance.now() - started;
    const canvas = document.createElement('canvas');
    canvas.width = 1440; canvas.height = 710;
    document.body.append(canvas);
    const ctx = canvas.getContext('2d');
    const out = {index_ms: Math.round(indexMs), views: []};
    for (const scale of [m.OUTLINE_MIN_SCALE, 0.5, 1, 0.05]) {
        const transform = {scale, offsetX: 720 - scale * side / 2, offsetY: 355 - scale * side / 2};
        const rect = m.visibleRect(transform, 1440, 710, {width: side, height: side});
        const times = [];
        let drawn;
        for (let i = 0; i < 9; i++) {
            const t0 = performance.now();
            ctx.setTransform(1, 0, 0, 1, 0, 0);
            ctx.clearRect(0, 0, 1440, 710);
            drawn = m.drawOverlay(ctx, {transform, rect, cache, gridMode: 'status', classColors: {1: '#f0f', 2: '#0ff', 3: '#ff0'}});
            ctx.getImageData(0, 0, 1, 1);  // waits for the drawing to be done
            times.push(performance.now() - t0);
        }
        times.sort((a, b) => a - b);
        out.views.push({scale, mode: drawn.mode, nuclei: drawn.nuclei, tiles: drawn.tiles, median_ms: +times[4].toFixed(1),
                        max_ms: +times[8].toFixed(1)});
    }
    // While the view animates, the last full frame is only moved (one drawImage per frame).
    const screen = document.createElement('canvas');
    screen.width = 1440; screen.height = 710;
    const sctx = screen.getContext('2d');
    const moves = [];
    for (let i = 0; i < 9; i++) {
        const t0 = performance.now();
        const {k, dx, dy} = m.reproject({scale: 0.5, offsetX: 0, offsetY: 0}, {scale: 0.5 * (1 + i / 50), offsetX: -i * 7, offsetY: i * 3});
        sctx.setTransform(1, 0, 0, 1, 0, 0);
        sctx.clearRect(0, 0, 1440, 710);
        sctx.setTransform(k, 0, 0, k, dx, dy);
        sctx.drawImage(canvas, 0, 0);
        sctx.getImageData(0, 0, 1, 1);
        moves.push(performance.now() - t0);
    }
    moves.sort((a, b) => a - b);
    out.moving_frame_median_ms = +moves[4].toFixed(1);
    canvas.remove();
    return out;
}"""


def test_the_overlay_draws_a_view_of_a_100000_nucleus_slide_within_a_frame_budget(slide_project, open_session):
    """Chromium's real canvas: 100,000 nuclei over a 20,480² slide, one view drawn at the densest
    zoom that still shows outlines, at closer zooms, and zoomed out (tile summaries only)."""
    s = open_session("admin", PASSWORD)
    s.goto(f"/projects/{slide_project['project'].pk}/images/")
    s.page.wait_for_selector("[data-testid=empty-state]")
    result = s.page.evaluate(OVERLAY_BENCH)
    record_timings("slide_overlay_100k_nuclei", result)
    print("overlay, 100,000 nuclei on the slide (target: a full view under 50 ms; moving frames under 16 ms):")
    for view in result["views"]:
        print(f"  scale {view['scale']:<5} {view['mode']:<8} {view['nuclei']:>6} nuclei {view['tiles']:>5} tiles in view: "
              f"median {view['median_ms']} ms, max {view['max_ms']} ms")
    densest = result["views"][0]
    assert densest["mode"] == "outlines" and densest["nuclei"] > 1000
    assert result["views"][-1]["mode"] == "summary" and result["views"][-1]["nuclei"] == 0
    assert all(view["nuclei"] < 20000 for view in result["views"])
    print(f"  moving the last frame while the view animates: median {result['moving_frame_median_ms']} ms")
    # Bounds with room for a loaded 2-core CI machine (the figures above are what counts); the
    # first version, one path for every outline, took ~1,400 ms for the densest view here.
    assert max(view["median_ms"] for view in result["views"]) < 300, result
    assert result["moving_frame_median_ms"] < 30, result


@pytest.mark.skipif(not os.environ.get("KARYO_BENCH_SLIDE_UPLOAD"), reason="opt-in benchmark: KARYO_BENCH_SLIDE_UPLOAD=<side px>")
def test_benchmark_a_big_slide_through_the_upload_page(slide_project, open_session, start_worker, tmp_path):
    """Opt-in: ``KARYO_BENCH_SLIDE_UPLOAD=40000 KARYO_UPLOAD_CHUNK_BYTES=8388608`` uploads a generated
    slide of that side through the page and prints upload, ingest and viewer times. Measured here
    (loopback, 2 loaded cores): 40,000² (235 MB, 30% tissue) written in 180 s, uploaded in 5.6 s
    (42 MB/s), ready 17.4 s after the drop (8,836 of 24,649 tiles kept), viewer sharp in 2.6 s."""
    side = int(os.environ["KARYO_BENCH_SLIDE_UPLOAD"])
    project = slide_project["project"]
    path = tmp_path / f"bench-{side}.svs"
    started = time.perf_counter()
    write_pyramidal_tiff(path, width=side, height=side, mpp=0.5, tile=256, seed=3, tissue_fraction=0.3, n_textures=2)
    written = time.perf_counter() - started
    worker = start_worker(queues="cpu")
    s = open_session("admin", PASSWORD)
    s.goto(f"/projects/{project.pk}/upload/")
    s.page.wait_for_selector("[data-testid=drop-zone]")
    started = time.perf_counter()
    s.page.set_input_files("[data-testid=file-input]", str(path))
    s.page.wait_for_function(
        "document.querySelector('[data-testid=upload-row] [role=progressbar]')?.getAttribute('aria-valuenow') === '100'",
        timeout=1_800_000)
    uploaded = time.perf_counter() - started
    s.page.wait_for_selector("[data-testid=upload-row][data-state=ready], [data-testid=upload-row][data-state=failed]",
                             timeout=1_800_000)
    ingested = time.perf_counter() - started
    image = Image.objects.get(project=project)
    assert image.state == ImageState.READY, (image.state_reason, worker.output()[-3000:])
    started = time.perf_counter()
    with s.page.expect_navigation():
        s.page.click("[data-testid=open-viewer]")
    s.page.wait_for_function("window.karyoViewer && window.karyoViewer.world.getItemCount() === 1"
                             " && window.karyoViewer.world.getItemAt(0).getFullyLoaded()", timeout=120_000)
    viewer_s = time.perf_counter() - started
    s.shot(f"15c-slide-viewer-{side}", full_page=False)
    size = path.stat().st_size
    figures = {"side_px": side, "bytes": size, "write_s": round(written, 1), "upload_s": round(uploaded, 1),
               "upload_mb_per_s": round(size / 1e6 / uploaded, 1), "upload_to_ready_s": round(ingested, 1),
               "tiles_kept": image.tiles_kept, "tiles_grid": image.tiles_grid, "viewer_open_to_sharp_s": round(viewer_s, 1)}
    record_timings(f"slide_upload_benchmark_{side}", figures)
    print(figures)
