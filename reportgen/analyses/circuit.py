"""`circuit`: which input channels one filter of a Conv2D layer is built from, read off its kernel.

Input channel c contributes to filter f through the kxk slice kernel[:, :, c, f]: its L2 norm says how
much the filter draws on that channel, the sign of its sum whether the channel excites (+) or inhibits
(-) the filter on a uniform response. The strongest input channels are visualised where they are made,
in the layer that produces this layer's input (found by following the graph back through pooling,
activations, normalisation and the like), with the batched ascent engine, like `filters`. With the
`neuron` objective and a `position`, the filter's image maximises its unit there and each input channel's
image the unit of the earlier layer under the centre of that unit's receptive field (`input_position`).
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field

from reportgen.analyses.base import Analysis, Artifact, RunContext, SectionOutput, SectionResult
from reportgen.analyses.shared import check_position, dead_explanation, dead_label, filter_requests, map_shape
from reportgen.engine.receptive_field import receptive_field
from reportgen.engine.recipes import RECIPES, ascent_size, params_json_schema, resolve_recipe
from reportgen.errors import ReportgenError, SpecError
from reportgen.imaging import chart_png, chart_text, colormap
from reportgen.models import LoadedModel
from reportgen.spec.fields import SectionBase
from reportgen.store import content_key
from reportgen.work import AscentRequest


class CircuitSection(SectionBase):
    type: Literal["circuit"]
    model: str
    layer: str
    filter: int = Field(ge=0)
    top: int = Field(8, ge=1, description="Input channels shown.")
    visualize: bool = Field(True, description="Visualize the top input channels with the filters engine.")
    recipe: str = "keras-example"
    params: dict[str, float | int | bool] = Field(
        default_factory=dict, description="Recipe overrides.", json_schema_extra=params_json_schema
    )
    objective: Literal["channel", "neuron"] = Field(
        "channel",
        description="What each image maximises: a channel's mean over its map (channel), or one unit "
        "(neuron): at the centre of the map, for the filter and its input channels alike, or at `position`.",
    )
    position: list[int] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="neuron: [y, x] of the filter's unit in the layer's map (default its centre); the input "
        "channels' units are those under the centre of its receptive field.",
    )

HEATMAP_SIDE = 96  # kxk weights are upscaled (nearest) to about this many pixels a side
DIVERGING = "RdBu_r"  # red = positive weight, blue = negative, white = 0


def conv_layer(lm: LoadedModel, name: str, where: str) -> Any:
    """The named layer if it is a Conv2D, else a located error listing the model's Conv2D layers."""
    import keras

    layer = lm.layer(name, where)
    if not isinstance(layer, keras.layers.Conv2D):
        convs = [ly.name for ly in lm.model.layers if isinstance(ly, keras.layers.Conv2D)]
        listing = ", ".join(convs[:12]) + (", ..." if len(convs) > 12 else "")
        raise ReportgenError(
            f"{where}: layer {name!r} is a {type(layer).__name__}, not a Conv2D; a circuit reads a Conv2D "
            f"kernel. Conv2D layers of model {lm.key!r}: {listing or 'none'}"
        )
    return layer


def kernel_slices(layer: Any, filt: int) -> dict[str, np.ndarray]:
    """kernel[:, :, c, filt] for every input channel c the filter reads (a group's channels for grouped
    convolutions), their model-wide input channel indices, and the filter's bias."""
    kernel = np.asarray(layer.kernel.numpy(), np.float32)  # (kh, kw, in_channels / groups, filters)
    per_group_in = kernel.shape[2]
    group = filt // (kernel.shape[3] // layer.groups)
    bias = np.asarray(layer.bias.numpy()[filt], np.float32) if layer.use_bias else np.float32(0.0)
    return {
        "slices": kernel[:, :, :, filt],
        "channels": np.arange(group * per_group_in, (group + 1) * per_group_in, dtype=np.int32),
        "bias": np.asarray(bias, np.float32),
    }


def channel_stats(slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(L2 norm, sum) of each input channel's kxk slice: slices is (kh, kw, channels)."""
    return np.sqrt((slices.astype(np.float64) ** 2).sum(axis=(0, 1))), slices.astype(np.float64).sum(
        axis=(0, 1)
    )


def input_position(
    lm: LoadedModel, layer: str, prev: str, position: tuple[int, int], size: tuple[int, int]
) -> tuple[int, int]:
    """The unit of `prev`'s map whose receptive field is centred closest to that of `layer`'s unit at
    `position` (ties towards larger indices), at ascent input `size`: the input channels' units that the
    filter's unit reads through the centre of its kernel (for a conv right after `prev` its centre tap;
    through pooling, the pooled window's). Unit i of an axis (jump j, offset o, size n) is centred on
    i j + o + (n - 1) / 2, so the closest unit is floor((2 i j_a + 2 (o_a - o_b) + n_a - n_b + j_b) / 2 j_b),
    in integers; clipped to the map."""
    own, src = receptive_field(lm.model, layer, size), receptive_field(lm.model, prev, size)
    out = []
    for i, a, b, n in zip(position, (own.y, own.x), (src.y, src.x), map_shape(lm, prev, size), strict=True):
        j = (2 * i * a.jump + 2 * (a.offset - b.offset) + a.size - b.size + b.jump) // (2 * b.jump)
        out.append(min(max(j, 0), n - 1))
    return out[0], out[1]


def at(position: tuple[int, int] | None) -> dict[str, list[int]]:
    """An artifact's `position` metric: the neuron's [y, x] where the spec gave one."""
    return {} if position is None else {"position": list(position)}


def sign_word(total: float) -> str:
    return "excitatory" if total > 0 else "inhibitory" if total < 0 else "zero"


def _has_kernel(op: Any) -> bool:
    return any(hasattr(op, a) for a in ("kernel", "depthwise_kernel", "pointwise_kernel"))


def previous_layer(model: Any, name: str) -> tuple[str | None, list[str]]:
    """The layer whose output channels are this layer's input channels, and the layers passed on the way.

    Walks back from the layer's input through single-input layers without a kernel that keep the channel
    count (pooling, activations, batch norm, dropout, padding); stops at the first layer with a kernel,
    a merge (Add, Concatenate: its outputs are what the kernel reads) or a channel-changing layer.
    None when the input channels are the model's own input (e.g. RGB).
    """
    import keras

    tensor = model.get_layer(name).input
    passed: list[str] = []
    while True:
        history = tensor._keras_history
        op = history.operation
        if isinstance(op, keras.layers.InputLayer):
            return None, passed
        inputs = op._inbound_nodes[history.node_index].input_tensors
        if len(inputs) != 1 or _has_kernel(op) or inputs[0].shape[-1] != tensor.shape[-1]:
            return op.name, passed
        passed.append(op.name)
        tensor = inputs[0]


def _bar_chart(
    norms: np.ndarray, sums: np.ndarray, channels: np.ndarray, top: list[int], title: str
) -> bytes:
    """All input-channel norms, coloured by sign, the shown ones labelled; matplotlib Agg, 150 dpi."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 2.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = np.where(sums > 0, "#c0392b", np.where(sums < 0, "#2e6fb0", "#999999"))
    ax.bar(np.arange(len(norms)), norms, color=colors, width=0.85)
    for i in top:
        ax.annotate(
            str(int(channels[i])),
            (i, norms[i]),
            ha="center",
            va="bottom",
            fontsize=7,
            xytext=(0, 1),
            textcoords="offset points",
        )
    if len(norms) <= 32:
        ax.set_xticks(np.arange(len(norms)), [str(int(c)) for c in channels], fontsize=6)
    else:
        ax.set_xticks([])
    ax.set_xlabel("input channel (red: excitatory, blue: inhibitory)", fontsize=8)
    ax.set_ylabel("L2 norm of kernel slice", fontsize=8)
    ax.set_title(chart_text(title), fontsize=9)
    ax.tick_params(labelsize=7)
    ax.set_xlim(-0.8, len(norms) - 0.2)
    return chart_png(fig, ax)


def _heatmap(weights: np.ndarray, limit: float) -> np.ndarray:
    """kxk weights -> RGB on a diverging scale symmetric around 0, upscaled nearest to ~HEATMAP_SIDE."""
    rgb = (
        colormap(weights, DIVERGING, -limit, limit) if limit > 0 else colormap(weights * 0, DIVERGING, -1, 1)
    )
    factor = max(1, math.ceil(HEATMAP_SIDE / max(weights.shape)))
    img = Image.fromarray(rgb).resize((weights.shape[1] * factor, weights.shape[0] * factor), Image.NEAREST)
    return np.asarray(img)


class CircuitAnalysis(Analysis):
    section = CircuitSection
    version = "1"

    def ascent_layers(self, section: Any, model: Any) -> list[str]:
        """The circuit's layer: its input channels lie before it."""
        return [section.layer]

    def default_title(self, section: CircuitSection) -> str:
        return f"Circuit of {section.layer} filter {section.filter}"

    # -- shared by prepare and build ----------------------------------------------------------
    def _kernel(
        self, section: CircuitSection, ctx: RunContext, index: int
    ) -> tuple[LoadedModel, dict[str, Any]]:
        lm = ctx.models.get(section.model)
        layer = conv_layer(lm, section.layer, ctx.where(index, "layer"))
        filters = int(layer.kernel.shape[-1])
        if section.filter >= filters:
            raise ReportgenError(
                f"{ctx.where(index, 'filter')}: layer {section.layer!r} has {filters} filters "
                f"(0 to {filters - 1}); filter {section.filter} does not exist"
            )
        key = content_key("circuit", self.version, lm.digest, section.layer, section.filter)
        return lm, ctx.cached(key, lambda: kernel_slices(layer, section.filter))

    def _plan(self, section: CircuitSection, ctx: RunContext, index: int) -> dict[str, Any]:
        lm, arrays = self._kernel(section, ctx, index)
        norms, sums = channel_stats(arrays["slices"])
        top = [int(i) for i in np.argsort(-norms, kind="stable")[: section.top]]
        prev, passed = previous_layer(lm.model, section.layer)
        own_pos, input_pos = self._positions(section, ctx, index, lm, prev)
        return {
            "lm": lm,
            "arrays": arrays,
            "norms": norms,
            "sums": sums,
            "top": top,
            "prev": prev,
            "passed": passed,
            "position": own_pos,
            "input_position": input_pos,
        }

    @staticmethod
    def _positions(
        section: CircuitSection, ctx: RunContext, index: int, lm: LoadedModel, prev: str | None
    ) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        """The neuron positions of the filter and of its input channels: None (each map's centre) without
        `position`; a position outside the layer's map is a located error, as in `filters`."""
        if section.objective != "neuron" or section.position is None or not section.visualize:
            return None, None
        where = ctx.where(index, "position")
        size = ascent_size(lm, resolve_recipe(section.recipe, section.params))
        own = check_position(lm, section.layer, section.position, [size], where)
        if prev is None:
            return own, None
        try:
            return own, input_position(lm, section.layer, prev, own, size)
        except ReportgenError as exc:  # a layer between them that moves positions: say where it was asked
            raise SpecError([f"{where}: position: {exc}"]) from None

    def _requests(
        self, section: CircuitSection, ctx: RunContext, plan: dict[str, Any]
    ) -> tuple[AscentRequest, list[AscentRequest]]:
        # a circuit is about one filter and its input channels: the objectives of a whole layer (layer,
        # direction) and diversity have no place here; a neuron is at `position` (and the input channels'
        # units under it) or each map's centre unit
        unit = {"objective": section.objective, "position": plan["position"]}
        own = filter_requests(
            section, ctx, section.layer, [section.filter], section.recipe, section.params, unit
        )
        inputs = []
        if plan["prev"] is not None:
            channels = [int(plan["arrays"]["channels"][i]) for i in plan["top"]]
            unit = {"objective": section.objective, "position": plan["input_position"]}
            inputs = filter_requests(
                section, ctx, plan["prev"], channels, section.recipe, section.params, unit
            )
        return own[0], inputs

    # -- phases -------------------------------------------------------------------------------
    def prepare(self, section: CircuitSection, ctx: RunContext, index: int) -> None:
        if not section.visualize:
            self._kernel(section, ctx, index)  # validate the layer and filter before anything runs
            return
        own, inputs = self._requests(section, ctx, self._plan(section, ctx, index))
        for req in [own, *inputs]:
            ctx.ascent.request(req)

    def build(
        self, section: CircuitSection, ctx: RunContext, out: SectionOutput, index: int
    ) -> SectionResult:
        plan = self._plan(section, ctx, index)
        arrays, norms, sums, top, prev = (
            plan["arrays"],
            plan["norms"],
            plan["sums"],
            plan["top"],
            plan["prev"],
        )
        slices, channels = arrays["slices"], arrays["channels"]
        energy = float((norms**2).sum())
        layer, f, model = section.layer, section.filter, section.model
        artifacts: list[Artifact] = []
        notes: list[str] = []

        chart = out.bytes(
            f"{layer}_f{f:04d}_norms.png",
            _bar_chart(norms, sums, channels, top, f"{layer} filter {f}: input-channel norms"),
        )
        artifacts.append(Artifact("chart", chart, model, layer, f, {"input_channels": len(norms)}))
        limit = float(np.abs(slices[:, :, top]).max()) if top else 0.0

        own_vis, vis = None, {}
        if section.visualize:
            own_req, input_reqs = self._requests(section, ctx, plan)
            path, meta = ctx.ascent.result(own_req)
            own_vis = {"path": out.copy(f"{layer}_f{f:04d}.png", path), **meta}
            artifacts.append(
                Artifact(
                    "filter",
                    own_vis["path"],
                    model,
                    layer,
                    f,
                    {
                        "activation": meta["activation"],
                        "dead": meta["dead"],
                        "objective": section.objective,
                        **at(plan["position"]),
                    },
                )
            )
            for req in input_reqs:
                path, meta = ctx.ascent.result(req)
                rel = out.copy(f"{prev}_f{req.filter:04d}.png", path)
                vis[req.filter] = {"path": rel, **meta}
                artifacts.append(
                    Artifact(
                        "filter",
                        rel,
                        model,
                        prev,
                        req.filter,
                        {
                            "activation": meta["activation"],
                            "dead": meta["dead"],
                            "feeds": f"{layer}/{f}",
                            "objective": section.objective,
                            **at(plan["input_position"]),
                        },
                    )
                )
            if section.objective == "neuron" and plan["position"] is None:
                notes.append(
                    "Each image maximises one unit at the centre of its channel's map (objective: neuron), "
                    "not the channel's mean over the map."
                )
            elif section.objective == "neuron":
                (y, x), inner = plan["position"], plan["input_position"]
                below = (
                    f"; each input channel's image maximises its unit at [{inner[0]}, {inner[1]}] of "
                    f"{prev}'s map, the one under the centre of that unit's receptive field"
                    if inner is not None
                    else ""
                )
                notes.append(
                    f"The filter's image maximises its unit at [{y}, {x}] of {layer}'s map (objective: "
                    f"neuron, position){below}; not the channel's mean over the map."
                )
            if prev is None:
                notes.append(
                    f"{layer} reads the model's input channels directly; there is no earlier layer "
                    "whose channels could be visualised."
                )

        rows = []
        for rank, i in enumerate(top, 1):
            c = int(channels[i])
            heat = out.image(f"{layer}_f{f:04d}_in{c:04d}_weights.png", _heatmap(slices[:, :, i], limit))
            row = {
                "rank": rank,
                "channel": c,
                "norm": float(norms[i]),
                "sum": float(sums[i]),
                "sign": "+" if sums[i] > 0 else "-" if sums[i] < 0 else "0",
                "effect": sign_word(sums[i]),
                "share": float(norms[i] ** 2 / energy) if energy else 0.0,
                "heatmap": heat,
                "vis": vis.get(c),
            }
            rows.append(row)
            artifacts.append(
                Artifact(
                    "heatmap",
                    heat,
                    model,
                    layer,
                    f,
                    {"input_channel": c, "norm": row["norm"], "sum": row["sum"], "effect": row["effect"]},
                )
            )
        csv_rel = out.bytes(f"{layer}_f{f:04d}_inputs.csv", self._csv(norms, sums, channels, energy))
        artifacts.append(Artifact("table", csv_rel, model, layer, f, {"rows": len(norms)}))
        if plan["passed"] and prev is not None:
            notes.append(
                f"Input channels are the outputs of {prev}, passed through "
                f"{', '.join(reversed(plan['passed']))} on the way to {layer}."
            )
        kh, kw = slices.shape[:2]
        recipe = resolve_recipe(section.recipe, section.params)
        size = ascent_size(ctx.models.get(model), recipe)
        return SectionResult(
            context={
                "model": model,
                "layer": layer,
                "filter": f,
                "kernel": [kh, kw],
                "inputs": len(norms),
                "bias": float(arrays["bias"]),
                "rows": rows,
                "chart": chart,
                "csv": csv_rel,
                "limit": limit,
                "prev": prev,
                "own": own_vis,
                "visualize": section.visualize,
                "objective": section.objective,
                "recipe": section.recipe,
                "recipe_description": RECIPES[section.recipe].description,
                "params": recipe.as_dict(),
                "size": size,  # the recipe line shows what ran
                "dead_label": dead_label(recipe.pre_relu),
            },
            artifacts=artifacts,
            findings=self._findings(f, norms, sums, channels, top, energy, own_vis, recipe.pre_relu),
            notes=notes,
            sizes=[size] if section.visualize else [],  # without images it only reads the weights
        )

    @staticmethod
    def _findings(
        f: int,
        norms: np.ndarray,
        sums: np.ndarray,
        channels: np.ndarray,
        top: list[int],
        energy: float,
        own_vis: dict[str, Any] | None,
        pre_relu: bool = False,
    ) -> list[str]:
        out = []
        exc = [i for i in np.argsort(-norms, kind="stable") if sums[i] > 0]
        inh = [i for i in np.argsort(-norms, kind="stable") if sums[i] < 0]
        strongest = [(exc[0], "+, excitatory")] if exc else []
        strongest += [(inh[0], "-, inhibitory")] if inh else []
        strongest.sort(key=lambda pair: -norms[pair[0]])
        parts = [f"{int(channels[i])} ({word})" for i, word in strongest]
        if parts:
            out.append(
                f"filter {f} draws most on input channel{'s' if len(parts) > 1 else ''} "
                f"{' and '.join(parts)}."
            )
        if energy:
            share = float((norms[top] ** 2).sum() / energy)
            out.append(
                f"the top {len(top)} of {len(norms)} input channels carry {100 * share:.0f}% of the "
                f"filter's squared weight; {len(exc)} of {len(norms)} excite it, {len(inh)} inhibit it."
            )
        else:
            out.append(f"filter {f} has an all-zero kernel: it ignores its input.")
        if own_vis is not None and own_vis["dead"]:
            verb = "never turns positive" if pre_relu else "stays dead"
            out.append(
                f"filter {f} {verb} under activation maximization (activation "
                f"{own_vis['activation']:.3g}: {dead_explanation(pre_relu)})."
            )
        return out

    @staticmethod
    def _csv(norms: np.ndarray, sums: np.ndarray, channels: np.ndarray, energy: float) -> bytes:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["input_channel", "l2_norm", "sum", "effect", "share_of_squared_weight"])
        for i in np.argsort(-norms, kind="stable"):
            writer.writerow(
                [
                    int(channels[i]),
                    f"{norms[i]:.6g}",
                    f"{sums[i]:.6g}",
                    sign_word(sums[i]),
                    f"{norms[i] ** 2 / energy if energy else 0:.6g}",
                ]
            )
        return buf.getvalue().encode()


ANALYSIS = CircuitAnalysis()
