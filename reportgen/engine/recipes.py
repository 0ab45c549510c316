"""Named, documented bundles of activation-maximization parameters.

Pure Python (no TensorFlow) so that spec validation can check recipe names and overrides quickly.

All optimisation happens in a canonical input space x in [-1, 1] where the RGB pixel is (x + 1) * 127.5;
the model's own preprocessing is applied inside the differentiated function. For models whose
preprocessing is exactly that map (ResNet50V2, MobileNetV2, the `tf` family) this is the Keras example
bit for bit; for Caffe-style models (VGG16) it gives the same visual step size, where optimising in
their mean-subtracted 0..255 space would make `lr: 10` a different recipe.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Any

from reportgen.errors import echo


@dataclass(frozen=True)
class Recipe:
    """Parameters of one gradient-ascent run; every field may be overridden in a spec's `params`."""

    steps: int = 30
    lr: float = 10.0
    size: int = 0  # input side in pixels; 0 = the model's input size (a spec leaves `size` out for that)
    border: int = 2  # activation rows/cols excluded from the mean on each side
    init_scale: float = 0.25  # start = gray + (uniform(0,1) - 0.5) * init_scale, i.e. +-0.125
    display_std: float = 0.15
    crop: int = 25  # pixels cut from each side for display
    # regularizers (0 disables each)
    jitter: int = 0  # max random translation in pixels, per step
    rotate: float = 0.0  # max random rotation in degrees, per step
    scale: float = 0.0  # max relative random zoom, per step
    blur_every: int = 0  # apply a Gaussian blur every k steps
    blur_sigma: float = 0.5
    decay: float = 0.0  # L2 decay of the image towards gray, per step
    tv: float = 0.0  # total-variation weight in the objective
    clip_weak: float = 0.0  # zero pixels whose norm is below this percentile (0-100), every blur step
    dead_threshold: float = 1e-6  # a filter whose final activation stays below this is "dead"
    pre_relu: bool = False  # maximise the conv output before its ReLU: gradients exist even where it is 0
    # image parameterisation (reportgen.engine.parameterization) and optimiser
    fourier: bool = False  # optimise 1/f-scaled Fourier coefficients instead of pixels (lucid fft_image)
    phase_only: bool = False  # with fourier: optimise only the phase, magnitude fixed (MaCo)
    decorrelate: bool = False  # with fourier: ImageNet colour decorrelation
    decay_power: float = 1.0  # with fourier: the coefficients' scale is 1 / f^decay_power
    adam: bool = False  # Adam steps on the raw gradient instead of steps along the L2-normalised gradient
    nesterov: bool = False  # with adam: Nadam (Keras' schedule)
    standardize: bool = True  # display: standardise around gray (pixel recipes) or show the image as is
    # lucid's standard transforms beside jitter/rotate/scale: gray padding, a second jitter after them
    pad: int = 0
    jitter_after: int = 0
    # MaCo's random crops and noise
    crops: int = 0  # random crops per sample and step (0: the whole image, with the transforms above)
    crop_start: float = 0.5  # mean crop side, as a share of the image side, at the first step
    crop_end: float = 0.05  # ... and at the last step (linear in between)
    noise: float = 0.0  # std of the Gaussian (and width of the uniform) noise added to what the model sees
    diversity_weight: float = 100.0  # lucid's weight of the Gram-similarity penalty (filters `diversity`)

    def with_overrides(self, overrides: dict[str, Any]) -> Recipe:
        """A copy with `overrides` (already checked by `param_problem`) converted to the fields' types."""
        return dataclasses.replace(self, **{k: type(getattr(self, k))(v) for k, v in overrides.items()})

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def is_regularized(self) -> bool:
        return any(
            (self.jitter, self.rotate, self.scale, self.blur_every, self.decay, self.tv, self.clip_weak)
        )

    @property
    def parameterization(self) -> str:
        """`pixel`, `fourier` or `phase` (see reportgen.engine.parameterization)."""
        return "pixel" if not self.fourier else "phase" if self.phase_only else "fourier"

    @property
    def optimizer(self) -> str:
        return "nadam" if self.adam and self.nesterov else "adam" if self.adam else "normalized"


@dataclass(frozen=True)
class RecipeInfo:
    recipe: Recipe
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)


RECIPES: dict[str, RecipeInfo] = {
    "keras-example": RecipeInfo(
        Recipe(),
        "The Keras example 'Visualizing what convnets learn': a gray start with a little uniform noise, "
        "plain gradient ascent with L2-normalised gradients on the filter's mean activation (border "
        "excluded), the result standardised around gray for display.",
    ),
    "regularized": RecipeInfo(
        Recipe(
            steps=64,
            lr=10.0,
            jitter=8,
            rotate=5.0,
            scale=0.05,
            blur_every=4,
            blur_sigma=0.5,
            decay=0.0005,
            tv=0.0,
            clip_weak=0.0,
            crop=16,
            pre_relu=True,
        ),
        "Yosinski et al. (2015)-style regularised ascent: random jitter, rotation and zoom each step "
        "(transform robustness), periodic Gaussian blur and L2 decay towards gray; by default the objective "
        "is the conv output before its ReLU, so filters silent on a gray start still get a gradient.",
    ),
    "fourier": RecipeInfo(
        Recipe(
            steps=256,
            lr=0.05,
            size=128,
            init_scale=0.01,
            crop=0,
            jitter=8,
            jitter_after=4,
            pad=12,
            rotate=10.0,
            scale=0.1,
            fourier=True,
            decorrelate=True,
            adam=True,
            standardize=False,
            pre_relu=True,
        ),
        "lucid's feature visualisation (Olah et al., Distill 2017): the image is parameterised by its "
        "Fourier coefficients scaled by 1/f, with ImageNet colour decorrelation and a sigmoid; lucid's "
        "standard transforms (gray pad 12, jitter 8, zoom 0.9-1.1, rotation 10 degrees, jitter 4) each step; "
        "Adam, lr 0.05, 256 steps at 128 px (lucid: 512; 256 already converges on VGG16's block4/block5).",
    ),
    "maco": RecipeInfo(
        Recipe(
            steps=256,
            lr=1.0,
            size=128,
            init_scale=1.0,
            crop=0,
            fourier=True,
            phase_only=True,
            decorrelate=True,
            adam=True,
            nesterov=True,
            standardize=False,
            crops=8,
            crop_start=1.0,
            crop_end=0.5,
            noise=0.08,
            pre_relu=True,
        ),
        "MaCo (Fel et al., NeurIPS 2023): only the Fourier phase is optimised, the magnitude stays that of "
        "natural images (a power law fitted to the bundled photos); each step the model sees random crops "
        "(mean side shrinking from the whole image to half of it) with noise 0.08; Nadam, lr 1.0, 256 steps "
        "at 128 px; 8 crops a step (xplique: 32, 4x the cost). The accumulated gradient magnitude is its "
        "transparency mask. xplique shrinks the crops from 50% to 5% of a canvas 2.3x the model's input "
        "(zooms 0.9x-9x); on a canvas the size of the input those shares zoom 2x-20x and left 5 of 8 "
        "VGG16-HED block4_conv3 units below zero on the whole image, hence 1x-2x.",
    ),
}


@dataclass(frozen=True)
class Range:
    """The values a numeric recipe parameter may take: what the engine can compute with, and upper bounds
    that keep one sample's memory and the compiled loop finite (e.g. `steps` sizes per-step arrays,
    `blur_sigma` the blur kernel, `scale` >= 1 would zoom by 0)."""

    low: float
    high: float = math.inf
    low_open: bool = False  # `low` itself is not allowed
    high_open: bool = False
    doc: str = ""

    def allows(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        """The rule as an error line states it: `from 1 to 10000`, `> 0`, `>= 0 and < 1`."""
        if self.low == -math.inf:
            rule = "a finite number"
        elif self.high == math.inf:
            rule = f"{'>' if self.low_open else '>='} {self.low:g}"
        elif not (self.low_open or self.high_open):
            rule = f"from {self.low:g} to {self.high:g}"
        else:
            low, high = ">" if self.low_open else ">=", "<" if self.high_open else "<="
            rule = f"{low} {self.low:g} and {high} {self.high:g}"
        return rule

    def json_schema(self) -> dict[str, Any]:
        bounds: dict[str, Any] = {}
        if self.low != -math.inf:
            bounds["exclusiveMinimum" if self.low_open else "minimum"] = self.low
        if self.high != math.inf:
            bounds["exclusiveMaximum" if self.high_open else "maximum"] = self.high
        return bounds


# Every numeric field of Recipe; the bools (BOOL_DOCS) are plain true/false.
PARAM_RANGES: dict[str, Range] = {
    "steps": Range(1, 10_000, doc="Gradient-ascent steps."),
    "lr": Range(
        0, low_open=True, doc="Step size in the canonical [-1, 1] input space (L2-normalised gradients)."
    ),
    "size": Range(8, 2048, doc="Input side in pixels; leave it out to use the model's input size."),
    "border": Range(0, 1024, doc="Activation rows/cols excluded from the mean on each side."),
    "init_scale": Range(0, 2, doc="Spread of the uniform noise of the gray start."),
    "display_std": Range(0, 1, low_open=True, doc="Standard deviation of the displayed image around gray."),
    "crop": Range(0, 1024, doc="Pixels cut from each side for display."),
    "jitter": Range(0, 1024, doc="Max random translation in pixels, per step (0 disables)."),
    "rotate": Range(0, 180, doc="Max random rotation in degrees, per step (0 disables)."),
    "scale": Range(0, 1, high_open=True, doc="Max relative random zoom, per step (0 disables)."),
    "blur_every": Range(0, 10_000, doc="Gaussian blur every k steps (0 disables)."),
    "blur_sigma": Range(0, 50, low_open=True, doc="Standard deviation of the blur in pixels."),
    "decay": Range(0, 1, high_open=True, doc="L2 decay of the image towards gray, per step."),
    "tv": Range(0, doc="Total-variation weight in the objective."),
    "clip_weak": Range(0, 100, doc="Zero pixels whose norm is below this percentile, every blur step."),
    "dead_threshold": Range(
        -math.inf, doc='A filter whose final activation stays at or below this is "dead".'
    ),
    "decay_power": Range(0, 4, doc="With fourier: the coefficients' scale is 1 / f^decay_power."),
    "pad": Range(0, 1024, doc="Gray padding on each side before the random transforms (0 disables)."),
    "jitter_after": Range(0, 1024, doc="Max random translation after zoom and rotation (0 disables)."),
    "crops": Range(0, 256, doc="Random crops per sample and step (MaCo; 0: the whole image)."),
    "crop_start": Range(
        0, 1, low_open=True, doc="Mean crop side at the first step, share of the image side."
    ),
    "crop_end": Range(0, 1, low_open=True, doc="Mean crop side at the last step, share of the image side."),
    "noise": Range(0, 1, doc="Std of the noise added to what the model sees each step (0 disables)."),
    "diversity_weight": Range(0, doc="Weight of the Gram-similarity penalty of `diversity` (lucid: 100)."),
}

BOOL_DOCS: dict[str, str] = {
    "pre_relu": "Maximise the conv output before its ReLU.",
    "fourier": "Optimise 1/f-scaled Fourier coefficients instead of pixels.",
    "phase_only": "With fourier: optimise only the phase, the magnitude fixed to a natural-image spectrum.",
    "decorrelate": "With fourier: ImageNet colour decorrelation.",
    "adam": "Adam steps on the raw gradient instead of steps along the L2-normalised gradient.",
    "nesterov": "With adam: Nadam.",
    "standardize": "Display: standardise the image around gray (false: show it as it is).",
}


class RecipeError(ValueError):
    """A recipe name or parameter a spec cannot use; `param` names the parameter at fault (None: the
    recipe's name), so that the error can point at it."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def recipe_field_names() -> list[str]:
    return [f.name for f in fields(Recipe)]


def param_problem(name: str, value: Any, recipe_name: str) -> str | None:
    """What is wrong with `value` for the known parameter `name`, or None. A bool is no number (YAML reads
    `yes` as true), a whole-number parameter takes no fraction, nan and infinity are no step size."""
    default = getattr(RECIPES[recipe_name].recipe, name)
    got = f"(got {echo(value)})"
    fix = f"the {recipe_name} recipe uses {default!r}"  # a value that works, and the one it replaces
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"must be true or false {got}; {fix}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number {got}; {fix}"
    if not math.isfinite(value):
        return f"must be a finite number {got}; {fix}"
    if isinstance(default, int) and not float(value).is_integer():
        return f"must be a whole number {got}; {fix}"
    rule = PARAM_RANGES[name]
    if not rule.allows(value):
        return f"must be {rule.describe()} {got}; {fix}"
    return None


def recipe_problems(name: str, overrides: dict[str, Any]) -> list[RecipeError]:
    """Every problem of a recipe name with these overrides (empty when `resolve_recipe` will succeed)."""
    if name not in RECIPES:
        close = difflib.get_close_matches(name, list(RECIPES), n=1) if len(name) < 100 else []
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(RECIPES)}"
        return [RecipeError(f"unknown recipe {echo(name)}; {hint}")]
    problems = []
    for key, value in overrides.items():
        if key not in recipe_field_names():
            close = difflib.get_close_matches(key, recipe_field_names(), n=1) if len(key) < 100 else []
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(recipe_field_names())}"
            problems.append(RecipeError(f"unknown recipe parameter {echo(key)}; {hint}", key))
        elif (msg := param_problem(key, value, name)) is not None:
            problems.append(RecipeError(msg, key))
    return problems


def resolve_recipe(name: str, overrides: dict[str, Any]) -> Recipe:
    """Recipe by name with overrides applied; raises RecipeError (a ValueError) for an unknown name or
    parameter, or a value outside the parameter's range."""
    problems = recipe_problems(name, overrides)
    if problems:
        raise problems[0]
    return RECIPES[name].recipe.with_overrides(overrides)


def params_json_schema(schema: dict[str, Any]) -> None:
    """Describe a section's `params` in its JSON Schema: the known parameters with types, ranges and
    descriptions, and no others (pydantic only sees a mapping of numbers)."""
    props: dict[str, Any] = {}
    for f in fields(Recipe):
        default = getattr(Recipe(), f.name)
        if isinstance(default, bool):
            props[f.name] = {"type": "boolean", "description": BOOL_DOCS[f.name]}
            continue
        rule = PARAM_RANGES[f.name]
        kind = "integer" if isinstance(default, int) else "number"
        props[f.name] = {"type": kind, **rule.json_schema(), "description": rule.doc}
    schema["properties"] = props
    schema["additionalProperties"] = False


def ascent_size(model: Any, recipe: Recipe) -> tuple[int, int]:
    """(height, width) the ascent optimises at on `model` (a `reportgen.models.LoadedModel`): the recipe's
    `size` where the model takes any size, else the model's fixed input. Here, with the recipes rather than
    with the TensorFlow program, so that sections and the planner can compute keys without TensorFlow."""
    if model.fixed_input or not recipe.size:
        return model.input_size
    return (recipe.size, recipe.size)
