"""`NoiseMonitor`: what the injected noise does, measured from the per-example gradients of a probe batch.

Everything is a function of the probe batch's Gram matrix `K = G G^T`
(`K_ij = <G_i, G_j>`, `n x n`) and a weight covariance `C` (`n x n`):

    g                 = (1/n) sum_i G_i                 |g|^2 = 1^T K 1 / n^2
    noise  xi         = (1/n) sum_i (m_i - 1) G_i        |xi|^2 = (m-1)^T K (m-1) / n^2
    tr Cov(xi)        = tr(C K) / n^2                   (C: the covariance of m)
    tr Sigma          = (tr K - n |g|^2) / (n - 1)       (per-example gradient covariance)
    noise scale       = tr Sigma / |g|^2                 (McCandlish et al. 2018, B_simple)
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops, tree

from keras_noisygd import noise as noise_lib
from keras_noisygd import per_example
from keras_noisygd._checks import at_most, check_int
from keras_noisygd.optimizers import find_noisy_optimizer

_BACKEND = keras.backend.backend()


def _wide_float():
    """The Gram matrix's and the draws' dtype: float64, but float32 on JAX unless `jax_enable_x64` is set."""
    if _BACKEND == "jax":
        import jax

        return "float64" if jax.config.jax_enable_x64 else "float32"
    return "float64"

__all__ = ["NoiseMonitor", "noise_statistics", "STATISTICS"]

STATISTICS = (
    "grad_norm",
    "noise_norm",
    "noise_to_grad",
    "noise_cov_trace",
    "sgd_cov_trace",
    "noise_scale",
)


def noise_statistics(gram, weights, noise_covariance, sgd_covariance):
    """The monitor's statistics from the Gram matrix of the per-example gradients (NumPy, float64).

    Args:
        gram: `[n, n]` matrix `K_ij = <G_i, G_j>`.
        weights: `[n]` one draw `m` of the noise weights.
        noise_covariance: `[n, n]` covariance of `m` for the injected noise.
        sgd_covariance: `[n, n]` covariance of SGD(b)'s weights out of `n`.

    Returns:
        A dict with the `STATISTICS` keys (floats).
    """
    gram = np.asarray(gram, np.float64)
    n = gram.shape[0]
    ones = np.ones(n)
    grad_sq = ones @ gram @ ones / n**2
    deviation = np.asarray(weights, np.float64) - 1.0
    noise_sq = deviation @ gram @ deviation / n**2
    per_example_trace = (np.trace(gram) - n * grad_sq) / (n - 1) if n > 1 else 0.0
    grad_norm = np.sqrt(max(grad_sq, 0.0))
    noise_norm = np.sqrt(max(noise_sq, 0.0))
    return {
        "grad_norm": float(grad_norm),
        "noise_norm": float(noise_norm),
        "noise_to_grad": float(noise_norm / grad_norm) if grad_norm > 0 else float("inf"),
        "noise_cov_trace": float(np.sum(noise_covariance * gram) / n**2),  # tr(C K), both symmetric
        "sgd_cov_trace": float(np.sum(sgd_covariance * gram) / n**2),
        "noise_scale": float(per_example_trace / grad_sq) if grad_sq > 0 else float("inf"),
    }


class NoiseMonitor(keras.callbacks.Callback):
    """Logs the size of the injected noise against the gradient, every `every_n_steps` optimizer steps.

    From the per-example gradients `G` of a fixed probe batch of `n` examples
    (the probe plays the role of the step's batch, so for full-batch noisy GD
    pass the training set, or a subset of it) it computes:

    - `grad_norm`: `|g|`, the norm of the batch gradient `g = mean_i G_i`;
    - `noise_norm`: `|xi|` for one draw of the optimizer's noise,
      `xi = (1/n) sum_i (m_i - 1) G_i`, and `noise_to_grad = |xi| / |g|`;
    - `noise_cov_trace`: `tr Cov(xi)` of the optimizer's (calibrated) noise
      class, next to `sgd_cov_trace`, the trace of SGD(`b`)'s sampling-noise
      covariance it is meant to match (equal for every class calibrated to `b`);
    - `noise_scale`: the gradient noise scale `tr(Sigma) / |g|^2` (McCandlish et
      al. 2018, arXiv 1812.06162; `Sigma` the per-example gradient covariance
      on the probe, `n - 1` normalised).

    The values (prefixed `noise/`) are added to `fit`'s logs, so `History`
    and a `keras.callbacks.TensorBoard` placed after this callback record them
    per epoch; `log_dir` also writes them per measurement. `history` keeps
    every measurement with its step. Measuring leaves the model's state and
    the optimizer's noise stream untouched.

    Everything comes from the Gram matrix `K = G G^T`. On TensorFlow and PyTorch, for a network whose
    trainable layers are all `keras.layers.Dense` (on `[B, features]`
    inputs), `Conv1D` or `Conv2D` (channels last, no dilation or groups),
    `Embedding` or `LayerNormalization`, with no BatchNormalization,
    GhostBatchNormalization or Dropout, the monitor never forms `G`: a
    Dense layer contributes `(<a_i, a_j> + 1) <d_i, d_j>` (`a`: its input,
    `d`: the loss's gradient at its pre-activation), an Embedding
    `sum_{s,t} [id_is = id_jt] <d_is, d_jt>` over the positions (or the
    products of its rows, where the vocabulary is below positions^2), a
    convolution or LayerNormalization the products of its small per-example
    rows, all from one batched forward and backward pass. Other models,
    `method="per_example"`, and every model on JAX form `G`
    with `per_example_gradients`. After a measurement, `gram_source` says
    which was used: `"layers"` or `"per_example"`.

    Args:
        probe_batch: `(x, y)` or `(x, y, sample_weight)` arrays: the probe.
        every_n_steps: Measure when the optimizer's step count reaches a
            multiple of this (and once before training). Defaults to `100`.
        sgd_batch_size: The `b` of the SGD(`b`) reference covariance. `None`
            uses the optimizer's `emulate_batch_size` (a schedule's value at
            each measurement). Defaults to `None`.
        loss: Loss for the per-example values; `None` uses the compiled loss.
            Defaults to `None`.
        chunk_size: Passed to `per_example_gradients`. Defaults to `None`.
        log_dir: Optional directory for per-measurement TensorBoard scalars
            (needs the `tensorboard` package: `pip install keras_noisygd[tensorboard]`,
            and the TensorFlow backend). Defaults to `None`.
        seed: Seed of the monitor's own noise draws. Defaults to `0`.
        method: `"auto"` (the Gram matrix from the layers' inputs and
            output gradients where that applies, else from `G`) or
            `"per_example"` (always from `G`). Defaults to `"auto"`.

    Example:

    ```python
    monitor = keras_noisygd.NoiseMonitor((x_train[:256], y_train[:256]), every_n_steps=50)
    history = model.fit(x_train, y_train, batch_size=len(x_train), epochs=500, callbacks=[monitor])
    history.history["noise/noise_to_grad"]
    ```
    """

    def __init__(
        self, probe_batch, every_n_steps=100, sgd_batch_size=None, loss=None, chunk_size=None, log_dir=None, seed=0,
        method="auto",
    ):
        super().__init__()
        if method not in ("auto", "per_example"):
            raise ValueError(f"Argument `method` must be 'auto' or 'per_example'. Received: method={method!r}")
        every_n_steps = check_int("every_n_steps", every_n_steps, 1)
        if not isinstance(probe_batch, (tuple, list)) or len(probe_batch) not in (2, 3):
            raise ValueError(
                "Argument `probe_batch` must be a tuple (x, y) or (x, y, sample_weight). "
                f"Received: probe_batch of type {type(probe_batch).__name__}"
            )
        if log_dir is not None and _BACKEND != "tensorflow":
            raise ValueError(
                "Argument `log_dir` writes TensorBoard summaries with `tf.summary`, which needs the TensorFlow "
                "backend; on the others the values are in `fit`'s logs and `history` (a `keras.callbacks.CSVLogger` "
                f"after this callback records them). Received: log_dir={log_dir!r} with the {_BACKEND!r} backend"
            )
        self.probe_batch = tuple(tree.map_structure(ops.convert_to_tensor, tuple(probe_batch)))
        size = int(tree.flatten(self.probe_batch[0])[0].shape[0])
        if size < 2:
            raise ValueError(f"Argument `probe_batch` must hold at least 2 examples. Received: {size} example(s)")
        self.probe_size = size
        self.every_n_steps = every_n_steps
        self.sgd_batch_size = sgd_batch_size
        self.loss = loss
        self.chunk_size = chunk_size
        self.log_dir = log_dir
        self.seed = seed
        self.method = method
        self.history = []
        self._latest = {}
        self._gram = None
        self._writer = None
        self._plan = None
        self._configurations = {}
        self.gram_source = None

    def on_train_begin(self, logs=None):
        self._noise_configuration()  # bad settings fail here, before the first step
        self._configurations = {}  # this fit's optimizer and model
        self._gram = _compiled(self._gram_matrix)
        self._plan = None
        if self.method == "auto" and _BACKEND != "jax":  # the layer rules need a gradient at each layer's output
            from keras_noisygd import _gram

            self._plan = _gram.cached_plan(self.model)
        if self.log_dir is not None and self._writer is None:
            try:
                import tensorboard  # noqa: F401  (tf.summary's scalar implementation)
            except ImportError as error:
                raise ImportError(
                    "Argument `log_dir` writes TensorBoard summaries, which need the `tensorboard` package: "
                    f"pip install tensorboard. Received: log_dir={self.log_dir!r}"
                ) from error
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(self.log_dir)
        self._layer_gram_function = None
        self._next_step = 0
        self._measure_if_due()

    def on_train_batch_end(self, batch, logs=None):
        self._measure_if_due()
        if logs is not None:
            logs.update(self._latest)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self._latest)

    def _noise_configuration(self):
        optimizer = find_noisy_optimizer(self.model.optimizer)
        noise, b = noise_lib.NoNoise(), self.sgd_batch_size
        if optimizer is not None:
            emulated = optimizer.current_emulate_batch_size()  # a schedule's value at the current update
            b = b if b is not None else emulated
            noise = optimizer.noise
            if emulated is not None:
                noise = noise.calibrated(emulated, self.probe_size)
        if b is None:
            raise ValueError(
                "Argument `sgd_batch_size` is needed: the optimizer has no `emulate_batch_size` to compare "
                "its noise with SGD(b). Received: sgd_batch_size=None"
            )
        at_most("sgd_batch_size", b, "the probe batch size", self.probe_size)
        if not hasattr(noise, "covariance"):
            raise ValueError(f"The optimizer's noise {noise!r} has no `covariance(n)`; NoiseMonitor needs it.")
        return noise, b

    def _configuration(self):
        """`(sample, noise covariance, SGD(b) covariance)` for the current `b`, built once per value of `b`."""
        optimizer = find_noisy_optimizer(self.model.optimizer)
        key = (id(optimizer.noise), optimizer.current_emulate_batch_size()) if optimizer is not None else None
        if key not in self._configurations:
            noise, b = self._noise_configuration()
            n = self.probe_size
            sample = _compiled(lambda seed: noise.sample(seed, n, _wide_float()))
            self._configurations[key] = (sample, noise.covariance(n), noise_lib.SGDSampling(b).covariance(n))
        return self._configurations[key]

    def _gram_matrix(self, values, x, y, sample_weight):
        """`K = G G^T` from the rows of `per_example_gradients` at the trainable and non-trainable `values`."""
        grads = per_example._rows(per_example._compute(
            self.model, x, y, sample_weight=sample_weight, loss=self.loss, chunk_size=self.chunk_size, values=values
        ))
        flat = [ops.reshape(ops.cast(g, _wide_float()), [self.probe_size, -1]) for g in grads]
        return sum(ops.matmul(f, ops.transpose(f)) for f in flat)

    def _layer_gram(self, x, y, sample_weight):
        """`(K, mismatch)` from the layer rules (TensorFlow, compiled once per `fit`, and PyTorch)."""
        if self._layer_gram_function is None:
            from keras_noisygd import _gram

            def layer_gram(x, y, sample_weight):
                return _gram.gram(self._plan, self.model, x, y, sample_weight=sample_weight, loss=self.loss)

            self._layer_gram_function = _compiled(layer_gram)
        return self._layer_gram_function(x, y, sample_weight)

    def _probe_gram(self, x, y, sample_weight):
        """`K` from the layers' inputs and output gradients where that applies, else from `G`."""
        if self._plan is not None:
            from keras_noisygd import _gram

            result = self._layer_gram(x, y, sample_weight)
            if result is not None and float(result[1]) <= _gram.TOLERANCE:
                self.gram_source = "layers"
                return ops.convert_to_numpy(result[0])
            self._plan = None  # the check failed (a layer applied twice, say): form G from now on
        self.gram_source = "per_example"
        values = None
        if _BACKEND == "jax":  # passed in: a compiled JAX function would keep the values it was traced with
            values = ([v.value for v in self.model.trainable_variables],
                      [v.value for v in self.model.non_trainable_variables])
        return ops.convert_to_numpy(self._gram(values, x, y, sample_weight))

    def _measure_if_due(self):
        if hasattr(self.model, "jax_state_sync"):  # JAX keeps the trained values outside the model during fit
            self.model.jax_state_sync()
        step = int(ops.convert_to_numpy(self.model.optimizer.iterations))
        if step < self._next_step:
            return
        self._next_step = (step // self.every_n_steps + 1) * self.every_n_steps
        x, y, *rest = self.probe_batch
        gram = self._probe_gram(x, y, rest[0] if rest else None)
        sample, noise_covariance, sgd_covariance = self._configuration()
        weights = ops.convert_to_numpy(sample(ops.convert_to_tensor([self.seed, step], "int32" if _BACKEND == "jax" else "int64")))
        values = noise_statistics(gram, weights, noise_covariance, sgd_covariance)
        self._latest = {f"noise/{k}": v for k, v in values.items()}
        self.history.append({"step": step, **values})
        if self._writer is not None:
            import tensorflow as tf  # log_dir is refused off TensorFlow

            with self._writer.as_default(step=step):
                for key, value in self._latest.items():
                    tf.summary.scalar(key, value)
            self._writer.flush()


def _compiled(function):
    """`function` compiled once: `tf.function` (graph, no XLA) on TensorFlow, `jax.jit` on JAX, eager on PyTorch."""
    if _BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(function, jit_compile=False)
    if _BACKEND == "jax":
        import jax

        return jax.jit(function)
    return function
