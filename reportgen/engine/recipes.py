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
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class Recipe:
    """Parameters of one gradient-ascent run; every field may be overridden in a spec's `params`."""

    steps: int = 30
    lr: float = 10.0
    size: int = 0  # input side in pixels; 0 = the model's input size (or 180 when the model has none)
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

    def with_overrides(self, overrides: dict[str, Any]) -> Recipe:
        return dataclasses.replace(self, **{k: type(getattr(self, k))(v) for k, v in overrides.items()})

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def is_regularized(self) -> bool:
        return any(
            (self.jitter, self.rotate, self.scale, self.blur_every, self.decay, self.tv, self.clip_weak)
        )


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
}


def recipe_field_names() -> list[str]:
    return [f.name for f in fields(Recipe)]


def resolve_recipe(name: str, overrides: dict[str, Any]) -> Recipe:
    """Recipe by name with overrides applied; raises ValueError with a suggestion on unknown names."""
    if name not in RECIPES:
        close = difflib.get_close_matches(name, list(RECIPES), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(RECIPES)}"
        raise ValueError(f"unknown recipe {name!r}; {hint}")
    unknown = [k for k in overrides if k not in recipe_field_names()]
    if unknown:
        close = difflib.get_close_matches(unknown[0], recipe_field_names(), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(recipe_field_names())}"
        raise ValueError(f"unknown recipe parameter {unknown[0]!r}; {hint}")
    return RECIPES[name].recipe.with_overrides(overrides)
