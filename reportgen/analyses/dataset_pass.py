"""One streamed forward pass per (model, dataset) for every section that reduces a whole dataset.

`class_ranking` needs the channel means of its layer over every image; `predictions` needs class
outputs. When sections of both kinds (or several class rankings) name the same model and dataset, the
first of them to run computes everything the others still lack in a single `tf.data` pass (all their
layers at once, plus the outputs), stores each piece under its own content key, and the others read it.
A `predictions` section with no class ranking beside it keeps its own small pass over just its images,
which is cheaper than reading a whole dataset. Activation maps are not reduced (`activations` keeps maps
of a few chosen images), so that section runs its own batched pass.
"""

from __future__ import annotations

import numpy as np

from reportgen.analyses.base import RunContext
from reportgen.datasets import Dataset
from reportgen.engine.forward import class_count, forward
from reportgen.models import LoadedModel
from reportgen.store import content_key

VERSION = "1"


def means_key(lm: LoadedModel, ds: Dataset, layer: str) -> str:
    """Key of one layer's (N, C) channel means over every image of the dataset."""
    return content_key(
        "class_ranking",
        VERSION,
        lm.digest,
        lm.preprocessing.model_dump(),
        lm.channels,
        ds.digest,
        layer,
        lm.input_size,
    )


def outputs_key(lm: LoadedModel, ds: Dataset) -> str:
    """Key of the model's (N, K) class outputs over every image of the dataset."""
    return content_key(
        "dataset_outputs",
        VERSION,
        lm.digest,
        lm.preprocessing.model_dump(),
        lm.channels,
        ds.digest,
        lm.input_size,
    )


def shares_pass(ctx: RunContext, model: str, dataset: str) -> bool:
    """Whether a class ranking reads this (model, dataset) in full, so a predictions section can ride on
    that pass instead of running its own."""
    return any(
        s.type == "class_ranking" and s.model == model and s.dataset == dataset for s in ctx.spec.sections
    )


def _needs(ctx: RunContext, lm: LoadedModel, model: str, dataset: str) -> tuple[list[str], bool]:
    """Layers whose means, and whether class outputs, any section of the spec wants from this pair."""
    layers: list[str] = []
    outputs = False
    for j, s in enumerate(ctx.spec.sections):
        if getattr(s, "model", None) != model or getattr(s, "dataset", None) != dataset:
            continue
        if s.type == "class_ranking" and s.layer not in layers:
            lm.layer(s.layer, ctx.where(j, "layer"))
            layers.append(s.layer)
        elif s.type == "predictions" and shares_pass(ctx, model, dataset):
            outputs = True
    return layers, outputs


def ensure(ctx: RunContext, lm: LoadedModel, ds: Dataset, model: str, dataset: str) -> None:
    """Run the shared pass if any piece the spec wants from (model, dataset) is not stored yet."""
    layers, outputs = _needs(ctx, lm, model, dataset)
    todo = [layer for layer in layers if not ctx.store.has(means_key(lm, ds, layer), "npz")]
    want_outputs = outputs and not ctx.store.has(outputs_key(lm, ds), "npz")
    if not todo and not want_outputs:
        return
    if want_outputs:
        class_count(lm)
    pieces = ", ".join(todo + (["class outputs"] if want_outputs else []))
    label = f"{model} {pieces}: one pass over {ds.key}"
    with ctx.timed("engine: forward"), ctx.progress.task(label, len(ds.items)) as advance:
        result = forward(lm, ds.items, todo, outputs=want_outputs, on_batch=advance)
    missing = np.asarray(result.missing, np.int64)
    for layer in todo:
        key = means_key(lm, ds, layer)
        ctx.store.put_arrays(key, {"means": result.means[layer], "missing": missing})
        ctx.fresh.add(key)
        ctx.computed += 1
    if want_outputs:
        assert result.outputs is not None
        ctx.store.put_arrays(outputs_key(lm, ds), {"outputs": result.outputs, "missing": missing})
        ctx.fresh.add(outputs_key(lm, ds))
        ctx.computed += 1


def _get(ctx: RunContext, lm: LoadedModel, ds: Dataset, model: str, dataset: str, key: str) -> dict:
    ensure(ctx, lm, ds, model, dataset)
    arrays = ctx.store.get_arrays(key)
    assert arrays is not None, key
    if key not in ctx.fresh:  # stored by an earlier run, not by this run's shared pass
        ctx.reused += 1
    return arrays


def layer_means(ctx: RunContext, lm: LoadedModel, ds: Dataset, model: str, dataset: str, layer: str) -> dict:
    """{"means": (N, C) channel means of `layer` over ds.items, "missing": undecodable indices}."""
    return _get(ctx, lm, ds, model, dataset, means_key(lm, ds, layer))


def class_outputs(ctx: RunContext, lm: LoadedModel, ds: Dataset, model: str, dataset: str) -> dict:
    """{"outputs": (N, K) model outputs over ds.items, "missing": undecodable indices}; only for a
    (model, dataset) that `shares_pass`."""
    return _get(ctx, lm, ds, model, dataset, outputs_key(lm, ds))
