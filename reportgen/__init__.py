"""reportgen: batch reports of what convolutional networks learn.

oneDNN is switched off by default before TensorFlow can be imported: with it on, gradients through
the FER mini-Xception segfault on CPU in TF 2.20/2.21 (see README). Users may set the variable first.

TensorFlow's C++ logging is off by default (TF_CPP_MIN_LOG_LEVEL=3): on a machine without a GPU every
command printed CUDA probe messages ("failed call to cuInit") into cron mails. `reportgen -v` turns it
back on; a level the user set wins either way. Part of that output ignores the variable: TensorFlow's
shared libraries print "Could not find cuda drivers" while they load, before absl logging exists. So
while the level is 3, the first `import tensorflow` of the process runs with file descriptor 2 pointed
at /dev/null (`_QuietTensorFlowImport`); exceptions still propagate and are reported as usual. The hook
sits in `sys.meta_path` rather than in the CLI so that worker processes (joblib, Dask), which import
reportgen before TensorFlow, are quiet too.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

# Whether the user chose oneDNN themselves (not inherited from a reportgen parent process): bfloat16
# runs switch it on otherwise (reportgen.device.select_cpu_kernels).
_ONEDNN = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "")
ONEDNN_FROM_USER = _ONEDNN not in ("", os.environ.get("REPORTGEN_ONEDNN_SET"))
if "TF_ENABLE_ONEDNN_OPTS" not in os.environ:
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = os.environ["REPORTGEN_ONEDNN_SET"] = "0"

# Whether TF_CPP_MIN_LOG_LEVEL came from the user (then `-v` leaves it alone).
TF_LOG_LEVEL_FROM_USER = "TF_CPP_MIN_LOG_LEVEL" in os.environ
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"


@contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null meanwhile: C++ code writes there directly, not via sys.stderr."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    if sys.stderr is not None:
        sys.stderr.flush()
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        if sys.stderr is not None:
            sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _SilentLoader(importlib.abc.Loader):
    """Runs the real loader of `tensorflow` with stderr silenced, then hands the module back to it."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self.loader  # tensorflow sees its own loader, as without the hook
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        with _stderr_silenced():
            self.loader.exec_module(module)  # type: ignore[attr-defined]


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` like the other finders do, but with a loader that silences its import; once."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # one import per process; also keeps the lookup below from recursing
        if os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "3":
            return None
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _SilentLoader(spec.loader)
        return spec


if "tensorflow" not in sys.modules:
    sys.meta_path.insert(0, _QuietTensorFlowImport())
