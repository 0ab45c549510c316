"""Section types. Each module defines one `Analysis` subclass; ANALYSES maps `type:` to an instance.

Modules are imported lazily so that `reportgen validate` and `schema` never import TensorFlow.
"""

from __future__ import annotations

import importlib

from reportgen.analyses.base import Analysis

_MODULES = {
    "filters": "reportgen.analyses.filters",
    "activations": "reportgen.analyses.activations",
    "class_ranking": "reportgen.analyses.class_ranking",
    "predictions": "reportgen.analyses.predictions",
    "gradcam": "reportgen.analyses.gradcam",
    "occlusion": "reportgen.analyses.occlusion",
    "saliency": "reportgen.analyses.saliency",
    "class_model": "reportgen.analyses.class_model",
    "circuit": "reportgen.analyses.circuit",
}


def analysis_for(section_type: str) -> Analysis:
    """The Analysis instance for a section type (its module defines `ANALYSIS`)."""
    module = importlib.import_module(_MODULES[section_type])
    return module.ANALYSIS
