"""Process-level behaviour a cron job relies on: SIGTERM cleans up like Ctrl-C, an unexpected failure is
one line (the traceback only with -v), a full disk or a missing permission names the path, and
TensorFlow's C++ start-up chatter stays out of stderr.

The SIGTERM, disk-full and quiet-TensorFlow cases run the real CLI in a subprocess: signals, file
descriptor 2 and environment variables are process-wide, so only a separate process shows what a user
sees.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SPEC = """\
title: Process report
output: ../out/proc
models:
  tiny:
    path: ../models/tiny.keras
sections:
  - type: filters
    model: tiny
    layers: [conv_a, conv_b]
    filters: "0:4"
    params: {{steps: {steps}, crop: 0}}
"""
DEADLINE_S = 180


@pytest.fixture
def project(tmp_path: Path, tiny_keras_model: Path) -> Path:
    (tmp_path / "models").mkdir()
    shutil.copyfile(tiny_keras_model, tmp_path / "models" / "tiny.keras")
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "proc.yaml").write_text(SPEC.format(steps=3), encoding="utf-8")
    return tmp_path


def _cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "reportgen", *map(str, args)]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _failure_lines(stderr: str) -> list[str]:
    """stderr without the progress log lines (`<timestamp> INFO ...`) a non-TTY run writes."""
    return [line for line in stderr.splitlines() if line and " INFO " not in line]


def test_sigterm_during_compute_cleans_up_like_ctrl_c(project: Path, cli_main) -> None:
    spec = project / "specs" / "proc.yaml"
    code, _, err = cli_main("run", spec, "-q")  # the previous report, built in this process
    assert code == 0, err
    out = project / "out"
    before = _snapshot(out / "proc")
    assert "report.pdf" in before

    # A spec change that needs a long compute, in 4 chunks. The signal is sent once the first chunk is
    # stored: the pass then runs TensorFlow's compiled program, as it does for most of a real run. (A
    # signal during the first chunk's tracing surfaces from inside TensorFlow as another exception; the
    # exit code is right then too, but TensorFlow may print that exception itself.)
    spec.write_text(SPEC.format(steps=1500), encoding="utf-8")
    log = project / "stderr.txt"
    with open(log, "w") as err_file:
        proc = subprocess.Popen(
            _cli("run", spec, "--batch-size", 2), stdout=subprocess.PIPE, stderr=err_file, text=True
        )
    try:
        deadline = time.monotonic() + DEADLINE_S
        while "progress task=" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it computed anything: {log.read_text()}"
        assert list(out.glob(".proc.staging-*")), "the run should be building its report by now"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = log.read_text()
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert _failure_lines(stderr) == ["reportgen: terminated; results computed so far are kept in the store"]
    assert not list(out.glob(".proc.staging-*"))  # the staging folder is gone ...
    assert _snapshot(out / "proc") == before  # ... and the previous report is untouched, byte for byte
    assert not list((out / ".reportgen-cache").rglob("*.claim"))  # the chunk's claims were released
    with open(out / ".proc.lock", "a") as lock:  # the lock was released: a next run may start
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_unexpected_error_is_one_line_and_v_adds_the_traceback(
    tmp_path: Path, cli_main, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", os.environ["TF_CPP_MIN_LOG_LEVEL"])  # -v changes it
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("a user's file\n")
    code, _, err = cli_main("schema", "-o", not_a_folder / "schema.json")
    assert code == 1
    assert err.splitlines() == [
        f"reportgen: NotADirectoryError: [Errno 20] Not a directory: '{not_a_folder / 'schema.json'}'; "
        "run with -v for the traceback"
    ]
    code, _, err = cli_main("-v", "schema", "-o", not_a_folder / "schema.json")
    assert code == 1
    assert err.startswith("Traceback (most recent call last):")
    assert err.splitlines()[-1].startswith("reportgen: NotADirectoryError: ")
    assert not_a_folder.read_text() == "a user's file\n"


def test_disk_full_names_the_file(cli_main) -> None:
    """/dev/full fails every write with ENOSPC: a real full disk, without filling one."""
    code, out, err = cli_main("schema", "-o", "/dev/full")
    assert (code, out) == (1, "")
    assert err.splitlines() == ["reportgen: disk full writing /dev/full; free disk space"]


def test_permission_denied_names_the_path(cli_main) -> None:
    """A read-only sysctl file refuses writes with EACCES, even to root (who may write anywhere else)."""
    target = "/proc/sys/kernel/ostype"
    before = Path(target).read_text()
    code, _, err = cli_main("schema", "-o", target)
    assert code == 1
    assert err.splitlines() == [
        f"reportgen: Permission denied: {target}; give this user access to it, or choose another "
        "output:/cache: folder"
    ]
    assert Path(target).read_text() == before


@pytest.fixture
def small_disk(project: Path) -> Iterator[Path]:
    """`project/out` on a 96 KiB tmpfs: a disk that really fills up during a run (needs mount rights)."""
    mount_point = project / "out"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@pytest.mark.slow
def test_disk_full_during_a_run_is_one_line(project: Path, small_disk: Path) -> None:
    proc = subprocess.run(
        _cli("run", project / "specs" / "proc.yaml"), capture_output=True, text=True, timeout=DEADLINE_S
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = _failure_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("reportgen: ") and "free disk space" in lines[0], lines
    assert not list(small_disk.glob(".proc.staging-*"))  # the staging folder was cleaned up


def test_tensorflow_start_up_messages_are_quiet(tiny_keras_model: Path) -> None:
    """`reportgen layers` imports TensorFlow; without -v its C++ start-up lines (CUDA probes, oneDNN,
    absl's pre-init notice) must not reach stderr. The child gets the user's environment, not the
    TF_CPP_MIN_LOG_LEVEL that importing reportgen set in this test process."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    proc = subprocess.run(
        _cli("layers", tiny_keras_model), capture_output=True, text=True, timeout=DEADLINE_S, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "conv_b" in proc.stdout
    noisy = [
        line for line in proc.stderr.splitlines()
        if any(word in line.lower() for word in ("cuda", "cuinit", "onednn", "absl"))
    ]
    assert noisy == []


def test_a_huge_message_is_capped(tmp_path: Path, cli_main) -> None:
    """An exception may quote a huge value (here a 100 000-character file name): one short line."""
    code, _, err = cli_main("schema", "-o", tmp_path / ("x" * 100_000))
    assert code == 1
    (line,) = err.splitlines()
    assert line.startswith("reportgen: OSError: [Errno 36] File name too long: ")
    assert line.endswith("…; run with -v for the traceback") and len(line) < 400


def test_out_of_memory_is_one_line() -> None:
    """A real MemoryError (numpy refuses a 1 EiB array) becomes the line main() prints for it."""
    import numpy as np

    from reportgen.cli import _environment_error

    with pytest.raises(MemoryError) as caught:
        np.ones(1 << 60, np.uint8)
    line = _environment_error(caught.value, verbose=False)
    assert line.startswith("reportgen: out of memory (Unable to allocate 1.00 EiB for an array")
    assert "lower --batch-size" in line and "\n" not in line
