"""Worker for tests/test_production_backends.py: save a `.keras` file mid-run, continue; or load it and continue.

    python keras_file_worker.py save|resume DIR OPTIMIZER

On the backend `KERAS_BACKEND` names. `save` trains 3 `fit` steps (with
`gradient_accumulation_steps=2` that is one update and half of the next),
saves `DIR/model.keras`, trains 4 more steps and writes the weights and every
optimizer variable to `DIR/uninterrupted.npz`; `resume` loads the file in a
fresh process, trains the same 4 steps and writes `DIR/resumed.npz`.
"""

import sys
from pathlib import Path

import keras
import numpy as np

import keras_noisygd as kn

OPTIMIZERS = {
    "adam_accumulating": lambda: kn.NoisyAdam(0.01, noise="gaussian_centered", emulate_batch_size=4, seed=11,
                                              gradient_accumulation_steps=2),
    "momentum_gd": lambda: kn.NoisyGD(0.1, momentum=0.5, noise="bernoulli", emulate_batch_size=4, seed=11),
}


def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 5)).astype("float32"), rng.integers(0, 3, 32)


def build(optimizer):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(7, activation="tanh")(inputs)
    model = kn.NoisyModel(inputs, keras.layers.Dense(3, activation="softmax")(hidden))
    # jit_compile=True is torch.compile on PyTorch; the compiled steps of TensorFlow and JAX are the ones to check.
    model.compile(optimizer, "sparse_categorical_crossentropy", jit_compile=keras.backend.backend() != "torch")
    return model


def train(model, steps):
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)


def write(model, path):
    state = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    state.update({f"opt{i:02d}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.optimizer.variables)})
    np.savez(path, **state)


def main(mode, directory, name):
    directory = Path(directory)
    if mode == "save":
        model = build(OPTIMIZERS[name]())
        train(model, 3)
        model.save(directory / "model.keras")
        train(model, 4)
        write(model, directory / "uninterrupted.npz")
    else:
        model = keras.saving.load_model(directory / "model.keras")
        train(model, 4)
        write(model, directory / "resumed.npz")


if __name__ == "__main__":
    main(*sys.argv[1:])
