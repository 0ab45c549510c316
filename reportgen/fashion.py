"""Fashion-MNIST, offline: the raw data, a small reference CNN, and a class-per-folder PNG export.

Why this module exists: the "small-image CNN" study needs a real trained classifier and real images, but CI
machines have no internet. Debian's `dataset-fashion-mnist` package ships the four original IDX files, so we
parse those directly (no Keras download path), train a small seeded CNN once in about 15 s on 2 CPU cores,
and cache both the model and a PNG export under a "home" folder (usually `$REPORTGEN_HOME`).

Both `ensure_*` functions are idempotent, build atomically (temp name in the same folder, then rename) and
serialise concurrent builders with an `fcntl.flock` lock file inside home, so parallel test workers or
report jobs that hit a cold cache build the artifact once and never see a half-written one.

TensorFlow/Keras are imported lazily: the folder export and the data loader do not need them, and importing
TensorFlow costs seconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import keras

# With oneDNN on, gradients on CPU can segfault in TF 2.20/2.21; this only helps if TensorFlow is not
# imported yet (reportgen/__init__.py sets it too). A user's explicit setting wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

FASHION_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""Readable class names, indexed by label (the order of the original dataset)."""


def class_dir_name(name: str) -> str:
    """Filesystem-safe folder name for a class: "T-shirt/top" -> "T-shirt_top", "Ankle boot" -> "Ankle_boot".

    Why: "/" cannot appear in a folder name and spaces are a nuisance in shells and URLs.
    """
    return re.sub(r"[^A-Za-z0-9-]+", "_", name).strip("_")


FASHION_CLASS_DIRS: tuple[str, ...] = tuple(class_dir_name(c) for c in FASHION_CLASSES)
"""Folder names of the PNG export, indexed by label (sorted differently from labels: do not rely on sort)."""

DEBIAN_PACKAGE = "dataset-fashion-mnist"
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

MODEL_FILENAME = "fashion_cnn.keras"
MODEL_INFO_FILENAME = "fashion_cnn.json"
FOLDER_NAME = "fashion-mnist-test"
_MANIFEST = ".manifest.json"

SEED = 0
EPOCHS = 2
BATCH_SIZE = 32
MIN_ACCURACY = 0.80
"""Below this the training is considered broken and nothing is cached (typically ~0.88 is reached)."""


# --------------------------------------------------------------------------------------------------- data


def find_debian_files(root: Path = Path("/usr/share")) -> Path:
    """The folder holding the four Fashion-MNIST gz files installed by the Debian package.

    The package's usual location is checked first; otherwise `root` is searched, but only folders whose path
    mentions "fashion" are accepted, because the plain MNIST package ships files with the same names.
    """
    root = Path(root)
    usual = root / "datasets" / "fashion-mnist"
    if _has_all_files(usual):
        return usual
    for dirpath, _dirnames, filenames in os.walk(root, onerror=lambda _err: None):
        folder = Path(dirpath)
        if IDX_FILES["train_images"] in filenames and "fashion" in dirpath.lower() and _has_all_files(folder):
            return folder
    raise FileNotFoundError(
        f"Fashion-MNIST files not found under {root} (looked for {IDX_FILES['train_images']} and its three "
        f"siblings in a folder named like 'fashion-mnist'). Install them with: "
        f"apt-get install {DEBIAN_PACKAGE}"
    )


def _has_all_files(folder: Path) -> bool:
    return all((folder / name).is_file() for name in IDX_FILES.values())


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse one gzipped IDX file (big-endian header: magic 0x0000 08 <ndim>, then ndim uint32 sizes).

    Why parse by hand: it is 10 lines, needs no network, and checks the header so a truncated or swapped
    file fails loudly instead of yielding misaligned images.
    """
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic != 0x0800 | ndim:
        raise ValueError(f"{path}: not an IDX file of {ndim} dims of uint8 (magic {magic:#010x})")
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=header)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {array.size} bytes of data")
    return array.reshape(shape)


def _load_split(split: str, folder: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    folder = folder or find_debian_files()
    x = _read_idx(folder / IDX_FILES[f"{split}_images"], 3)
    y = _read_idx(folder / IDX_FILES[f"{split}_labels"], 1)
    if len(x) != len(y):
        raise ValueError(f"{folder}: {len(x)} {split} images but {len(y)} labels")
    return x, y


def load_fashion() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """`(x_train, y_train), (x_test, y_test)` like `keras.datasets.fashion_mnist.load_data()`, offline.

    Images are uint8 of shape (N, 28, 28) (60000 train, 10000 test); labels are uint8 in 0..9.
    """
    folder = find_debian_files()
    return _load_split("train", folder), _load_split("test", folder)


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 28, 28, 1) in [0, 1]: what the CNN was trained on ("unit" preset)."""
    return (np.asarray(images, dtype=np.float32) / 255.0)[..., None]


# -------------------------------------------------------------------------------------------- locking


@contextlib.contextmanager
def _locked(home: Path, name: str) -> Iterator[None]:
    """Hold an exclusive flock on `home/.<name>.lock` so concurrent processes build an artifact once.

    The lock file is left in place: deleting it would let a waiter lock a file that is no longer the one a
    newcomer opens. The kernel releases the lock if the holder dies, so a crash never wedges later runs.
    """
    home.mkdir(parents=True, exist_ok=True)
    with open(home / f".{name}.lock", "a") as handle:  # "a": never truncate what another process holds
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_stale(home: Path, pattern: str) -> None:
    """Delete temp files/folders left by a builder that crashed (safe: only called while holding the lock)."""
    for stale in home.glob(pattern):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- model


def build_fashion_cnn() -> keras.Model:
    """The small CNN, with stable layer names (conv1..conv3, logits, probs) that report specs refer to.

    A separate `logits` layer before the softmax lets class visualisations and Grad-CAM use scores that
    softmax has not squashed. Flatten (not global pooling) keeps spatial layout: it trains to ~88% in two
    epochs where global average pooling needs more.
    """
    import keras
    from keras import layers

    inputs = keras.Input(shape=(28, 28, 1), name="image")
    x = layers.Conv2D(16, 3, activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(name="pool1")(x)
    x = layers.Conv2D(32, 3, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(name="pool2")(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv3")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(10, name="logits")(x)
    outputs = layers.Activation("softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="fashion_cnn")


def model_filename(epochs: int = EPOCHS) -> str:
    """The builtin's file (`fashion_cnn.keras`), or that of the same training stopped after `epochs`
    (`fashion_cnn_epoch1.keras`: builtin `fashion-cnn-epoch1`, the earlier checkpoint that the nightly
    twin compares with)."""
    return MODEL_FILENAME if epochs == EPOCHS else f"fashion_cnn_epoch{epochs}.keras"


def ensure_fashion_model(home: Path, epochs: int = EPOCHS) -> Path:
    """`home/fashion_cnn.keras` (`home/model_filename(epochs)`), training and saving it first if it is
    not there yet.

    Training is seeded (`keras.utils.set_random_seed(0)`, full training set, fixed epochs/batch size), so a
    rebuild on the same software stack gives the same weights. `home/fashion_cnn.json` records the test
    accuracy, epochs and training seconds; it is written before the model appears, so whoever sees the
    model also sees its record.
    """
    home = Path(home)
    target = home / model_filename(epochs)
    if target.is_file():
        return target
    with _locked(home, target.stem):
        if target.is_file():  # another process finished while we waited for the lock
            return target
        _remove_stale(home, f".{target.stem}*.tmp-*")  # model and json temp files
        _train_and_save(home, target, epochs)
    return target


def _train_and_save(home: Path, target: Path, epochs: int = EPOCHS) -> None:
    import keras

    (x_train, y_train), (x_test, y_test) = load_fashion()
    keras.utils.set_random_seed(SEED)
    model = build_fashion_cnn()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    start = time.perf_counter()
    model.fit(to_model_input(x_train), y_train, epochs=epochs, batch_size=BATCH_SIZE, shuffle=True, verbose=0)
    seconds = time.perf_counter() - start
    loss, accuracy = model.evaluate(to_model_input(x_test), y_test, batch_size=500, verbose=0)
    if accuracy < MIN_ACCURACY:
        # Caching a broken model would silently poison every later report; fail here instead.
        raise RuntimeError(
            f"Fashion-MNIST CNN reached only {accuracy:.3f} test accuracy (< {MIN_ACCURACY}); not saving it"
        )

    import tensorflow as tf

    info = {
        "test_accuracy": round(float(accuracy), 4),
        "test_loss": round(float(loss), 4),
        "epochs": epochs,
        "batch_size": BATCH_SIZE,
        "train_samples": int(len(x_train)),
        "test_samples": int(len(x_test)),
        "seconds": round(seconds, 1),
        "seed": SEED,
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
        "backend": keras.backend.backend(),
    }
    tmp = home / f".{target.stem}.tmp-{os.getpid()}.keras"  # Keras insists on the .keras suffix
    try:
        model.save(tmp)
        _write_json_atomic(home / (MODEL_INFO_FILENAME if epochs == EPOCHS else f"{target.stem}.json"), info)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- folder


def ensure_fashion_folder(home: Path, per_class: int = 20) -> Path:
    """`home/fashion-mnist-test/<class_dir>/<index>.png`: the first `per_class` test images of each class.

    `<index>` is the image's position in the test split, zero-padded to 5 digits so that name order is
    index order. The folder carries a `.manifest.json`; it is reused when the manifest matches `per_class`
    and every listed file exists, and rebuilt (in a temp folder, then renamed into place) otherwise.
    """
    if not 1 <= per_class <= 1000:
        raise ValueError(f"per_class must be in 1..1000 (the test split has 1000 a class): {per_class}")
    home = Path(home)
    target = home / FOLDER_NAME
    if _folder_complete(target, per_class):
        return target
    with _locked(home, FOLDER_NAME):
        if _folder_complete(target, per_class):
            return target
        _remove_stale(home, f".{FOLDER_NAME}.tmp-*")
        _remove_stale(home, f".{FOLDER_NAME}.old-*")
        _build_folder(home, target, per_class)
    return target


def _folder_complete(target: Path, per_class: int) -> bool:
    try:
        manifest = json.loads((target / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("per_class") != per_class or manifest.get("classes") is None:
        return False
    files = manifest["classes"]
    if sorted(files) != sorted(FASHION_CLASS_DIRS):
        return False
    return all(len(names) == per_class for names in files.values()) and all(
        (target / folder / name).is_file() for folder, names in files.items() for name in names
    )


def _build_folder(home: Path, target: Path, per_class: int) -> None:
    from PIL import Image

    x_test, y_test = _load_split("test")
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.tmp-", dir=home))
    try:
        listing: dict[str, list[str]] = {}
        for label, folder in enumerate(FASHION_CLASS_DIRS):
            (tmp / folder).mkdir()
            indices = np.flatnonzero(y_test == label)[:per_class]
            listing[folder] = []
            for index in indices:
                name = f"{int(index):05d}.png"
                Image.fromarray(np.ascontiguousarray(x_test[index])).save(tmp / folder / name)
                listing[folder].append(name)
        manifest = {
            "per_class": per_class,
            "source": "Fashion-MNIST test split (t10k), first images of each class in index order",
            "class_names": dict(zip(FASHION_CLASS_DIRS, FASHION_CLASSES, strict=True)),
            "classes": listing,
        }
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the export is meant to be readable like any other folder
        if target.exists():
            # A folder cannot be replaced atomically by rename: move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.old-", dir=home))
            os.rename(target, old / FOLDER_NAME)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
