"""Image / mask IO, the common on-disk layout, preprocessing and training patches.

Common layout (docs/ml_worker.md)::

    DIR/images/NAME.png   RGB (PNG / JPEG / TIFF / BMP accepted)
    DIR/masks/NAME.png    16-bit instance labels, 0 = background, 1..N = nuclei
                          (PNG / TIFF / .npy accepted)

Everything that can go wrong with user data raises :class:`DataError` with a one-line
message naming the file, so the caller (CLI, web job) can show it as is.

:func:`preprocess` is the single image -> tensor-array conversion, shared by
:class:`PatchDataset` (training) and ``ml_worker.inference`` (prediction), so the model sees
identically normalised inputs in both. With a :class:`Preprocessing` (what training now fits and
stores in every checkpoint) the conversion is pixel-wise: stain normalisation, then fixed
per-channel mean / std of the training images, so a pixel gets the same input value in a
training patch, a 256-px tile and a whole slide.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ml_worker.augment import AugmentConfig, Augmenter
from ml_worker.stain import StainNormalizer, zscore

if TYPE_CHECKING:
    import torch

__all__ = [
    "DataError",
    "IMAGE_EXTS",
    "MASK_EXTS",
    "read_image",
    "read_mask",
    "write_mask",
    "Sample",
    "load_folder",
    "split_by_image",
    "dataset_class_names",
    "preprocess",
    "Preprocessing",
    "tile_grid",
    "PatchDataset",
]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MASK_EXTS = (".png", ".tif", ".tiff", ".npy")
_TIFF_EXTS = (".tif", ".tiff")


class DataError(Exception):
    """User data problem (missing file, unreadable image, size mismatch, ...)."""


# ----------------------------------------------------------------------------- IO


def _to_rgb_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    """Any decoded array -> (H, W, 3) uint8."""
    arr = np.asarray(arr)
    if arr.ndim == 4:  # multi-page / z-stack TIFF: first plane
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4) and arr.shape[0] in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # channel-first TIFF
    if arr.ndim == 3:
        nc = arr.shape[-1]
        if nc in (1, 2):  # gray or gray + alpha
            arr = arr[..., 0]
        elif nc == 4:  # drop alpha
            arr = arr[..., :3]
        elif nc != 3:
            raise DataError(f"{path}: unsupported image with {nc} channels")
    elif arr.ndim != 2:
        raise DataError(f"{path}: unsupported image shape {arr.shape}")

    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        arr = np.round(arr.astype(np.float32) / 257.0).astype(np.uint8)  # 65535 -> 255
    elif np.issubdtype(arr.dtype, np.floating):
        a = np.nan_to_num(arr.astype(np.float32))
        if a.size and float(a.max()) <= 1.0:
            a = a * 255.0
        arr = np.clip(a, 0, 255).round().astype(np.uint8)
    elif arr.dtype != np.uint8:
        a = arr.astype(np.float64)
        top = float(a.max()) if a.size else 0.0
        if top > 65535:
            a = a * (255.0 / top)
        elif top > 255:
            a = a / 257.0
        arr = np.clip(a, 0, 255).round().astype(np.uint8)

    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{path}: empty image")
    return np.ascontiguousarray(arr)


def _read_array(path: Path) -> np.ndarray:
    """Decode an image file to a numpy array without changing its dtype."""
    suffix = path.suffix.lower()
    if suffix in _TIFF_EXTS:
        import tifffile

        return tifffile.imread(str(path))
    if suffix == ".npy":
        return np.load(str(path), allow_pickle=False)
    from PIL import Image

    with Image.open(path) as im:
        mode = im.mode
        if mode in ("RGB", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "RGBA", "LA"):
            return np.array(im)
        if mode == "1":
            return np.array(im.convert("L"))
        if mode == "P":
            return np.array(im.convert("RGBA" if "transparency" in im.info else "RGB"))
        return np.array(im.convert("RGB"))  # CMYK, YCbCr, LAB, ...


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an RGB image.

    PNG / JPEG / BMP via Pillow, TIFF via tifffile. Grayscale is replicated to 3 channels,
    alpha is dropped, 16-bit is scaled to 8-bit (``/ 257``), floats in [0, 1] are scaled
    by 255.

    Returns:
        (H, W, 3) uint8.

    Raises:
        DataError: missing or undecodable file.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"image not found: {p}")
    try:
        arr = _read_array(p)
    except DataError:
        raise
    except Exception as e:  # decoder errors are many and library specific
        raise DataError(f"cannot read image {p}: {e}") from e
    return _to_rgb_uint8(arr, p)


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an instance mask (16-bit PNG, TIFF or .npy).

    An RGB(A) mask whose channels are equal is accepted (its first channel is used); a
    real colour-coded mask is rejected because its colours are not instance ids.

    Returns:
        (H, W) int32, 0 = background.

    Raises:
        DataError: missing / undecodable file, colour or negative labels.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"mask not found: {p}")
    try:
        arr = np.asarray(_read_array(p))
    except Exception as e:
        raise DataError(f"cannot read mask {p}: {e}") from e
    if arr.ndim == 3:
        if arr.shape[-1] == 4:
            arr = arr[..., :3]
        if arr.shape[-1] == 1 or np.all(arr == arr[..., :1]):
            arr = arr[..., 0]
        else:
            raise DataError(f"{p}: mask has colour channels; expected one label per pixel")
    if arr.ndim != 2:
        raise DataError(f"{p}: mask must be 2-D, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise DataError(f"{p}: mask has non-integer values")
    if arr.size and arr.min() < 0:
        raise DataError(f"{p}: mask has negative labels")
    if arr.size and arr.max() > np.iinfo(np.int32).max:
        raise DataError(f"{p}: mask labels exceed int32")
    return arr.astype(np.int32)


def write_mask(path: str | os.PathLike[str], inst: np.ndarray) -> None:
    """Write an instance map as a 16-bit grayscale PNG, atomically.

    The file is written to a temporary name in the same folder and renamed into place, so
    a reader (or a crash) never sees a half-written mask.

    Args:
        path: destination (``.png``).
        inst: (H, W) non-negative integer labels, max 65535.
    """
    from PIL import Image

    p = Path(path)
    a = np.asarray(inst)
    if a.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {a.shape}")
    if a.size and (a.min() < 0 or a.max() > 65535):
        raise ValueError("mask labels must be in 0..65535 for a 16-bit PNG")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.stem}.", suffix=".png.tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(a.astype(np.uint16)).save(f, format="PNG")
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ------------------------------------------------------------------------ datasets


@dataclass
class Sample:
    """One annotated image.

    Attributes:
        name: file stem (unique within a dataset).
        image: (H, W, 3) uint8 RGB.
        instances: (H, W) int32 instance labels, 0 = background.
        classes: optional (H, W) uint8 per-pixel class ids (1..K nucleus types, 0 =
            background), as ``classes/NAME.png`` of the common layout. None: untyped.
    """

    name: str
    image: np.ndarray
    instances: np.ndarray
    classes: np.ndarray | None = None

    def instance_classes(self) -> np.ndarray:
        """Lookup table instance id -> class id (the majority class of its pixels; 1 for
        every nucleus of an untyped sample; 0 for the background)."""
        inst = np.asarray(self.instances)
        n = int(inst.max(initial=0))
        if self.classes is None:
            lut = np.ones(n + 1, np.int64)
            lut[0] = 0
            return lut
        cls = np.asarray(self.classes).astype(np.int64)
        k = int(cls.max(initial=0)) + 1
        votes = np.bincount(inst.ravel().astype(np.int64) * k + cls.ravel(), minlength=(n + 1) * k).reshape(n + 1, k)
        votes[:, 0] = 0
        lut = votes.argmax(axis=1)
        lut[(votes.sum(axis=1) == 0)] = 1  # a nucleus without a class pixel: the first class
        lut[0] = 0
        return lut

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])


def _index_files(folder: Path, exts: Sequence[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.suffix.lower() not in exts:
            continue
        if f.stem in out:
            raise DataError(f"two files named {f.stem!r} in {folder}: {out[f.stem].name}, {f.name}")
        out[f.stem] = f
    return out


def load_folder(root: str | os.PathLike[str]) -> list[Sample]:
    """Load every image of a common-layout dataset with its mask, sorted by name.

    Raises:
        DataError: missing folder, no images, an image without a mask, unreadable file,
            image / mask size mismatch.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    img_dir, mask_dir = root / "images", root / "masks"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise DataError(
                f"{root} has no {d.name}/ folder (expected DIR/images/NAME.png and "
                f"DIR/masks/NAME.png)"
            )
    images = _index_files(img_dir, IMAGE_EXTS)
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) in {img_dir}")
    masks = _index_files(mask_dir, MASK_EXTS)
    missing = [n for n in images if n not in masks]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DataError(
            f"{len(missing)} image(s) without a mask in {mask_dir}: "
            f"{', '.join(missing[:3])}{more}"
        )
    class_dir = root / "classes"
    class_files = _index_files(class_dir, MASK_EXTS) if class_dir.is_dir() else None
    if class_files is not None:
        missing = [n for n in images if n not in class_files]
        if missing:
            raise DataError(f"{len(missing)} image(s) without a class map in {class_dir}: {', '.join(missing[:3])}")
    samples = []
    for name, ipath in images.items():
        image = read_image(ipath)
        inst = read_mask(masks[name])
        if image.shape[:2] != inst.shape:
            raise DataError(
                f"{name}: image is {image.shape[0]}x{image.shape[1]} but mask is "
                f"{inst.shape[0]}x{inst.shape[1]} (HxW)"
            )
        classes = None
        if class_files is not None:
            classes = read_mask(class_files[name])
            if classes.shape != inst.shape:
                raise DataError(f"{name}: class map is {classes.shape} but mask is {inst.shape} (HxW)")
            if int(classes.max(initial=0)) > 255:
                raise DataError(f"{name}: class ids must be 0..255, found {int(classes.max())}")
            classes = classes.astype(np.uint8)
        samples.append(Sample(name, image, inst, classes))
    return samples


def dataset_class_names(root: str | os.PathLike[str]) -> list[str] | None:
    """Names of the nucleus classes of a typed dataset: ``classes.json`` (a list) when present,
    else ``class1..classK`` from the largest id in ``classes/``; None for an untyped one."""
    import json

    root = Path(root)
    if (root / "classes.json").is_file():
        names = json.loads((root / "classes.json").read_text())
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(f"{root / 'classes.json'} must be a JSON list of class names")
        return names
    if not (root / "classes").is_dir():
        return None
    k = max((int(s.classes.max(initial=0)) for s in load_folder(root) if s.classes is not None), default=0)
    return [f"class{i}" for i in range(1, k + 1)]


def split_by_image(
    samples: Sequence[Sample], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Random train / validation split at image level (no patch leaks across the split).

    At least one image goes to each side when there are two or more images and
    ``val_fraction > 0``; with a single image (or fraction 0) validation is empty.
    Both lists keep the input order.

    Returns:
        (train, val).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(samples)
    if n < 2 or val_fraction == 0:
        return list(samples), []
    n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = set(perm[:n_val].tolist())
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    return train, val


# ---------------------------------------------------------------- preprocessing


_MIN_STD = 0.03  # same floor as stain.zscore: near-constant channels stay flat


@dataclass
class Preprocessing:
    """How a model's input is made from RGB pixels; fitted by training, stored in the
    checkpoint (``to_dict``) and used unchanged by every prediction.

    ``mean`` / ``std`` (per channel, intensities in [0, 1]) are those of the stain-normalised
    training images; None means the older per-image z-score (checkpoints written before
    this existed, or ``input_norm="image"``), whose statistics depend on the crop.
    It stands in wherever a stain normaliser was passed (``name``, ``fitted``, ``transform``
    delegate to the stain normaliser; identity without one).
    """

    stain: StainNormalizer | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @property
    def name(self) -> str:
        return self.stain.name if self.stain is not None else "none"

    @property
    def fitted(self) -> bool:
        return bool(getattr(self.stain, "fitted", True)) if self.stain is not None else True

    def transform(self, image: np.ndarray) -> np.ndarray:
        """Stain normalisation only (uint8 in, uint8 out)."""
        return image if self.stain is None else self.stain.transform(image)

    def standardize(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8, already stain-normalised -> (3, H, W) float32."""
        if self.mean is None or self.std is None:
            return np.ascontiguousarray(zscore(image).transpose(2, 0, 1))
        x = np.asarray(image, dtype=np.float32) * np.float32(1.0 / 255.0)
        if x.ndim == 2:
            x = np.repeat(x[..., None], 3, axis=2)
        mean = np.asarray(self.mean, np.float32)
        inv = np.float32(1.0) / np.maximum(np.asarray(self.std, np.float32), np.float32(_MIN_STD))
        return np.ascontiguousarray(((x - mean) * inv).transpose(2, 0, 1))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.standardize(self.transform(image))

    @classmethod
    def fit(cls, images: Sequence[np.ndarray], stain: StainNormalizer | None = None) -> "Preprocessing":
        """Per-channel mean / std over every pixel of ``images`` after ``stain``."""
        n = 0
        s1 = np.zeros(3, np.float64)
        s2 = np.zeros(3, np.float64)
        for img in images:
            x = np.asarray(img if stain is None else stain.transform(img))
            if x.ndim == 2:
                x = np.repeat(x[..., None], 3, axis=2)
            x = x.reshape(-1, x.shape[-1])[:, :3].astype(np.float64) / 255.0
            n += x.shape[0]
            s1 += x.sum(axis=0)
            s2 += np.square(x).sum(axis=0)
        if n == 0:
            raise DataError("cannot fit the input normalisation on no images")
        mean = s1 / n
        std = np.sqrt(np.maximum(s2 / n - np.square(mean), 0.0))
        return cls(stain, tuple(float(v) for v in mean), tuple(float(v) for v in std))

    def to_dict(self) -> dict[str, Any]:
        return {
            "stain": self.stain.to_dict() if self.stain is not None else None,
            "mean": list(self.mean) if self.mean is not None else None,
            "std": list(self.std) if self.std is not None else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        from ml_worker.stain import normalizer_from_dict

        stain = normalizer_from_dict(d["stain"]) if d.get("stain") else None
        if stain is not None and stain.name == "none":
            stain = None
        mean = tuple(float(v) for v in d["mean"]) if d.get("mean") is not None else None
        std = tuple(float(v) for v in d["std"]) if d.get("std") is not None else None
        return cls(stain, mean, std)  # type: ignore[arg-type]


def preprocess(image: np.ndarray, normalizer: "StainNormalizer | Preprocessing | None" = None) -> np.ndarray:
    """The model input for an image.

    Args:
        image: (H, W, 3) uint8 RGB.
        normalizer: the run's :class:`Preprocessing` (pixel-wise: stain normalisation, then the
            training set's channel statistics), or — for older checkpoints — a fitted stain
            normaliser / None, followed by a per-image z-score.

    Returns:
        (3, H, W) float32, C-contiguous.
    """
    if isinstance(normalizer, Preprocessing):
        return normalizer(image)
    if normalizer is not None:
        image = normalizer.transform(image)
    return np.ascontiguousarray(zscore(image).transpose(2, 0, 1))


def _axis_starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)  # last tile flush with the end: no partial tiles
    return starts


def tile_grid(
    height: int, width: int, tile: int | tuple[int, int], overlap: int | tuple[int, int] = 0
) -> list[tuple[int, int]]:
    """Top-left corners of tiles covering an image.

    Tiles advance by ``tile - overlap``; the last tile of each row / column is aligned to
    the image end (it overlaps its neighbour more) so every tile is full-size when the
    image is at least one tile large. A side shorter than the tile gets a single start 0
    (the caller pads).

    Returns:
        list of (y, x), row-major.
    """
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    oh, ow = (overlap, overlap) if isinstance(overlap, int) else overlap
    if th <= 0 or tw <= 0:
        raise ValueError("tile size must be positive")
    if not (0 <= oh < th and 0 <= ow < tw):
        raise ValueError(f"overlap {overlap} must be in [0, tile) for tile {tile}")
    ys = _axis_starts(height, th, th - oh)
    xs = _axis_starts(width, tw, tw - ow)
    return [(y, x) for y in ys for x in xs]


def _crop_padded(arr: np.ndarray, y: int, x: int, h: int, w: int) -> np.ndarray:
    """arr[y:y+h, x:x+w] where the window may leave the array: outside is mirrored."""
    H, W = arr.shape[:2]
    y0, y1 = max(y, 0), min(y + h, H)
    x0, x1 = max(x, 0), min(x + w, W)
    crop = arr[y0:y1, x0:x1]
    pads = ((y0 - y, y + h - y1), (x0 - x, x + w - x1))
    if any(p for pair in pads for p in pair):
        pads = pads + ((0, 0),) * (arr.ndim - 2)
        # 'symmetric' (edge pixel repeated) works for any pad width, even on 1-pixel crops.
        crop = np.pad(crop, pads, mode="symmetric")
    return crop


def _define_patch_dataset() -> type:
    # torch is imported only when PatchDataset is first used, so the IO half of this
    # module (read/validate/write) stays usable by torch-free processes (web app).
    import torch
    from torch.utils.data import Dataset

    class PatchDataset(Dataset):
        """Random training patches of fixed size from whole images.

        Each item picks an image (probability proportional to its area), a random tile
        position (tiles may hang over the border of images smaller than the tile; the outside
        is mirrored), crops the tile plus the context the augmenter's warps need, augments,
        and preprocesses with :func:`preprocess`.

        Randomness comes from ``np.random.default_rng((seed, epoch, index))``: items are
        reproducible and independent of DataLoader worker scheduling. Call :meth:`set_epoch`
        each epoch to get new patches.

        Args:
            samples: images with instance maps.
            tile_size: patch side in pixels.
            augment: :class:`Augmenter`, config / dict / preset name for one, or None (no
                augmentation).
            normalizer: the run's :class:`Preprocessing` (its stain normalisation is applied
                once per image at construction, its channel statistics per patch), or one
                without statistics / a fitted stain normaliser / None: then each patch is
                standardised with the channel statistics of the whole sample image it comes
                from (as inference standardises the image it is given).
            length: items per epoch; default: number of tiles needed to cover all images.
            seed: base seed.
            foreground_bias: probability of centring a patch on a random nucleus pixel instead
                of a uniform position (useful for sparse Pap smears).

        Items are dicts:
            ``image`` (3, T, T) float32, ``mask`` (T, T) int64 semantic (each nucleus' class
            id, 1 for untyped samples),
            ``instances`` (T, T) int64 instance ids.
        """

        def __init__(
            self,
            samples: Sequence[Sample],
            tile_size: int = 256,
            augment: Augmenter | AugmentConfig | dict[str, Any] | str | None = None,
            normalizer: "StainNormalizer | Preprocessing | None" = None,
            length: int | None = None,
            seed: int = 0,
            foreground_bias: float = 0.0,
        ) -> None:
            if not samples:
                raise DataError("PatchDataset needs at least one sample")
            self.samples = list(samples)
            self.tile_size = int(tile_size)
            if augment is None:
                self.augmenter: Augmenter | None = None
            elif isinstance(augment, Augmenter):
                self.augmenter = augment
            else:
                self.augmenter = Augmenter(augment, seed=seed)
            self.normalizer = normalizer
            self.images = [
                s.image if normalizer is None else normalizer.transform(s.image) for s in self.samples
            ]
            self.class_luts = [s.instance_classes() for s in self.samples]
            # Without fixed statistics, a patch is standardised with those of the image it is cut
            # from (what inference does when it is given that image), not its own.
            fixed = isinstance(normalizer, Preprocessing) and normalizer.mean is not None
            self.image_stats = None if fixed else [Preprocessing.fit([im]) for im in self.images]
            areas = np.array([s.image.shape[0] * s.image.shape[1] for s in self.samples], float)
            self.weights = areas / areas.sum()
            t = self.tile_size
            self.length = int(length) if length else int(
                sum(math.ceil(s.shape[0] / t) * math.ceil(s.shape[1] / t) for s in self.samples)
            )
            self.seed = int(seed)
            self.epoch = 0
            self.foreground_bias = float(foreground_bias)
            self._fg: list[np.ndarray] | None = None

        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)

        def __len__(self) -> int:
            return self.length

        def _foreground_coords(self, i: int) -> np.ndarray:
            if self._fg is None:
                fg = []
                for s in self.samples:
                    idx = np.flatnonzero(s.instances.ravel() > 0)
                    if idx.size > 20000:  # a subsample is plenty to pick centres from
                        idx = idx[:: idx.size // 20000 + 1]
                    fg.append(idx)
                self._fg = fg
            return self._fg[i]

        def __getitem__(self, index: int) -> dict[str, "torch.Tensor"]:
            if not 0 <= index < self.length:
                raise IndexError(index)
            rng = np.random.default_rng((self.seed, self.epoch, int(index)))
            i = int(rng.choice(len(self.samples), p=self.weights))
            image, inst = self.images[i], self.samples[i].instances
            H, W = inst.shape
            t = self.tile_size
            fg = self._foreground_coords(i) if self.foreground_bias > 0 else None
            if fg is not None and fg.size and rng.random() < self.foreground_bias:
                cy, cx = divmod(int(fg[rng.integers(fg.size)]), W)
                y = int(np.clip(cy - t // 2 + rng.integers(-t // 4, t // 4 + 1), min(0, H - t), max(0, H - t)))
                x = int(np.clip(cx - t // 2 + rng.integers(-t // 4, t // 4 + 1), min(0, W - t), max(0, W - t)))
            else:
                # Images smaller than the tile get a random offset inside the padded window.
                y = int(rng.integers(min(0, H - t), max(0, H - t) + 1))
                x = int(rng.integers(min(0, W - t), max(0, W - t) + 1))
            m = self.augmenter.context(t) if self.augmenter is not None else 0
            img = _crop_padded(image, y - m, x - m, t + 2 * m, t + 2 * m)
            ins = _crop_padded(inst, y - m, x - m, t + 2 * m, t + 2 * m)
            if self.augmenter is not None:
                img, ins = self.augmenter(img, ins, rng=rng, out_shape=(t, t))
            if self.image_stats is None:
                x_arr = self.normalizer.standardize(img)  # type: ignore[union-attr]
            else:
                x_arr = self.image_stats[i].standardize(img)
            ins_t = torch.from_numpy(np.ascontiguousarray(ins, dtype=np.int64))
            # Semantic target: each nucleus' class (1 for untyped data), from its instance id,
            # so it follows the instances through every augmentation.
            lut = torch.from_numpy(self.class_luts[i])
            return {
                "image": torch.from_numpy(x_arr),
                "mask": lut[ins_t.clamp(max=lut.numel() - 1)],
                "instances": ins_t,
            }

    # Picklable by reference (DataLoader workers with the "spawn" start method): pickle
    # looks up ml_worker.data.PatchDataset, which resolves through __getattr__ below.
    PatchDataset.__qualname__ = "PatchDataset"
    PatchDataset.__module__ = __name__
    return PatchDataset


def __getattr__(name: str) -> Any:
    if name == "PatchDataset":
        cls = _define_patch_dataset()
        globals()["PatchDataset"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
