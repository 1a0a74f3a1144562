"""Keras optimizers that carry the sampling noise: `NoiseMixin`, `NoisyGD`, `NoisyAdam`, `NoisyAdamW`.

The optimizer owns the noise configuration and the noise random state; the
train step (`keras_noisygd.NoisyModel`) asks it for each step's loss weights
with `noise_weights(batch_size)` and trains on the re-weighted loss. The update
rule itself is Keras's, untouched: clipping, weight decay, EMA, schedules,
loss scaling and gradient accumulation all come from the base class.
"""

from __future__ import annotations

import numbers
import random
import threading

import keras
import tensorflow as tf

from keras_noisygd import noise as noise_lib

__all__ = ["NoiseMixin", "NoisyGD", "NoisyAdam", "NoisyAdamW", "find_noisy_optimizer"]

_register = keras.saving.register_keras_serializable(package="keras_noisygd")

_NO_NOISE_DRAWN = (
    "{name} received gradients for a step that drew no noise weights, so it would "
    "silently train without noise. A stock `keras.Model`'s train_step does not inject "
    "the sampling noise: build the model with `keras_noisygd.NoisyModel` / "
    "`keras_noisygd.NoisySequential`, or wrap it with `model = keras_noisygd.noisy(model)` "
    "before `compile`. In a custom training loop, call `weights = optimizer.noise_weights("
    "batch_size)` and `keras_noisygd.noisy_gradients(model, x, y, weights)` before "
    "`apply_gradients`. Received: gradients for {count} variables, with no noise weights drawn for their step."
)


class NoiseMixin:
    """Gives any Keras optimizer a multiplicative sampling noise.

    Put it first among the bases, before a `keras.optimizers.Optimizer`
    subclass; it adds three arguments and passes every other one to the base:

    ```python
    @keras.saving.register_keras_serializable()
    class NoisyRMSprop(keras_noisygd.NoiseMixin, keras.optimizers.RMSprop):
        pass
    ```

    The random state is the optimizer variable `noise_state = [seed, counter]`,
    a stateless seed: step `k` draws its weights from `[seed, k]`, and the
    counter advances once per `apply` (per micro-step under gradient
    accumulation), so checkpoints restore the noise stream exactly.

    Args:
        noise: A name from `keras_noisygd.noise.NAMES`, a sampler, or a sampler
            config. A name, or a sampler whose noise size is `None`, is a template
            that needs `emulate_batch_size`. Defaults to `"gaussian_centered"`.
        emulate_batch_size: The SGD batch size `b` to emulate. At every step the
            noise class is calibrated to SGD(`b`) drawn out of that step's batch
            of `B` examples (`B` = the training set for full-batch noisy GD,
            `b < B` for the large-batch variant). Defaults to `None`.
        seed: Int seed of the noise stream. `None` draws one, recorded in the
            config. Defaults to `None`.
        engine: How the train step forms `G W`. `"weighted"`: the gradient of
            the re-weighted loss, one backward pass, `G` never formed.
            `"per_example"`: forms `G` with `keras_noisygd.per_example_gradients`
            and contracts it with the weights (same update to float rounding;
            slower; the base for noise that is not linear in `G`). Defaults to
            `"weighted"`.
        chunk_size: With `engine="per_example"`, examples per vectorised chunk
            (bounds the memory of `G` to `chunk_size` rows); `None` forms all
            `B` rows at once. Defaults to `None`.
        **kwargs: Arguments of the Keras optimizer.
    """

    def __init__(
        self,
        *args,
        noise="gaussian_centered",
        emulate_batch_size=None,
        seed=None,
        engine="weighted",
        chunk_size=None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.noise = _validated_noise(noise, emulate_batch_size)
        self.emulate_batch_size = emulate_batch_size
        self.engine, self.chunk_size = _validated_engine(engine, chunk_size)
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < 2**31:
            raise ValueError(f"Argument `seed` must be None or an int in [0, 2**31). Received: seed={seed!r}")
        self.seed = int(seed)  # a NumPy int too, stored as a Python int for the JSON config
        self._noise_state = self.add_variable(
            shape=(2,), dtype="int64", name="noise_state", aggregation="only_first_replica"
        )
        self._noise_state.assign([seed, 0])
        self._drawn = _DrawnGraphs()

    @property
    def noise_state(self):
        """The `[seed, counter]` variable from which the next step's weights are drawn."""
        return self._noise_state

    def noise_weights(self, batch_size, dtype="float32"):
        """The per-example loss weights `m` of the next step (`E[m_i] = 1`).

        Calling it again before `apply_gradients` returns the same weights. With
        `emulate_batch_size=b`, a batch smaller than `b` is an error when its size
        is known while tracing; a smaller batch that only shows up at run time
        (a partial last batch) gets `m = 1`: drawing fewer than `b` examples
        already carries at least SGD(`b`)'s sampling noise. An empty batch is an
        error (at run time without XLA; under XLA the train step reports loss NaN).

        Under a `tf.distribute` strategy with several replicas in sync
        (`MirroredStrategy`, `MultiWorkerMirroredStrategy`), call it in replica
        context with the replica's own batch size. Every replica draws the
        weights of the *global* batch (the concatenation of all replicas'
        batches, in replica order) from the same seed and returns its own slice,
        so the replicas' weights are those of one single-device step on the
        global batch: the noise is calibrated to SGD(`b`) out of the global
        batch size, and coupled noise classes (centred, SGD sampling) stay
        coupled across replicas. The global size and this replica's offset
        come from an `all_gather` of the local batch sizes, so uneven splits are
        covered; a global batch smaller than `b` is then only known at run
        time and gets `m = 1`.

        Args:
            batch_size: Number `B` of examples in the step (in this replica's
                batch, under a strategy): a Python int or a scalar int tensor.
            dtype: Floating dtype of the weights. Defaults to `"float32"`.

        Returns:
            A `[batch_size]` tensor.
        """
        batch_size = _checked_batch_size(batch_size)
        self._drawn.mark()
        global_size, offset = _global_batch(batch_size, type(self).__name__)
        weights = self._sample(global_size, dtype)
        if offset is None:
            return weights
        return tf.slice(weights, tf.reshape(offset, [1]), tf.reshape(batch_size, [1]))

    def _sample(self, batch_size, dtype):
        b, seed = self.emulate_batch_size, self._noise_state.value
        if b is None:
            return self.noise.sample(seed, batch_size, dtype)
        run_time_check = noise_lib.check_at_most("emulate_batch_size", b, "the batch size B of every step", batch_size)
        sampler = self.noise.calibrated(b, batch_size)
        if not run_time_check:
            return sampler.sample(seed, batch_size, dtype)
        (b_fits, _), = run_time_check
        return tf.cond(
            b_fits,
            lambda: sampler.sample(seed, batch_size, dtype),
            lambda: tf.ones([batch_size], dtype),
        )

    def apply(self, grads, trainable_variables=None):
        # Runs in Python once per trace (or per eager step): a step whose weights
        # were never drawn in this graph would be plain, noise-free descent.
        if not _drawn_in_enclosing_graph(self._drawn.pop()):
            raise ValueError(_NO_NOISE_DRAWN.format(name=type(self).__name__, count=len(grads)))
        super().apply(grads, trainable_variables)
        self._noise_state.assign_add(tf.constant([0, 1], tf.int64))

    def get_config(self):
        config = super().get_config()
        config.update(
            noise=noise_lib.serialize(self.noise),
            emulate_batch_size=self.emulate_batch_size,
            seed=self.seed,
            engine=self.engine,
            chunk_size=self.chunk_size,
        )
        return config


def _checked_batch_size(batch_size):
    """`batch_size`, refused if empty: now for a Python int, at run time (without XLA) for a tensor.

    XLA drops the run-time assertion; `NoisyTrainStep` then reports the loss of
    an empty batch as NaN, so `keras.callbacks.TerminateOnNaN` stops.
    """
    if not tf.is_tensor(batch_size):
        noise_lib._check_int("batch_size", batch_size, 1)
        return batch_size
    message = ["Argument `batch_size` must be >= 1: an empty batch has no examples to weight. Received: batch_size=",
               batch_size]
    with tf.control_dependencies([tf.debugging.Assert(batch_size >= 1, message)]):
        return tf.identity(batch_size)


_EAGER = object()


class _DrawnGraphs:
    """The graph in which each thread last drew weights, until its `apply`.

    Keyed by thread: `MirroredStrategy` runs (and traces) each replica's step
    in a thread of its own, interleaved at every cross-replica call, so one
    replica's `apply` must not see or clear another's mark.
    """

    def __init__(self):
        self._graphs = {}

    def mark(self):
        self._graphs[threading.get_ident()] = _current_graph()

    def pop(self):
        return self._graphs.pop(threading.get_ident(), None)


def _global_batch(batch_size, optimizer_name):
    """`(global batch size, this replica's offset in it)`; `(batch_size, None)` on one replica.

    The local sizes are all-gathered in replica order, the order in which
    `tf.distribute` splits a global batch into the replicas' batches (and
    `MultiWorkerMirroredStrategy` numbers the workers' replicas).
    """
    strategy = tf.distribute.get_strategy()
    if isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy):
        raise ValueError(
            f"{optimizer_name} does not support `ParameterServerStrategy`: its workers step "
            "asynchronously, so they cannot share "
            "one noise draw per global batch. Use `MirroredStrategy` or "
            f"`MultiWorkerMirroredStrategy`. Received: strategy={type(strategy).__name__}"
        )
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return batch_size, None
    local = tf.cast(batch_size, tf.int32)
    sizes = context.all_gather(tf.reshape(local, [1]), axis=0)  # [replicas], in replica order
    before = tf.range(context.num_replicas_in_sync) < tf.cast(context.replica_id_in_sync_group, tf.int32)
    offset = tf.reduce_sum(tf.where(before, sizes, 0))
    return tf.reduce_sum(sizes), offset


def _current_graph():
    return _EAGER if tf.executing_eagerly() else tf.compat.v1.get_default_graph()


def _drawn_in_enclosing_graph(drawn):
    """Whether the weights were drawn in the current graph or one it is nested in (tf.cond)."""
    if drawn is None:
        return False
    graph = _current_graph()
    while graph is not None:
        if graph is drawn:
            return True
        graph = getattr(graph, "outer_graph", None)
    return False


def _validated_noise(noise, emulate_batch_size):
    sampler = noise_lib.get(noise)
    b = emulate_batch_size
    if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 1):
        raise ValueError(
            f"Argument `emulate_batch_size` must be None or an integer >= 1. Received: emulate_batch_size={b!r}"
        )
    template = getattr(sampler, "is_template", False)
    if b is None and template:
        raise ValueError(
            f"Argument `noise={noise!r}` names a noise class without its size: pass "
            "`emulate_batch_size=b` to calibrate it to SGD with batch b, or a configured "
            "sampler such as `keras_noisygd.noise.Gaussian(std=1.0)`. Received: emulate_batch_size=None"
        )
    if b is not None and not template:
        raise ValueError(
            f"Argument `emulate_batch_size` calibrates a noise template, but `noise` is already "
            f"configured: {sampler!r}. Pass one or the other. Received: emulate_batch_size={b}"
        )
    if b is not None:
        sampler.calibrated(b, b)  # raises now, not at the first step, if b cannot be emulated
    return sampler


ENGINES = ("weighted", "per_example")


def _validated_engine(engine, chunk_size):
    if engine not in ENGINES:
        raise ValueError(f"Argument `engine` must be one of {list(ENGINES)}. Received: engine={engine!r}")
    if chunk_size is not None:
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"Argument `chunk_size` must be None or an int >= 1. Received: chunk_size={chunk_size!r}")
        if engine != "per_example":
            raise ValueError(
                "Argument `chunk_size` only applies to engine='per_example' (the weighted engine never forms "
                f"the per-example gradients). Received: chunk_size={chunk_size}, engine={engine!r}"
            )
    return engine, chunk_size


def find_noisy_optimizer(optimizer):
    """The noise-carrying optimizer in `optimizer` (itself, or inside a `LossScaleOptimizer`), or `None`."""
    for candidate in (optimizer, getattr(optimizer, "inner_optimizer", None)):
        if isinstance(candidate, NoiseMixin):
            return candidate
    return None


@_register
class NoisyGD(NoiseMixin, keras.optimizers.SGD):
    """Multiplicative-noise gradient descent (the paper's MSGD), on `keras.optimizers.SGD`.

    Each step draws per-example loss weights `m` with `E[m_i] = 1` from the
    noise class and descends the re-weighted loss, i.e. the gradient matrix
    times the sampling noise `W = m / B`:

    ```
    m ~ noise calibrated to SGD(b) out of B          # fresh each step
    g = grad( (1/B) sum_i m_i l_i(theta) + reg(theta) )   # = G W + grad reg
    velocity = momentum * velocity - learning_rate * g
    theta = theta + velocity                          # (Nesterov as in SGD)
    ```

    With `noise="none"` (or SGD sampling with `b = B`) it is
    `keras.optimizers.SGD`, step for step.

    Conventions: the noise is a per-example *loss weight* with mean 1, not an
    additive or per-coordinate perturbation; the learning rate multiplies the
    noisy gradient; `emulate_batch_size=b` calibrates to the batch `B` the step
    actually sees. Train with `keras_noisygd.NoisyModel` (or `noisy(model)`);
    a stock `keras.Model` raises at the start of `fit` rather than train without noise.

    Args:
        learning_rate: A float, a schedule or a callable. Defaults to `0.01`.
        noise: A name from `keras_noisygd.noise.NAMES`, a sampler or a sampler
            config. Defaults to `"gaussian_centered"`.
        emulate_batch_size: The SGD batch size `b` that a name or template noise is
            calibrated to, against each step's batch size `B`. Defaults to `None`.
        momentum: Momentum, as in `keras.optimizers.SGD`. Defaults to `0.0`.
        nesterov: Nesterov momentum. Defaults to `False`.
        seed: Int seed of the noise stream; `None` draws one. Defaults to `None`.
        engine: `"weighted"` (one backward pass of the re-weighted loss) or
            `"per_example"` (forms the per-example gradients `G`, then `G W`);
            see `NoiseMixin`. Defaults to `"weighted"`.
        chunk_size: Rows of `G` formed at a time by the per-example engine.
            Defaults to `None` (all).
        **kwargs: Other `keras.optimizers.Optimizer` arguments (`weight_decay`,
            `clipnorm`, `use_ema`, `gradient_accumulation_steps`, `name`, ...).

    Example:

    ```python
    model = keras_noisygd.NoisyModel(inputs, outputs)
    model.compile(
        optimizer=keras_noisygd.NoisyGD(0.1, noise="bernoulli", emulate_batch_size=32),
        loss="sparse_categorical_crossentropy",
    )
    model.fit(x, y, batch_size=len(x), epochs=1000)   # full-batch noisy GD ~ SGD(32)
    ```

    References:
        Wu et al., "On the Noisy Gradient Descent that Generalizes as SGD",
        ICML 2020, https://arxiv.org/abs/1906.07405
    """

    def __init__(
        self,
        learning_rate=0.01,
        noise="gaussian_centered",
        emulate_batch_size=None,
        momentum=0.0,
        nesterov=False,
        seed=None,
        engine="weighted",
        chunk_size=None,
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            momentum=momentum,
            nesterov=nesterov,
            noise=noise,
            emulate_batch_size=emulate_batch_size,
            seed=seed,
            engine=engine,
            chunk_size=chunk_size,
            **kwargs,
        )


@_register
class NoisyAdam(NoiseMixin, keras.optimizers.Adam):
    """`keras.optimizers.Adam` on the multiplicative-noise gradient.

    Same noise contract as `NoisyGD` (`noise`, `emulate_batch_size`, `seed`,
    `engine`, `chunk_size`);
    every other argument is Adam's. Adam's moments see the noisy gradient `G W`.

    Args:
        learning_rate: Defaults to `0.001`.
        noise: Defaults to `"gaussian_centered"`.
        emulate_batch_size: Defaults to `None`.
        seed: Defaults to `None`.
        **kwargs: Other `keras.optimizers.Adam` arguments.
    """

    def __init__(self, learning_rate=0.001, noise="gaussian_centered", emulate_batch_size=None, seed=None, **kwargs):
        super().__init__(
            learning_rate=learning_rate, noise=noise, emulate_batch_size=emulate_batch_size, seed=seed, **kwargs
        )


@_register
class NoisyAdamW(NoiseMixin, keras.optimizers.AdamW):
    """`keras.optimizers.AdamW` on the multiplicative-noise gradient (decoupled decay is not noised).

    Args:
        learning_rate: Defaults to `0.001`.
        noise: Defaults to `"gaussian_centered"`.
        emulate_batch_size: Defaults to `None`.
        seed: Defaults to `None`.
        **kwargs: Other `keras.optimizers.AdamW` arguments.
    """

    def __init__(self, learning_rate=0.001, noise="gaussian_centered", emulate_batch_size=None, seed=None, **kwargs):
        super().__init__(
            learning_rate=learning_rate, noise=noise, emulate_batch_size=emulate_batch_size, seed=seed, **kwargs
        )
