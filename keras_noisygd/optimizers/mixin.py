"""`NoiseMixin`: the noise draw any Keras optimizer can carry, one draw per update.

The optimizer owns the noise configuration and the noise random state; the
train step (`keras_noisygd.NoisyModel`) asks it for each step's loss weights
with `noise_weights(batch_size)` and trains on the re-weighted loss. The update
rule itself is Keras's, untouched: clipping, weight decay, EMA, schedules,
loss scaling and gradient accumulation all come from the base class.
"""

from __future__ import annotations

import random

import keras
from keras import ops

from keras_noisygd import _backend
from keras_noisygd import noise as noise_lib
from keras_noisygd._checks import at_most, check_batch_size, check_int, guarded, is_static
from keras_noisygd.optimizers import validation


class NoiseMixin:
    """Gives any Keras optimizer a multiplicative sampling noise.

    Put it first among the bases, before a `keras.optimizers.Optimizer`
    subclass; it adds its arguments and passes every other one to the base:

    ```python
    @keras.saving.register_keras_serializable()
    class NoisyRMSprop(keras_noisygd.NoiseMixin, keras.optimizers.RMSprop):
        pass
    ```

    The random state is the optimizer variable `noise_state = [seed, counter]`.
    The counter advances once per `apply` (once per micro-step under gradient
    accumulation), so checkpoints restore the noise stream exactly. Update
    `u` draws its weights from the stateless seed `[seed, u]`.

    **One draw per update.** With Keras's `gradient_accumulation_steps=k`, an
    update averages the gradients of `k` micro-batches of `c` examples each.
    The weights of the whole update (`N = k c` examples, times the replicas
    under `tf.distribute`) are drawn once, from the same seed a single batch of
    `N` would use, and micro-step `j` trains on its slice `[j c, (j + 1) c)`.
    So `fit(x, y, batch_size=n // k)` with `gradient_accumulation_steps=k`
    takes the steps of `fit(x, y, batch_size=n)`: full-batch noisy GD on data
    of any size, and `emulate_batch_size` is calibrated against `N`. All
    micro-batches of an update must have the same size (checked at run time).

    Args:
        noise: A name from `keras_noisygd.noise.NAMES`, a sampler, or a sampler
            config. A name, or a sampler whose noise size is `None`, is a template
            that needs `emulate_batch_size`. Defaults to `"gaussian_centered"`.
        emulate_batch_size: The SGD batch size `b` to emulate: an int, or a
            `keras.optimizers.schedules.LearningRateSchedule` of the update
            step whose value (rounded to the nearest integer) is `b` at that
            update, e.g. an emulated batch that grows during training. At every
            update the noise class is calibrated to SGD(`b`) drawn out of that
            update's `N` examples (`N` = the training set for full-batch noisy
            GD, `b < N` for the large-batch variant). Defaults to `None`.
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
        self.emulate_batch_size = validation.emulate_batch_size(emulate_batch_size)
        self.noise = validation.noise(noise, self.emulate_batch_size)
        self.engine, self.chunk_size = validation.engine(engine, chunk_size)
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
        # A NumPy int too, stored as a Python int for the JSON config.
        self.seed = check_int("seed", seed, 0, maximum=2**31 - 1, allow_none=True)
        self._noise_state = self.add_variable(
            shape=(2,), dtype=_backend.COUNTER_DTYPE, name="noise_state", aggregation="only_first_replica"
        )
        self._noise_state.assign(ops.convert_to_tensor([self.seed, 0], _backend.COUNTER_DTYPE))
        if self.gradient_accumulation_steps:
            # The (global) size of the current update's first micro-batch: the others must match it.
            self._micro_batch_size = self.add_variable(
                shape=(), dtype=_backend.COUNTER_DTYPE, name="noise_micro_batch_size", aggregation="only_first_replica"
            )
        self._drawn = _backend.DrawRecord()
        self._full_update_seen = False  # whether an update of at least `emulate_batch_size` examples was drawn

    @property
    def noise_state(self):
        """The `[seed, counter]` variable from which the next step's weights are drawn."""
        return self._noise_state

    def noise_weights(self, batch_size, dtype="float32"):
        """The per-example loss weights `m` of the next step (`E[m_i] = 1`).

        Calling it again before `apply_gradients` returns the same weights. With
        `emulate_batch_size=b`, a first update of fewer than `b` examples is an
        error; a smaller update after full ones (a partial last batch: a run-time
        size under TensorFlow, a static one on JAX and PyTorch) gets `m = 1`:
        drawing fewer than `b` examples already carries at least SGD(`b`)'s
        sampling noise. An empty batch is an error (at run time without XLA;
        under XLA the train step reports loss NaN).

        Under gradient accumulation (`gradient_accumulation_steps=k`) the
        weights are the micro-step's slice of one draw for the whole update of
        `k` micro-batches (see the class docstring). A micro-batch whose size
        differs from the first micro-batch of its update is an error (under
        XLA: NaN weights, so the loss is NaN), since the update's draw was sized
        for `k` equal micro-batches.

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
        batch_size = check_batch_size(batch_size)
        self._drawn.mark(self._noise_state.value)
        step_size, offset = _backend.global_batch(batch_size, type(self).__name__)
        update, micro_step = self._update_position()
        update_size, conditions = step_size, []
        if self.gradient_accumulation_steps:
            if offset is not None:
                raise ValueError(validation.NO_DISTRIBUTED_ACCUMULATION.format(k=self.gradient_accumulation_steps))
            update_size = self.gradient_accumulation_steps * step_size
            conditions = self._check_micro_batch(step_size, micro_step)
            offset = micro_step * ops.cast(step_size, _backend.COUNTER_DTYPE)
        weights, schedule_conditions = self._draw_update(update, update_size, dtype)
        weights = guarded(weights, conditions + schedule_conditions)
        if offset is None:
            return weights
        # A gather, not a slice: XLA needs a slice's `begin` at compile time, so an offset read from
        # the noise-state variable would recompile the step at every new update (and did: 2.5 s a step).
        indices = ops.cast(offset, "int32") + ops.arange(batch_size, dtype="int32")
        return ops.take(weights, indices)

    def current_emulate_batch_size(self):
        """The SGD batch size `b` the next update emulates (a schedule's current value), or `None`."""
        if not isinstance(self.emulate_batch_size, keras.optimizers.schedules.LearningRateSchedule):
            return self.emulate_batch_size  # fixed: no need to read the update counter
        update, _ = self._update_position()
        b, _ = self._emulated_batch_size(update)
        return b if b is None or isinstance(b, int) else int(ops.convert_to_numpy(b))

    def _update_position(self):
        """`(update, micro-step)`: the index of the update the next step belongs to, and its place in it."""
        counter = self._noise_state.value[1]
        k = self.gradient_accumulation_steps or 1
        return ops.floor_divide(counter, k), ops.mod(counter, k)

    def _check_micro_batch(self, step_size, micro_step):
        """Records the first micro-batch's size; the run-time condition that this one has the same size."""
        size = ops.cast(step_size, _backend.COUNTER_DTYPE)
        expected = ops.where(ops.equal(micro_step, 0), size, self._micro_batch_size.value)
        self._micro_batch_size.assign(expected)
        k = self.gradient_accumulation_steps
        message = [
            f"With `gradient_accumulation_steps={k}` every micro-batch of an update must have the same size: the "
            f"update's noise is drawn once for {k} x that many examples. Pass a `batch_size` that divides the "
            "number of training examples, or batch a dataset with `drop_remainder=True`. Received: a micro-batch "
            "of", size, "examples in an update whose first micro-batch had", expected,
        ]
        return [(ops.equal(size, expected), message)]

    def _emulated_batch_size(self, update):
        """`(b, run-time conditions)` at `update`: `None`, an int, or a schedule's rounded value (float32)."""
        b = self.emulate_batch_size
        if not isinstance(b, keras.optimizers.schedules.LearningRateSchedule):
            return b, []
        value = ops.round(ops.cast(b(update), "float32"))
        message = ["Argument `emulate_batch_size` (a schedule) must give values >= 1. Received: emulate_batch_size=",
                   value, "at update", update]
        return value, [(ops.greater_equal(value, 1), message)]

    def _draw_update(self, update, size, dtype):
        """`(weights, run-time conditions)`: the draw of update `update`, of `size` examples in all."""
        seed = ops.stack([self._noise_state.value[0], ops.cast(update, _backend.COUNTER_DTYPE)])
        b, conditions = self._emulated_batch_size(update)
        if b is None:
            return self.noise.sample(seed, size, dtype), conditions
        if is_static(b) and is_static(size):
            if size >= b:
                self._full_update_seen = True
            elif self._full_update_seen:
                # A smaller update after full ones: a partial last batch, which JAX and PyTorch see with its
                # static size (TensorFlow's traced step sees it at run time, below). Drawing fewer than b
                # examples already carries at least SGD(b)'s noise.
                return ops.ones([size], dtype), conditions
        # Checked before calibrating, so that a static b > B names the user's argument.
        run_time_check = at_most("emulate_batch_size", b, "the batch size B of every step", size)
        sampler = self.noise.calibrated(b, size)
        if not run_time_check:
            return sampler.sample(seed, size, dtype), conditions
        (b_fits, _), = run_time_check
        weights = ops.cond(
            b_fits,
            lambda: sampler.sample(seed, size, dtype),
            lambda: ops.ones([size], dtype),
        )
        return weights, conditions

    def apply(self, grads, trainable_variables=None):
        # Runs in Python once per trace (or per eager step): a step whose weights
        # were never drawn in this graph would be plain, noise-free descent.
        if not self._drawn.drawn_in_step(self._noise_state.value):
            raise ValueError(validation.NO_NOISE_DRAWN.format(name=type(self).__name__, count=len(grads)))
        super().apply(grads, trainable_variables)
        self._noise_state.assign_add(ops.convert_to_tensor([0, 1], _backend.COUNTER_DTYPE))

    def get_config(self):
        config = super().get_config()
        b = self.emulate_batch_size
        if isinstance(b, keras.optimizers.schedules.LearningRateSchedule):
            b = keras.optimizers.schedules.serialize(b)
        config.update(
            noise=noise_lib.serialize(self.noise),
            emulate_batch_size=b,
            seed=self.seed,
            engine=self.engine,
            chunk_size=self.chunk_size,
        )
        return config


def find_noisy_optimizer(optimizer):
    """The noise-carrying optimizer in `optimizer` (itself, or inside a `LossScaleOptimizer`), or `None`."""
    for candidate in (optimizer, getattr(optimizer, "inner_optimizer", None)):
        if isinstance(candidate, NoiseMixin):
            return candidate
    return None
