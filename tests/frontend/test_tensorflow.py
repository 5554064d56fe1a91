"""TensorFlow / Keras import through tf2onnx: SavedModel directories and Keras models.

The conversions need the extra ``kiln[tensorflow]`` and skip without it; the error that names the
extra is tested either way.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import kiln
from kiln.cli.main import main
from kiln.errors import ModelError
from kiln.frontend.tensorflow import import_tensorflow

MAX_RELATIVE_ERROR = 1e-4


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / max(float(np.abs(expected).max()), 1e-30))


@pytest.fixture(scope="module")
def tf():
    try:
        tensorflow, _ = import_tensorflow()  # in the order that keeps Triton and TensorFlow apart
    except ModelError as error:
        pytest.skip(str(error))
    return tensorflow


@pytest.fixture(scope="module")
def keras_cnn(tf, tmp_path_factory):
    """A small Keras CNN (NHWC) with non-trivial BatchNorm statistics, and its SavedModel."""
    keras = tf.keras
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((16, 16, 3), name="image"),
        keras.layers.Conv2D(8, 3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])
    norm = model.layers[1]
    rng = np.random.default_rng(0)
    norm.set_weights([rng.uniform(0.5, 1.5, 8), rng.uniform(-0.5, 0.5, 8),
                      rng.uniform(-0.5, 0.5, 8), rng.uniform(0.5, 2.0, 8)])
    directory = tmp_path_factory.mktemp("keras") / "cnn"
    model.export(str(directory), verbose=False)
    return model, directory


@pytest.mark.slow
def test_saved_model_builds_from_the_command_line(keras_cnn, tmp_path):
    model, directory = keras_cnn
    engine_path = tmp_path / "cnn.kiln"
    assert main(["build", str(directory), "-o", str(engine_path), "--device", "cpu"]) == 0
    engine = kiln.load(engine_path)
    image = np.random.default_rng(1).standard_normal((2, 16, 16, 3)).astype(np.float32)
    (output,) = engine.run({engine.inputs[0].name: image}).values()
    assert relative_error(output, model(image, training=False).numpy()) <= MAX_RELATIVE_ERROR


@pytest.mark.slow
def test_keras_model_builds_with_its_own_input_signature(keras_cnn):
    model, _ = keras_cnn
    engine = kiln.from_tensorflow(model, device="cpu")
    assert engine.inputs[0].shape[1:] == (16, 16, 3)  # batch stays symbolic
    assert [info.name for info in engine.outputs] == ["output_0"]
    image = np.random.default_rng(2).standard_normal((3, 16, 16, 3)).astype(np.float32)
    output = engine.run({engine.inputs[0].name: image})["output_0"]
    assert relative_error(output, model(image, training=False).numpy()) <= MAX_RELATIVE_ERROR


@pytest.mark.slow
def test_tf_function_with_a_captured_constant_and_named_outputs(tf):
    weight = tf.constant(np.random.default_rng(3).standard_normal((4, 3)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def project(x):
        return {"projected": tf.nn.relu(tf.matmul(x, weight)), "total": tf.reduce_sum(x, axis=1)}

    engine = kiln.from_tensorflow(project, device="cpu")
    assert [info.name for info in engine.inputs] == ["x"]  # the constant is a weight, not an input
    x = np.random.default_rng(4).standard_normal((5, 4)).astype(np.float32)
    actual, expected = engine.run({"x": x}), project(x)
    for name in ("projected", "total"):
        assert relative_error(actual[name], expected[name].numpy()) <= MAX_RELATIVE_ERROR


def test_without_tensorflow_the_error_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "saved_model.pb").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import tensorflow raises ImportError
    with pytest.raises(ModelError, match=r"pip install 'kiln\[tensorflow\]'"):
        kiln.from_tensorflow(tmp_path)


def test_a_directory_without_a_saved_model_is_refused(tmp_path):
    with pytest.raises(ModelError, match="not a SavedModel directory"):
        kiln.from_tensorflow(tmp_path)
