"""reportgen: batch reports of what convolutional networks learn.

oneDNN is switched off by default before TensorFlow can be imported: with it on, gradients through
the FER mini-Xception segfault on CPU in TF 2.20/2.21 (see README). Users may set the variable first.
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
