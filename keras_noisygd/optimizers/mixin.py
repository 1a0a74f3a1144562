"""`NoiseMixin`: the noise draw any Keras optimizer can carry, one draw per update.

The optimizer owns the noise configuration and the noise random state; the
train step (`keras_noisygd.NoisyModel`) asks it for each step's loss weights
with `noise_weights(batch_size)` and trains on the re-weighted loss. The update
rule itself is Keras's, untouched: clipping, weight decay, EMA, schedules,
loss scaling and gradient accumulation all come from the base class.
"""

from __future__ import annotations

import random
import types
import warnings

import keras
import numpy as np
from keras import ops

from keras_noisygd import _backend
from keras_noisygd import noise as noise_lib
from keras_noisygd._checks import EMPTY_BATCH, check_batch_size, check_int, guarded
from keras_noisygd.optimizers import checks, draw, validation
from keras_noisygd.optimizers.docs import with_noise_args

_ONE_UPDATE = np.array([0, 1], _backend.COUNTER_DTYPE)  # what `apply` adds to `[seed, counter]`


@with_noise_args
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
        {{noise_args}}
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
        self.noise, self.emulate_batch_size = validation.noise(noise, validation.emulate_batch_size(emulate_batch_size))
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
        # The first failed run-time check of the draw since `reset_noise_check`: [code, value, value]. A compiled
        # step cannot raise, so it skips its update and records the failure here (`failed_check_message`).
        # Not saved: a `.keras` file of an earlier version has the same optimizer variables.
        self._noise_check = self.add_variable(
            shape=(3,), dtype=_backend.COUNTER_DTYPE, name="noise_check", aggregation="only_first_replica"
        )
        self._check_messages = {}  # code -> the message's parts, recorded at trace time
        self._drawn = _backend.DrawRecord()
        self._calibrations = {}  # (noise, b, N) -> the noise calibrated to them, for static sizes
        # Set by each draw, outside Keras's attribute tracking (which runs at every setting): whether an update
        # of at least `emulate_batch_size` examples was drawn, and `checks_in_step` and `checked_on_host`.
        self._flags = types.SimpleNamespace(full_update_seen=False, checks_in_step=False, checked_on_host=False)
        self._warned_noiseless = False

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
        a compiled step records it and skips its update, see `apply`).

        Under gradient accumulation (`gradient_accumulation_steps=k`) the
        weights are the micro-step's slice of one draw for the whole update of
        `k` micro-batches (see the class docstring). A micro-batch of another
        size than its update's first is an error (in a compiled step: recorded,
        and the update skipped): the draw was sized for `k` equal micro-batches.

        Under a `tf.distribute` strategy with several replicas in sync
        (`MirroredStrategy`, `MultiWorkerMirroredStrategy`), call it in replica
        context with the replica's own batch size. Every replica draws the
        weights of the *global* batch (the concatenation of all replicas'
        batches, in replica order) from the same seed and returns its own slice,
        so the replicas' weights are those of one single-device step on the
        global batch: the noise is calibrated to SGD(`b`) out of the global
        batch size, and coupled noise classes (centred, SGD sampling) stay
        coupled across replicas. The global size and offset come from an
        `all_gather` of the local sizes, so uneven splits are covered. With
        accumulation too, replica `r` of micro-step `j` gets `[j C + o_r, ...)`
        of the update's draw, `C` the global micro-batch size.

        Args:
            batch_size: Number `B` of examples in the step (in this replica's
                batch, under a strategy): a Python int or a scalar int tensor.
            dtype: Floating dtype of the weights. Defaults to `"float32"`.

        Returns:
            A `[batch_size]` tensor.
        """
        batch_size = check_batch_size(batch_size)
        state = self._noise_state.value  # read once: each read dispatches through Keras in an eager step
        self._drawn.mark(state)
        step_size, offset = _backend.global_batch(batch_size, type(self).__name__)
        update, micro_step = self._update_position(state)
        update_size, conditions = step_size, []
        if self.gradient_accumulation_steps:  # micro-step j of global size C (over replicas): [j C, (j + 1) C)
            k = self.gradient_accumulation_steps
            update_size = k * step_size
            conditions = checks.same_micro_batch(self._micro_batch_size, step_size, micro_step, k)
            start = micro_step * ops.cast(step_size, _backend.COUNTER_DTYPE)
            offset = start if offset is None else start + ops.cast(offset, _backend.COUNTER_DTYPE)
        weights, schedule_conditions = draw.update_weights(self, state, update, update_size, dtype)
        conditions = conditions + schedule_conditions
        if ops.is_tensor(batch_size):  # an empty batch (TensorFlow's traced step sees its size at run time)
            conditions.append((ops.greater_equal(batch_size, 1), [EMPTY_BATCH, batch_size]))
        self._flags.checked_on_host = checks.record(self._noise_check, self._check_messages, conditions, weights)
        self._flags.checks_in_step = bool(conditions)
        weights = guarded(weights, conditions)
        if offset is None:
            return weights
        # A gather, not a slice: XLA needs a slice's `begin` at compile time, so an offset read from
        # the noise-state variable would recompile the step at every new update (and did: 2.5 s a step).
        indices = ops.cast(offset, "int32") + ops.arange(batch_size, dtype="int32")
        return ops.take(weights, indices)

    @property
    def checks_in_step(self):
        """Whether the last draw has run-time checks: only then is the update conditional (a `tf.cond` costs 3x)."""
        return self._flags.checks_in_step

    @property
    def checked_on_host(self):
        """Whether the host saw every check of the last draw pass (an eager CPU step): its loss report needs no guard."""
        return self._flags.checked_on_host

    @property
    def noise_check(self):
        """The `[code, value, value]` variable of the first failed run-time check (`code` 0: none)."""
        return self._noise_check

    def reset_noise_check(self):
        """Forgets a recorded failure (`fit` does this at its start)."""
        self._noise_check.assign(ops.zeros((3,), _backend.COUNTER_DTYPE))

    def failed_check_message(self):
        """The message of the first run-time check that failed in a compiled step since the last reset, or `None`.

        A step compiled with XLA or `jax.jit` cannot raise, so a failed check
        skips that step's update (weights, slots and noise counter stay as
        they were) and records itself; `NoisyTrainStep.fit` then stops with
        this message.
        """
        return checks.message(ops.convert_to_numpy(self._noise_check.value), self._check_messages)

    def warn_if_noiseless(self, update_size):
        """Warns once when the noise calibrated to SGD(b) out of `update_size` examples is no noise at all.

        SGD(`B`) out of `B` examples is GD: the centred classes, SGD sampling
        and Bernoulli then draw `m = 1`. Called by the draw when the sizes are
        known while tracing, and by `NoisyTrainStep.fit` from its `batch_size`.
        """
        if not self._warned_noiseless and checks.is_noiseless(self.noise, self.emulate_batch_size, update_size):
            self._warned_noiseless = True
            warnings.warn(checks.NOISELESS.format(
                name=type(self).__name__, noise=self.noise.name, b=self.emulate_batch_size, B=int(update_size)
            ), stacklevel=3)

    def stateless_noise_weights(self, optimizer_variables, batch_size, dtype="float32"):
        """`(weights, optimizer_variables)`: `noise_weights` for a stateless (JAX) loop, from and to the values."""
        with keras.StatelessScope(state_mapping=list(zip(self.variables, optimizer_variables))) as scope:
            weights = self.noise_weights(batch_size, dtype)
        return weights, [scope.get_current_value(v) for v in self.variables]

    def current_emulate_batch_size(self):
        """The SGD batch size `b` the next update emulates (a schedule's current value), or `None`."""
        if not isinstance(self.emulate_batch_size, keras.optimizers.schedules.LearningRateSchedule):
            return self.emulate_batch_size  # fixed: no need to read the update counter
        update, _ = self._update_position()
        b, _ = checks.emulated_batch_size(self.emulate_batch_size, update)
        return b if b is None or isinstance(b, int) else int(ops.convert_to_numpy(b))

    def _update_position(self, state=None):
        """`(update, micro-step)`: the index of the update the next step belongs to, and its place in it."""
        counter = (self._noise_state.value if state is None else state)[1]
        k = self.gradient_accumulation_steps or 1
        if k == 1:
            return counter, 0  # every step is an update (two operations fewer in an eager step)
        return ops.floor_divide(counter, k), ops.mod(counter, k)

    def apply(self, grads, trainable_variables=None):
        # Runs in Python once per trace (or per eager step): a step whose weights
        # were never drawn in this graph would be plain, noise-free descent.
        if not self._drawn.drawn_in_step(self._noise_state.value):
            raise ValueError(validation.NO_NOISE_DRAWN.format(name=type(self).__name__, count=len(grads)))
        if not self.built and trainable_variables is not None:  # not inside the tf.cond below
            self.build(trainable_variables)
        base_apply = super().apply

        def update():
            base_apply(grads, trainable_variables)
            _backend.assign_add(self._noise_state, _ONE_UPDATE)

        # A failed check (recorded by a compiled step that could not raise) skips the update, like
        # LossScaleOptimizer skips a non-finite one: the weights, slots and noise counter stay as they were.
        if self.checks_in_step:
            _backend.run_if(ops.equal(self._noise_check.value[0], 0), update)
        else:
            update()

    def _backend_apply_gradients(self, grads, trainable_variables):
        # Keras's accumulation cannot run under several tf.distribute replicas (keras-team/keras#20582).
        if not _backend.accumulate_across_replicas(self, grads, trainable_variables):
            super()._backend_apply_gradients(grads, trainable_variables)

    def save_own_variables(self, store):
        """Keras's, without `noise_check` (run-time state), so files stay those of earlier versions."""
        checks.save_variables(self, store, self._noise_check)

    def load_own_variables(self, store):
        """Keras's, without `noise_check`."""
        checks.load_variables(self, store, self._noise_check)

    def get_config(self):
        config = super().get_config()
        b = self.emulate_batch_size
        if isinstance(b, keras.optimizers.schedules.LearningRateSchedule):
            b = keras.optimizers.schedules.serialize(b)
        config.update(noise=noise_lib.serialize(self.noise), emulate_batch_size=b, seed=self.seed,
                      engine=self.engine, chunk_size=self.chunk_size)
        return config


def find_noisy_optimizer(optimizer):
    """The noise-carrying optimizer in `optimizer` (itself, or inside a `LossScaleOptimizer`), or `None`."""
    for candidate in (optimizer, getattr(optimizer, "inner_optimizer", None)):
        if isinstance(candidate, NoiseMixin):
            return candidate
    return None
