"""Image folders: discovery (flat or one subfolder per class), seeded sampling, builtin photo sets,
and a streamed `tf.data` loader that skips unreadable files and reports them.

A dataset folder is the user's, and may hold anything: the report reportgen wrote into it, a symbolic
link to its parent, a 389 KB PNG that decodes to 6 GiB. So discovery never enters the output or cache
folders, a folder reportgen published, hidden folders, or any symlinked folder (`up -> ..` would scan
the whole parent tree; symlinked image *files* are fine), and reads each chosen file's header to leave
out images over the dataset's `max_pixels` before anything decodes them. Every decode path (the
streamed loader, `load_pixels`, `load_image`) checks the header again right before decoding, because a
file may change during a long run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from reportgen.decoded_cache import CacheReader, CacheWriter, DecodedSource, source_of
from reportgen.errors import ReportgenError, SpecError
from reportgen.labels import readable_class
from reportgen.progress import log
from reportgen.spec.fields import MAX_PIXELS_CEILING, DatasetSpec
from reportgen.store import atomic_write, store_root

if TYPE_CHECKING:
    import tensorflow as tf

    from reportgen.spec.schema import Spec

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Decoded by TensorFlow, as they always were (JPEG decoders differ slightly, so results stay comparable).
# Every other format goes through Pillow: TIFF, which TF cannot read, and GIF / WebP, which TF decodes
# frame by frame in full although only the first frame is used.
TF_FORMATS = {"JPEG", "MPO", "PNG"}
TF_DECODER, PILLOW_DECODER = 0, 1
NAMES_IN_NOTE = 5


class DatasetFileError(ReportgenError):
    """A dataset's folder is missing or holds no usable image: a problem of the spec's `field` (`path`),
    which the caller that knows the spec turns into a located error (`reportgen.spec.files`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class TooLargeError(ValueError):
    """An image whose header promises more pixels than the limit: never decoded (decompression bomb)."""


@dataclass(frozen=True)
class ImageItem:
    path: Path
    name: str  # path relative to the dataset root, e.g. "n01440764/x.jpg" or "astronaut.png"
    label: int | None  # class index into Dataset.class_names, None for flat folders
    class_name: str | None
    # Set on every item of a dataset with `decoded_cache: true`: where `stream` reads and writes its
    # decoded pixels. Not part of equality: the same file is the same item with or without it.
    decoded: DecodedSource | None = field(default=None, compare=False, repr=False)

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
    notes: list[str] = field(default_factory=list)  # caveats shown in every section that uses it
    too_large: dict[str, str] = field(default_factory=dict)  # name -> "W×H px", left out of `items`

    def select(
        self, names: list[str] | None = None, limit: int | None = None, where: str = ""
    ) -> list[ImageItem]:
        """Items picked by file name / stem / relative path (in the order given), then capped by `limit`.

        A name the dataset lacks is a spec problem at `where`; an image left out for its size says so,
        since "no such image" would send the user looking for a file that is there."""
        items = self.items
        if names:
            index: dict[str, ImageItem] = {}
            for it in self.items:
                for k in (it.name, Path(it.name).name, it.stem):
                    index.setdefault(k, it)
            missing = [n for n in names if n not in index]
            if missing:
                import difflib

                big = {
                    k: v
                    for name, v in self.too_large.items()
                    for k in (name, Path(name).name, Path(name).stem)
                }
                if missing[0] in big:
                    problem = (
                        f"image {missing[0]!r} of dataset {self.key!r} is too large to decode "
                        f"({big[missing[0]]}); raise the dataset's `max_pixels:` or pick another image"
                    )
                else:
                    close = difflib.get_close_matches(missing[0], list(index), n=3)
                    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                    problem = f"dataset {self.key!r} has no image {missing[0]!r}{hint}"
                if where:
                    raise SpecError([f"{where}: {problem}"])
                raise ReportgenError(problem)
            items = [index[n] for n in names]
        return list(items[:limit] if limit else items)


def _digest(items: list[ImageItem]) -> str:
    h = hashlib.sha256()
    for it in items:
        st = it.path.stat()
        h.update(f"{it.name}|{st.st_size}|{st.st_mtime_ns}|{it.label}\n".encode())
    return h.hexdigest()


# -- headers ----------------------------------------------------------------------------------------


@functools.cache
def _pillow() -> Any:
    """Pillow, with its decompression-bomb *warning* silenced: reportgen checks every header against its
    own limit (`max_pixels`) and says so in one line; the warning would be a second, unasked-for one."""
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    return Image


def probe(path: Path | str) -> tuple[str | None, int, str]:
    """(format, pixels, "W×H px") from the file's header, without decoding it; (None, 0, "") where Pillow
    cannot identify the file (decoding then reports it as unreadable). Images too large even for Pillow
    to open (over MAX_PIXELS_CEILING) come back with the pixel count Pillow read."""
    image = _pillow()
    try:
        with image.open(path) as im:
            w, h = im.size
            return im.format, w * h, f"{w}×{h} px"
    except image.DecompressionBombError as exc:
        m = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = int(m.group(1)) if m else MAX_PIXELS_CEILING + 1
        return None, pixels, f"{pixels / 1e6:.0f} megapixels"
    except (OSError, ValueError, SyntaxError):
        return None, 0, ""


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:g} megapixels"


def check_size(path: Path | str, max_pixels: int = MAX_PIXELS_CEILING) -> str | None:
    """The format of a file about to be decoded (it picks the decoder: TensorFlow for JPEG and PNG,
    Pillow for the rest); TooLargeError when its header promises more than `max_pixels`, so that no
    decode path ever starts on a bomb."""
    fmt, pixels, size = probe(path)
    if pixels > max_pixels:
        raise TooLargeError(f"{path}: {size}, over the {_megapixels(max_pixels)} limit")
    return fmt


# -- discovery --------------------------------------------------------------------------------------


def _marked_report(folder: Path) -> bool:
    """A folder reportgen published (it carries the marker; or a report from before markers existed)."""
    from reportgen.publish import MARKER, is_legacy_report

    return (folder / MARKER).exists() or (folder / "manifest.json").is_file() and is_legacy_report(folder)


def _folders_to_skip(spec: Spec) -> set[Path]:
    """The spec's output and cache folders: a dataset around them must not read the report's own PNGs."""
    folders = [Path(spec.output)] + ([Path(spec.cache)] if spec.cache else [])
    return {p.resolve() for p in folders if p.is_absolute()}


class _Walker:
    """Image files under a root, sorted like `Path.rglob` sorted them, never entering a skipped folder;
    records the symlinked folders it did not follow, for the log."""

    def __init__(self, root: Path, skip: set[Path]):
        self.root, self.skip = root, skip
        self.not_followed: list[str] = []

    def enter(self, folder: Path) -> bool:
        if folder.is_symlink():
            self.not_followed.append(f"{folder.relative_to(self.root).as_posix()} -> {os.readlink(folder)}")
            return False
        return (
            not folder.name.startswith(".")
            and folder.resolve() not in self.skip
            and not _marked_report(folder)
        )

    def subfolders(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_dir() and self.enter(p))

    def files(self, top: Path) -> list[Path]:
        found: list[Path] = []
        for here, dirnames, filenames in os.walk(top, followlinks=False):
            dirnames[:] = [d for d in dirnames if self.enter(Path(here) / d)]
            found += [
                Path(here) / f
                for f in filenames
                if Path(f).suffix.lower() in IMAGE_SUFFIXES and (Path(here) / f).is_file()
            ]
        return sorted(found)


def _within_limit(
    items: Iterable[ImageItem], max_pixels: int, limit: int | None, too_large: dict[str, str]
) -> list[ImageItem]:
    """Items in order whose header is within `max_pixels` (the others go to `too_large`), at most `limit`:
    headers are read only until the limit is reached, so `limit: 100` on a big folder stays cheap."""
    kept: list[ImageItem] = []
    for it in items:
        if limit and len(kept) >= limit:
            break
        _, pixels, size = probe(it.path)
        if pixels > max_pixels:
            too_large[it.name] = size
        else:
            kept.append(it)
    return kept


def too_large_note(key: str, too_large: dict[str, str], max_pixels: int) -> str:
    """The caveat naming images left out for their size, as other unreadable files are named."""
    shown = ", ".join(f"{name} {size}" for name, size in list(too_large.items())[:NAMES_IN_NOTE])
    more = f" and {len(too_large) - NAMES_IN_NOTE} more" if len(too_large) > NAMES_IN_NOTE else ""
    return (
        f"Dataset {key!r} skipped: {len(too_large)} file{'s' if len(too_large) != 1 else ''} (too large: "
        f"{shown}{more}): over the {_megapixels(max_pixels)} limit, so never decoded; raise the "
        "dataset's `max_pixels:` to include them."
    )


def scan_folder(
    key: str,
    root: Path,
    spec: DatasetSpec,
    seed: int = 0,
    skip: Iterable[Path] = (),
    decoded_folder: Path | None = None,
) -> Dataset:
    """Flat folder -> unlabelled items; subfolders -> one class each (sorted names = label order).

    `skip`: folders never read (the spec's output and cache). `decoded_folder`: where a dataset with
    `decoded_cache: true` keeps its decoded pixels (`<cache>/decoded`)."""
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DatasetFileError(
            "path", f"dataset {key!r}: {root} {what}; fix `path:` (relative to the spec file)"
        )
    walker = _Walker(root, {Path(p).resolve() for p in skip})
    subdirs = walker.subfolders()
    items: list[ImageItem] = []
    class_names: list[str] = []
    rng = random.Random(f"{key}|{seed}")
    if subdirs and spec.labels != "none":
        for label, d in enumerate(subdirs):
            name = readable_class(d.name) if spec.labels == "imagenet" else d.name
            class_names.append(name)
            files = walker.files(d)
            if spec.per_class and len(files) > spec.per_class:
                files = sorted(rng.sample(files, spec.per_class))
            items += [ImageItem(p, p.relative_to(root).as_posix(), label, name) for p in files]
    else:
        items = [ImageItem(p, p.relative_to(root).as_posix(), None, None) for p in walker.files(root)]
    if walker.not_followed:
        log.warning(
            "dataset %r: symlinked folders are not followed: %s", key, ", ".join(walker.not_followed[:5])
        )
    too_large: dict[str, str] = {}
    items = _within_limit(items, spec.max_pixels, spec.limit, too_large)
    notes = [too_large_note(key, too_large, spec.max_pixels)] if too_large else []
    if notes:
        log.warning("%s", notes[0])
    if not items:
        found = "no images" if not too_large else "no image within `max_pixels`"
        links = (
            f" (symlinked folders are not followed: {', '.join(walker.not_followed[:3])})"
            if walker.not_followed
            else ""
        )
        raise DatasetFileError(
            "max_pixels" if too_large else "path",
            f"dataset {key!r}: {found} ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}{links}; "
            + ("raise `max_pixels:`" if too_large else "fix `path:` or add images"),
        )
    digest = _digest(items)
    if spec.decoded_cache and decoded_folder is not None:
        # Cached pixels are rounded to uint8 after the resize (decoded ones are float): results computed
        # from them get their own keys, so turning the cache on or off never mixes the two.
        digest = hashlib.sha256(f"{digest}|decoded-uint8".encode()).hexdigest()
        settings = [str(root.resolve()), spec.labels, spec.per_class, spec.limit, spec.max_pixels, seed]
        lineage = hashlib.sha256(repr(settings).encode()).hexdigest()
        source = DecodedSource(decoded_folder, digest, tuple(it.name for it in items), lineage)
        items = [dataclasses.replace(it, decoded=source) for it in items]
    return Dataset(key, root, items, class_names, digest, notes, too_large)


# -- builtin photo sets ---------------------------------------------------------------------------


BUILTIN_LISTING = ".reportgen-builtin"  # the names a builtin folder was written with, one per line


def _export(target: Path, make: Callable[[], dict[str, np.ndarray]]) -> Path:
    """Write the named arrays `make()` returns as PNG files into target atomically (build beside, then
    rename). `make` runs only when the folder is missing or incomplete: it imports scikit-image and
    decodes every photo (~1.8 s), which an unchanged rerun must not pay. The folder's listing file says
    which files a complete folder has; a folder written before the listing existed gets it added (its
    PNGs, and so the dataset's digest, stay as they are)."""
    from PIL import Image

    listing = target / BUILTIN_LISTING
    if listing.is_file():
        names = [n for n in listing.read_text(encoding="utf-8").splitlines() if n]
        if names and all((target / f"{n}.png").exists() for n in names):
            return target
    images = make()
    if target.is_dir() and all((target / f"{n}.png").exists() for n in images):
        atomic_write(listing, "".join(f"{n}\n" for n in images).encode())
        return target
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, arr in images.items():
        path = tmp / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(arr)).save(path)
    (tmp / BUILTIN_LISTING).write_text("".join(f"{n}\n" for n in images), encoding="utf-8")
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
        return _export(home / "sample-photos", _sample_photos)
    if name == "faces":
        return _export(home / "faces", _faces)
    if name == "lfw-faces":
        return _export(home / "lfw-faces", _lfw_classes)
    if name == "fashion-mnist-test":
        from reportgen.fashion import ensure_fashion_folder

        return ensure_fashion_folder(home)
    raise ReportgenError(f"unknown builtin dataset {name!r}")


def decoded_folder(spec: Spec) -> Path:
    """`<cache>/decoded`, beside the result store (`<cache>/results`): one `cache:` folder holds everything
    reportgen keeps between runs, and dataset discovery never enters it."""
    return store_root(spec).parent / "decoded"


class DatasetRegistry:
    """Scans each dataset of the spec once, on first use, never entering the spec's output or cache."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self._cache: dict[str, Dataset] = {}

    def get(self, key: str) -> Dataset:
        if key not in self._cache:
            ds = self.spec.datasets[key]
            root = builtin_folder(ds.builtin) if ds.builtin else Path(ds.path or "")
            self._cache[key] = scan_folder(
                key, root, ds, self.spec.seed, _folders_to_skip(self.spec), decoded_folder(self.spec)
            )
        return self._cache[key]


def dataset_notes(registry: DatasetRegistry | None, section: Any) -> list[str]:
    """The caveats of the dataset a section reads (images left out for their size), for its notes."""
    key = getattr(section, "dataset", None)
    return list(registry.get(key).notes) if registry is not None and key else []


# -- loading ----------------------------------------------------------------------------------------


def pillow_pixels(path: Path | str, channels: int, max_pixels: int = MAX_PIXELS_CEILING) -> np.ndarray:
    """uint8 (H, W, channels) of a file's first frame, decoded by Pillow after a header check.

    16-bit images (TIFF `I;16`, PNG read as `I`) are scaled to 0..255 (65535 -> 255), not clipped:
    Pillow's own `convert("L")` clips them, which turns most 16-bit photos white. Float images are taken
    as 0..255. Alpha is dropped, as TensorFlow's decoder drops it."""
    image = _pillow()
    try:
        im = image.open(path)
    except image.DecompressionBombError:
        raise TooLargeError(f"{path}: over Pillow's decompression-bomb limit") from None
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise TooLargeError(f"{path}: {w}×{h} px, over the {_megapixels(max_pixels)} limit")
        if im.mode.startswith("I"):  # 16-bit or 32-bit integer gray
            wide = np.asarray(im).astype(np.int64)
            arr = ((np.clip(wide, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)[..., None]
        elif im.mode == "F":
            arr = np.clip(np.rint(np.asarray(im, np.float32)), 0, 255).astype(np.uint8)[..., None]
        else:
            gray = im.mode in ("1", "L", "LA", "La") or channels == 1
            arr = np.asarray(im.convert("L" if gray else "RGB"), dtype=np.uint8)
            arr = arr[..., None] if arr.ndim == 2 else arr
    if arr.shape[-1] != channels:
        arr = (
            np.repeat(arr, channels, axis=-1)
            if arr.shape[-1] == 1
            else np.asarray(image.fromarray(arr).convert("L"), np.uint8)[..., None]
        )
    return arr


def load_image(path: Path, size: tuple[int, int] | None = None, channels: int = 3) -> np.ndarray:
    """One image for display (thumbnails, overlays): uint8 (H, W, C), resized with Pillow if size is given."""
    arr = pillow_pixels(path, channels)
    if size is None or arr.shape[:2] == tuple(size):
        return arr
    pil = _pillow().fromarray(arr[..., 0] if channels == 1 else arr)
    out = np.asarray(pil.resize((size[1], size[0]), _pillow().BILINEAR), dtype=np.uint8)
    return out[..., None] if channels == 1 else out


def _as_path(path: Any) -> str:
    """A path as `tf.numpy_function` hands it over: bytes in a graph, a 0-d bytes array when eager."""
    raw = path.item() if isinstance(path, np.ndarray) else path
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _route(path: Any) -> np.int32:
    """Which decoder a file takes (header check first; a TooLargeError drops the file from the stream)."""
    fmt = check_size(_as_path(path))
    return np.int32(TF_DECODER if fmt is None or fmt in TF_FORMATS else PILLOW_DECODER)


def _decoder(size: tuple[int, int], channels: int, to_uint8: bool = False) -> Any:
    """The one decode+resize used for every model input, batched or not, so all analyses agree.

    `to_uint8`: round the resized pixels to uint8, as the decoded-image cache stores them (a dataset
    with `decoded_cache: true` gets these pixels on every pass, cached or not)."""
    import tensorflow as tf

    def with_pillow(path: Any) -> np.ndarray:
        return pillow_pixels(_as_path(path), channels)

    def decode(path: tf.Tensor) -> tf.Tensor:
        route = tf.numpy_function(_route, [path], tf.int32, stateful=False)

        def by_tf() -> tf.Tensor:
            data = tf.io.read_file(path)
            return tf.io.decode_image(data, channels=channels, expand_animations=False)

        def by_pillow() -> tf.Tensor:
            pixels = tf.numpy_function(with_pillow, [path], tf.uint8, stateful=False)
            return tf.ensure_shape(pixels, (None, None, channels))

        img = tf.cond(tf.equal(route, TF_DECODER), by_tf, by_pillow)
        img = tf.cast(img, tf.float32)
        # A resize to the image's own size returns it exactly (checked in tests): skip it for folders
        # already at the model's size, where it would cost as much as the decode.
        same = tf.reduce_all(tf.equal(tf.shape(img)[:2], size))
        img = tf.cond(
            same, lambda: img, lambda: tf.image.resize(img, size, method="bilinear", antialias=True)
        )
        if to_uint8:
            img = tf.cast(tf.clip_by_value(tf.round(img), 0.0, 255.0), tf.uint8)
        return tf.ensure_shape(img, (size[0], size[1], channels))

    return decode


def load_pixels(items: list[ImageItem], size: tuple[int, int], channels: int) -> tuple[np.ndarray, list[str]]:
    """Model-input pixels (N, H, W, C) float32 0..255 for a small set of images, plus the names of files
    that could not be decoded or are too large to (left out of the array)."""
    import tensorflow as tf

    decode = _decoder(size, channels)
    arrays, bad = [], []
    for it in items:
        try:
            arrays.append(decode(tf.constant(str(it.path))).numpy())
        except (tf.errors.OpError, ValueError):
            bad.append(it.name)
    if not arrays:
        return np.zeros((0, size[0], size[1], channels), np.float32), bad
    return np.stack(arrays), bad


class Batches:
    """What `stream` returns: iterate for (pixels float32 0..255 (B, H, W, C), index int32 (B,)) batches.

    Counts where the pixels of the last iteration came from (`decoded` files, rows read `from_cache`) and
    whether it built the decoded-image cache, so callers and tests can tell a cached pass from a decoded
    one without timing it."""

    def __init__(self, items: list[ImageItem], size: tuple[int, int], channels: int, batch_size: int):
        self.items, self.size, self.channels, self.batch_size = items, tuple(size), channels, batch_size
        self.source = source_of(items)
        self.decoded = 0
        self.from_cache = 0
        self.built = False

    def __iter__(self) -> Iterator[tuple[tf.Tensor, tf.Tensor]]:
        self.decoded = self.from_cache = 0
        self.built = False
        if self.source is None:
            return self._decode(self._pipeline(to_uint8=False), None)
        names = [it.name for it in self.items]
        reader = CacheReader.open(self.source, self.size, self.channels)
        if reader is not None and reader.has(names):
            return self._cached(reader, names)
        return self._decode(self._pipeline(to_uint8=True), self.source.part(names))

    def _pipeline(self, to_uint8: bool) -> tf.data.Dataset:
        import tensorflow as tf

        decode = _decoder(self.size, self.channels, to_uint8)
        paths = [str(it.path) for it in self.items]
        ds = tf.data.Dataset.from_tensor_slices((paths, tf.range(len(paths), dtype=tf.int32)))
        ds = ds.map(lambda p, i: (decode(p), i), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.ignore_errors()
        return ds.batch(self.batch_size).prefetch(tf.data.AUTOTUNE)

    def _decode(
        self, pipeline: tf.data.Dataset, build: DecodedSource | None
    ) -> Iterator[tuple[tf.Tensor, tf.Tensor]]:
        """Decoded batches; with `build`, each batch's rows also go to a new cache of that source."""
        import tensorflow as tf

        names = [it.name for it in self.items] if build is not None else []
        complete = False
        # created here, not in __iter__: only a pass that starts opens a temporary file
        writer = CacheWriter(build, self.size, self.channels) if build is not None else None
        try:
            for pixels, index in pipeline:
                self.decoded += int(index.shape[0])
                if pixels.dtype == tf.uint8:
                    if writer is not None:
                        writer.write(pixels.numpy(), index.numpy(), names)
                    pixels = tf.cast(pixels, tf.float32)
                yield pixels, index
            complete = True
        finally:  # a pass that stopped early (error, interrupt, caller gone) leaves no cache behind
            if writer is not None and complete:
                self.built = writer.commit()
            elif writer is not None:
                writer.abort()

    def _cached(self, reader: CacheReader, names: list[str]) -> Iterator[tuple[tf.Tensor, tf.Tensor]]:
        import tensorflow as tf

        for pixels, index in reader.batches(names, self.batch_size):
            self.from_cache += len(index)
            yield tf.cast(tf.constant(pixels), tf.float32), tf.constant(index)


def stream(items: list[ImageItem], size: tuple[int, int], channels: int, batch_size: int = 8) -> Batches:
    """Batches of (pixels float32 0..255 (B, H, W, C), index int32 (B,)) decoded and resized in parallel
    (a `tf.data` map with prefetch), or read from the dataset's decoded-image cache when it has one.

    Files that fail to decode, or whose header is over the pixel limit, are dropped by `ignore_errors`;
    callers find them as the indices that never arrive (see `missing_indices`), so one corrupt file is
    reported, not fatal. A cache records such files and skips them the same way. A full pass over a
    dataset with `decoded_cache: true` and no cache yet builds it (see `reportgen.decoded_cache`).
    """
    return Batches(list(items), size, channels, batch_size)


def missing_indices(total: int, seen: Any) -> list[int]:
    seen_set = {int(i) for i in seen}
    return [i for i in range(total) if i not in seen_set]
