"""Image folders: discovery (flat or one subfolder per class), seeded sampling, builtin photo sets,
and a streamed `tf.data` loader that skips unreadable files and reports them.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from reportgen.errors import ReportgenError
from reportgen.labels import readable_class
from reportgen.spec.schema import DatasetSpec, Spec

if TYPE_CHECKING:
    import tensorflow as tf

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class ImageItem:
    path: Path
    name: str  # path relative to the dataset root, e.g. "n01440764/x.jpg" or "astronaut.png"
    label: int | None  # class index into Dataset.class_names, None for flat folders
    class_name: str | None

    @property
    def stem(self) -> str:
        return Path(self.name).stem


@dataclass
class Dataset:
    key: str
    root: Path
    items: list[ImageItem]
    class_names: list[str]
    digest: str  # changes when any file is added, removed or modified
    notes: list[str] = field(default_factory=list)

    def select(
        self, names: list[str] | None = None, limit: int | None = None, where: str = ""
    ) -> list[ImageItem]:
        """Items picked by file name / stem / relative path (in the order given), then capped by `limit`."""
        items = self.items
        if names:
            index: dict[str, ImageItem] = {}
            for it in self.items:
                for k in (it.name, Path(it.name).name, it.stem):
                    index.setdefault(k, it)
            missing = [n for n in names if n not in index]
            if missing:
                import difflib

                close = difflib.get_close_matches(missing[0], list(index), n=3)
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise ReportgenError(
                    f"{where + ': ' if where else ''}dataset {self.key!r} has no image {missing[0]!r}{hint}"
                )
            items = [index[n] for n in names]
        return list(items[:limit] if limit else items)


def _digest(items: list[ImageItem]) -> str:
    h = hashlib.sha256()
    for it in items:
        st = it.path.stat()
        h.update(f"{it.name}|{st.st_size}|{st.st_mtime_ns}|{it.label}\n".encode())
    return h.hexdigest()


def scan_folder(key: str, root: Path, spec: DatasetSpec, seed: int = 0) -> Dataset:
    """Flat folder -> unlabelled items; subfolders -> one class each (sorted names = label order)."""
    if not root.is_dir():
        raise ReportgenError(
            f"dataset {key!r}: folder {root} does not exist; fix `path:` (relative to the spec)"
        )
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items: list[ImageItem] = []
    class_names: list[str] = []
    rng = random.Random(f"{key}|{seed}")
    if subdirs and spec.labels != "none":
        for label, d in enumerate(subdirs):
            name = readable_class(d.name) if spec.labels == "imagenet" else d.name
            class_names.append(name)
            files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if spec.per_class and len(files) > spec.per_class:
                files = sorted(rng.sample(files, spec.per_class))
            items += [ImageItem(p, p.relative_to(root).as_posix(), label, name) for p in files]
    else:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        items = [ImageItem(p, p.relative_to(root).as_posix(), None, None) for p in files]
    if spec.limit:
        items = items[: spec.limit]
    if not items:
        raise ReportgenError(f"dataset {key!r}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    return Dataset(key, root, items, class_names, _digest(items))


# -- builtin photo sets ---------------------------------------------------------------------------


def _export(target: Path, images: dict[str, np.ndarray]) -> Path:
    """Write named arrays as PNG files into target atomically (build beside, then rename)."""
    from PIL import Image

    if target.is_dir() and all((target / f"{n}.png").exists() for n in images):
        return target
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, arr in images.items():
        path = tmp / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(arr)).save(path)
    if target.exists():
        shutil.rmtree(target)
    os.rename(tmp, target)
    return target


def _sample_photos() -> dict[str, np.ndarray]:
    """Real photos that ship offline with scikit-image, scikit-learn and matplotlib."""
    import matplotlib.cbook
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")}
    sk = load_sample_images()
    for fname, img in zip(sk.filenames, sk.images, strict=True):
        photos[Path(fname).stem] = img
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photos["grace_hopper"] = np.asarray(Image.open(f).convert("RGB"))
    return photos


def _faces() -> dict[str, np.ndarray]:
    """Face photos: astronaut (Eileen Collins), Grace Hopper, and the lfw_subset faces."""
    from skimage import data

    photos = _sample_photos()
    faces = {
        "astronaut": photos["astronaut"],
        "grace_hopper": photos["grace_hopper"],
        # square face crops, for models trained on faces (FER-2013 is 48x48 face crops)
        "astronaut_face": photos["astronaut"][30:190, 150:310],
        "grace_hopper_face": photos["grace_hopper"][100:380, 130:410],
    }
    lfw = data.lfw_subset()  # 200 images 25x25 float: the first 100 are faces
    for i in range(0, 100, 10):
        faces[f"lfw_face_{i:03d}"] = (np.clip(lfw[i], 0, 1) * 255).astype(np.uint8)
    return faces


def _lfw_classes() -> dict[str, np.ndarray]:
    """scikit-image's lfw_subset as two class folders: 100 faces and 100 non-faces (25x25 gray)."""
    from skimage import data

    lfw = (np.clip(data.lfw_subset(), 0, 1) * 255).astype(np.uint8)
    return {f"{'face' if i < 100 else 'non_face'}/{i:03d}": lfw[i] for i in range(len(lfw))}


def builtin_folder(name: str) -> Path:
    from reportgen.models import reportgen_home

    home = reportgen_home()
    home.mkdir(parents=True, exist_ok=True)
    if name == "sample-photos":
        return _export(home / "sample-photos", _sample_photos())
    if name == "faces":
        return _export(home / "faces", _faces())
    if name == "lfw-faces":
        return _export(home / "lfw-faces", _lfw_classes())
    if name == "fashion-mnist-test":
        from reportgen.fashion import ensure_fashion_folder

        return ensure_fashion_folder(home)
    raise ReportgenError(f"unknown builtin dataset {name!r}")


class DatasetRegistry:
    """Scans each dataset of the spec once, on first use."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self._cache: dict[str, Dataset] = {}

    def get(self, key: str) -> Dataset:
        if key not in self._cache:
            ds = self.spec.datasets[key]
            root = builtin_folder(ds.builtin) if ds.builtin else Path(ds.path or "")
            self._cache[key] = scan_folder(key, root, ds, self.spec.seed)
        return self._cache[key]


# -- loading ----------------------------------------------------------------------------------------


def load_image(path: Path, size: tuple[int, int] | None = None, channels: int = 3) -> np.ndarray:
    """One image for display (thumbnails, overlays): uint8 (H, W, C), resized with Pillow if size is given."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if channels == 1 else arr


def _decoder(size: tuple[int, int], channels: int) -> Any:
    """The one decode+resize used for every model input, batched or not, so all analyses agree."""
    import tensorflow as tf

    def decode(path: tf.Tensor) -> tf.Tensor:
        img = tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
        img = tf.image.resize(tf.cast(img, tf.float32), size, method="bilinear", antialias=True)
        return tf.ensure_shape(img, (size[0], size[1], channels))

    return decode


def load_pixels(items: list[ImageItem], size: tuple[int, int], channels: int) -> tuple[np.ndarray, list[str]]:
    """Model-input pixels (N, H, W, C) float32 0..255 for a small set of images, plus the names of files
    that could not be decoded (left out of the array)."""
    import tensorflow as tf

    decode = _decoder(size, channels)
    arrays, bad = [], []
    for it in items:
        try:
            arrays.append(decode(tf.constant(str(it.path))).numpy())
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, ValueError):
            bad.append(it.name)
    if not arrays:
        return np.zeros((0, size[0], size[1], channels), np.float32), bad
    return np.stack(arrays), bad


def stream(
    items: list[ImageItem], size: tuple[int, int], channels: int, batch_size: int = 8
) -> tf.data.Dataset:
    """Batches of (pixels float32 0..255 (B, H, W, C), index int32 (B,)) decoded and resized in parallel.

    Files that fail to decode are dropped by `ignore_errors`; callers find them as the indices that never
    arrive (see `missing_indices`), so one corrupt file is reported, not fatal.
    """
    import tensorflow as tf

    decode = _decoder(size, channels)
    paths = [str(it.path) for it in items]
    ds = tf.data.Dataset.from_tensor_slices((paths, tf.range(len(paths), dtype=tf.int32)))
    ds = ds.map(lambda p, i: (decode(p), i), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors()
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def missing_indices(total: int, seen: Any) -> list[int]:
    seen_set = {int(i) for i in seen}
    return [i for i in range(total) if i not in seen_set]
