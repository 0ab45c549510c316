"""Fashion-MNIST builtins: offline data, the trained CNN, the PNG export, reuse and concurrent builders.

Needs the Debian package `dataset-fashion-mnist` (no network). The model is trained once per session
(~20 s on 2 CPU cores) by two concurrent processes, which also checks that the lock makes only one train.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reportgen.fashion import (
    FASHION_CLASS_DIRS,
    FASHION_CLASSES,
    FOLDER_NAME,
    MODEL_FILENAME,
    MODEL_INFO_FILENAME,
    ensure_fashion_folder,
    ensure_fashion_model,
    find_debian_files,
    load_fashion,
    to_model_input,
)

REPO = Path(__file__).resolve().parent.parent

# Each child wraps the private builder so that it reports whether *it* did the work.
_CHILD = """
import sys
from pathlib import Path
import reportgen.fashion as f
real = getattr(f, sys.argv[1])
def spy(*args, **kwargs):
    print("BUILT", flush=True)
    return real(*args, **kwargs)
setattr(f, sys.argv[1], spy)
fn = getattr(f, sys.argv[2])
print(fn(Path(sys.argv[3])))
"""


def _run_concurrently(builder: str, ensure: str, home: Path, n: int) -> list[str]:
    """Start `n` processes calling `ensure(home)` at once; assert they all succeed; return their stdouts."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-c", _CHILD, builder, ensure, str(home)]

    def one(_: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    return [r.stdout for r in results]


@pytest.fixture(scope="session")
def trained_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    find_debian_files()  # fail with the apt-get hint before spending time on subprocesses
    home = tmp_path_factory.mktemp("reportgen-home")
    outputs = _run_concurrently("_train_and_save", "ensure_fashion_model", home, n=2)
    assert sum(out.count("BUILT") for out in outputs) == 1, outputs
    assert {out.strip().splitlines()[-1] for out in outputs} == {str(home / MODEL_FILENAME)}
    return home


def test_load_fashion_offline() -> None:
    (x_train, y_train), (x_test, y_test) = load_fashion()
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert x_train.dtype == np.uint8 and y_train.dtype == np.uint8
    assert np.bincount(y_train).tolist() == [6000] * 10
    assert np.bincount(y_test).tolist() == [1000] * 10
    assert y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the published first labels


def test_missing_files_say_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        find_debian_files(tmp_path)


def test_class_names() -> None:
    assert len(FASHION_CLASSES) == len(FASHION_CLASS_DIRS) == 10
    assert FASHION_CLASSES[0] == "T-shirt/top" and FASHION_CLASSES[9] == "Ankle boot"
    assert FASHION_CLASS_DIRS[0] == "T-shirt_top" and FASHION_CLASS_DIRS[9] == "Ankle_boot"


def test_model_accuracy_on_test_split(trained_home: Path) -> None:
    import keras

    path = trained_home / MODEL_FILENAME
    model = keras.models.load_model(path, compile=False, safe_mode=True)
    assert model.input_shape == (None, 28, 28, 1)
    names = [layer.name for layer in model.layers]
    for name in ("conv1", "conv2", "conv3", "logits", "probs"):
        assert name in names
    _, (x_test, y_test) = load_fashion()
    probs = model.predict(to_model_input(x_test), batch_size=500, verbose=0)
    accuracy = float(np.mean(np.argmax(probs, axis=1) == y_test))
    assert accuracy >= 0.80

    info = json.loads((trained_home / MODEL_INFO_FILENAME).read_text())
    assert info["test_accuracy"] == pytest.approx(accuracy, abs=0.002)
    assert info["epochs"] >= 1 and info["seconds"] > 0
    assert not list(trained_home.glob(".*.tmp-*")), "temp files left behind"


def test_model_is_reused(trained_home: Path) -> None:
    path = trained_home / MODEL_FILENAME
    before = path.stat()
    info_before = (trained_home / MODEL_INFO_FILENAME).stat()
    assert ensure_fashion_model(trained_home) == path
    after = path.stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
    assert (trained_home / MODEL_INFO_FILENAME).stat().st_mtime_ns == info_before.st_mtime_ns


def test_folder_layout_and_pixels(tmp_path: Path) -> None:
    folder = ensure_fashion_folder(tmp_path, per_class=20)
    assert folder == tmp_path / FOLDER_NAME
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == sorted(FASHION_CLASS_DIRS)
    _, (x_test, y_test) = load_fashion()
    for label, class_dir in enumerate(FASHION_CLASS_DIRS):
        pngs = sorted((folder / class_dir).glob("*.png"))
        assert len(pngs) == 20
        expected = np.flatnonzero(y_test == label)[:20]
        assert [int(p.stem) for p in pngs] == expected.tolist()  # the first 20 of the class, in index order
        for png, index in zip(pngs, expected, strict=True):
            with Image.open(png) as img:
                assert img.size == (28, 28) and img.mode == "L"
                assert np.array_equal(np.asarray(img), x_test[index])  # PNG is lossless: exact pixels


def test_folder_is_reused_and_rebuilt_for_other_sizes(tmp_path: Path) -> None:
    folder = ensure_fashion_folder(tmp_path, per_class=3)
    probe = folder / FASHION_CLASS_DIRS[0]
    first_png = sorted(probe.glob("*.png"))[0]
    before = (first_png.stat().st_mtime_ns, folder.stat().st_ino)
    assert ensure_fashion_folder(tmp_path, per_class=3) == folder
    assert (first_png.stat().st_mtime_ns, folder.stat().st_ino) == before

    ensure_fashion_folder(tmp_path, per_class=5)
    assert all(len(list((folder / d).glob("*.png"))) == 5 for d in FASHION_CLASS_DIRS)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [FOLDER_NAME]


def test_folder_concurrent_builders_build_once(tmp_path: Path) -> None:
    outputs = _run_concurrently("_build_folder", "ensure_fashion_folder", tmp_path, n=3)
    assert sum(out.count("BUILT") for out in outputs) == 1, outputs
    assert all(len(list((tmp_path / FOLDER_NAME / d).glob("*.png"))) == 20 for d in FASHION_CLASS_DIRS)
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_bad_per_class(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="per_class"):
        ensure_fashion_folder(tmp_path, per_class=0)
