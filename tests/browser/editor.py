"""Driving the embedded Label Studio editor with a real mouse: where a region's points are on
screen, selecting, reshaping."""
from __future__ import annotations

import time


def wait_ready(page, timeout: float = 120_000) -> None:
    page.wait_for_selector("[data-testid=editor][data-ready='1']", timeout=timeout)


def tile_box(page) -> dict:
    """The tile image's box on screen (the polygons are drawn over it, in percent of it)."""
    return page.locator("[data-testid=editor] img").first.bounding_box()


def regions(page, tile_id: int) -> list[dict]:
    return page.evaluate(f"fetch('/api/tiles/{tile_id}/regions/').then(r => r.json()).then(d => d.result)")


def to_screen(box: dict, point: list[float]) -> tuple[float, float]:
    return box["x"] + point[0] / 100 * box["width"], box["y"] + point[1] / 100 * box["height"]


def largest(result: list[dict]) -> dict:
    def area(r):
        pts = r["value"]["points"]
        return abs(sum(pts[i][0] * pts[i - 1][1] - pts[i - 1][0] * pts[i][1] for i in range(len(pts)))) / 2

    return max(result, key=area)


def select_region(page, region: dict, modifiers: list[str] | None = None) -> None:
    """Click inside the region (at its vertices' mean: inside for the convex-ish nuclei);
    ``modifiers=["Control"]`` adds it to the selection."""
    box = tile_box(page)
    pts = region["value"]["points"]
    cx = sum(p[0] for p in pts) / len(pts)
    cy = sum(p[1] for p in pts) / len(pts)
    x, y = to_screen(box, [cx, cy])
    for key in modifiers or []:
        page.keyboard.down(key)
    page.mouse.click(x, y)
    for key in modifiers or []:
        page.keyboard.up(key)
    time.sleep(0.3)


def drag_first_point(page, region: dict, dx: float, dy: float) -> None:
    """Reshape: drag the region's first vertex by (dx, dy) screen pixels (region selected first)."""
    select_region(page, region)
    x, y = to_screen(tile_box(page), region["value"]["points"][0])
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + dx / 2, y + dy / 2, steps=4)
    page.mouse.move(x + dx, y + dy, steps=4)
    page.mouse.up()
    time.sleep(0.3)


def editor_points(page, region_id: str) -> list[list[float]]:
    """The region's points as the editor would submit them."""
    return page.evaluate(
        """(id) => { const a = window.karyoEditor && window.karyoEditor.annotation;
                     const r = a.serializeAnnotation().find(x => x.id === id); return r ? r.value.points : null; }""",
        region_id,
    )
