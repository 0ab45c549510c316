"""Whole-spec planning: which batched passes run, in what batch sizes, at what cost, and what is stored.

Every section registers its ascent requests first; the planner then groups them per (model, recipe) into
passes (one compiled program each, with one extractor that has an output at every layer of the pass) and
splits what the store does not hold yet into chunks. `reportgen run --dry-run` prints this plan.

Estimates, from the layers' output shapes at the pass's input size:
- FLOPs of a pass = (FLOPs of one sample's forward pass through the layers up to the deepest requested
  layer, counting convolutions and dense layers) x 2 (forward + backward to the input: the ascent needs
  no weight gradients, which would be a third) x steps x samples; the benchmarks count the same way.
- Memory of a sample = bytes of every layer output of that subgraph x MEMORY_FACTOR (activations kept for
  the backward pass, their gradients, scratch). The batch is what fits a share of the free memory of the
  device TensorFlow computes on (GPU memory when there is a GPU, host memory otherwise), capped so that
  chunks stay small enough to store often; an out-of-memory error still halves it at run time.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reportgen.engine.recipes import Recipe

MEMORY_FACTOR = 3.0
# A pass computes every sample up to its deepest layer. Layers whose forward cost exceeds DEPTH_RATIO x the
# cheapest layer of the pass get a pass of their own once the cheaper ones fill MIN_SPLIT samples: sharing
# batches then saves nothing, while each shallow sample would pay for the deep layer (block1 vs block5 of
# VGG16: ~30x). Layers of similar depth, or too few samples to fill a batch, still share one pass.
DEPTH_RATIO = 2.0
MIN_SPLIT = 8
HOST_MEMORY_SHARE = 0.5  # the host also holds the models, the store's files and other processes
GPU_MEMORY_SHARE = 0.8
MAX_BATCH = {"CPU": 32, "GPU": 256}  # larger chunks would not run faster, and are stored less often
# Without oneDNN, TensorFlow's (Eigen) input-gradient convolutions slow down with the batch: batch 16 ran
# 1.4x slower than batch 4 on VGG16 and ResNet50V2 (benchmarks/filters.py), so CPU chunks stay small.
MAX_BATCH_CPU_NO_ONEDNN = 4
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class SampleCost:
    """Forward FLOPs and activation bytes of one sample through the subgraph that computes some layers."""

    flops: int
    activation_bytes: int


def _kernel_flops(layer: Any, out_shape: tuple[int | None, ...]) -> int:
    """2 x MACs of a conv-like or dense layer: every kernel weight is used once per output position."""
    spatial = math.prod(int(d or 1) for d in out_shape[1:-1])
    total = 0
    for name in ("kernel", "depthwise_kernel", "pointwise_kernel"):
        kernel = getattr(layer, name, None)
        shape = getattr(kernel, "shape", None)
        if shape is not None and len(shape) >= 2:
            total += 2 * spatial * math.prod(int(d) for d in shape)
    return total


def sample_cost(
    model: Any, layers: list[str] | tuple[str, ...], size: tuple[int, int], precision: str = "float32"
) -> SampleCost:
    """Cost of one sample of a pass whose extractor has outputs at `layers`, at input `size` (h, w).

    Shapes come from Keras' symbolic shape inference at that size (models with a free input size get the
    pass's size); layers that are not ancestors of a requested layer are not counted."""
    import keras

    sub = keras.Model(model.model.inputs, [model.layer(name).output for name in layers])
    ops = [ly for ly in sub.layers if not isinstance(ly, keras.layers.InputLayer)]
    h, w = size
    try:
        probe = keras.Model(sub.inputs, [ly.output for ly in ops])
        specs = probe.compute_output_spec(keras.KerasTensor((1, h, w, model.channels)))
        shapes = [tuple(s.shape) for s in (specs if isinstance(specs, list | tuple) else [specs])]
    except (AttributeError, ValueError, TypeError):  # a layer used twice has no single output
        shapes = [
            (1, *[h if i == 0 else w if i == 1 else d for i, d in enumerate(ly.output.shape[1:])])
            if len(ly.output.shape) == 4
            else tuple(ly.output.shape)
            for ly in ops
        ]
    flops = sum(_kernel_flops(ly, shape) for ly, shape in zip(ops, shapes, strict=True))
    elements = sum(math.prod(int(d or 1) for d in shape[1:]) for shape in shapes)
    return SampleCost(flops=flops, activation_bytes=elements * BYTES.get(precision, 4))


@dataclass(frozen=True)
class DeviceBudget:
    """Where TensorFlow computes and how many bytes a batch may use there."""

    kind: str  # "GPU" or "CPU"
    free_bytes: int

    def describe(self) -> str:
        return f"{self.kind}, {human_bytes(self.free_bytes)} for batches"


def host_available_bytes() -> int:
    """Free host memory: MemAvailable of /proc/meminfo, bounded by the cgroup limit of a container."""
    available = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if not available:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 4 * 2**30
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return available


def _gpu_memory_limit() -> int:
    """Bytes TensorFlow's allocator may use on the first GPU."""
    from tensorflow.python.client import device_lib

    for device in device_lib.list_local_devices():
        if device.device_type == "GPU":
            return int(device.memory_limit)
    return 0


def device_budget(share: float = 1.0) -> DeviceBudget:
    """Free memory of the device TensorFlow uses; `share` < 1 when several local processes split it."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        used = tf.config.experimental.get_memory_info("GPU:0")["current"]
        free = max(_gpu_memory_limit() - used, 0) * GPU_MEMORY_SHARE
        return DeviceBudget("GPU", int(free * share))
    return DeviceBudget("CPU", int(host_available_bytes() * HOST_MEMORY_SHARE * share))


def batch_size_for(cost: SampleCost, budget: DeviceBudget, override: int | None = None) -> int:
    """Samples per chunk: what fits the budget, at most MAX_BATCH; `override` (--batch-size) wins."""
    if override:
        return int(override)
    per_sample = max(1, int(cost.activation_bytes * MEMORY_FACTOR))
    cap = MAX_BATCH.get(budget.kind, 32)
    if budget.kind == "CPU" and os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0":
        cap = MAX_BATCH_CPU_NO_ONEDNN
    return int(max(1, min(cap, budget.free_bytes // per_sample)))


def human_flops(flops: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:.0f} FLOP"


def human_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def recipe_label(recipe: Recipe) -> str:
    """Short text of a recipe: the fields that differ from the defaults."""
    default = Recipe()
    diff = [f"{k}={v}" for k, v in recipe.as_dict().items() if getattr(default, k) != v]
    return "recipe " + (", ".join(diff) if diff else "defaults")


@dataclass
class AscentPass:
    """All requests of one (model, recipe): one compiled program, chunks of `batch_size`."""

    model: str
    recipe: Recipe
    size: tuple[int, int]
    layers: tuple[str, ...]  # of the samples to compute, in model order: the extractor's outputs
    requests: list[Any]  # AscentRequest to compute, in registration order
    keys: list[str]  # their content keys
    total: int  # distinct results of this (model, recipe), stored or not
    stored: int
    batch_size: int = 1
    cost: SampleCost = field(default_factory=lambda: SampleCost(0, 0))

    @property
    def pending(self) -> int:
        return len(self.requests)

    @property
    def chunks(self) -> int:
        return math.ceil(self.pending / self.batch_size) if self.pending else 0

    @property
    def flops(self) -> int:
        """Estimated FLOPs of the pass: forward + backward to the input per step, per sample to compute."""
        return self.cost.flops * 2 * self.recipe.steps * self.pending

    def describe(self) -> str:
        if not self.pending:
            return f"ascent {self.model} ({recipe_label(self.recipe)}): all {self.total} results stored"
        layers = ", ".join(self.layers)
        return (
            f"ascent {self.model} ({recipe_label(self.recipe)}): {self.pending} filters over "
            f"{len(self.layers)} layer{'s' if len(self.layers) != 1 else ''} ({layers}) "
            f"at {self.size[0]}x{self.size[1]} px, "
            f"{self.recipe.steps} steps, batch {min(self.batch_size, self.pending)} ({self.chunks} chunk"
            f"{'s' if self.chunks != 1 else ''}), est. {human_flops(self.flops)}, "
            f"~{human_bytes(self.cost.activation_bytes * MEMORY_FACTOR)} a sample; "
            f"{self.stored} of {self.total} stored"
        )


@dataclass
class Plan:
    """The passes of a run and what the store already holds, overall and per section."""

    passes: list[AscentPass]
    budget: DeviceBudget
    precision: str = "float32"
    sections: dict[str, tuple[int, int]] = field(default_factory=dict)  # sid -> (results, stored)

    @property
    def total(self) -> int:
        return sum(p.total for p in self.passes)

    @property
    def stored(self) -> int:
        return sum(p.stored for p in self.passes)

    @property
    def pending(self) -> int:
        return sum(p.pending for p in self.passes)

    @property
    def flops(self) -> int:
        return sum(p.flops for p in self.passes)

    def lines(self) -> list[str]:
        """Human-readable plan: a headline, one line per pass, one per section with ascent results."""
        if not self.passes:
            return ["no batched passes: no section registered work ahead (each caches its own results)"]
        todo = [p for p in self.passes if p.pending]
        head = (
            f"{len(todo)} of {len(self.passes)} pass{'es' if len(self.passes) != 1 else ''} to run on "
            f"{self.budget.describe()}, precision {self.precision}: {self.stored} of {self.total} results "
            f"stored, {self.pending} to compute, est. {human_flops(self.flops)}"
        )
        lines = [head]
        lines += [f"pass {i + 1}: {p.describe()}" for i, p in enumerate(self.passes)]
        lines += [
            f"section {sid}: {stored} of {n} ascent results stored"
            for sid, (n, stored) in self.sections.items()
        ]
        return lines


def build_plan(
    requests: dict[Any, str],
    owners: dict[str, list[str]],
    store: Any,
    models: Any,
    precision: str,
    batch_size: int | None = None,
    budget: DeviceBudget | None = None,
) -> Plan:
    """Group requests (AscentRequest -> content key) per (model, recipe), drop the stored, size batches.

    A key requested twice (two sections, or two model entries with the same weights) is computed once,
    in the pass of its first request."""
    from reportgen.engine.ascent import ascent_size

    budget = budget or device_budget()
    groups: dict[tuple[str, Recipe], list[tuple[Any, str]]] = {}
    seen: set[str] = set()
    for req, key in requests.items():
        if key in seen:
            continue
        seen.add(key)
        groups.setdefault((req.model, req.recipe), []).append((req, key))
    stored_keys = {key for key in seen if store.has(key, "json")}
    passes = []
    for (model_key, recipe), items in groups.items():
        lm = models.get(model_key)
        size = ascent_size(lm, recipe)
        todo = [(r, k) for r, k in items if k not in stored_keys]
        order = [ly.name for ly in lm.model.layers]
        pending_layers = sorted({r.layer for r, _ in todo}, key=order.index)
        layer_groups = split_by_depth(lm, pending_layers, [r.layer for r, _ in todo], size, precision)
        for i, group in enumerate(layer_groups or [()]):
            # results of layers with nothing pending are counted (as stored) in the first pass
            mine = [(r, k) for r, k in items if r.layer in group or not i and r.layer not in pending_layers]
            pending = [(r, k) for r, k in mine if k not in stored_keys]
            p = AscentPass(
                model_key,
                recipe,
                size,
                tuple(group),
                [r for r, _ in pending],
                [k for _, k in pending],
                total=len(mine),
                stored=len(mine) - len(pending),
            )
            if pending:
                p.cost = sample_cost(lm, group, size, precision)
                p.batch_size = batch_size_for(p.cost, budget, batch_size)
            passes.append(p)
    sections = {sid: (len(set(keys)), len(set(keys) & stored_keys)) for sid, keys in owners.items()}
    return Plan(passes, budget, precision, sections)


def split_by_depth(
    model: Any, layers: list[str], samples: list[str], size: tuple[int, int], precision: str
) -> list[tuple[str, ...]]:
    """Partition `layers` (model order) into passes by forward cost (see DEPTH_RATIO, MIN_SPLIT).

    `samples` holds the layer of every pending sample, to count how many a group would hold."""
    if len(layers) <= 1:
        return [tuple(layers)] if layers else []
    cost = {name: sample_cost(model, [name], size, precision).flops for name in layers}
    count = {name: samples.count(name) for name in layers}
    groups: list[list[str]] = []
    for name in sorted(layers, key=lambda n: (cost[n], layers.index(n))):
        if groups and not (
            cost[name] > DEPTH_RATIO * cost[groups[-1][0]] and sum(count[n] for n in groups[-1]) >= MIN_SPLIT
        ):
            groups[-1].append(name)
        else:
            groups.append([name])
    return [tuple(sorted(g, key=layers.index)) for g in groups]


def _ascent_layers(section: Any, model: Any) -> list[str]:
    """Layers whose subgraph one ascent sample of `section` computes: the filter sections' layers, the
    circuit's layer (its input channels lie before it), the whole model for class models."""
    if section.type == "filters":
        return list(section.layers)
    if section.type == "circuit":
        return [section.layer]
    return [model.model.layers[-1].name]


def check_samples_fit(spec: Any, models: Any, budget: DeviceBudget) -> None:
    """Raise SpecError when one ascent sample of a section needs more memory than the device has.

    A pass's batch shrinks to what fits, down to one sample; a sample that alone does not fit would be
    planned and then die with an out-of-memory error after the run started (`size: 100000`: 7152 GiB a
    sample vs an 11.2 GiB budget). The estimate is the planner's (`sample_cost` x MEMORY_FACTOR), checked
    for each section's own layers before any compute; the error names the field that set the size."""
    from reportgen.engine.ascent import ascent_size
    from reportgen.engine.recipes import resolve_recipe
    from reportgen.errors import SpecError
    from reportgen.spec.load import dotted, locate

    problems = []
    for i, section in enumerate(spec.sections):
        if not hasattr(section, "recipe") or not getattr(section, "visualize", True):
            continue
        lm = models.get(section.model)
        for name in dict.fromkeys([section.recipe, *getattr(section, "compare", [])]):
            recipe = resolve_recipe(name, section.params)
            size = ascent_size(lm, recipe)
            need = sample_cost(lm, _ascent_layers(section, lm), size, spec.precision).activation_bytes
            need = int(need * MEMORY_FACTOR)
            if need <= budget.free_bytes:
                continue
            if recipe.size and not lm.fixed_input:
                path, fix = ("sections", i, "params", "size"), "lower size"
            elif spec.models[section.model].input_size is not None:
                path, fix = ("models", section.model, "input_size"), "lower input_size"
            elif lm.fixed_input:  # the graph takes no other size
                path, fix = ("sections", i, "model"), "the model takes no other size; use a larger device"
            else:  # the model's own input size
                path, fix = ("sections", i, "model"), "set a smaller `params: {size: ...}`"
            problems.append(
                f"{locate(spec, path)}: {dotted(path)}: one sample needs {human_bytes(need)} "
                f"({size[0]}x{size[1]} px, recipe {name}), the device has {human_bytes(budget.free_bytes)} "
                f"({budget.kind}); {fix}"
            )
            break
    if problems:
        raise SpecError(problems)
