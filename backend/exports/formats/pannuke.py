"""PanNuke-style numpy arrays (the layout HoVer-Net / CellViT PanNuke loaders read).

Per split (a folder ``<split>/`` when the export is split, else the archive root):

* ``images.npy`` (N, H, W, 3) uint8;
* ``masks.npy`` (N, H, W, C+1) uint16: channel c < C holds the instance ids of the nuclei of
  class c (the export's class table order, ``manifest.json`` ``classes``), ids unique across
  channels; the last channel is background (1 where there is no nucleus);
* ``types.npy`` (N,) str: tissue type (the ``tissue`` option, default the project name);
* Karyo additions, ignored by other tools: ``names.npy`` (N,) str and ``sizes.npy`` (N, 2)
  int32 (height, width) — tiles smaller than the largest are zero-padded bottom/right to one
  array shape, and the importer crops them back.

Arrays are written row by row into ``.npy`` files on disk: memory stays at one tile.
Reading also understands the original PanNuke folds (``Fold 1/images/fold1/images.npy`` +
``Fold 1/masks/fold1/masks.npy``, float64 masks, the five PanNuke classes).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from backend.common.storage import encode_png

from .base import PANNUKE_CLASSES, BaseWriter, ClassDef, Dataset, ExportSample, Labels, SourceItem, manifest_classes, palette_color, problem

NAME = "pannuke"


class _NpyStream:
    """An .npy file written one leading-axis row at a time."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.row_shape = shape[1:]
        self.fh = open(path, "wb")
        np.lib.format.write_array_header_2_0(
            self.fh, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        )
        self.rows = 0

    def append(self, row: np.ndarray) -> None:
        assert row.shape == self.row_shape, (row.shape, self.row_shape)
        self.fh.write(np.ascontiguousarray(row, dtype=self.dtype).tobytes())
        self.rows += 1

    def close(self) -> None:
        self.fh.close()


def to_channels(instances: np.ndarray, classes: dict[int, int], class_ids: list[int]) -> np.ndarray:
    """(H, W) instances + instance -> class id -> (H, W, C+1) uint16 PanNuke mask."""
    height, width = instances.shape
    out = np.zeros((height, width, len(class_ids) + 1), np.uint16)
    top = int(instances.max(initial=0))
    channel_of = np.full(top + 1, -1, np.int64)
    index = {cid: i for i, cid in enumerate(class_ids)}
    for instance, class_id in classes.items():
        if 0 < instance <= top:
            channel_of[instance] = index[class_id]
    channels = channel_of[instances]
    for c in range(len(class_ids)):
        hit = channels == c
        out[..., c][hit] = instances[hit]
    out[..., -1] = instances == 0
    return out


def from_channels(mask: np.ndarray, where: str) -> tuple[np.ndarray, dict[int, int]]:
    """(H, W, C+1) PanNuke mask -> (instances int32, instance -> channel index). Ids are kept when
    they are unique across channels (Karyo's own exports), else renumbered channel by channel."""
    if mask.ndim != 3 or mask.shape[2] < 2:
        raise problem(where, f"a PanNuke mask is (H, W, C+1); got {mask.shape}")
    data = np.asarray(mask[..., :-1])
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
            raise problem(where, "instance ids must be whole numbers")
    if data.min(initial=0) < 0:
        raise problem(where, "instance ids must not be negative")
    data = data.astype(np.int64)
    per_channel = [np.unique(data[..., c]) for c in range(data.shape[2])]
    per_channel = [ids[ids > 0] for ids in per_channel]
    all_ids = np.concatenate(per_channel) if per_channel else np.zeros(0, np.int64)
    unique = all_ids.size == np.unique(all_ids).size and ((data > 0).sum(axis=2) <= 1).all()
    instances = np.zeros(data.shape[:2], np.int64)
    channel_of: dict[int, int] = {}
    offset = 0
    for c, ids in enumerate(per_channel):
        layer = data[..., c]
        hit = layer > 0
        if unique:
            instances[hit] = layer[hit]
            channel_of.update({int(i): c for i in ids})
        else:
            lut = np.zeros(int(layer.max(initial=0)) + 1, np.int64)
            lut[ids] = np.arange(1, ids.size + 1) + offset
            instances[hit] = lut[layer[hit]]
            channel_of.update({int(i) + offset: c for i in range(1, ids.size + 1)})
            offset += ids.size
    if instances.max(initial=0) > 65535:
        raise problem(where, "more than 65535 nuclei in one image")
    return instances.astype(np.int32), channel_of


def to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image[..., :3])
    return np.clip(np.round(image[..., :3].astype(np.float64)), 0, 255).astype(np.uint8)


class Writer(BaseWriter):
    name = NAME

    def __init__(self, sink, **kwargs):
        super().__init__(sink, **kwargs)
        self.class_ids = [c.id for c in self.classes]
        self.tissue = str(self.options.get("tissue") or (self.options.get("project") or {}).get("name") or "unknown")
        self.groups: dict[str | None, dict] = {}
        for item in self.plan:
            group = self.groups.setdefault(item.split, {"items": []})
            group["items"].append(item)
        for split, group in self.groups.items():
            n = len(group["items"])
            h = max(i.height for i in group["items"])
            w = max(i.width for i in group["items"])
            group["shape"] = (h, w)
            group["images"] = _NpyStream(sink.temp_path(".npy"), (n, h, w, 3), np.uint8)
            group["masks"] = _NpyStream(sink.temp_path(".npy"), (n, h, w, len(self.class_ids) + 1), np.uint16)
            group["names"], group["sizes"] = [], []

    def add(self, sample: ExportSample) -> None:
        group = self.groups[sample.split]
        h, w = group["shape"]
        rgb = sample.rgb()
        sh, sw = rgb.shape[:2]
        image = np.zeros((h, w, 3), np.uint8)
        image[:sh, :sw] = rgb
        mask = np.zeros((h, w, len(self.class_ids) + 1), np.uint16)
        mask[..., -1] = 1
        mask[:sh, :sw] = to_channels(sample.instances, sample.classes, self.class_ids)
        group["images"].append(image)
        group["masks"].append(mask)
        group["names"].append(sample.name)
        group["sizes"].append((sh, sw))

    def close(self) -> None:
        for split, group in self.groups.items():
            prefix = f"{split}/" if split else ""
            for key in ("images", "masks"):
                group[key].close()
                if group[key].rows != len(group["items"]):
                    raise RuntimeError(f"{prefix}{key}.npy got {group[key].rows} of {len(group['items'])} rows")
                self.sink.add_file(f"{prefix}{key}.npy", group[key].path)
            for key, array in (
                ("types", np.array([self.tissue] * len(group["names"]))),
                ("names", np.array(group["names"])),
                ("sizes", np.array(group["sizes"], dtype=np.int32).reshape(-1, 2)),
            ):
                path = self.sink.temp_path(".npy")
                with open(path, "wb") as fh:
                    np.save(fh, array, allow_pickle=False)
                self.sink.add_file(f"{prefix}{key}.npy", path)


def _groups(root: Path) -> list[tuple[Path, Path]]:
    """(images.npy, masks.npy) pairs: side by side, or PanNuke's images/foldN + masks/foldN."""
    pairs = []
    for images in sorted(root.rglob("images.npy")):
        masks = images.with_name("masks.npy")
        if not masks.exists() and images.parent.parent.name == "images":
            masks = images.parent.parent.parent / "masks" / images.parent.name / "masks.npy"
        pairs.append((images, masks))
    return pairs


def detect(root: Path) -> bool:
    return bool(_groups(Path(root)))


def _load(path: Path, where: str):
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise problem(where, f"not a readable .npy array ({exc})") from None


def read(root: Path, *, manifest: dict | None = None) -> Dataset:
    root = Path(root)
    pairs = _groups(root)
    if not pairs:
        raise problem(str(root), "no images.npy")
    problems: list[str] = []
    items: list[SourceItem] = []
    channels = None
    channel_names: list[str] = []  # filled once the class table is known; the loaders read it
    seen: dict[str, str] = {}
    for images_path, masks_path in pairs:
        rel_images = images_path.relative_to(root).as_posix()
        if not masks_path.exists():
            problems.append(f"{rel_images} has no masks.npy next to it")
            continue
        rel_masks = masks_path.relative_to(root).as_posix()
        try:
            images, masks = _load(images_path, rel_images), _load(masks_path, rel_masks)
        except Exception as exc:
            problems.append(str(getattr(exc, "detail", exc)))
            continue
        if images.ndim != 4 or images.shape[3] < 3:
            problems.append(f"{rel_images}: expected (N, H, W, 3), got {images.shape}")
            continue
        if masks.ndim != 4 or masks.shape[:3] != images.shape[:3] or masks.shape[3] < 2:
            problems.append(f"{rel_masks}: shape {masks.shape} does not match {rel_images} {images.shape} (expected (N, H, W, C+1))")
            continue
        if channels is None:
            channels = masks.shape[3] - 1
        elif channels != masks.shape[3] - 1:
            problems.append(f"{rel_masks}: {masks.shape[3] - 1} class channels, other files have {channels}")
            continue
        folder = images_path.parent
        names = _optional(folder / "names.npy", images.shape[0], problems, root)
        sizes = _optional(folder / "sizes.npy", images.shape[0], problems, root)
        group = images_path.parent.name if images_path.parent != root else "pannuke"
        for i in range(images.shape[0]):
            name = str(names[i]) if names is not None else f"{group}_{i:05d}"
            where = f"{rel_images}[{i}]"
            if name in seen:
                problems.append(f"duplicate names: {name} in {rel_images} and {seen[name]}")
                continue
            seen[name] = rel_images
            size = tuple(int(v) for v in sizes[i]) if sizes is not None else images.shape[1:3]
            items.append(SourceItem(
                name=name, image_file=f"{name}.png", origin=where,
                load_image=_image_loader(images, i, size),
                load_labels=_label_loader(masks, i, size, f"{rel_masks}[{i}]", channel_names),
            ))
    classes = manifest_classes(manifest)
    if channels is not None and (classes is None or len(classes) != channels):
        if classes is not None:
            problems.append(f"the manifest lists {len(classes)} classes but masks.npy has {channels} class channels")
        names_ = PANNUKE_CLASSES if channels == len(PANNUKE_CLASSES) else [f"class_{c + 1}" for c in range(channels)]
        classes = [ClassDef(c + 1, n, palette_color(c)) for c, n in enumerate(names_)]
    channel_names.extend(c.name for c in classes or [])
    return Dataset(format=NAME, items=items, classes=classes, problems=problems, manifest=manifest)


def _optional(path: Path, n: int, problems: list[str], root: Path):
    if not path.exists():
        return None
    array = np.load(path, allow_pickle=False)
    if array.shape[0] != n:
        problems.append(f"{path.relative_to(root).as_posix()}: {array.shape[0]} rows, expected {n}")
        return None
    return array


def _image_loader(images, i: int, size: tuple[int, int]):
    def load() -> bytes:
        h, w = size
        return encode_png(to_uint8_rgb(np.asarray(images[i, :h, :w])))

    return load


def _label_loader(masks, i: int, size: tuple[int, int], where: str, channel_names: list[str]):
    def load(height: int, width: int) -> Labels:
        h, w = size
        if (h, w) != (height, width):
            raise problem(where, f"mask is {w}x{h} but the image is {width}x{height}")
        instances, channel_of = from_channels(np.asarray(masks[i, :h, :w]), where)
        return Labels(instances=instances, classes={inst: channel_names[ch] for inst, ch in channel_of.items()})

    return load
