"""reportgen: batch reports of what convolutional networks learn.

oneDNN is switched off by default before TensorFlow can be imported: with it on, gradients through
the FER mini-Xception segfault on CPU in TF 2.20/2.21 (see README). Users may set the variable first.
"""

import os

# Whether the user chose oneDNN themselves (not inherited from a reportgen parent process): bfloat16
# runs switch it on otherwise (reportgen.runner.select_cpu_kernels).
_ONEDNN = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "")
ONEDNN_FROM_USER = _ONEDNN not in ("", os.environ.get("REPORTGEN_ONEDNN_SET"))
if "TF_ENABLE_ONEDNN_OPTS" not in os.environ:
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = os.environ["REPORTGEN_ONEDNN_SET"] = "0"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
