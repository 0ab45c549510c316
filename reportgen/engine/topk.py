"""Top-k (and bottom-k) images per channel with the position of each image's peak, merged exactly.

A dataset pass reduces every image's map of a channel to its peak (the maximum, or for bottom-k the
minimum of the pre-ReLU output) and where it is; `select` keeps the k best images per channel. Shards of
a pass each keep their own k best, and the k best of those candidates are the k best of the whole pass:
ties are broken by the image's index in the pass, so any cut into shards gives the same result as one
shard. NumPy only: the executor merges shards on the host.
"""

from __future__ import annotations

import numpy as np

FIELDS = ("value", "index", "y", "x")


def select(
    values: np.ndarray, index: np.ndarray, y: np.ndarray, x: np.ndarray, k: int, largest: bool = True
) -> dict[str, np.ndarray]:
    """(n, C) candidates -> (k, C) per channel, best first: "value" (NaN where fewer than k images were
    decodable), "index" (the image's index in the pass, -1 there), "y", "x" (its peak in the layer's map).
    Undecodable images (NaN values) are never selected; equal values keep the lower index first."""
    values = np.asarray(values, np.float32)
    n = values.shape[0]
    index = np.broadcast_to(np.asarray(index, np.int64).reshape(n, -1), values.shape)
    order_key = np.where(np.isnan(values), np.inf, -values if largest else values)
    take = np.lexsort((index, order_key), axis=0)[: min(k, n)]
    out = {
        "value": np.take_along_axis(values, take, 0),
        "index": np.take_along_axis(index, take, 0).copy(),
        "y": np.take_along_axis(np.asarray(y), take, 0).astype(np.int32),
        "x": np.take_along_axis(np.asarray(x), take, 0).astype(np.int32),
    }
    invalid = np.isnan(out["value"])
    out["index"][invalid] = -1
    return out


def merge(parts: list[dict[str, np.ndarray]], k: int, largest: bool = True) -> dict[str, np.ndarray]:
    """The k best of several shards' selections (their "index" already in pass numbering)."""
    cat = {f: np.concatenate([p[f] for p in parts], axis=0) for f in FIELDS}
    return select(cat["value"], cat["index"], cat["y"], cat["x"], k, largest)
