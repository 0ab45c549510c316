"""What sections read from dataset passes, and the requests they declare for them.

`class_ranking` needs the channel means of its layer over every image; `predictions` needs class
outputs. In `prepare` they declare `DatasetRequest`s (`reportgen.work`); the planner merges all requests
of a (model, dataset, image selection) into one streamed pass, the executor (`reportgen.execute`) runs
it before any section builds and stores each piece under its own content key, and `build` reads the
pieces here. A `predictions` section with no class ranking beside it asks only for its chosen images,
which is cheaper than reading a whole dataset.
"""

from __future__ import annotations

import numpy as np

from reportgen.analyses.base import RunContext
from reportgen.datasets import Dataset
from reportgen.models import LoadedModel
from reportgen.work import DatasetRequest, means_key, outputs_key


def shares_pass(ctx: RunContext, model: str, dataset: str) -> bool:
    """Whether a class ranking reads this (model, dataset) in full, so a predictions section can ride on
    that pass instead of asking for its own."""
    return any(
        s.type == "class_ranking" and s.model == model and s.dataset == dataset for s in ctx.spec.sections
    )


def request(ctx: RunContext, req: DatasetRequest) -> None:
    """Declare what a section needs from a dataset pass (during its `prepare`)."""
    ctx.work.add(req)


def layer_means(ctx: RunContext, lm: LoadedModel, ds: Dataset, layer: str) -> dict[str, np.ndarray]:
    """{"means": (N, C) channel means of `layer` over ds.items, "missing": undecodable indices}."""
    return ctx.result(means_key(lm, ds, layer), "dataset pass")


def class_outputs(
    ctx: RunContext, lm: LoadedModel, ds: Dataset, images: tuple[str, ...] | None
) -> dict[str, np.ndarray]:
    """{"outputs": (N, K) model outputs, "missing": undecodable indices} over ds.items (`images` None)
    or over the chosen images, in their order."""
    return ctx.result(outputs_key(lm, ds, images), "dataset pass")
