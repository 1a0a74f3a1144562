"""One training loop for every experiment: a method is a configuration, a run is (method, seed)."""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from keras_noisygd import _backend
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
    jit_compile: bool = True  # see `fastest_jit_compile`
    micro_batch_size: Optional[int] = None  # larger batches are trained in micro-batches of this size
    curve_size: Optional[int] = None  # test examples for the curve (the first ones; the final accuracy uses all)


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


def accumulation_steps(batch_size, micro_batch_size):
    """Micro-batches per update of a `batch_size` batch: `batch_size // micro_batch_size`, or `None` if not split."""
    if micro_batch_size is None or batch_size <= micro_batch_size:
        return None
    return batch_size // micro_batch_size


def check_micro_batch_size(micro_batch_size, methods):
    """Raises ValueError unless `micro_batch_size` is >= 1 and divides every batch it splits."""
    c = micro_batch_size
    if c is not None and (not isinstance(c, int) or c < 1):
        raise ValueError(f"Argument `micro_batch_size` must be an integer >= 1. Received: micro_batch_size={c!r}")
    for method in methods:
        batch = method.batch_size
        if accumulation_steps(batch, c) and batch % c:
            divisor = max(d for d in range(1, c + 1) if batch % d == 0)
            raise ValueError(
                f"Argument `micro_batch_size` must divide the batch of every method it splits: {method.label} "
                f"trains on batches of {batch}. Pass a divisor of {batch} (the largest below {c} is {divisor}) "
                f"or at least {batch}. Received: micro_batch_size={c}"
            )


def _check_batch(value, limit, name, limit_name):
    if not 1 <= value <= limit:
        raise ValueError(f"Argument `{name}` must be in [1, {limit_name}={limit}]. Received: {name}={value}")


SPARSE = ("sparse_gaussian", "sparse_gaussian_centered")


def _checked_noises(noises):
    for spec in noises:
        noise_template(spec)
    return noises


def noise_template(spec):
    """A noise name, or `"sparse_gaussian[_centered]:k"` for a sparse class with `k` noisy examples per step."""
    name, _, k = str(spec).partition(":")
    if name not in noise_lib.NAMES or name == "none" or (k and name not in SPARSE):
        raise ValueError(
            f"Argument `noise` must be among {[n for n in noise_lib.NAMES if n != 'none']}, a sparse one optionally "
            f"followed by ':k' (k >= 1 noisy examples per step). Received: noise={spec!r}"
        )
    if not k:
        return name
    if not k.isdigit() or int(k) < (2 if name.endswith("centered") else 1):
        raise ValueError(
            f"Argument `noise` takes ':k' with an integer k >= {2 if name.endswith('centered') else 1} for {name}. "
            f"Received: noise={spec!r}"
        )
    return noise_lib.SparseGaussian(num_noisy=int(k), centered=name.endswith("centered"))


def fastest_jit_compile(model):
    """`--xla auto`: the `jit_compile` measured fastest for `model` ("mlp", "cnn", "convsmall") here.

    `benchmarks/main_job.py` (docs/benchmarks.md): on a CPU, TensorFlow's XLA
    ran the paper's full-batch ConvSmall step ~4x slower than TensorFlow
    without it (XLA's CPU convolutions against oneDNN's), while it made the MLP
    step faster; on JAX both ways run XLA's convolutions (op by op without
    `jit`) and were no faster. So XLA is off only for convolutions on
    TensorFlow without an accelerator. PyTorch trains without `torch.compile`
    (it had not compiled the step after 5 minutes here; `fit` below ignores
    `jit_compile` there).
    """
    if _backend.NAME == "torch":
        return False
    if _backend.NAME == "jax" or model == "mlp":
        return True
    return any(not device.startswith("cpu") for device in keras.distribution.list_devices())


def micro_steps(method, config):
    """Keras `fit` steps per update of `method`: its micro-batches (1 when the batch is not split)."""
    return accumulation_steps(method.batch_size, config.micro_batch_size) or 1


def fit(dataset, method, config, seed, callbacks=()):
    """Trains `method` for `config.steps` updates from the initialisation of `seed`.

    A batch larger than `config.micro_batch_size` is trained in micro-batches of
    that size with Keras's `gradient_accumulation_steps`, so each update still
    sees the whole batch (and `NoisyGD` draws one noise vector for it).
    `callbacks` run after the curve's (a progress bar can show its last point).

    Returns:
        `(model, curve)`: the trained model and its `Curve`.
    """
    keras.utils.set_random_seed(seed)  # same initialisation for every method of a seed
    model = architectures.build(
        config.model, dataset.x_train.shape[1:], dataset.num_classes, config.width, config.ghost_batch_size
    )
    k = accumulation_steps(method.batch_size, config.micro_batch_size)
    kwargs = dict(momentum=config.momentum, weight_decay=config.weight_decay or None, gradient_accumulation_steps=k)
    if method.noise is None:
        optimizer = keras.optimizers.SGD(config.lr, **kwargs)
    else:
        optimizer = NoisyGD(config.lr, noise=noise_template(method.noise), emulate_batch_size=method.emulate_batch_size, seed=seed, **kwargs)
    steps = k or 1  # Keras's fit counts micro-steps; `steps` and `eval_every` count updates
    chunk = config.eval_every * steps  # micro-steps between two points of the test curve
    execution = 1 if _backend.NAME == "torch" else chunk  # PyTorch runs one step per call
    model.compile(
        optimizer,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=execution,  # Python (and the test curve) once per chunk
        jit_compile=config.jit_compile and _backend.NAME != "torch",  # there it means torch.compile
    )
    n = len(dataset.x_train)
    data = tf.data.Dataset.from_tensor_slices((dataset.x_train, dataset.y_train))
    if method.batch_size < n:
        data = data.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    # k consecutive micro-batches of the repeated stream are exactly one batch of the unsplit stream.
    data = data.repeat().batch(method.batch_size // steps, drop_remainder=True).prefetch(2)

    m = config.curve_size
    curve = Curve((dataset.x_train, dataset.y_train), (dataset.x_test[:m], dataset.y_test[:m]), every=chunk // execution)
    model.fit(data, steps_per_epoch=config.steps * steps, epochs=1, verbose=0, shuffle=False,
              callbacks=[curve, *callbacks])
    return model, curve


def train(dataset, method, config, seed, callbacks=()):
    """Trains `method` from the initialisation of `seed`; returns a result dict with its learning curve."""
    model, curve = fit(dataset, method, config, seed, callbacks)
    train_loss, train_acc = evaluate(model, dataset.x_train, dataset.y_train)
    test_loss, test_acc = evaluate(model, dataset.x_test, dataset.y_test)
    return dict(
        method=method.label, seed=seed, train_acc=train_acc, test_acc=test_acc, gap=train_acc - test_acc,
        train_loss=train_loss, test_loss=test_loss, steps=config.steps,
        seconds=curve.train_seconds, compile_seconds=curve.compile_seconds, curve=curve.points,
    )


class Curve(keras.callbacks.Callback):
    """Train and test loss and accuracy after every execution chunk, against the update count.

    `points` are dicts of `updates` (the optimizer's `iterations`, which counts
    updates, not the micro-steps of gradient accumulation), `train_loss`,
    `train_acc` (on the whole training set, as trained: random labels
    included), `test_loss` and `test_acc` (on the `test` examples given).
    The evaluations' own time is excluded from the timings: `train_seconds`
    is the wall time of the training chunks; `compile_seconds` is the first
    chunk's time beyond the median of the others (tracing, compilation and the
    input pipeline's start), `None` when there is only one chunk.
    """

    def __init__(self, train, test, every=1):
        super().__init__()
        self.train, self.test, self.points, self.chunks = train, test, [], []
        self.every, self.calls, self.compile_seconds = every, 0, None  # batch callbacks per point of the curve

    @property
    def train_seconds(self):
        return float(sum(self.chunks))

    def on_train_begin(self, logs=None):
        self._since = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.calls += 1
        if self.calls % self.every:
            return
        self.chunks.append(time.perf_counter() - self._since)
        if hasattr(self.model, "jax_state_sync"):  # JAX keeps the trained values outside the model during fit
            self.model.jax_state_sync()
        updates = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        (train_loss, train_acc), (test_loss, test_acc) = evaluate(self.model, *self.train), evaluate(self.model, *self.test)
        self.points.append(dict(updates=updates, train_loss=train_loss, train_acc=train_acc,
                                test_loss=test_loss, test_acc=test_acc))
        if logs is not None:
            logs["test_acc"] = test_acc  # for the callbacks after this one (a progress bar)
        self._since = time.perf_counter()

    def on_train_end(self, logs=None):
        if len(self.chunks) > 1:
            self.compile_seconds = max(0.0, self.chunks[0] - float(np.median(self.chunks[1:])))


def evaluate(model, x, y, batch_size=2048):
    """`(mean cross-entropy, accuracy)` of the model's logits on `(x, y)`, in NumPy float64."""
    logits = np.concatenate([
        keras.ops.convert_to_numpy(model(x[i : i + batch_size], training=False)).astype(np.float64)
        for i in range(0, len(x), batch_size)
    ])
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    y = np.asarray(y).astype(np.int64)
    return float(-log_probs[np.arange(len(y)), y].mean()), float(np.mean(np.argmax(logits, -1) == y))
