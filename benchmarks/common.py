"""Shared pieces of the benchmarks: result rows, Markdown tables, FLOP counting, machine description.

FLOPs are counted from the traced TensorFlow graph of the forward pass at the benchmark's input size
(Conv2D, depthwise conv and MatMul ops: 2 x multiply-adds), so the count is exactly what the model
computes for that layer and size, whatever the architecture.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's start-up chatter out of the results

# Gradient ascent differentiates w.r.t. the input only: each step is one forward pass plus one
# input-gradient pass (Conv2DBackpropInput, the same FLOPs as the forward conv). Weight gradients are
# never needed, so the usual "training step = 3x forward" would overstate the work by 1.5x.
ASCENT_STEP_FACTOR = 2.0
RAW = argparse.RawDescriptionHelpFormatter  # keep the scripts' docstrings (their usage) as written


@dataclass
class Row:
    """One line of the results table: the naive and the reportgen measurement of one case."""

    case: str
    unit: str  # what naive/reportgen measure, e.g. "s/filter" or "images/s"
    naive: float
    reportgen: float
    speedup: float  # how many times faster reportgen is (>1 = faster)
    naive_fraction: float | None = None  # achieved FLOP/s / measured matmul peak
    reportgen_fraction: float | None = None
    notes: list[str] = field(default_factory=list)


def fmt_value(value: float, unit: str) -> str:
    return f"{value:.3g} {unit}"


def fmt_fraction(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.1f} %" if value >= 0.01 else f"{100 * value:.2g} %"


def fmt_ratio(value: float) -> str:
    return f"{value:.3g}x" if value >= 10 else f"{value:.2f}x"


def print_rows(rows: list[Row]) -> None:
    """A script's result: the Markdown table, then each row's notes."""
    print()
    print(markdown_table(rows))
    for r in rows:
        for note in r.notes:
            print(f"- {r.case}: {note}")


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| case | naive | reportgen | ratio (x faster) | naive, % of peak | reportgen, % of peak |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.case} | {fmt_value(r.naive, r.unit)} | {fmt_value(r.reportgen, r.unit)} | "
            f"{fmt_ratio(r.speedup)} | {fmt_fraction(r.naive_fraction)} | "
            f"{fmt_fraction(r.reportgen_fraction)} |"
        )
    return "\n".join(lines)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def graph_flops(concrete: Any) -> float:
    """FLOPs of the conv / matmul ops of a concrete function's graph (static shapes required).

    2 x multiply-adds: Conv2D = 2 * |output| * kh * kw * c_in; depthwise = 2 * |output| * kh * kw;
    MatMul = 2 * m * n * k. Elementwise ops (ReLU, BatchNorm, adds) are a few % and are left out, which
    makes the fractions of peak slightly conservative.
    """
    import numpy as np

    total = 0.0
    for op in concrete.graph.get_operations():
        if op.type == "Conv2D":
            out = op.outputs[0].shape
            kh, kw, cin, _ = op.inputs[1].shape
            total += 2.0 * float(np.prod(out.as_list())) * kh * kw * cin
        elif op.type == "DepthwiseConv2dNative":
            out = op.outputs[0].shape
            kh, kw = op.inputs[1].shape[:2]
            total += 2.0 * float(np.prod(out.as_list())) * kh * kw
        elif op.type in ("MatMul", "BatchMatMulV2"):
            a, b = op.inputs[0].shape, op.inputs[1].shape
            m = a[-1] if op.get_attr("transpose_a" if op.type == "MatMul" else "adj_x") else a[-2]
            k = a[-2] if op.get_attr("transpose_a" if op.type == "MatMul" else "adj_x") else a[-1]
            n = b[-2] if op.get_attr("transpose_b" if op.type == "MatMul" else "adj_y") else b[-1]
            batch = float(np.prod(a.as_list()[:-2])) if len(a) > 2 else 1.0
            total += 2.0 * batch * m * n * k
    return total


def forward_flops(model: Any, output: Any, size: tuple[int, int], channels: int) -> float:
    """FLOPs of one image's forward pass from the model's input to `output` (a symbolic tensor) at `size`."""
    import keras
    import tensorflow as tf

    sub = keras.Model(model.inputs, output)
    fn = tf.function(lambda x: sub(x, training=False))
    return graph_flops(fn.get_concrete_function(tf.TensorSpec((1, *size, channels), tf.float32)))


ONEDNN_MODES = ("reportgen", "on", "off")
_KERNEL_VARS = ("TF_ENABLE_ONEDNN_OPTS", "REPORTGEN_ONEDNN_SET")
_STARTUP_KERNEL_ENV = {k: os.environ.get(k) for k in _KERNEL_VARS}  # before select_kernels changes them


def user_env() -> dict[str, str]:
    """This process's environment with the kernel variables as the user started it: for child processes
    that must pick their kernels as `reportgen run` would (e.g. the demo's FER model needs oneDNN off)."""
    env = dict(os.environ)
    for key, value in _STARTUP_KERNEL_ENV.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def select_kernels(mode: str, precision: str = "float32") -> None:
    """Choose TensorFlow's CPU kernels for this process; must run before TensorFlow is imported.

    `reportgen`: what `reportgen run` picks for a spec of a keras.applications model at this precision
    (reportgen/__init__.py turns oneDNN off; `device.select_cpu_kernels` turns it back on for models known
    to be safe with it, as here). `on` / `off`: oneDNN forced,
    as a user setting TF_ENABLE_ONEDNN_OPTS would. The naive approaches run in the same process, so
    both sides of every comparison use the same kernels.
    """
    import sys

    if "tensorflow" in sys.modules:
        raise RuntimeError("select_kernels must run before TensorFlow is imported")
    if mode in ("on", "off"):
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1" if mode == "on" else "0"
        os.environ.pop("REPORTGEN_ONEDNN_SET", None)  # reportgen then treats it as the user's choice
        return
    import reportgen  # noqa: F401  (applies reportgen's default before TensorFlow loads)
    from reportgen.analyses.filters import FiltersSection
    from reportgen.device import select_cpu_kernels
    from reportgen.spec.fields import ModelSpec
    from reportgen.spec.schema import Spec

    spec = Spec(title="benchmark", output="unused", precision=precision,
                models={"m": ModelSpec(keras_app="VGG16", weights="none")},
                sections=[FiltersSection(type="filters", model="m", layers=["block1_conv1"])])
    select_cpu_kernels(spec)


def kernels() -> str:
    value = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    return {"0": "oneDNN off", "1": "oneDNN on"}.get(value or "", "oneDNN TF default (on for x86)")


def machine(kernels_label: str | None = None) -> str:
    """CPU model, cores, TF version, its kernels and threads, load: what the numbers depend on.
    `kernels_label` replaces this process's kernel setting where the work runs elsewhere."""
    import tensorflow as tf

    from reportgen.device import cpu_model

    cpu = cpu_model()
    gpus = tf.config.list_physical_devices("GPU")
    dev = f", GPU: {len(gpus)}" if gpus else ""
    try:
        load = "load avg {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        load = "load avg n/a"
    return (f"{cpu}, {os.cpu_count()} cores{dev}; TensorFlow {tf.__version__}, {kernels_label or kernels()}; "
            f"intra-op threads {tf.config.threading.get_intra_op_parallelism_threads() or 'auto'}; {load}")


def build_keras_app(name: str, seed: int = 0) -> Any:
    """A keras.applications model through reportgen's loader, random weights with a fixed seed.

    ImageNet weights cannot be downloaded here; the FLOPs and the code paths are the same.
    """
    from reportgen.models import load_model
    from reportgen.spec.fields import ModelSpec

    return load_model(name.lower(), ModelSpec(keras_app=name, weights="none"), seed=seed)


def build_model(name: str, seed: int = 0) -> Any:
    """`vgg16-hed` (reportgen's builtin, real weights) or any keras.applications name (random weights)."""
    from reportgen.models import load_model
    from reportgen.spec.fields import BUILTIN_MODELS, ModelSpec

    if name in BUILTIN_MODELS:
        return load_model(name, ModelSpec(builtin=name), seed=seed)
    return build_keras_app(name, seed)
