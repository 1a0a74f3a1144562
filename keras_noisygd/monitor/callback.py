"""`NoiseMonitor`: the callback that measures the injected noise on a probe batch during `fit`."""

from __future__ import annotations

import keras
from keras import ops, tree

from keras_noisygd import _backend
from keras_noisygd import noise as noise_lib
from keras_noisygd._checks import at_most, check_int
from keras_noisygd.monitor.statistics import noise_statistics
from keras_noisygd.optimizers import find_noisy_optimizer
from keras_noisygd.per_example.gram import ProbeGram


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
    rows, all from one batched forward and backward pass (on every backend).
    Other models and `method="per_example"` form `G`
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
        if log_dir is not None and not _backend.SCALAR_SUMMARIES:
            _backend.summary_writer(log_dir)  # raises the ValueError that names the backend
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
        self._probe = None
        self._probe_owner = ()  # what `_probe` and `_configurations` were built for (`_owner`)
        self._writer = None
        self._configurations = {}
        self.gram_source = None

    def on_train_begin(self, logs=None):
        self._noise_configuration()  # bad settings fail here, before the first step
        owner = self._owner()
        if len(owner) != len(self._probe_owner) or any(a is not b for a, b in zip(owner, self._probe_owner)):
            # Another model, optimizer, loss or set of trainable variables: compile the probe's functions anew.
            # Otherwise the next `fit` keeps them (tracing them at every `fit` dominated short fits on JAX).
            self._configurations = {}
            self._probe = ProbeGram(self.model, self.loss, self.chunk_size, self.method)
            self._probe_owner = owner
        if self.log_dir is not None and self._writer is None:
            try:
                import tensorboard  # noqa: F401  (tf.summary's scalar implementation)
            except ImportError as error:
                raise ImportError(
                    "Argument `log_dir` writes TensorBoard summaries, which need the `tensorboard` package: "
                    f"pip install tensorboard. Received: log_dir={self.log_dir!r}"
                ) from error
            self._writer = _backend.summary_writer(self.log_dir)
        self._next_step = 0
        self._measure_if_due()

    def on_train_batch_end(self, batch, logs=None):
        self._measure_if_due()
        if logs is not None:
            logs.update(self._latest)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self._latest)

    def _owner(self):
        """What the probe's compiled functions depend on: the model, its optimizer and loss, its trainable variables."""
        model = self.model
        return (model, model.optimizer, getattr(model, "loss", None), *model.trainable_variables)

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
            sample = _backend.compiled(lambda seed: noise.sample(seed, n, _backend.wide_float()))
            self._configurations[key] = (sample, noise.covariance(n), noise_lib.SGDSampling(b).covariance(n))
        return self._configurations[key]

    def _measure_if_due(self):
        _backend.sync_state(self.model)  # JAX keeps the trained values outside the model during fit
        step = int(ops.convert_to_numpy(self.model.optimizer.iterations))
        if step < self._next_step:
            return
        self._next_step = (step // self.every_n_steps + 1) * self.every_n_steps
        x, y, *rest = self.probe_batch
        gram = self._probe(x, y, rest[0] if rest else None)
        self.gram_source = self._probe.source
        sample, noise_covariance, sgd_covariance = self._configuration()
        weights = ops.convert_to_numpy(sample(ops.convert_to_tensor([self.seed, step], _backend.COUNTER_DTYPE)))
        values = noise_statistics(gram, weights, noise_covariance, sgd_covariance)
        self._latest = {f"noise/{k}": v for k, v in values.items()}
        self.history.append({"step": step, **values})
        if self._writer is not None:
            _backend.write_scalars(self._writer, step, self._latest)
