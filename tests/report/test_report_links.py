"""The links of a published PDF work where the report is: relative links to files of the output folder.

WeasyPrint resolves every href against the HTML's folder, which during a run is the hidden staging
folder that publishing deletes; the PDF then pointed at a folder that no longer exists and leaked the
machine's local path. A reviewer who opens the PDF from the published folder must reach every file.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from PIL import Image
from pypdf import PdfReader

from reportgen.runner import run

AUTHOR_LINK = "https://keras.io/examples/vision/visualizing_what_convnets_learn/"
SPEC = f"""\
title: Links
output: ../out/links
formats: [html, pdf]
models:
  tiny: {{path: ../models/tiny.keras}}
datasets:
  photos: {{path: ../photos}}
sections:
  - type: activations
    model: tiny
    dataset: photos
    layers: [conv_a]
    observations: |
      See [the Keras example]({AUTHOR_LINK}).
  - type: gradcam
    model: tiny
    dataset: photos
    layer: conv_b
"""


def pdf_links(pdf: Path) -> list[str]:
    """Every URI of a link annotation in the PDF (internal jumps have a Dest, not a URI)."""
    uris = []
    for page in PdfReader(pdf).pages:
        for ref in page.get("/Annots") or []:
            action = ref.get_object().get("/A")
            if action is not None and "/URI" in action:
                uris.append(str(action["/URI"]))
    return uris


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, tiny_keras_model: Path) -> Path:
    root = tmp_path_factory.mktemp("links")
    (root / "models").mkdir()
    shutil.copyfile(tiny_keras_model, root / "models" / "tiny.keras")
    (root / "photos").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "photos" / f"{name}.png")
    (root / "specs").mkdir()
    (root / "specs" / "links.yaml").write_text(SPEC, encoding="utf-8")
    run(root / "specs" / "links.yaml", quiet=True)
    return root / "out" / "links"


def test_every_local_link_resolves_inside_the_published_folder(published: Path) -> None:
    uris = pdf_links(published / "report.pdf")
    local = [u for u in uris if urlsplit(u).scheme in ("", "file")]
    assert len(local) >= 2  # the activations and the Grad-CAM CSV
    for uri in local:
        assert "staging" not in uri and str(published.parent) not in unquote(uri), uri
        parts = urlsplit(uri)
        assert parts.scheme == "" and not parts.path.startswith("/"), f"not relative: {uri}"
        target = (published / unquote(parts.path)).resolve()
        assert target.is_file() and target.is_relative_to(published.resolve()), uri


def test_author_links_stay_as_written(published: Path) -> None:
    uris = pdf_links(published / "report.pdf")
    assert AUTHOR_LINK in uris
    assert all(urlsplit(u).scheme in ("", "https") for u in uris), uris
