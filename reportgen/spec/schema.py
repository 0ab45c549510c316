"""Pydantic models of a spec. They are the single source of truth for validation and the JSON Schema.

Every model forbids unknown keys so that a typo ("fliters") is an error with a suggestion, never a
silently ignored setting.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, PrivateAttr, field_validator, model_validator

from reportgen.engine.recipes import params_json_schema
from reportgen.errors import echo

KERAS_APPS = (
    "ConvNeXtBase ConvNeXtLarge ConvNeXtSmall ConvNeXtTiny ConvNeXtXLarge DenseNet121 DenseNet169 "
    "DenseNet201 EfficientNetB0 EfficientNetB1 EfficientNetB2 EfficientNetB3 EfficientNetB4 "
    "EfficientNetB5 EfficientNetB6 EfficientNetB7 EfficientNetV2B0 EfficientNetV2B1 EfficientNetV2B2 "
    "EfficientNetV2B3 EfficientNetV2L EfficientNetV2M EfficientNetV2S InceptionResNetV2 InceptionV3 "
    "MobileNet MobileNetV2 MobileNetV3Large MobileNetV3Small NASNetLarge NASNetMobile ResNet101 "
    "ResNet101V2 ResNet152 ResNet152V2 ResNet50 ResNet50V2 VGG16 VGG19 Xception"
).split()

BUILTIN_MODELS = ("vgg16-hed", "fer-emotion", "fashion-cnn")

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
    builtin: Literal["vgg16-hed", "fer-emotion", "fashion-cnn"] | None = Field(
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
    title: str | None = None
    observations: str | None = Field(None, description="Markdown by the spec's author (HTML is escaped).")


class ImagesMixin(Strict):
    dataset: str = Field(description="Key of a dataset under `datasets`.")
    images: list[str] | None = Field(None, description="File names (or stems) to pick from the dataset.")
    limit: int | None = Field(None, ge=1, description="At most this many images.")


class FiltersSection(SectionBase):
    type: Literal["filters"]
    model: str
    layers: list[str] = Field(min_length=1)
    filters: FilterSelection = "0:64"
    recipe: str = "keras-example"
    compare: list[str] = Field(
        default_factory=list, description="More recipes, shown side by side with `recipe` for each layer."
    )
    params: dict[str, float | int | bool] = Field(
        default_factory=dict, description="Recipe overrides.", json_schema_extra=params_json_schema
    )
    columns: int | None = Field(
        None, ge=1, le=256, description="Grid columns (default: square grid); the grid is one image."
    )
    objective: Literal["channel", "neuron", "layer", "direction"] = Field(
        "channel",
        description="What each image maximises: a filter's mean (channel), its unit at one position "
        "(neuron), the whole layer's mean square (layer: one image per layer), or the dot product with "
        "`direction` (one image per layer).",
    )
    position: list[int] | None = Field(
        None, min_length=2, max_length=2, description="neuron: [y, x] in the layer's map; default its centre."
    )
    direction: list[float] | str | None = Field(
        None, description="direction: one weight per channel of the layer, or a .npy file (spec-relative)."
    )
    diversity: int = Field(
        1, ge=1, le=16, description="Images per filter, pushed apart by lucid's Gram-similarity penalty."
    )

    _f = field_validator("filters")(check_filter_selection)

    @field_validator("compare")
    @classmethod
    def _known_recipes(cls, value: list[str]) -> list[str]:
        from reportgen.engine.recipes import RECIPES

        for name in value:
            if name not in RECIPES:
                close = difflib.get_close_matches(name, list(RECIPES), n=1) if len(name) < 100 else []
                raise ValueError(
                    f"unknown recipe {echo(name)}; "
                    + (f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(RECIPES)}")
                )
        return value

    @property
    def recipes(self) -> list[str]:
        return [self.recipe, *[r for r in self.compare if r != self.recipe]]


class ActivationsSection(SectionBase, ImagesMixin):
    type: Literal["activations"]
    model: str
    layers: list[str] = Field(min_length=1)
    channels: FilterSelection = "all"
    max_channels: int = Field(64, ge=1, description="Cap of maps shown per layer and image.")
    colormap: str = "viridis"
    map_size: int = Field(
        64, ge=4, description="Maps larger than this (pixels a side) are downsampled for display."
    )
    zero_tolerance: float = Field(
        1e-3,
        ge=0,
        lt=1,
        description="A channel stays ~0 for an image when its peak |activation| is at most this share of the "
        "layer's peak for that image (ReLU channels that never fire are exactly 0).",
    )

    _f = field_validator("channels")(check_filter_selection)


class ClassRankingSection(SectionBase):
    type: Literal["class_ranking"]
    model: str
    dataset: str
    layer: str
    filters: FilterSelection = Field(description="Filters to rank classes and images for.")
    top: int = Field(10, ge=1, description="Classes in the table and chart.")
    top_images: int = Field(8, ge=1, description="Thumbnails of the most activating images.")

    _f = field_validator("filters")(check_filter_selection)


class PredictionsSection(SectionBase, ImagesMixin):
    type: Literal["predictions"]
    model: str
    top_k: int = Field(5, ge=1)


class GradcamSection(SectionBase, ImagesMixin):
    type: Literal["gradcam"]
    model: str
    layer: str
    target: Index | str | None = Field(None, description="Class index or name; default: the top prediction.")
    alpha: float = Field(0.45, ge=0, le=1)


class OcclusionMask(Strict):
    name: str
    box: tuple[Index, Index, Index, Index] = Field(description="[x0, y0, x1, y1] in the image's own pixels.")
    image: str | None = Field(None, description="Apply only to this image (file name or stem).")
    fill: Literal["gray", "black", "blur", "mean"] = "gray"

    @field_validator("box")
    @classmethod
    def _not_empty(cls, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"box {list(box)} is empty; [x0, y0, x1, y1] needs x1 > x0 and y1 > y0")
        return box


class SlidingPatch(Strict):
    patch: int = Field(32, ge=1, description="Patch size in model-input pixels.")
    stride: int = Field(16, ge=1)
    fill: Literal["gray", "black", "blur", "mean"] = Field("gray", description="What the patch shows.")


class OcclusionSection(SectionBase, ImagesMixin):
    type: Literal["occlusion"]
    model: str
    layer: str
    masks: list[OcclusionMask] = Field(default_factory=list)
    sliding: SlidingPatch | None = None
    target: Index | str | None = None


class SaliencySection(SectionBase, ImagesMixin):
    type: Literal["saliency"]
    model: str
    methods: list[Literal["vanilla", "smoothgrad"]] = Field(default_factory=lambda: ["vanilla", "smoothgrad"])
    samples: int = Field(
        16, ge=1, le=256, description="SmoothGrad noisy samples (each a copy of the image in memory)."
    )
    noise: float = Field(
        0.15,
        ge=0,
        le=10,
        allow_inf_nan=False,
        description="SmoothGrad noise std as a share of the input range.",
    )
    target: Index | str | None = None


class ClassModelSection(SectionBase):
    type: Literal["class_model"]
    model: str
    classes: list[Index | str] = Field(min_length=1)
    recipe: str = "regularized"
    params: dict[str, float | int | bool] = Field(
        default_factory=dict, description="Recipe overrides.", json_schema_extra=params_json_schema
    )


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


Section = Annotated[
    FiltersSection
    | ActivationsSection
    | ClassRankingSection
    | PredictionsSection
    | GradcamSection
    | OcclusionSection
    | SaliencySection
    | ClassModelSection
    | CircuitSection,
    Field(discriminator="type"),
]

SECTION_TYPES = (
    "filters activations class_ranking predictions gradcam occlusion saliency class_model circuit".split()
)


class Spec(Strict):
    title: str
    output: str = Field(description="Output folder, relative to the spec file.")
    formats: list[Literal["html", "pdf"]] = Field(default_factory=lambda: ["html", "pdf"])
    seed: int = Field(0, ge=0, le=MAX_SEED)
    precision: Literal["float32", "bfloat16", "float16"] = "float32"
    cache: str | None = Field(
        None, description="Result store folder (default: .reportgen-cache beside output)."
    )
    author: str | None = None
    introduction: str | None = Field(None, description="Markdown shown before the first section.")
    models: dict[str, ModelSpec] = Field(min_length=1)
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict)
    sections: list[Section] = Field(min_length=1)
    _located: Any = PrivateAttr(None)
    _filename: str = PrivateAttr("<spec>")


def json_schema() -> dict[str, Any]:
    """JSON Schema of the spec, for editors (e.g. the YAML language server's `# yaml-language-server`)."""
    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "reportgen spec"
    return schema
