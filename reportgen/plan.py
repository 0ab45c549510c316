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

from reportgen.engine.recipes import Recipe, ascent_size
from reportgen.work import CLASS_TAG

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
    all_keys: list[str] = field(default_factory=list)  # of every result of the pass, stored or not

    @property
    def pending(self) -> int:
        return len(self.requests)

    @property
    def classes(self) -> bool:
        """A pass of class models (`class_model` sections): the objective is the model's class logits."""
        return self.layers == (CLASS_TAG,)

    @property
    def chunks(self) -> int:
        return math.ceil(self.pending / self.batch_size) if self.pending else 0

    def label(self) -> str:
        """The pass's progress line."""
        if self.classes:
            return f"class models {self.model} ({self.recipe.steps} steps)"
        layers = f"{len(self.layers)} layer{'s' if len(self.layers) != 1 else ''}"
        return f"ascent {self.model} ({layers}, {self.recipe.steps} steps)"

    @property
    def flops(self) -> int:
        """Estimated FLOPs of the pass: forward + backward to the input per step, per sample to compute."""
        return self.cost.flops * 2 * self.recipe.steps * self.pending

    def describe(self, workers: int = 1) -> str:
        """One line of the dry run; with `workers` > 1, how many pieces the workers get."""
        if not self.pending:
            return f"ascent {self.model} ({recipe_label(self.recipe)}): all {self.total} results stored"
        n = len(self.layers)
        what = (
            f"{self.pending} class model{'s' if self.pending != 1 else ''}"
            if self.classes
            else f"{self.pending} filters over {n} layer{'s' if n != 1 else ''} ({', '.join(self.layers)})"
        )
        n_pieces = len(ascent_pieces(self, workers)) if workers > 1 else 0
        pieces = f" in {n_pieces} pieces on {workers} workers" if n_pieces else ""
        return (
            f"ascent {self.model} ({recipe_label(self.recipe)}): {what} "
            f"at {self.size[0]}x{self.size[1]} px, "
            f"{self.recipe.steps} steps, batch {min(self.batch_size, self.pending)} ({self.chunks} chunk"
            f"{'s' if self.chunks != 1 else ''}{pieces}), est. {human_flops(self.flops)}, "
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
    workers: int = 1  # of the backend the passes run on (1: in this process)

    def shards(self, p: AscentPass) -> int:
        """Units of work of a pass: its chunks here, its pieces on a parallel backend's workers."""
        return len(ascent_pieces(p, self.workers)) if self.workers > 1 else p.chunks

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
        lines += [f"pass {i + 1}: {p.describe(self.workers)}" for i, p in enumerate(self.passes)]
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
    workers: int = 1,
) -> Plan:
    """Group requests (AscentRequest -> content key) per (model, recipe), drop the stored, size batches;
    class models (layer CLASS_TAG) get passes of their own. `workers`: of a parallel backend (the pieces
    each pass is cut into, `ascent_pieces`).

    A key requested twice (two sections, or two model entries with the same weights) is computed once,
    in the pass of its first request."""
    budget = budget or device_budget()
    groups: dict[tuple[str, Recipe, bool], list[tuple[Any, str]]] = {}
    seen: set[str] = set()
    for req, key in requests.items():
        if key in seen:
            continue
        seen.add(key)
        groups.setdefault((req.model, req.recipe, req.layer == CLASS_TAG), []).append((req, key))
    stored_keys = {key for key in seen if store.has(key, "json")}
    passes = []
    for (model_key, recipe, classes), items in groups.items():
        lm = models.get(model_key)
        size = ascent_size(lm, recipe)
        todo = [(r, k) for r, k in items if k not in stored_keys]
        if classes:  # class models run through the whole model, in a pass of their own
            pending_layers = [CLASS_TAG] if todo else []
            layer_groups = [(CLASS_TAG,)] if todo else []
        else:
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
                all_keys=[k for _, k in mine],
            )
            if classes:
                p.layers = (CLASS_TAG,)
            if pending:
                computed = [lm.model.layers[-1].name] if classes else list(group)
                p.cost = sample_cost(lm, computed, size, precision)
                p.batch_size = batch_size_for(p.cost, budget, batch_size)
            passes.append(p)
    sections = {sid: (len(set(keys)), len(set(keys) & stored_keys)) for sid, keys in owners.items()}
    return Plan(passes, budget, precision, sections, workers)


# A parallel backend gets about this many pieces of an ascent pass per worker: a few balance the load,
# and each reports progress when it finishes.
PIECES_PER_WORKER = 2


def ascent_pieces(p: AscentPass, workers: int) -> list[list[int]]:
    """Indices of a pass's pending requests cut into pieces for a parallel backend's workers: whole
    chunks (never splitting a `diversity` group, `engine.ascent.chunk_ranges`), about PIECES_PER_WORKER
    pieces per worker, and chunks no larger than needed to give every worker some (results do not depend
    on the chunks). The dry run counts these; `reportgen.parallel.run_passes` sends them."""
    from reportgen.engine.ascent import chunk_ranges

    size = max(1, min(p.batch_size, math.ceil(p.pending / max(1, workers))))
    chunks = [list(range(s, e)) for s, e in chunk_ranges([r.job() for r in p.requests], size)]
    per_piece = max(1, math.ceil(len(chunks) / max(1, workers * PIECES_PER_WORKER)))
    return [sum(chunks[i : i + per_piece], []) for i in range(0, len(chunks), per_piece)]


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


def check_samples_fit(spec: Any, models: Any, budget: DeviceBudget) -> None:
    """Raise SpecError when one ascent sample of a section needs more memory than the device has.

    A pass's batch shrinks to what fits, down to one sample; a sample that alone does not fit would be
    planned and then die with an out-of-memory error after the run started (`size: 100000`: 7152 GiB a
    sample vs an 11.2 GiB budget). The estimate is the planner's (`sample_cost` x MEMORY_FACTOR), checked
    for each section's own layers before any compute; the error names the field that set the size."""
    from reportgen.analyses import analysis_for
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
            layers = analysis_for(section.type).ascent_layers(section, lm)
            need = sample_cost(lm, layers, size, spec.precision).activation_bytes
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


# -- every kind of work: dataset passes, activation maps, gradient batches ------------------------------

# Forward-only passes keep no activations for a backward pass; batches of ~8 were best on the 2-core CPU
# (see DESIGN.md), larger ones only on a GPU.
MAX_FORWARD_BATCH = {"CPU": 8, "GPU": 256}
# A dataset pass runs in shards of at most this many images (file ranges): each is stored as it finishes
# (a killed run over a big folder resumes from the last one) and is the grain of work sent to a cluster.
SHARD_IMAGES = 1024


def forward_batch_for(cost: SampleCost, budget: DeviceBudget, override: int | None = None) -> int:
    """Images per forward batch: what fits the budget (no backward, so no MEMORY_FACTOR), capped."""
    if override:
        return int(override)
    cap = MAX_FORWARD_BATCH.get(budget.kind, 8)
    return int(max(1, min(cap, budget.free_bytes // max(1, cost.activation_bytes))))


def shard_ranges(n: int, workers: int = 1) -> list[tuple[int, int]]:
    """[start, end) file ranges of a dataset pass over `n` images: at least one per worker (when there
    are images enough), more for big folders, none larger than SHARD_IMAGES."""
    if n <= 0:
        return []
    count = min(n, max(workers, math.ceil(n / SHARD_IMAGES)))
    size = math.ceil(n / count)
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def shard_key(piece_keys: list[str] | tuple[str, ...], start: int, end: int) -> str:
    """Key of one shard's partial results: the pieces it computes and its file range."""
    from reportgen.store import content_key

    return content_key("dataset-shard", sorted(piece_keys), start, end)


@dataclass
class DatasetPass:
    """One streamed forward pass over (model, dataset, image selection), serving every section that asked.

    `pieces`: name -> content key of everything the requests want ("means:<layer>", "outputs"); `pending`:
    the names the store lacks. The pass computes only those, in shards of file ranges."""

    model: str
    dataset: str
    images: tuple[str, ...] | None  # None: every image of the dataset
    items: list[Any]  # ImageItem, in pass order (rows of every stored array)
    pieces: dict[str, str]
    pending: list[str]
    sections: list[str]
    batch_size: int = 1
    cost: SampleCost = field(default_factory=lambda: SampleCost(0, 0))
    shards: list[tuple[int, int]] = field(default_factory=list)
    cached_images: int = 0  # images whose shard of the pending pieces is stored (a killed run's work)

    @property
    def layers(self) -> tuple[str, ...]:
        """Layers to compute (pending pieces only), in request order."""
        return tuple(p.split(":", 1)[1] for p in self.pending if p.startswith("means:"))

    @property
    def peaks(self) -> tuple[str, ...]:
        """Pending top-k / bottom-k pieces ("topk:<k>:<layer>"), in request order."""
        return tuple(p for p in self.pending if p.startswith(("topk:", "bottomk:")))

    @property
    def deepest(self) -> list[str]:
        """Every layer the pass computes (the planner's cost estimate)."""
        return [*self.layers, *(p.split(":", 2)[2] for p in self.peaks)]

    @property
    def outputs(self) -> bool:
        return "outputs" in self.pending

    @property
    def pending_keys(self) -> list[str]:
        return [self.pieces[p] for p in self.pending]

    def shard_key(self, start: int, end: int) -> str:
        return shard_key(self.pending_keys, start, end)

    @property
    def cached(self) -> int:
        return len(self.items) if not self.pending else self.cached_images

    @property
    def flops(self) -> int:
        return self.cost.flops * (len(self.items) - self.cached_images) if self.pending else 0

    def describe(self) -> str:
        what = ", ".join(sorted(self.pieces)) or "nothing"
        chosen = "all" if self.images is None else "chosen"
        head = f"dataset {self.model} over {self.dataset} ({len(self.items)} {chosen} images; {what})"
        if not self.pending:
            return f"{head}: all {len(self.pieces)} results stored"
        return (
            f"{head}: {len(self.pending)} of {len(self.pieces)} results to compute in "
            f"{len(self.shards)} shard{'s' if len(self.shards) != 1 else ''}, batch {self.batch_size}, "
            f"est. {human_flops(self.flops)}, ~{human_bytes(self.cost.activation_bytes)} a sample; "
            f"{self.cached} of {len(self.items)} images stored"
        )

    def row(self) -> dict[str, Any]:
        return {
            "kind": "dataset",
            "model": self.model,
            "dataset": self.dataset,
            "sections": self.sections,
            "items": len(self.items),
            "cached": self.cached,
            "batch": self.batch_size if self.pending else 0,
            "flops": self.flops,
            "bytes_per_sample": self.cost.activation_bytes,
            "shards": len(self.shards),
        }


@dataclass
class ImagePass:
    """Activation maps or gradient batches of one kind and model over chosen images, each request stored
    under its key with this pass's batch: by the executor (`reportgen.execute.execute_images`) when the
    request names an engine (activation maps, saliency, occlusion), else by its section in `build`."""

    kind: str
    model: str
    requests: list[tuple[str, Any]]  # (section id, ImageRequest)
    stored: set[str]  # keys of the requests the store holds
    batch_size: int = 1
    cost: SampleCost = field(default_factory=lambda: SampleCost(0, 0))
    workers: int = 1  # >1: each pending request runs as image-range shards on a parallel backend's workers
    # request key -> its shards ((start, end), shard key), filled by the executor on a parallel backend
    shard_keys: dict[str, list[tuple[tuple[int, int], str]]] = field(default_factory=dict)

    @property
    def shards(self) -> int:
        """Units of work: one per pending request here, its image ranges (>= 1 per worker) when parallel."""
        todo = [r for _, r in self.requests if r.key not in self.stored]
        return sum(len(shard_ranges(r.images, self.workers)) if self.workers > 1 else 1 for r in todo)

    @property
    def sections(self) -> list[str]:
        return list(dict.fromkeys(sid for sid, _ in self.requests))

    @property
    def items(self) -> int:
        return sum(r.images for _, r in self.requests)

    @property
    def cached(self) -> int:
        return sum(r.images for _, r in self.requests if r.key in self.stored)

    @property
    def pending(self) -> bool:
        return any(r.key not in self.stored for _, r in self.requests)

    @property
    def flops(self) -> int:
        todo = [r for _, r in self.requests if r.key not in self.stored]
        return sum(self.cost.flops * ((2 if r.backward else 1) * r.samples + r.forward_samples) for r in todo)

    @property
    def bytes_per_sample(self) -> int:
        backward = any(r.backward for _, r in self.requests)
        return int(self.cost.activation_bytes * (MEMORY_FACTOR if backward else 1))

    def describe(self) -> str:
        samples = sum(r.samples + r.forward_samples for _, r in self.requests if r.key not in self.stored)
        head = f"{self.kind} {self.model}"
        if not self.pending:
            return f"{head}: all {self.items} images stored"
        shards = f" in {self.shards} shards on {self.workers} workers" if self.workers > 1 else ""
        return (
            f"{head}: {samples} samples over {self.items - self.cached} images{shards}, "
            f"batch {self.batch_size}, "
            f"est. {human_flops(self.flops)}, ~{human_bytes(self.bytes_per_sample)} a sample; "
            f"{self.cached} of {self.items} images stored"
        )

    def row(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self.model,
            "sections": self.sections,
            "items": self.items,
            "cached": self.cached,
            "batch": self.batch_size if self.pending else 0,
            "flops": self.flops,
            "bytes_per_sample": self.bytes_per_sample if self.pending else 0,
            "shards": self.shards,
        }


def plan_dataset(
    board: Any,
    store: Any,
    models: Any,
    datasets: Any,
    budget: DeviceBudget,
    precision: str = "float32",
    batch_size: int | None = None,
    workers: int = 1,
) -> list[DatasetPass]:
    """Merge the dataset requests of all sections into one pass per (model, dataset, image selection)."""
    from reportgen.work import outputs_key, piece_key

    groups: dict[tuple[str, str, tuple[str, ...] | None], list[tuple[str, Any]]] = {}
    for sid, req in board.dataset:
        groups.setdefault((req.model, req.dataset, req.images), []).append((sid, req))
    passes = []
    for (model, dataset, images), reqs in groups.items():
        lm, ds = models.get(model), datasets.get(dataset)
        items = ds.items if images is None else ds.select(list(images))
        pieces: dict[str, str] = {}
        for _, req in reqs:
            for piece in req.pieces():
                pieces.setdefault(piece, piece_key(lm, ds, piece))
        if any(req.outputs for _, req in reqs):
            pieces["outputs"] = outputs_key(lm, ds, images)
        pending = [name for name, key in pieces.items() if not store.has(key, "npz")]
        p = DatasetPass(
            model, dataset, images, list(items), pieces, pending, list(dict.fromkeys(s for s, _ in reqs))
        )
        if pending:
            deepest = [*p.deepest, *([lm.model.layers[-1].name] if p.outputs else [])]
            p.cost = sample_cost(lm, deepest, lm.input_size, precision)
            p.batch_size = forward_batch_for(p.cost, budget, batch_size)
            p.shards = shard_ranges(len(items), workers)
            p.cached_images = sum(e - s for s, e in p.shards if store.has(p.shard_key(s, e), "npz"))
        passes.append(p)
    return passes


def plan_images(
    board: Any,
    store: Any,
    models: Any,
    budget: DeviceBudget,
    precision: str = "float32",
    batch_size: int | None = None,
    workers: int = 1,
) -> list[ImagePass]:
    """Group activation-map and gradient requests per (kind, model); size their batches from the device's
    memory (or `batch_size`) and record each request's batch on the board. With `workers` > 1 each
    pending request is planned as image-range shards, at least one per worker."""
    groups: dict[tuple[str, str], list[tuple[str, Any]]] = {}
    for sid, req in board.images:
        groups.setdefault((req.kind, req.model), []).append((sid, req))
    passes = []
    for (kind, model), reqs in groups.items():
        lm = models.get(model)
        layers = list(dict.fromkeys(ly for _, r in reqs for ly in r.layers))
        p = ImagePass(kind, model, reqs, {r.key for _, r in reqs if store.has(r.key, "npz")}, workers=workers)
        p.cost = sample_cost(lm, layers, lm.input_size, precision)
        backward = any(r.backward for _, r in reqs)
        p.batch_size = (
            batch_size_for(p.cost, budget, batch_size)
            if backward
            else forward_batch_for(p.cost, budget, batch_size)
        )
        for _, r in reqs:
            board.batch[r.key] = p.batch_size
        passes.append(p)
    return passes


KINDS = ("ascent", "dataset", "activations", "gradient")  # every kind of pass, in the order they run


@dataclass
class WorkPlan:
    """Every pass of a run: ascent (its own planner, `Plan`), dataset passes, activation maps, gradients."""

    ascent: Plan
    dataset: list[DatasetPass]
    images: list[ImagePass]
    owners: dict[str, list[str]] = field(default_factory=dict)  # ascent: section id -> keys

    @property
    def pending(self) -> int:
        """Results still to compute, over every kind."""
        return (
            self.ascent.pending
            + sum(len(p.pending) for p in self.dataset)
            + sum(len(p.requests) - len(p.stored) for p in self.images)
        )

    def lines(self) -> list[str]:
        """Human-readable plan: a headline over every kind, one line per pass (with the sections it serves),
        one per section with ascent results. A spec with ascent work only gets the ascent planner's lines."""
        if not (self.dataset or self.images):
            return self.ascent.lines()
        rows = self.rows()
        passes: list[Any] = [*self.ascent.passes, *self.dataset, *self.images]
        todo = sum(1 for r in rows if r["cached"] < r["items"])
        kinds = ", ".join(
            f"{n} {kind}" for kind in KINDS if (n := sum(1 for r in rows if r["kind"] == kind))
        )
        what = (
            f"est. {human_flops(sum(r['flops'] for r in rows))} in all"
            if todo
            else "every result is stored"
        )
        lines = [
            f"{todo} of {len(rows)} pass{'es' if len(rows) != 1 else ''} ({kinds}) to run on "
            f"{self.ascent.budget.describe()}, precision {self.ascent.precision}: {what}"
        ]
        texts = [p.describe(self.ascent.workers) for p in self.ascent.passes]
        texts += [p.describe() for p in passes[len(self.ascent.passes) :]]
        lines += [
            f"pass {i + 1}: {text}; serves {', '.join(r['sections'])}"
            for i, (text, r) in enumerate(zip(texts, rows, strict=True))
        ]
        lines += [
            f"section {sid}: {stored} of {n} ascent results stored"
            for sid, (n, stored) in self.ascent.sections.items()
        ]
        return lines

    def rows(self) -> list[dict[str, Any]]:
        """The plan for machines (`run --dry-run --json`): one row per pass of every kind."""
        rows = []
        for p in self.ascent.passes:
            keys = set(p.all_keys)
            rows.append(
                {
                    "kind": "ascent",
                    "model": p.model,
                    "sections": [sid for sid, ks in self.owners.items() if keys & set(ks)],
                    "items": p.total,
                    "cached": p.stored,
                    "batch": p.batch_size if p.pending else 0,
                    "flops": p.flops,
                    "bytes_per_sample": int(p.cost.activation_bytes * MEMORY_FACTOR),
                    "shards": self.ascent.shards(p),
                }
            )
        return rows + [p.row() for p in self.dataset] + [p.row() for p in self.images]


def plan_work(
    ctx: Any, memory_share: float = 1.0, batch_size: int | None = None, workers: int = 1
) -> WorkPlan:
    """The whole run's plan from the requests sections declared in `prepare` (ctx: a RunContext)."""
    ascent = ctx.ascent.plan(memory_share=memory_share, workers=workers)
    board = ctx.work
    dataset = plan_dataset(
        board, ctx.store, ctx.models, ctx.datasets, ascent.budget, ctx.spec.precision, batch_size, workers
    )
    images = plan_images(
        board, ctx.store, ctx.models, ascent.budget, ctx.spec.precision, batch_size, workers
    )
    return WorkPlan(ascent, dataset, images, ctx.ascent.owners)
