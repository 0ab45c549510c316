"""The machine a run computes on: what to call it in the report, and which TensorFlow CPU kernels to use.

`select_cpu_kernels` must run before TensorFlow is imported (it sets an environment variable TensorFlow
reads once), so this module imports TensorFlow only inside `device_description`.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import reportgen
from reportgen.progress import log
from reportgen.spec.schema import Spec


def onednn_safe(spec: Spec) -> bool:
    """Models known to take input gradients safely with oneDNN on: the VGG16-HED backbone and
    keras.applications models (VGG16, ResNet50V2, MobileNetV2 measured). The FER mini-Xception segfaults
    with it (TF 2.20/2.21 CPU), and saved models of unknown make are not risked in a nightly job."""
    return all(m.builtin == "vgg16-hed" or m.keras_app for m in spec.models.values())


def select_cpu_kernels(spec: Spec) -> None:
    """Choose TensorFlow's CPU kernels before it is imported. reportgen turns oneDNN off by default
    (reportgen/__init__); a spec whose models are all `onednn_safe` turns it back on: float32 ascent on
    VGG16 runs ~2x faster with it (benchmarks/filters.py), and bfloat16 is only fast with its AVX512-BF16 /
    AMX kernels (Eigen's bfloat16 convolutions run ~7x slower than float32). A user who set
    TF_ENABLE_ONEDNN_OPTS keeps their choice."""
    if "tensorflow" in sys.modules or reportgen.ONEDNN_FROM_USER:
        return
    if not onednn_safe(spec):
        if spec.precision == "bfloat16":
            log.warning("precision bfloat16 without oneDNN (a model here may crash with it): slow on CPU")
        return
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = os.environ["REPORTGEN_ONEDNN_SET"] = "1"


def cpu_model() -> str:
    """The processor's marketing name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def device_description() -> str:
    """The first GPU TensorFlow sees, else the CPU and its cores: what the report says the run used."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"GPU: {details.get('device_name', gpus[0].name)} ({len(gpus)} visible)"
    return f"CPU: {cpu_model()}, {os.cpu_count()} cores"
