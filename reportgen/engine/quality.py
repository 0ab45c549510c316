"""Quality figures of a visualisation, so a reviewer (and the findings) can tell a readable image from
high-frequency texture or from an adversarial pattern that only works pixel-exactly.

- `hf_energy`: the share of spectral power (DC excluded) of the image's luma, Hann-windowed, at radial
  frequencies above half the Nyquist frequency (> 0.25 cycles/pixel). Natural photos put a few percent
  there; pixel-space ascent often a third or more (the "high-frequency patterns" of Olah et al. 2017).
- `robustness`: the unit's objective on the image after random jitter, zoom and rotation that the
  optimisation did not use (drawn from their own seed), averaged over ROBUSTNESS_DRAWS draws, divided by
  its objective on the image itself. Near 1: the image shows the feature; near 0 or negative: the
  activation relied on exact pixel positions.
"""

from __future__ import annotations

import math

import numpy as np

HF_CUTOFF = 0.25  # cycles/pixel: half the Nyquist frequency
ROBUSTNESS_DRAWS = 8
ROBUSTNESS_JITTER = 0.0625  # max translation, as a share of the image side (8 px at 128 px)
ROBUSTNESS_SCALE = 0.15  # zoom in 0.85..1.15
ROBUSTNESS_ROTATE = 15.0  # degrees
LUMA = np.array([0.299, 0.587, 0.114])
NOT_ROBUST = 0.5  # findings call out a visualisation that keeps less than this share of its activation


def hf_energy(image: np.ndarray) -> float:
    """Share of the Hann-windowed luma's spectral power (DC excluded) above HF_CUTOFF cycles/pixel."""
    img = np.asarray(image, np.float64)
    luma = img @ LUMA[: img.shape[-1]] / LUMA[: img.shape[-1]].sum() if img.ndim == 3 else img
    h, w = luma.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    luma = (luma - luma.mean()) * window
    power = np.abs(np.fft.fft2(luma)) ** 2
    f = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.fftfreq(w)[None, :] ** 2)
    power[0, 0] = 0.0
    total = power.sum()
    return float(power[f > HF_CUTOFF].sum() / total) if total > 0 else 0.0


def robustness_transforms(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """ROBUSTNESS_DRAWS projective transforms (8 numbers each, see ascent.transform_params) of random
    jitter, zoom and rotation about the centre."""
    h, w = size
    d = rng.uniform(-1.0, 1.0, (ROBUSTNESS_DRAWS, 4))
    dx, dy = d[:, 0] * ROBUSTNESS_JITTER * w, d[:, 1] * ROBUSTNESS_JITTER * h
    angle = d[:, 2] * ROBUSTNESS_ROTATE * math.pi / 180.0
    zoom = 1.0 + d[:, 3] * ROBUSTNESS_SCALE
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    a2 = cx - cos * cx + sin * cy - dx
    b2 = cy - sin * cx - cos * cy - dy
    zeros = np.zeros_like(cos)
    return np.stack([cos, -sin, a2, sin, cos, b2, zeros, zeros], axis=-1).astype(np.float32)


def robustness_ratio(transformed: float, original: float) -> float | None:
    """Mean objective after the transforms over the objective on the image; None where the image does
    not activate the unit (a ratio of two ~0 numbers says nothing)."""
    return float(transformed / original) if original > 1e-6 else None
