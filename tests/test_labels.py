"""Offline ImageNet labels: the bundled index must match Keras' exactly, lookups must be right."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from reportgen.labels import (
    decode_top_k,
    imagenet_classes,
    imagenet_name,
    readable_class,
    synset_name,
)

# MD5 Keras checks when downloading imagenet_class_index.json (keras/src/applications/imagenet_utils.py).
KERAS_CLASS_INDEX_MD5 = "c2c37ea517e94d9795004a39431a14cb"


def test_has_1000_well_formed_classes():
    classes = imagenet_classes()
    assert len(classes) == 1000
    wnids = [wnid for wnid, _ in classes]
    assert len(set(wnids)) == 1000
    assert all(re.fullmatch(r"n\d{8}", wnid) for wnid in wnids)
    assert wnids == sorted(wnids)  # Keras orders class indices by synset id
    assert all(name and "_" not in name for _, name in classes)


def test_matches_keras_class_index_byte_for_byte():
    # Keras names contain no spaces, so turning spaces back into underscores restores its file exactly.
    body = ", ".join(
        f'"{i}": ["{wnid}", "{name.replace(" ", "_")}"]' for i, (wnid, name) in enumerate(imagenet_classes())
    )
    assert hashlib.md5(("{" + body + "}").encode()).hexdigest() == KERAS_CLASS_INDEX_MD5


@pytest.mark.parametrize(
    ("index", "wnid", "name"),
    [
        (0, "n01440764", "tench"),
        (1, "n01443537", "goldfish"),
        (281, "n02123045", "tabby"),
        (477, "n02966687", "carpenter's kit"),
        (999, "n15075141", "toilet tissue"),
    ],
)
def test_known_entries(index, wnid, name):
    assert imagenet_classes()[index] == (wnid, name)
    assert imagenet_name(index) == name


@pytest.mark.parametrize("index", [-1, 1000])
def test_imagenet_name_rejects_out_of_range(index):
    with pytest.raises(IndexError):
        imagenet_name(index)


def test_synset_name():
    assert synset_name("n01440764") == "tench"
    assert synset_name("n02123045") == "tabby"
    assert synset_name("n99999999") is None
    assert synset_name("cats") is None


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("n01440764", "tench"),
        ("n15075141", "toilet tissue"),
        ("golden_retriever", "golden retriever"),
        ("sea-lion", "sea lion"),
        ("cats", "cats"),
        ("n99999999", "n99999999"),
    ],
)
def test_readable_class(folder, expected):
    assert readable_class(folder) == expected


def test_decode_top_k_orders_descending_with_custom_names():
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], dtype=np.float32)
    out = decode_top_k(probs, 2, class_names=["cat", "dog", "bird"])
    assert [[(i, n) for i, n, _ in row] for row in out] == [
        [(1, "dog"), (2, "bird")],
        [(0, "cat"), (2, "bird")],
    ]
    assert out[0][0][2] == pytest.approx(0.6)
    assert all(isinstance(p, float) for row in out for _, _, p in row)


def test_decode_top_k_default_names():
    assert decode_top_k(np.array([[0.2, 0.8]]), 5) == [[(1, "class 1", 0.8), (0, "class 0", 0.2)]]
    imagenet = np.zeros((1, 1000))
    imagenet[0, 281] = 1.0
    assert decode_top_k(imagenet, 1) == [[(281, "tabby", 1.0)]]


def test_decode_top_k_rejects_bad_input():
    with pytest.raises(ValueError):
        decode_top_k(np.zeros(3), 1)
    with pytest.raises(ValueError):
        decode_top_k(np.zeros((1, 3)), 0)
    with pytest.raises(ValueError):
        decode_top_k(np.zeros((1, 3)), 1, class_names=["a", "b"])
