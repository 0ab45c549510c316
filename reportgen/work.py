"""Work requests: what sections need from the engines, as plain data declared in `prepare`.

A section never runs an engine itself to get what it needs: in `prepare` it adds requests to the run's
`WorkBoard` (`ctx.work`), the planner (`reportgen.plan.plan_work`) merges the requests of all sections,
drops what the store holds and sizes batches, the executor (`reportgen.execute`) runs what is left, and
`build` only reads results from the store. Requests are frozen dataclasses of strings and numbers, so
they hash (the planner merges them), print (`--dry-run`) and travel to cluster workers unchanged.

Kinds (the `kind` of a planned pass):
- `ascent`: activation maximization (`AscentRequest`: filters, class models with layer `CLASS_TAG`, circuit
  visualisations), grouped into passes by `reportgen.engine.scheduler`, which `plan_work` lists first.
- `dataset`: a streamed forward pass over a dataset's images (`DatasetRequest`): per-image channel means
  of layers, class outputs. One pass per (model, dataset, image selection) serves every section.
- `activations` / `gradient`: batched work over a few chosen images (`ImageRequest`): activation maps;
  Grad-CAM, saliency, occlusion batches. The planner lists them, sizes their batch and counts what the
  store holds; the executor runs them before any section builds (`build` reads them), here or, with a
  parallel backend, as image-range shards on the workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from reportgen.store import content_key

if TYPE_CHECKING:
    from reportgen.engine.recipes import Recipe

# The `layer` of a class-model request (its `filter` is the class index): distinct from every layer name,
# part of each class sample's seed, and the mark of a class-model pass (`reportgen.engine.class_model`).
CLASS_TAG = "__class_model__"


@dataclass(frozen=True)
class AscentRequest:
    model: str
    layer: str
    filter: int
    recipe: Recipe
    seed: int
    objective: str = "channel"  # see reportgen.engine.ascent.AscentJob
    position: tuple[int, int] | None = None
    direction: tuple[float, ...] | None = None
    variant: int = 0
    diversity: int = 1

    def job(self) -> Any:
        from reportgen.engine.ascent import AscentJob

        return AscentJob(
            self.layer, self.filter, self.seed, self.objective, self.position, self.direction,
            self.variant, self.diversity,
        )  # fmt: skip


# Bump when the dataset pass's numbers change, so that stored results are recomputed.
DATASET_VERSION = "1"
# What a dataset pass can compute per layer. "means": the (N, C) spatial mean of every channel; "topk":
# each channel's `k` images with the largest peak over the dataset and where the peak is (exemplars);
# "bottomk": the `k` most negative peaks of the layer's output before its fused ReLU. A statistic is one
# more value here, one more reduction in the pass, and one more key per layer.
STATISTICS = ("means", "topk", "bottomk")
PEAKS = ("topk", "bottomk")  # the statistics that keep k images per channel


@dataclass(frozen=True)
class DatasetRequest:
    """What one section needs from one streamed pass over a dataset.

    `images`: None for every image of the dataset (rankings), else the names of the chosen images (a
    predictions section over a few images of a big folder reads only those). `layers`: layers whose
    per-image statistics (`stats`) are needed. `outputs`: whether the model's class outputs are needed.
    `k`: images per channel kept by the "topk" / "bottomk" statistics."""

    model: str
    dataset: str
    layers: tuple[str, ...] = ()
    outputs: bool = False
    images: tuple[str, ...] | None = None
    stats: tuple[str, ...] = ("means",)
    k: int = 0

    def __post_init__(self) -> None:
        unknown = [s for s in self.stats if s not in STATISTICS]
        if unknown:
            raise ValueError(f"dataset statistic {unknown[0]!r} is not one of {', '.join(STATISTICS)}")
        if any(s in PEAKS for s in self.stats) and self.k < 1:
            raise ValueError("the topk / bottomk statistics need k >= 1")

    def pieces(self) -> list[str]:
        """Names of the pieces this request needs from its pass: "means:<layer>", "topk:<k>:<layer>"."""
        return [
            f"{stat}:{self.k}:{layer}" if stat in PEAKS else f"{stat}:{layer}"
            for layer in self.layers
            for stat in self.stats
        ]


@dataclass(frozen=True)
class ImageRequest:
    """Batched work of one section over chosen images, stored under `key` (the section's cache key).

    `samples`: forward (+ backward) samples it costs (an occlusion section runs one per mask per image);
    `layers`: the deepest layers the work computes (the planner's cost estimate); `backward`: whether
    those samples take gradients (Grad-CAM, saliency), which roughly doubles their FLOPs;
    `forward_samples`: forward-only samples on top (the sliding patch of an occlusion section, which
    only reads probabilities beside its Grad-CAMs). `engine`: the function that computes the
    request before any section builds, as "module.function" inside `reportgen.engine` (a gradient
    request's function takes decoded pixels: `reportgen.execute.pixel_engine`), with the chosen images
    (`names`) and the engine's parameters (`params`, (name, value) pairs of plain data); the request
    travels as is to the cluster workers that compute shards of its images."""

    kind: str  # "activations" | "gradient"
    model: str
    dataset: str
    key: str
    images: int
    samples: int
    layers: tuple[str, ...]
    backward: bool = False
    forward_samples: int = 0
    engine: str = ""
    names: tuple[str, ...] = ()
    params: tuple[tuple[str, Any], ...] = ()


def means_key(lm: Any, ds: Any, layer: str) -> str:
    """Key of one layer's (N, C) channel means over every image of the dataset."""
    return content_key(
        "class_ranking",
        DATASET_VERSION,
        lm.digest,
        lm.preprocessing.model_dump(),
        lm.channels,
        ds.digest,
        layer,
        lm.input_size,
    )


def peaks_key(lm: Any, ds: Any, layer: str, stat: str, k: int) -> str:
    """Key of one layer's per-channel top-k ("topk") or bottom-k ("bottomk") images and peak positions."""
    return content_key(
        "exemplars",
        DATASET_VERSION,
        lm.digest,
        lm.preprocessing.model_dump(),
        lm.channels,
        ds.digest,
        layer,
        lm.input_size,
        stat,
        k,
    )


def parse_peak(piece: str) -> tuple[str, int, str]:
    """"topk:<k>:<layer>" -> ("topk", k, layer)."""
    stat, k, layer = piece.split(":", 2)
    return stat, int(k), layer


def piece_key(lm: Any, ds: Any, piece: str, images: tuple[str, ...] | None = None) -> str:
    """The content key of a piece of a dataset pass, by its name (see `DatasetRequest.pieces`)."""
    if piece == "outputs":
        return outputs_key(lm, ds, images)
    stat = piece.split(":", 1)[0]
    if stat in PEAKS:
        _, k, layer = parse_peak(piece)
        return peaks_key(lm, ds, layer, stat, k)
    return means_key(lm, ds, piece.split(":", 1)[1])


def outputs_key(lm: Any, ds: Any, images: tuple[str, ...] | None = None) -> str:
    """Key of the model's (N, K) class outputs over every image of the dataset, or over `images`."""
    parts: tuple[Any, ...] = () if images is None else (list(images),)
    return content_key(
        "dataset_outputs",
        DATASET_VERSION,
        lm.digest,
        lm.preprocessing.model_dump(),
        lm.channels,
        ds.digest,
        lm.input_size,
        *parts,
    )


@dataclass
class WorkBoard:
    """Requests of all sections of a run, in declaration order, with the section ids that made them."""

    dataset: list[tuple[str, DatasetRequest]] = field(default_factory=list)
    images: list[tuple[str, ImageRequest]] = field(default_factory=list)
    batch: dict[str, int] = field(default_factory=dict)  # ImageRequest key -> the planner's batch size
    fresh: set[str] = field(default_factory=set)  # dataset pieces the executor stored in this run
    counted: set[str] = field(default_factory=set)  # fresh pieces already counted as computed
    devices: set[str] = field(default_factory=set)  # where dataset shards ran (cluster workers)
    pids: set[int] = field(default_factory=set)  # processes that computed dataset shards
    current: str = ""  # the section whose `prepare` is running

    @contextmanager
    def section(self, sid: str) -> Iterator[None]:
        """Requests added inside are owned by section `sid` (the plan lists the sections a pass serves)."""
        previous, self.current = self.current, sid
        try:
            yield
        finally:
            self.current = previous

    def add(self, request: DatasetRequest | ImageRequest) -> None:
        if isinstance(request, DatasetRequest):
            self.dataset.append((self.current, request))
        else:
            self.images.append((self.current, request))

    def batch_for(self, key: str, default: int) -> int:
        """The planner's batch for an image request (`default` when the section was not planned)."""
        return self.batch.get(key, default)
