"""Image parameterisations of the ascent: pixels, scaled Fourier coefficients, or Fourier phase only.

A sample's optimised state is one of
- `pixel`: the canonical image x in [-1, 1] itself (the classic recipes);
- `fourier`: real and imaginary parts of the image's 2-D real FFT per colour channel, scaled by 1/f
  ("spectrum whitening"), through the ImageNet colour-decorrelation matrix and a sigmoid (Olah et al.,
  "Feature Visualization", Distill 2017; lucid's `param.image(fft=True, decorrelate=True)`): a gradient
  step then changes all frequencies at the rate natural images have them, instead of favouring the high
  frequencies that pixel-space ascent fills with texture;
- `phase`: only the spectrum's phase; its magnitude is fixed to that of natural images (Fel et al.,
  "Unlocking Feature Visualization for Deeper Networks with MAgnitude Constrained Optimization", NeurIPS
  2023, "MaCo"; xplique's `maco`).

Every op here works per sample (elementwise, or reductions over one sample's axes), so an image depends
on its own state only, whatever the batch: the colour matrix is applied as three multiply-adds rather
than a matmul whose blocking could depend on the batch size.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# lucid's `color_correlation_svd_sqrt`: the square root of the ImageNet colour covariance (its SVD
# factors), mapping decorrelated channels to RGB; normalised by its largest column norm as lucid does.
COLOR_CORRELATION_SVD_SQRT = np.array(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=np.float64
)
COLOR_MATRIX = COLOR_CORRELATION_SVD_SQRT / np.max(np.linalg.norm(COLOR_CORRELATION_SVD_SQRT, axis=0))

# MaCo's fixed magnitude: a power law a_c * f^-alpha_c per decorrelated channel c (f in cycles/pixel),
# fitted (log-log least squares over 0 < f <= 0.5) to the mean |rfft2| of the seven colour photos that ship
# offline with scikit-image, scikit-learn and matplotlib (reportgen.datasets `photos`: astronaut, chelsea,
# coffee, rocket, china, flower, grace_hopper; centre square, 128 px, logit of [0, 1], decorrelated with
# COLOR_MATRIX, standardised). Why a fitted law rather than the photos' mean spectrum itself: the fit is
# a few constants that do not change with a scikit-image release (a content key could not see that), it
# has no per-photo artefacts at small sizes, and it resizes to any image size exactly, where xplique
# resizes a stored 224-px ImageNet spectrum. xplique's spectrum is downloaded, which reportgen never does.
MACO_ALPHA = (1.52, 1.23, 0.97)
MACO_AMPLITUDE = (3.80, 6.94, 10.26)

PARAMETERIZATIONS = ("pixel", "fourier", "phase")


def rfft2d_freqs(h: int, w: int) -> np.ndarray:
    """Radial frequency (cycles/pixel) of each coefficient of a (h, w) real 2-D FFT: (h, w // 2 + 1)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    return np.sqrt(fx * fx + fy * fy)


def fourier_scale(h: int, w: int, decay_power: float) -> np.ndarray:
    """lucid's `fft_image` scale: 1 / max(f, 1/max(h, w))^decay_power, times sqrt(h w)."""
    freqs = rfft2d_freqs(h, w)
    return (1.0 / np.maximum(freqs, 1.0 / max(w, h)) ** decay_power * np.sqrt(w * h)).astype(np.float32)


def natural_magnitude(h: int, w: int, channels: int) -> np.ndarray:
    """MaCo's fixed magnitude (channels, h, w // 2 + 1) from the fitted power law (see MACO_ALPHA)."""
    f = np.maximum(rfft2d_freqs(h, w), 1.0 / max(h, w))
    mags = [MACO_AMPLITUDE[c % 3] * f ** -MACO_ALPHA[c % 3] for c in range(channels)]
    return np.stack(mags).astype(np.float32)


def state_shape(kind: str, h: int, w: int, c: int) -> tuple[int, ...]:
    """Shape of one sample's optimised state."""
    wf = w // 2 + 1
    return {"pixel": (h, w, c), "fourier": (2, c, h, wf), "phase": (c, h, wf)}[kind]


def recorrelate(t: tf.Tensor) -> tf.Tensor:
    """Decorrelated channels (N, H, W, 3) to RGB-like ones: t @ COLOR_MATRIX.T as multiply-adds."""
    m = COLOR_MATRIX.astype(np.float32)
    ch = [t[..., k] for k in range(3)]
    return tf.stack([ch[0] * m[i, 0] + ch[1] * m[i, 1] + ch[2] * m[i, 2] for i in range(3)], axis=-1)


def _standardize(t: tf.Tensor, axes: list[int]) -> tf.Tensor:
    """Per-sample (t - mean) / (std + 1e-5), with an exactly rounded sqrt (as ascent.normalize_per_sample)."""
    t = t - tf.reduce_mean(t, axis=axes, keepdims=True)
    std = tf.sqrt(tf.reduce_mean(tf.square(t), axis=axes, keepdims=True))
    return t / (std + 1e-5)


class Parameterization:
    """Maps a batch of states to canonical images (N, H, W, C) in [-1, 1], differentiably."""

    def __init__(
        self, kind: str, size: tuple[int, int], channels: int, decorrelate: bool, decay_power: float
    ):
        if kind not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization {kind!r} is not one of {', '.join(PARAMETERIZATIONS)}")
        self.kind, self.size, self.channels = kind, tuple(size), channels
        self.decorrelate = decorrelate and channels == 3
        h, w = size
        self.shape = state_shape(kind, h, w, channels)
        if kind == "fourier":
            self._scale = tf.constant(fourier_scale(h, w, decay_power))
        if kind == "phase":
            self._magnitude = tf.constant(natural_magnitude(h, w, channels))

    def initial(self, rng: np.random.Generator, init_scale: float) -> np.ndarray:
        """One sample's seeded start state: gray plus uniform noise for pixels (the classic start), normal
        coefficients of spread `init_scale` (lucid: 0.01) or a normal phase (xplique: 1.0) otherwise."""
        if self.kind == "pixel":
            return (rng.random(self.shape, dtype=np.float32) - 0.5) * init_scale
        return rng.normal(0.0, init_scale, self.shape).astype(np.float32)

    def _to_rgb(self, t: tf.Tensor) -> tf.Tensor:
        """Decorrelated (N, H, W, C) to the canonical image: recorrelated colours, sigmoid to [-1, 1]."""
        if self.decorrelate:
            t = recorrelate(t)
        return 2.0 * tf.sigmoid(t) - 1.0

    def image(self, z: tf.Tensor) -> tf.Tensor:
        h, w = self.size
        if self.kind == "pixel":
            return z
        if self.kind == "fourier":
            spectrum = tf.complex(z[:, 0] * self._scale, z[:, 1] * self._scale)
            t = tf.signal.irfft2d(spectrum, fft_length=[h, w])  # (N, C, H, W)
            t = tf.transpose(t, [0, 2, 3, 1]) / 4.0
            return self._to_rgb(t)
        phase = _standardize(z, [1, 2, 3])
        spectrum = tf.complex(tf.cos(phase) * self._magnitude, tf.sin(phase) * self._magnitude)
        t = tf.transpose(tf.signal.irfft2d(spectrum, fft_length=[h, w]), [0, 2, 3, 1])
        return self._to_rgb(_standardize(t, [1, 2, 3]))


def optimizer_tables(kind: str, steps: int, beta1: float = 0.9, beta2: float = 0.999) -> np.ndarray:
    """Per-step coefficients (steps, 3) of an Adam-type update, computed on the host so the loop only
    multiplies: update = (a_t m + b_t g) / (sqrt(c_t v) + eps), m and v the usual moving averages.

    `adam`: Kingma & Ba (2015) with bias correction (a = 1 / (1 - beta1^t), b = 0, c = 1 / (1 - beta2^t)).
    `nadam`: Dozat (2016) as Keras implements it, with its momentum schedule
    u_t = beta1 (1 - 0.5 * 0.96^(0.004 t)) (xplique's MaCo uses Keras' Nadam)."""
    out = np.zeros((steps, 3), np.float64)
    u_product = 1.0
    for i in range(steps):
        t = i + 1
        if kind == "adam":
            out[i] = (1.0 / (1.0 - beta1**t), 0.0, 1.0 / (1.0 - beta2**t))
            continue
        u_t = beta1 * (1.0 - 0.5 * 0.96 ** (0.004 * t))
        u_t1 = beta1 * (1.0 - 0.5 * 0.96 ** (0.004 * (t + 1)))
        u_product *= u_t
        out[i] = (u_t1 / (1.0 - u_product * u_t1), (1.0 - u_t) / (1.0 - u_product), 1.0 / (1.0 - beta2**t))
    return out.astype(np.float32)
