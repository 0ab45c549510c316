"""How different two pictures look: SSIM and a distance between features of a fixed network.

A byte digest says only "not the same file"; a filter picture redrawn by a retrained unit can differ in
every byte and look the same, or keep its layout while its texture changes. Two figures, both in 0..1:

- SSIM (Wang et al. 2004, "Image quality assessment: from error visibility to structural similarity";
  `skimage.metrics.structural_similarity`) of the two pictures in gray at a common size: local means,
  contrasts and correlations. 1 = identical.
- A feature-space distance in the manner of LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of
  Deep Features as a Perceptual Metric"): both pictures go through the same small convolutional network,
  each position's feature vector is normalized to unit length, and the distance is the mean squared
  difference per position, averaged over the layers (halved: ReLU features are non-negative, so a
  position contributes at most 2). The network is NOT a trained one: two fixed random layers (16 5x5
  filters, 2x2 average pooling, 32 3x3 filters, ReLU), drawn once from a fixed seed. So it works offline,
  is the same on every machine and costs microseconds, and measures change in local oriented structure
  (edges, textures, their layout) rather than the human judgements LPIPS was trained on. It runs in
  numpy: `reportgen diff` must not import TensorFlow.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 64  # both pictures are compared at SIDE x SIDE: filter pictures differ in size between recipes
FEATURE_SEED = 20250610  # the fixed network's weights; changing it changes every recorded distance


def load(path: Path) -> np.ndarray:
    """(SIDE, SIDE, 3) float32 in 0..1."""
    with Image.open(path) as img:
        rgb = img.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BILINEAR)
    return np.asarray(rgb, np.float32) / 255.0


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two (SIDE, SIDE, 3) pictures in 0..1, over their luminance (7x7 windows)."""
    from skimage.metrics import structural_similarity

    gray = np.array([0.299, 0.587, 0.114], np.float32)
    return float(structural_similarity(a @ gray, b @ gray, data_range=1.0))


@functools.cache
def _weights() -> tuple[np.ndarray, np.ndarray]:
    """The fixed network: zero-mean unit-norm random filters (they respond to structure, not brightness)."""
    rng = np.random.default_rng(FEATURE_SEED)
    first = rng.standard_normal((5 * 5 * 3, 16)).astype(np.float32)
    second = rng.standard_normal((3 * 3 * 16, 32)).astype(np.float32)
    out = []
    for w in (first, second):
        w -= w.mean(axis=0, keepdims=True)
        out.append(w / np.linalg.norm(w, axis=0, keepdims=True))
    return out[0], out[1]


def _conv_relu(x: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """Valid k x k convolution of (H, W, C) by (k*k*C, F) weights, then ReLU."""
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(0, 1))  # (H', W', C, k, k)
    rows, cols = windows.shape[:2]
    flat = windows.transpose(0, 1, 3, 4, 2).reshape(rows, cols, -1)
    return np.maximum(flat @ w, 0.0)


def features(x: np.ndarray) -> list[np.ndarray]:
    """The fixed network's two layers of one picture, each position's vector at unit length."""
    first, second = _weights()
    a = _conv_relu(x - x.mean(), first, 5)
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    pooled = a[:h, :w].reshape(h // 2, 2, w // 2, 2, -1).mean(axis=(1, 3))
    b = _conv_relu(pooled, second, 3)
    return [f / (np.linalg.norm(f, axis=-1, keepdims=True) + 1e-8) for f in (a, b)]


def feature_distance(a: np.ndarray, b: np.ndarray) -> float:
    """0 (same features everywhere) .. 1 (orthogonal features everywhere)."""
    return float(np.mean([np.mean(np.sum((fa - fb) ** 2, axis=-1)) / 2.0
                          for fa, fb in zip(features(a), features(b), strict=True)]))  # fmt: skip


def picture_change(old: Path, new: Path) -> dict[str, float]:
    """{"ssim", "feature"} of two picture files."""
    a, b = load(old), load(new)
    return {"ssim": round(ssim(a, b), 4), "feature": round(feature_distance(a, b), 4)}


def entry_pictures(old: dict[str, object], new: dict[str, object]) -> dict[str, float] | None:
    """{"ssim", "feature"} of two history entries' pictures (identical digests: 1 and 0 without reading
    them); None when either picture is unknown or no longer on disk (its output folder was replaced)."""
    if old.get("image_digest") is not None and old.get("image_digest") == new.get("image_digest"):
        return {"ssim": 1.0, "feature": 0.0}
    a, b = old.get("picture"), new.get("picture")
    if not (isinstance(a, Path) and isinstance(b, Path) and a.is_file() and b.is_file()):
        return None
    return picture_change(a, b)
