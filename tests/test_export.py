"""Export: a trained NoisyModel as a SavedModel, reloaded by TensorFlow and by Keras.

Predictions are compared bit for bit on one batch: the exported function runs the
same float32 ops as `predict` on the same batch. (With another batching, e.g.
`predict`'s default of 32 rows per call, float32 matmuls round differently, ~3e-7.)
"""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from helpers import classification_data, mlp

import keras_noisygd as kn

ROOT = Path(__file__).resolve().parents[1]


def trained(momentum=0.5):
    x, y = classification_data(64)
    model = mlp()
    model.compile(kn.NoisyGD(0.1, noise="sparse_gaussian_centered", emulate_batch_size=8, momentum=momentum, seed=3),
                  "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    return model, x


def test_model_export_reloads_with_tf_and_keras_with_equal_predictions(tmp_path):
    model, x = trained()
    expected = model.predict(x, batch_size=len(x), verbose=0)
    model.export(tmp_path / "exported", verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "exported"))  # keep it: it owns the variables
    served = loaded.serve(tf.constant(x)).numpy()
    layer = keras.layers.TFSMLayer(tmp_path / "exported", call_endpoint="serve")
    np.testing.assert_array_equal(served, expected)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x)), expected)
    # The noise played its part in training only: serving is deterministic.
    np.testing.assert_array_equal(loaded.serve(tf.constant(x)).numpy(), served)


def test_tf_saved_model_save_reloads_with_equal_predictions(tmp_path):
    model, x = trained()
    expected = model.predict(x, batch_size=len(x), verbose=0)
    tf.saved_model.save(model, str(tmp_path / "saved"))
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    (output,) = loaded.signatures["serving_default"](tf.constant(x)).values()
    np.testing.assert_array_equal(output.numpy(), expected)
    layer = keras.layers.TFSMLayer(tmp_path / "saved", call_endpoint="serving_default")
    (from_layer,) = layer(x).values()
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(from_layer), expected)


SERVE_WITHOUT_PACKAGE = """
import sys
sys.modules["keras_noisygd"] = None  # any import of the package now fails
import numpy as np, tensorflow as tf
x = np.load(sys.argv[2])
loaded = tf.saved_model.load(sys.argv[1])
np.save(sys.argv[3], loaded.serve(tf.constant(x)).numpy())
"""


def test_the_export_serves_without_keras_noisygd(tmp_path):
    model, x = trained()
    model.export(tmp_path / "exported", verbose=False)
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", SERVE_WITHOUT_PACKAGE, str(tmp_path / "exported"), str(tmp_path / "x.npy"),
         str(tmp_path / "y.npy")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), model.predict(x, batch_size=len(x), verbose=0))
