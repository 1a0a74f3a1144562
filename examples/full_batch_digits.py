"""Example: full-batch noisy GD against GD and SGD on scikit-learn's bundled digits, with the plain API.

Trains the same MLP from the same initialisation with
  * GD:        full-batch gradient descent,
  * SGD(b):    mini-batches of b examples,
  * NoisyGD:   full-batch steps with Gaussian-centred ("MSGD-Cov") noise
               calibrated to emulate SGD(b),
for the same number of steps and learning rate, over a few seeds, and prints the
test accuracy of each. Runs offline in about a minute on two CPU cores. (On this
easy dataset the three end within seed noise of each other; `python -m
keras_noisygd compare` runs the comparison where the effect shows.)

    python examples/full_batch_digits.py [--steps 1500] [--seeds 3]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_noisygd as kn  # noqa: E402


def load_digits(train_size, seed=0):
    """scikit-learn's 1,797 8x8 digits (shipped with the package), split and scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    x = (data.data[order] / 16.0).astype("float32")
    y = data.target[order].astype("int32")
    return (x[:train_size], y[:train_size]), (x[train_size:], y[train_size:])


def make_model(seed, hidden=128):
    keras.utils.set_random_seed(seed)
    return kn.NoisySequential(
        [keras.Input((64,)), keras.layers.Dense(hidden, activation="relu"), keras.layers.Dense(10)]
    )


def train(name, train_data, test_data, seed, steps, lr, batch_size):
    """Trains one configuration; returns (train accuracy, test accuracy, seconds)."""
    (x, y), (x_test, y_test) = train_data, test_data
    n = len(x)
    model = make_model(seed)
    if name == "GD":
        optimizer, batch = keras.optimizers.SGD(lr), n
    elif name == "SGD":
        optimizer, batch = keras.optimizers.SGD(lr), batch_size
    else:  # noisy GD: full batch, noise emulating SGD(batch_size) out of n
        optimizer, batch = kn.NoisyGD(lr, noise="gaussian_centered", emulate_batch_size=batch_size, seed=seed), n
    model.compile(
        optimizer,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=50,
    )
    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(n, seed=seed, reshuffle_each_iteration=True)
    data = data.repeat().batch(batch, drop_remainder=True)
    start = time.perf_counter()
    model.fit(data, steps_per_epoch=steps, epochs=1, shuffle=False, verbose=0)
    seconds = time.perf_counter() - start
    _, train_acc = model.evaluate(x, y, batch_size=1024, verbose=0)
    _, test_acc = model.evaluate(x_test, y_test, batch_size=1024, verbose=0)
    return train_acc, test_acc, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="training steps per run (default 1500)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    parser.add_argument("--train-size", type=int, default=500, help="training examples (default 500)")
    parser.add_argument("--batch-size", type=int, default=16, help="SGD batch size b (default 16)")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate (default 0.1)")
    args = parser.parse_args(argv)

    train_data, test_data = load_digits(args.train_size)
    print(
        f"digits: {len(train_data[0])} train / {len(test_data[0])} test, MLP 64-128-10, "
        f"{args.steps} steps, lr {args.lr}, b = {args.batch_size}, seeds 0..{args.seeds - 1}"
    )
    results = {}
    for name in ("GD", "SGD", "NoisyGD"):
        runs = [train(name, train_data, test_data, seed, args.steps, args.lr, args.batch_size) for seed in range(args.seeds)]
        results[name] = np.array(runs)
    label = {"GD": "GD (full batch)", "SGD": f"SGD (b={args.batch_size})", "NoisyGD": f"NoisyGD gaussian_centered ~ SGD({args.batch_size})"}
    print(f"{'method':<40} {'test acc':>16} {'train acc':>10} {'s/run':>7}")
    for name, runs in results.items():
        print(
            f"{label[name]:<40} {runs[:, 1].mean():>9.4f} ± {runs[:, 1].std():.4f} "
            f"{runs[:, 0].mean():>10.4f} {runs[:, 2].mean():>7.1f}"
        )
    return results


if __name__ == "__main__":
    main()
