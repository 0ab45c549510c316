"""Readable class names for model outputs and dataset folders, fully offline.

Keras' ``decode_predictions`` downloads ``imagenet_class_index.json`` on first use, which fails on the
offline machines reports are built on. The same index (byte-identical source, MD5
c2c37ea517e94d9795004a39431a14cb) ships in ``reportgen/data/imagenet_classes.json`` as a list of
``[wnid, readable name]`` in class-index order, with underscores already turned into spaces.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

import numpy as np

IMAGENET_NUM_CLASSES = 1000


@lru_cache(maxsize=1)
def imagenet_classes() -> list[tuple[str, str]]:
    """The 1000 ImageNet classes as ``(wnid, readable name)``, index order; read once, then cached.

    Callers must not mutate the returned list: it is shared through the cache.
    """
    path = resources.files("reportgen") / "data" / "imagenet_classes.json"
    entries = json.loads(path.read_text(encoding="utf-8"))
    classes = [(str(wnid), str(name)) for wnid, name in entries]
    if len(classes) != IMAGENET_NUM_CLASSES:  # a truncated data file would silently mislabel every class
        raise RuntimeError(f"{path}: expected {IMAGENET_NUM_CLASSES} ImageNet classes, found {len(classes)}")
    return classes


@lru_cache(maxsize=1)
def _wnid_to_name() -> dict[str, str]:
    """Synset id -> readable name, built once for folder-name lookups."""
    return dict(imagenet_classes())


def imagenet_name(index: int) -> str:
    """Readable name of ImageNet class ``index`` (0-999).

    Negative indices are rejected rather than wrapped, so an off-by-one shows up as an error.
    """
    if not 0 <= index < IMAGENET_NUM_CLASSES:
        raise IndexError(f"ImageNet class index {index} is outside 0..{IMAGENET_NUM_CLASSES - 1}")
    return imagenet_classes()[index][1]


def synset_name(wnid: str) -> str | None:
    """Readable name of an ImageNet synset id such as ``n01440764``, or None if it is not one of the 1000."""
    return _wnid_to_name().get(wnid)


def readable_class(folder_name: str) -> str:
    """Display name for a dataset class folder.

    ImageNet-style folders are named by synset id (``n01440764`` -> ``tench``); any other folder name is
    shown as written, with underscores and dashes turned into spaces (``golden_retriever`` ->
    ``golden retriever``).
    """
    name = synset_name(folder_name)
    if name is not None:
        return name
    return " ".join(folder_name.replace("_", " ").replace("-", " ").split())


def decode_top_k(
    probs: np.ndarray, k: int, class_names: list[str] | None = None
) -> list[list[tuple[int, str, float]]]:
    """Per row of a ``(N, C)`` score array, the top ``k`` classes as ``(index, name, prob)``, highest first.

    Names come from ``class_names`` when given, else from ImageNet when ``C == 1000``, else
    ``"class {i}"``. Unlike Keras' ``decode_predictions`` this needs no download and works for any C.
    Ties keep the lower class index first, so output is deterministic. ``k`` larger than C is capped.
    """
    scores = np.asarray(probs)
    if scores.ndim != 2:
        raise ValueError(f"decode_top_k expects a (N, C) array, got shape {scores.shape}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    num_classes = scores.shape[1]
    if class_names is not None:
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names given for {num_classes} model outputs")
        names = list(class_names)
    elif num_classes == IMAGENET_NUM_CLASSES:
        names = [name for _, name in imagenet_classes()]
    else:
        names = [f"class {i}" for i in range(num_classes)]

    k = min(k, num_classes)
    results: list[list[tuple[int, str, float]]] = []
    for row in scores:
        order = np.argsort(-row, kind="stable")[:k]
        results.append([(int(i), names[i], float(row[i])) for i in order])
    return results
