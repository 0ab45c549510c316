"""The opt-in decoded-image cache (`decoded_cache: true`): built by the first full pass, read by later ones
(byte-identical batches, no decode), invalidated by any changed file, never left half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from reportgen.datasets import Dataset, DatasetRegistry, ImageItem, scan_folder, stream
from reportgen.engine.forward import forward
from reportgen.models import PRESETS, LoadedModel
from reportgen.spec.fields import DatasetSpec
from reportgen.spec.schema import Spec

SIZE = (24, 24)


def photos(folder: Path, count: int = 7, side: int = 32) -> Path:
    """`count` JPEG photos of noise in two class folders, plus one file that is not an image at all."""
    rng = np.random.default_rng(0)
    for i in range(count):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(sub / f"p{i}.jpg")
    (folder / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


def scan(folder: Path, cache: Path, on: bool = True) -> Dataset:
    return scan_folder("x", folder, DatasetSpec(path=str(folder), decoded_cache=on), decoded_folder=cache)


def collect(batches: object) -> tuple[np.ndarray, np.ndarray]:
    pixels, index = zip(*[(p.numpy(), i.numpy()) for p, i in batches], strict=True)  # type: ignore[attr-defined]
    return np.concatenate(pixels), np.concatenate(index)


def scramble_keeping_stat(path: Path) -> None:
    """Garbage of the same size with the same mtime: the dataset digest (name, size, mtime) is unchanged,
    but any decode of this file now fails."""
    st = path.stat()
    path.write_bytes(os.urandom(st.st_size))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_second_pass_reads_the_cache_byte_identical_without_decoding(tmp_path: Path) -> None:
    folder, cache = photos(tmp_path / "data"), tmp_path / "decoded"
    ds = scan(folder, cache)
    first = stream(ds.items, SIZE, 3, batch_size=3)
    px1, idx1 = collect(first)
    broken = next(i for i, it in enumerate(ds.items) if it.name == "a/broken.jpg")
    assert first.built and first.decoded == len(ds.items) - 1 and first.from_cache == 0
    assert broken not in idx1  # skipped, as without a cache
    (data,) = cache.glob("*.u8")
    index = json.loads(data.with_suffix(".json").read_text())
    assert index["unreadable"] == ["a/broken.jpg"] and index["rows"] == len(ds.items)
    assert data.stat().st_size == len(ds.items) * SIZE[0] * SIZE[1] * 3
    written = data.stat().st_mtime_ns

    for it in ds.items:  # from now on, decoding any of these files would fail
        scramble_keeping_stat(it.path)
    again = scan(folder, cache)
    assert again.digest == ds.digest
    second = stream(again.items, SIZE, 3, batch_size=3)
    px2, idx2 = collect(second)
    assert second.decoded == 0 and second.from_cache == len(ds.items) - 1 and not second.built
    np.testing.assert_array_equal(idx2, idx1)
    assert px2.dtype == np.float32 and px2.tobytes() == px1.tobytes()
    assert data.stat().st_mtime_ns == written  # read, not rebuilt

    # without the cache the same (scrambled) files no longer decode: the batches above came from the cache
    plain = stream(scan(folder, cache, on=False).items, SIZE, 3, batch_size=3)
    assert list(plain) == [] and plain.decoded == 0


def test_cached_pixels_are_the_decoded_ones_rounded(tmp_path: Path) -> None:
    folder, cache = photos(tmp_path / "data"), tmp_path / "decoded"
    exact, _ = collect(stream(scan(folder, cache, on=False).items, SIZE, 3, batch_size=4))
    rounded, _ = collect(stream(scan(folder, cache).items, SIZE, 3, batch_size=4))
    np.testing.assert_array_equal(rounded, np.clip(np.round(exact), 0, 255))
    assert not np.array_equal(rounded, exact)  # the resize makes fractions: rounding is real


def test_a_changed_file_gives_a_new_key(tmp_path: Path) -> None:
    folder, cache = photos(tmp_path / "data"), tmp_path / "decoded"
    ds = scan(folder, cache)
    old, _ = collect(stream(ds.items, SIZE, 3, batch_size=4))
    target = folder / "b" / "p0.jpg"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(target)
    changed = scan(folder, cache)
    assert changed.digest != ds.digest
    batches = stream(changed.items, SIZE, 3, batch_size=4)
    new, idx = collect(batches)
    assert batches.decoded == len(ds.items) - 1 and batches.from_cache == 0 and batches.built
    old_key, new_key = (d.items[0].decoded.key(SIZE, 3) for d in (ds, changed))  # type: ignore[union-attr]
    assert sorted(p.name for p in cache.iterdir()) == sorted([f"{new_key}.u8", f"{new_key}.json"])
    assert old_key != new_key  # the folder's earlier cache was replaced, not kept beside
    row = list(idx).index(next(i for i, it in enumerate(changed.items) if it.path == target))
    assert np.abs(new[row] - 200).max() <= 2 and not np.array_equal(new[row], old[row])


def test_another_input_size_is_another_cache(tmp_path: Path) -> None:
    folder, cache = photos(tmp_path / "data"), tmp_path / "decoded"
    ds = scan(folder, cache)
    collect(stream(ds.items, SIZE, 3))
    gray = stream(ds.items, SIZE, 1)
    px, _ = collect(gray)
    assert gray.built and px.shape[1:] == (*SIZE, 1)
    assert len(list(cache.glob("*.u8"))) == 2


def test_a_part_of_the_dataset_reads_the_cache_but_never_builds_it(tmp_path: Path) -> None:
    folder, cache = photos(tmp_path / "data"), tmp_path / "decoded"
    ds = scan(folder, cache)
    part = [ds.items[5], ds.items[1]]
    before = stream(part, SIZE, 3)
    px_before, _ = collect(before)
    assert before.decoded == 2 and not before.built and not cache.exists()
    full, full_idx = collect(stream(ds.items, SIZE, 3))
    after = stream(part, SIZE, 3)
    px_after, idx = collect(after)
    assert after.from_cache == 2 and after.decoded == 0
    assert list(idx) == [0, 1]  # positions in the part, as decoding reports them
    assert px_after.tobytes() == px_before.tobytes()
    np.testing.assert_array_equal(px_after[0], full[list(full_idx).index(5)])


def test_a_pass_stopped_early_leaves_no_cache_and_stale_temporaries_go(tmp_path: Path) -> None:
    folder, cache = photos(tmp_path / "data"), tmp_path / "decoded"
    ds = scan(folder, cache)
    batches = iter(stream(ds.items, SIZE, 3, batch_size=2))
    next(batches)
    assert len(list(cache.glob(".*.tmp-*"))) == 1  # being written under a temporary name
    batches.close()  # what an exception or an interrupt in the consumer does
    assert list(cache.iterdir()) == []

    # a build killed with SIGKILL leaves its temporary file; the next build removes it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    key = ds.items[0].decoded.key(SIZE, 3)  # type: ignore[union-attr]
    stale = [cache / f".{key}.u8.tmp-{dead}", cache / f".{key}.json.tmp-{dead}"]
    for path in stale:
        path.write_bytes(b"\0" * 100)
    (cache / f"{key}.u8").write_bytes(b"\0" * 100)  # a data file without its index is no cache
    first = stream(ds.items, SIZE, 3)
    collect(first)
    assert first.built and first.decoded == len(ds.items) - 1 and not any(p.exists() for p in stale)


def test_same_size_images_skip_the_resize_exactly(tmp_path: Path) -> None:
    folder = photos(tmp_path / "data", count=2, side=SIZE[0])
    items = [ImageItem(p, p.name, None, None) for p in sorted(folder.rglob("p*.jpg"))]
    px, _ = collect(stream(items, SIZE, 3))
    decoded = [tf.io.decode_jpeg(tf.io.read_file(str(it.path)), channels=3) for it in items]
    np.testing.assert_array_equal(px, np.stack(decoded).astype(np.float32))
    resized, _ = collect(stream(items, (16, 16), 3))
    expected = tf.image.resize(tf.cast(tf.stack(decoded), tf.float32), (16, 16), antialias=True)
    np.testing.assert_array_equal(resized, expected.numpy())


def test_a_spec_dataset_with_decoded_cache_serves_forward_passes(tmp_path: Path) -> None:
    folder = photos(tmp_path / "data")
    spec = Spec.model_validate({
        "title": "t", "output": str(tmp_path / "out"), "cache": str(tmp_path / "cache"),
        "models": {"m": {"keras_app": "VGG16", "weights": "none"}},
        "datasets": {"x": {"path": str(folder), "decoded_cache": True}},
        "sections": [{"type": "class_ranking", "model": "m", "layer": "c", "filters": [0], "dataset": "x"}],
    })
    ds = DatasetRegistry(spec).get("x")
    keras.utils.set_random_seed(0)
    inp = keras.Input((*SIZE, 3))
    model = keras.Model(inp, keras.layers.Conv2D(4, 3, name="c")(inp))
    lm = LoadedModel("m", model, PRESETS["tf"], SIZE, None, "digest", "test model")
    first = forward(lm, ds.items, ["c"], batch_size=4)
    (data,) = (tmp_path / "cache" / "decoded").glob("*.u8")
    for it in ds.items:
        scramble_keeping_stat(it.path)
    second = forward(lm, DatasetRegistry(spec).get("x").items, ["c"], batch_size=4)
    np.testing.assert_array_equal(second.means["c"], first.means["c"])
    broken = next(i for i, it in enumerate(ds.items) if it.name == "a/broken.jpg")
    assert second.missing == first.missing == [broken]  # the scrambled files were never decoded
    assert data.exists()


def test_decoded_cache_is_opt_in(tmp_path: Path) -> None:
    folder, cache = photos(tmp_path / "data"), tmp_path / "decoded"
    ds = scan(folder, cache, on=False)
    assert all(it.decoded is None for it in ds.items)
    assert ds.digest != scan(folder, cache).digest  # uint8 pixels: results get their own store keys
    batches = stream(ds.items, SIZE, 3)
    collect(batches)
    assert not batches.built and not cache.exists()


def test_shards_of_a_pass_build_parts_that_any_later_pass_reads(tmp_path: Path) -> None:
    """A sharded pass (file ranges, as `plan.shard_ranges` cuts them; here or on cluster workers) builds
    the cache part by part: each range its own files, renamed into place by their one writer. A later
    whole pass, another sharding and a selection all read the parts without decoding."""
    from reportgen.plan import shard_ranges

    folder, cache = photos(tmp_path / "data"), tmp_path / "decoded"
    ds = scan(folder, cache)
    exact, exact_idx = collect(stream(scan(folder, cache, on=False).items, SIZE, 3, batch_size=3))
    ranges = shard_ranges(len(ds.items), 2)
    assert len(ranges) == 2
    for start, end in ranges:
        shard = stream(ds.items[start:end], SIZE, 3, batch_size=3)
        collect(shard)
        assert shard.built and shard.from_cache == 0
    key = ds.items[0].decoded.key(SIZE, 3)  # type: ignore[union-attr]
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        f"{key}.{s}-{e}.{ext}" for s, e in ranges for ext in ("u8", "json")
    )
    for it in ds.items:  # from now on, decoding any of these files would fail
        scramble_keeping_stat(it.path)
    again = scan(folder, cache)
    whole = stream(again.items, SIZE, 3, batch_size=4)
    px, idx = collect(whole)
    assert whole.decoded == 0 and whole.from_cache == len(ds.items) - 1 and not whole.built
    np.testing.assert_array_equal(idx, exact_idx)  # the broken file is skipped, as decoding skips it
    np.testing.assert_array_equal(px, np.clip(np.round(exact), 0, 255))
    across = stream(again.items[2:6], SIZE, 3)  # a range that spans both parts
    collect(across)
    assert across.decoded == 0 and across.from_cache == 4 - ("a/broken.jpg" in {
        it.name for it in again.items[2:6]})


def test_concurrent_writers_of_one_part_never_share_a_file(tmp_path: Path) -> None:
    """Two writers of the same rows (two runs, or a retried shard beside its first try) each write their
    own temporary file and rename it into place; the cache a reader then finds is whole. A temporary file
    of another host is never taken for a dead process's."""
    from reportgen.decoded_cache import CacheReader, CacheWriter

    folder, cache = photos(tmp_path / "data"), tmp_path / "decoded"
    ds = scan(folder, cache)
    source = ds.items[0].decoded
    assert source is not None
    part = source.part([it.name for it in ds.items[1:4]])
    assert part is not None and part.span == (1, 4)
    key = source.key(SIZE, 3)
    foreign = cache / f".{key}.1-4.u8.tmp-1-0000-some-other-host"
    cache.mkdir()
    foreign.write_bytes(b"\0")
    names = [it.name for it in ds.items]
    rows = np.arange(len(names) * SIZE[0] * SIZE[1] * 3, dtype=np.uint64).astype(np.uint8).reshape(
        len(names), *SIZE, 3
    )
    first, second = CacheWriter(part, SIZE, 3), CacheWriter(part, SIZE, 3)
    assert first.tmp != second.tmp and first.active and second.active
    for writer in (first, second):
        writer.write(rows[1:4], np.arange(1, 4), names)
    assert second.commit() and first.commit()
    assert foreign.exists()  # its writer may be alive on that host
    reader = CacheReader.open(source, SIZE, 3)
    assert reader is not None and reader.has(names[1:4]) and not reader.has(names[:2])
    (pixels, index), = list(reader.batches(names[1:4], 3))
    np.testing.assert_array_equal(pixels, rows[1:4])
    np.testing.assert_array_equal(index, [0, 1, 2])
    assert sorted(p.name for p in cache.glob(f"{key}*")) == [f"{key}.1-4.json", f"{key}.1-4.u8"]
