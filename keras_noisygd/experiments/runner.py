"""One training loop for every experiment: a method is a configuration, a run is (method, seed)."""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from keras_noisygd import noise as noise_lib
from keras_noisygd.experiments import architectures
from keras_noisygd.optimizers import NoisyGD


@dataclasses.dataclass(frozen=True)
class Method:
    """How one curve is trained: its batch size and, for noisy GD, the noise class emulating SGD(b)."""

    label: str
    batch_size: int
    noise: Optional[str] = None
    emulate_batch_size: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run shares with the other methods of its comparison."""

    model: str
    steps: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    ghost_batch_size: Optional[int] = None
    eval_every: int = 100
    width: Optional[int] = None  # the model's default (architectures.DEFAULT_WIDTH)
    jit_compile: bool = True  # Keras's "auto" turns XLA off on CPU; it is ~30% faster here


def compare_methods(n, b, noises):
    """GD, SGD(b) and full-batch noisy GD with each noise class calibrated to SGD(b) out of n."""
    _check_batch(b, n, "batch_size", "the training-set size")
    return [Method("GD", n), Method(f"SGD(b={b})", b)] + [
        Method(f"GD+{name}", n, name, b) for name in _checked_noises(noises)
    ]


def large_batch_methods(n, b, B, noises):
    """SGD(b), SGD(B), and SGD(B) with each noise class calibrated to SGD(b) out of B."""
    _check_batch(B, n, "large_batch_size", "the training-set size")
    _check_batch(b, B, "batch_size", "large_batch_size")
    return [Method(f"SGD(b={b})", b), Method(f"SGD(B={B})", B)] + [
        Method(f"SGD(B)+{name}", B, name, b) for name in _checked_noises(noises)
    ]


def _check_batch(value, limit, name, limit_name):
    if not 1 <= value <= limit:
        raise ValueError(f"Argument `{name}` must be in [1, {limit_name}={limit}]. Received: {name}={value}")


def _checked_noises(noises):
    for name in noises:
        if name not in noise_lib.NAMES or name == "none":
            raise ValueError(
                f"Argument `noise` must be among {[n for n in noise_lib.NAMES if n != 'none']}. Received: noise={name!r}"
            )
    return noises


def train(dataset, method, config, seed):
    """Trains `method` from the initialisation of `seed`; returns a result dict with the test curve."""
    keras.utils.set_random_seed(seed)  # same initialisation for every method of a seed
    model = architectures.build(
        config.model, dataset.x_train.shape[1:], dataset.num_classes, config.width, config.ghost_batch_size
    )
    kwargs = dict(momentum=config.momentum, weight_decay=config.weight_decay or None)
    if method.noise is None:
        optimizer = keras.optimizers.SGD(config.lr, **kwargs)
    else:
        optimizer = NoisyGD(config.lr, noise=method.noise, emulate_batch_size=method.emulate_batch_size, seed=seed, **kwargs)
    model.compile(
        optimizer,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=config.eval_every,  # Python (and the test curve) once per chunk
        jit_compile=config.jit_compile,
    )
    n = len(dataset.x_train)
    data = tf.data.Dataset.from_tensor_slices((dataset.x_train, dataset.y_train))
    if method.batch_size < n:
        data = data.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    data = data.repeat().batch(method.batch_size, drop_remainder=True).prefetch(2)

    curve = TestCurve(dataset.x_test, dataset.y_test)
    start = time.perf_counter()
    model.fit(data, steps_per_epoch=config.steps, epochs=1, verbose=0, shuffle=False, callbacks=[curve])
    seconds = time.perf_counter() - start - curve.seconds
    train_acc = accuracy(model, dataset.x_train, dataset.y_train)
    test_acc = accuracy(model, dataset.x_test, dataset.y_test)
    return dict(
        method=method.label, seed=seed, train_acc=train_acc, test_acc=test_acc,
        gap=train_acc - test_acc, steps=config.steps, seconds=seconds, curve=curve.points,
    )


class TestCurve(keras.callbacks.Callback):
    """Test accuracy after every execution chunk (`steps_per_execution` steps); its own time is excluded."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y, self.points, self.seconds = x, y, [], 0.0

    def on_train_batch_end(self, batch, logs=None):
        start = time.perf_counter()
        self.points.append((batch + 1, accuracy(self.model, self.x, self.y)))
        self.seconds += time.perf_counter() - start


def accuracy(model, x, y, batch_size=2048):
    predictions = [np.argmax(model(x[i : i + batch_size], training=False), -1) for i in range(0, len(x), batch_size)]
    return float(np.mean(np.concatenate(predictions) == y))
