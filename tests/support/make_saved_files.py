"""Writes the `.keras` files of `tests/data/` and what continuing their training gives.

`tests/data/saved_2026-12-04/` was written by this script at commit a66655a (the flat layout, before the
package was split into subpackages), on TensorFlow; `tests/test_saved_files.py` checks that today's
package loads those files and continues their training exactly. It uses public names only, so it runs on
either layout:

    KERAS_BACKEND=tensorflow python tests/support/make_saved_files.py tests/data/saved_2026-12-04
"""

import sys
from pathlib import Path

import keras
import numpy as np

import keras_noisygd as kn


def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(8, 6)).astype("float32"), rng.integers(0, 3, 8)


def functional_model():
    """NoisyModel (functional) + GhostBatchNormalization + NoisyGD with momentum, mid-accumulation."""
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, activation="relu")(inputs)
    hidden = kn.layers.GhostBatchNormalization(ghost_batch_size=2)(hidden)
    outputs = keras.layers.Dense(3)(hidden)
    model = kn.NoisyModel(inputs, outputs, name="functional")
    optimizer = kn.NoisyGD(
        0.05, noise="sparse_gaussian_centered", emulate_batch_size=4, momentum=0.9, seed=7,
        gradient_accumulation_steps=2,
    )
    return model, optimizer


def sequential_model():
    """NoisySequential + NoisyAdamW with a scheduled emulated batch."""
    model = kn.NoisySequential([keras.Input((6,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3)])
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([2], [4.0, 2.0])
    return model, kn.NoisyAdamW(0.01, noise="bernoulli", emulate_batch_size=schedule, seed=11)


def wrapped_model():
    """NoisyWrapper (what `noisy` gives a subclassed model) + NoisyGD with a configured sampler."""
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)], name="inner")
    model = kn.models.NoisyWrapper(inner, name="wrapped")
    return model, kn.NoisyGD(0.1, noise=kn.noise.SGDSampling(batch_size=3, replacement=True), seed=5)


MODELS = {"functional": functional_model, "sequential": sequential_model, "wrapped": wrapped_model}


def train_then_save(name, folder):
    """Trains a few steps, saves `<name>.keras`, then keeps training; returns the arrays to compare."""
    x, y = data()
    keras.utils.set_random_seed(3)
    model, optimizer = MODELS[name]()
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before_save(model, x, y)
    model.save(folder / f"{name}.keras")
    saved = snapshot(model)
    after_load(model, x, y)
    return {**{f"saved_{k}": v for k, v in saved.items()}, **{f"continued_{k}": v for k, v in snapshot(model).items()}}


def before_save(model, x, y):
    """Three updates' worth of steps; the functional model stops after one micro-step of its fourth update."""
    model.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0)
    if model.name == "functional":
        model.fit(x[:4], y[:4], batch_size=4, epochs=1, shuffle=False, verbose=0)


def after_load(model, x, y):
    """What a resumed run does next (the functional model first finishes its update)."""
    if model.name == "functional":
        model.fit(x[4:], y[4:], batch_size=4, epochs=1, shuffle=False, verbose=0)
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)


def snapshot(model):
    x, _ = data()
    arrays = {f"weight_{i}": keras.ops.convert_to_numpy(w) for i, w in enumerate(model.weights)}
    arrays["noise_state"] = keras.ops.convert_to_numpy(kn.find_noisy_optimizer(model.optimizer).noise_state)
    arrays["predictions"] = keras.ops.convert_to_numpy(model(x, training=False))
    return arrays


def main(folder):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in MODELS:
        np.savez(folder / f"{name}_expected.npz", **train_then_save(name, folder))
    print("wrote", sorted(p.name for p in folder.iterdir()))


if __name__ == "__main__":
    main(sys.argv[1])
