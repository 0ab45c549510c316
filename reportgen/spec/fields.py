"""The building blocks of a spec: models, datasets, what every section has, filter selections.

Section types declare their own models (in their `reportgen.analyses` module) from these pieces, and
`reportgen.spec.schema` assembles the whole spec from the modules it finds. This module imports nothing
of reportgen's but errors, so every module can import it without an import circle.

Every model forbids unknown keys so that a typo ("fliters") is an error with a suggestion, never a
silently ignored setting.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, field_validator, model_validator

from reportgen.errors import echo

KERAS_APPS = (
    "ConvNeXtBase ConvNeXtLarge ConvNeXtSmall ConvNeXtTiny ConvNeXtXLarge DenseNet121 DenseNet169 "
    "DenseNet201 EfficientNetB0 EfficientNetB1 EfficientNetB2 EfficientNetB3 EfficientNetB4 "
    "EfficientNetB5 EfficientNetB6 EfficientNetB7 EfficientNetV2B0 EfficientNetV2B1 EfficientNetV2B2 "
    "EfficientNetV2B3 EfficientNetV2L EfficientNetV2M EfficientNetV2S InceptionResNetV2 InceptionV3 "
    "MobileNet MobileNetV2 MobileNetV3Large MobileNetV3Small NASNetLarge NASNetMobile ResNet101 "
    "ResNet101V2 ResNet152 ResNet152V2 ResNet50 ResNet50V2 VGG16 VGG19 Xception"
).split()

BUILTIN_MODELS = ("vgg16-hed", "fer-emotion", "fashion-cnn", "fashion-cnn-epoch1")

# The largest `max_pixels` a dataset may set: Pillow refuses to open anything larger (its own
# decompression-bomb limit), and a 179-megapixel image already takes ~2 GiB as float32 pixels.
MAX_PIXELS_CEILING = 178_956_970
_RANGE = re.compile(r"^\s*(\d*)\s*:\s*(\d*)\s*$")

# Sizes in pixels: a model input side. Ascent, forward passes and figures grow with its square; the
# device check at run time (reportgen.plan.check_sample_fits) covers what fits between the bounds.
Side = Annotated[int, Field(ge=8, le=8192)]
Index = Annotated[int, Field(ge=0)]
MAX_SEED = 2**32 - 1  # numpy and TensorFlow seeds are unsigned 32-bit


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


FilterSelection = int | list[int] | str
"""`all`, a Python-style range `"0:64"`, one index, or a list of indices."""


def check_filter_selection(value: FilterSelection) -> FilterSelection:
    if isinstance(value, str) and value != "all" and not _RANGE.match(value):
        raise ValueError(
            f"filter selection {echo(value)} is not 'all', a range like '0:64', or a list of indices"
        )
    if isinstance(value, int) and value < 0 or isinstance(value, list) and any(v < 0 for v in value):
        raise ValueError("filter indices must be >= 0")
    m = _RANGE.match(value) if isinstance(value, str) else None
    if m and m.group(1) and m.group(2) and int(m.group(2)) <= int(m.group(1)):
        raise ValueError(f"filter range {echo(value)} is empty; the stop must be larger than the start")
    return value


def expand_filters(value: FilterSelection, channels: int) -> list[int]:
    """Turn a selection into concrete channel indices for a layer with `channels` channels."""
    if value == "all":
        return list(range(channels))
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return list(value)
    m = _RANGE.match(value)
    assert m, value
    start = int(m.group(1) or 0)
    stop = min(int(m.group(2)) if m.group(2) else channels, channels)
    return list(range(start, stop))


class Preprocess(Strict):
    """Model input = pixel (0..255, RGB) * scale + offset; `bgr` swaps channels first (Caffe models)."""

    scale: FiniteFloat | list[FiniteFloat] = 1.0
    offset: FiniteFloat | list[FiniteFloat] = 0.0
    bgr: bool = False


class ModelSpec(Strict):
    builtin: Literal["vgg16-hed", "fer-emotion", "fashion-cnn", "fashion-cnn-epoch1"] | None = Field(
        None, description="A model that ships with reportgen's dependencies (works offline)."
    )
    keras_app: str | None = Field(None, description="Any keras.applications name, e.g. VGG16, ResNet50V2.")
    path: str | None = Field(None, description="A saved .keras or .h5 model, relative to the spec file.")
    weights: str = Field(
        "imagenet", description="imagenet | none | path to a .weights.h5 file (keras_app only)."
    )
    input_size: tuple[Side, Side] | None = Field(None, description="[height, width] of the input for ascent.")
    include_top: bool | None = Field(
        None, description="keras_app: keep the classifier (default: only when a section needs class scores)."
    )
    preprocess: Preprocess | Literal["caffe", "tf", "torch", "unit", "none"] | None = Field(
        None, description="Input preprocessing; keras_app models default to their family's preprocess_input."
    )
    class_names: list[str] | str | None = Field(
        None, description="Class names in output order, or a path to a text file with one name per line."
    )
    safe_mode: bool = Field(
        True,
        description="`path` models: false also loads Lambda layers, whose Python code is stored in the file "
        "and runs when it loads; only for files you trust.",
    )

    @field_validator("keras_app")
    @classmethod
    def _known_app(cls, value: str | None) -> str | None:
        if value is not None and value not in KERAS_APPS:
            close = difflib.get_close_matches(value, KERAS_APPS, n=1, cutoff=0.5) if len(value) < 100 else []
            hint = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(KERAS_APPS)}"
            raise ValueError(f"{echo(value)} is not a keras.applications model; {hint}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        given = [k for k in ("builtin", "keras_app", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "a model needs exactly one of `builtin`, `keras_app` or `path`"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self


class DatasetSpec(Strict):
    path: str | None = Field(None, description="Image folder: flat, or one subfolder per class.")
    builtin: Literal["sample-photos", "faces", "lfw-faces", "fashion-mnist-test"] | None = Field(
        None,
        description="Photos that ship offline: sample-photos, faces, lfw-faces (face / non_face "
        "class folders), fashion-mnist-test (one folder per class).",
    )
    labels: Literal["folders", "imagenet", "none"] = Field(
        "folders", description="How subfolder names become class names (`imagenet`: synset ids to names)."
    )
    per_class: int | None = Field(
        None, ge=1, description="Seeded sample of at most this many images a class."
    )
    limit: int | None = Field(None, ge=1, description="At most this many images in all.")
    max_pixels: int = Field(
        50_000_000,
        ge=1,
        le=MAX_PIXELS_CEILING,
        description="Images whose header promises more pixels (width x height) are skipped and listed, "
        "never decoded: a small PNG can decode to gigabytes.",
    )
    decoded_cache: bool = Field(
        False,
        description="Keep the decoded, resized pixels (uint8, one file per input size) in the cache folder: "
        "later passes over the unchanged folder (e.g. a nightly run with a new checkpoint) skip decoding. "
        "Costs H x W x C bytes per image on disk (150 KB at 224 px RGB).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.path is None) == (self.builtin is None):
            raise ValueError("a dataset needs exactly one of `path` or `builtin`")
        return self


class SectionBase(Strict):
    # The section reads class scores, so a keras_app model it names keeps its classifier head.
    needs_top: ClassVar[bool] = False

    title: str | None = None
    observations: str | None = Field(None, description="Markdown by the spec's author (HTML is escaped).")


class GradientSamplingMixin(Strict):
    """How the noise- and path-based gradient methods sample (SmoothGrad, VarGrad, integrated gradients):
    one definition, with one range each, for every section type that runs them (saliency, sanity)."""

    samples: int = Field(
        16,
        ge=1,
        le=256,
        description="SmoothGrad / VarGrad noisy samples per image (each a copy of the image in memory; in "
        "a sanity section, per cascade step).",
    )
    noise: float = Field(
        0.15,
        ge=0,
        le=10,
        allow_inf_nan=False,
        description="SmoothGrad / VarGrad noise std as a share of the input range (0..255).",
    )
    ig_baseline: Literal["black", "blur", "noise"] = Field(
        "black",
        description="Integrated gradients' reference image: black, a strong blur of the image, or uniform "
        "noise (seeded per model, image and seed).",
    )
    ig_steps: int = Field(
        32,
        ge=1,
        le=1024,
        description="Integrated gradients' points along the path from the baseline (midpoint rule); more "
        "steps, smaller completeness error, one gradient each (in a sanity section, per cascade step).",
    )


class ImagesMixin(Strict):
    dataset: str = Field(description="Key of a dataset under `datasets`.")
    images: list[str] | None = Field(None, description="File names (or stems) to pick from the dataset.")
    limit: int | None = Field(None, ge=1, description="At most this many images.")
