"""Per-key claims in the result store: runs that share a `cache:` compute each result once.

Real processes on a real store folder: two processes ask for the same key at once, and a claim whose
holder was killed with SIGKILL must not block the next run (the kernel drops a dead process's flock).
"""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from reportgen.store import Store, content_key

KEY = content_key("test_store_claims", 1)


def _compute_once(root: str, counter: str, started: str) -> list[float]:
    """What RunContext.cached does, in a separate process: claim, re-check, compute (slowly), store."""
    store = Store(Path(root))
    found = store.get_arrays(KEY)
    if found is None:
        with store.claim(KEY):
            found = store.get_arrays(KEY)
            if found is None:
                with open(counter, "a") as f:
                    f.write(f"{os.getpid()}\n")
                Path(started).touch()
                time.sleep(1.0)  # the other process arrives while this one computes
                found = {"values": np.array([os.getpid(), 1.5])}
                store.put_arrays(KEY, found)
    return found["values"].tolist()


def _hold_claim_forever(root: str, held: str) -> None:
    store = Store(Path(root))
    with store.claim(KEY):
        Path(held).touch()
        time.sleep(600)


def _wait_for(path: Path, proc: mp.process.BaseProcess) -> None:
    while not path.exists():
        assert proc.is_alive() or path.exists(), "the helper process died before it got going"
        time.sleep(0.02)


def test_two_processes_compute_a_shared_key_once(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")  # no forked TensorFlow state; the helper imports only numpy
    counter, started = tmp_path / "computed.txt", tmp_path / "started"
    with ctx.Pool(2) as pool:
        first = pool.apply_async(_compute_once, (str(tmp_path / "store"), str(counter), str(started)))
        while not started.exists():  # the first process holds the claim and is computing
            time.sleep(0.02)
        second = pool.apply_async(_compute_once, (str(tmp_path / "store"), str(counter), str(started)))
        a, b = first.get(timeout=60), second.get(timeout=60)
    assert len(counter.read_text().splitlines()) == 1  # computed once ...
    assert a == b  # ... and the second process read the first one's result
    assert not list((tmp_path / "store").rglob("*.claim"))  # released claims leave no files


def test_a_claim_of_a_killed_process_does_not_block(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    held = tmp_path / "held"
    holder = ctx.Process(target=_hold_claim_forever, args=(str(tmp_path / "store"), str(held)))
    holder.start()
    try:
        _wait_for(held, holder)
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(timeout=30)
    finally:
        if holder.is_alive():
            holder.kill()
    assert holder.exitcode == -signal.SIGKILL
    store = Store(tmp_path / "store")
    assert store.path(KEY, "claim").exists()  # the dead holder's claim file is still there ...
    counter = tmp_path / "computed.txt"
    with ctx.Pool(1) as pool:  # ... yet a new process claims the key (a hang here would time out)
        values = pool.apply_async(_compute_once, (str(tmp_path / "store"), str(counter), str(tmp_path / "s")))
        assert values.get(timeout=60)[1] == 1.5
    assert len(counter.read_text().splitlines()) == 1


def test_claims_of_overlapping_chunks_are_taken_in_one_order(tmp_path: Path) -> None:
    """claim_all sorts: a process claiming [k2, k1] while another holds k1 waits before taking k2, so
    neither can hold a key the other waits for."""
    ctx = mp.get_context("spawn")
    keys = [content_key("chunk", i) for i in range(3)]
    first_in_order = sorted(keys)[0]
    held = tmp_path / "held"
    holder = ctx.Process(target=_hold_one, args=(str(tmp_path / "store"), first_in_order, str(held)))
    holder.start()
    try:
        _wait_for(held, holder)
        with ctx.Pool(1) as pool:
            waiting = pool.apply_async(_claim_all_and_report, (str(tmp_path / "store"), list(reversed(keys))))
            time.sleep(0.5)
            store = Store(tmp_path / "store")
            # the waiter blocks on the smallest key, so the other two are still free for anyone
            for key in sorted(keys)[1:]:
                path = store.path(key, "claim")
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a") as f:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if the waiter took it
            os.kill(holder.pid, signal.SIGKILL)
            assert waiting.get(timeout=60) == sorted(keys)
    finally:
        if holder.is_alive():
            holder.kill()
        holder.join(timeout=30)


def _hold_one(root: str, key: str, held: str) -> None:
    with Store(Path(root)).claim(key):
        Path(held).touch()
        time.sleep(600)


def _claim_all_and_report(root: str, keys: list[str]) -> list[str]:
    store = Store(Path(root))
    with store.claim_all(keys):
        return sorted(p.name.removesuffix(".claim") for p in Path(root).rglob("*.claim"))


SHARED_SPEC = """\
title: Shared cache {name}
output: ../out/{name}
cache: ../cache
models:
  tiny:
    path: ../models/tiny.keras
sections:
  - type: filters
    model: tiny
    layers: [conv_b]
    filters: {filters}
    params: {{steps: 1000, crop: 0}}
"""


@pytest.mark.slow
def test_two_runs_sharing_a_cache_compute_the_overlap_once(tmp_path: Path, tiny_keras_model: Path) -> None:
    """Two specs whose filters overlap (2 and 3), started together on one `cache:`: both plan before
    either has stored anything, so without claims both would compute the overlap (8 results in all)."""
    (tmp_path / "models").mkdir()
    shutil.copyfile(tiny_keras_model, tmp_path / "models" / "tiny.keras")
    (tmp_path / "specs").mkdir()
    specs = {"a": "[0, 1, 2, 3]", "b": "[2, 3, 4, 5]"}
    for name, filters in specs.items():
        text = SHARED_SPEC.format(name=name, filters=filters)
        (tmp_path / "specs" / f"{name}.yaml").write_text(text, encoding="utf-8")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "reportgen", "run", str(tmp_path / "specs" / f"{name}.yaml"),
             "--batch-size", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name in specs
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    computed = sum(
        int(re.search(r"(\d+) results computed", out).group(1))  # type: ignore[union-attr]
        for out, _ in outputs
    )
    assert computed == 6  # filters 0-5 of conv_b, each computed by exactly one of the runs
    for name in specs:
        assert (tmp_path / "out" / name / "report.pdf").is_file()
    assert not list((tmp_path / "cache").rglob("*.claim"))
