"""Shared fixtures: a tiny saved Keras model; the real CLI run in this process or in a subprocess."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import reportgen  # noqa: F401 - first: sets TF_ENABLE_ONEDNN_OPTS before any test module imports TensorFlow

CLI_TIMEOUT_S = 180


@pytest.fixture(scope="session")
def tiny_keras_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved 32x32 RGB model: Rescaling -> conv_a (4 ch) -> conv_b (6 ch) -> GAP -> head (3 classes)."""
    import keras

    keras.utils.set_random_seed(1)
    inp = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0, name="rescale")(inp)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv_a")(x)
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv_b")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(3, activation="softmax", name="head")(x)
    path = tmp_path_factory.mktemp("models") / "tiny.keras"
    keras.Model(inp, out, name="tiny").save(path)
    return path


@pytest.fixture
def run_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """`python -m reportgen ARGS` in a fresh interpreter (exit codes, stderr and env as a user sees them)."""

    def run(*args: object, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "reportgen", *map(str, args)],
            capture_output=True, text=True, timeout=CLI_TIMEOUT_S, cwd=cwd, env={**os.environ, **(env or {})},
        )

    return run


@pytest.fixture
def cli_main(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[..., tuple[int, str, str]]]:
    """`reportgen.cli.main(ARGS)` in this process -> (exit code, stdout, stderr); no second TensorFlow start.

    main() points the `reportgen` logger at the current (captured) stderr; it is restored afterwards.
    """
    from reportgen.cli import main

    logger = logging.getLogger("reportgen")
    saved = (logger.handlers[:], logger.level, logger.propagate)

    def call(*args: object) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    yield call
    logger.handlers[:], logger.level, logger.propagate = saved
