"""Example: train with noisy GD, export a SavedModel, serve it back without the training code.

Trains an MLP on scikit-learn's bundled digits with full-batch `NoisyGD`
(Bernoulli noise calibrated to SGD(32)), exports it with `model.export`
(a TensorFlow SavedModel with a `serve` endpoint), loads it back two ways --
`tf.saved_model.load` and `keras.layers.TFSMLayer` -- and checks that both give
exactly the predictions of the trained model. The exported graph is the
inference graph: no optimizer, no noise, nothing from `keras_noisygd` is needed
to serve it. Runs offline in well under a minute on two CPU cores.

    python examples/export_savedmodel.py [--steps 300] [--out digits_savedmodel]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_noisygd as kn  # noqa: E402


def load_digits(train_size=1000, seed=0):
    """scikit-learn's 1,797 8x8 digits (shipped with the package), shuffled, split and scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    x = (data.data[order] / 16.0).astype("float32")
    y = data.target[order].astype("int32")
    return (x[:train_size], y[:train_size]), (x[train_size:], y[train_size:])


def train(x, y, steps, seed=0):
    """Full-batch noisy GD emulating SGD(32): `steps` steps of all `len(x)` examples."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((64,), name="pixels")
    hidden = keras.layers.Dense(64, activation="relu")(inputs)
    outputs = keras.layers.Dense(10, activation="softmax", name="digit")(hidden)
    model = kn.NoisyModel(inputs, outputs)
    model.compile(
        kn.NoisyGD(0.5, noise="bernoulli", emulate_batch_size=32, seed=seed),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x, y, batch_size=len(x), epochs=steps, verbose=0)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="full-batch training steps (default 300)")
    parser.add_argument("--train-size", type=int, default=1000, help="training examples (default 1000)")
    parser.add_argument("--out", default=None, help="export directory (default: a temporary one)")
    args = parser.parse_args(argv)

    (x, y), (x_test, y_test) = load_digits(args.train_size)
    model = train(x, y, args.steps)
    expected = model.predict(x_test, batch_size=len(x_test), verbose=0)  # one batch, as served below
    accuracy = float(np.mean(expected.argmax(axis=1) == y_test))
    print(f"trained: {args.steps} full-batch NoisyGD steps on {len(x)} digits, test accuracy {accuracy:.4f}")

    out = args.out or os.path.join(tempfile.mkdtemp(), "digits_savedmodel")
    model.export(out)  # SavedModel with the `serve` endpoint (and `serving_default`)

    # 1. Plain TensorFlow: what TF Serving or another program would load.
    loaded = tf.saved_model.load(out)
    served = loaded.serve(tf.constant(x_test)).numpy()
    # 2. Keras: the SavedModel as a layer, e.g. to build on it.
    layer = keras.layers.TFSMLayer(out, call_endpoint="serve")
    from_layer = keras.ops.convert_to_numpy(layer(x_test))

    for name, predictions in (("tf.saved_model.load", served), ("keras.layers.TFSMLayer", from_layer)):
        difference = float(np.abs(predictions - expected).max())
        print(f"{name:<24} max |prediction difference| = {difference:.1e}")
        if difference != 0.0:
            raise SystemExit(f"{name} does not reproduce the trained model's predictions")
    print(f"exported to {out}")
    return {"accuracy": accuracy, "path": out, "served": served, "expected": expected}


if __name__ == "__main__":
    main()
