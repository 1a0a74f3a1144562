"""Keras models whose `train_step` injects the optimizer's sampling noise.

The train step has one form for the stateful backends (TensorFlow and
PyTorch, which differ only in how a gradient is taken) and one for JAX,
whose trainer passes the state in and out (`_jax_step.py`).
"""

from __future__ import annotations

import keras
from keras import ops, tree

from keras_noisygd.gradients import _batch_size_of, _combine_weights
from keras_noisygd.optimizers import find_noisy_optimizer

if keras.backend.backend() == "tensorflow":
    from keras_noisygd import _tf_bookkeeping as _bookkeeping
else:
    from keras_noisygd import _bookkeeping

__all__ = ["NoisyTrainStep", "NoisyModel", "NoisySequential", "noisy"]

_register = keras.saving.register_keras_serializable(package="keras_noisygd")


class NoisyTrainStep:
    """Mixin for `keras.Model` subclasses: a `train_step` that injects the noise.

    With a noise-carrying optimizer (`NoisyGD`, `NoisyAdam`, a `NoiseMixin`
    subclass, or one of them inside a `LossScaleOptimizer`), each step asks it
    for the loss weights `m` of the batch, multiplies them into the user's
    `sample_weight`, and descends the re-weighted loss. Metrics and the
    reported `loss` are computed on the clean (un-noised) loss. With any other
    optimizer it is `keras.Model.train_step`. The same on TensorFlow, JAX and
    PyTorch.
    """

    if keras.backend.backend() == "jax":

        def train_step(self, state, data):
            """One noisy step on JAX: `train_step(state, data) -> (logs, state)`, as `JAXTrainer`'s."""
            if find_noisy_optimizer(self.optimizer) is None:
                return super().train_step(state, data)
            from keras_noisygd import _jax_step

            return _jax_step.train_step(self, state, data)

    else:

        def train_step(self, data):
            """One noisy step: draw `m`, descend `(1/B) sum_i m_i s_i l_i + reg`, report clean values.

            Args:
                data: A batch `(x, y, sample_weight)` as `fit` passes it.

            Returns:
                The logs dict of `compute_metrics`, with the clean `loss`.
            """
            optimizer = find_noisy_optimizer(self.optimizer)
            if optimizer is None:
                return super().train_step(data)
            _check_reductions(self.loss)
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            batch_size = _batch_size_of(x)
            weights = optimizer.noise_weights(batch_size, keras.config.floatx())  # float32 under mixed precision
            if optimizer.engine == "per_example":
                y_pred, gradients = self._per_example_gradients(x, y, sample_weight, weights, optimizer.chunk_size)
            else:
                y_pred, gradients = self._weighted_gradients(x, y, sample_weight, weights)
            # The clean loss is read before the update (regularizers see these weights).
            y_pred = tree.map_structure(ops.stop_gradient, y_pred)
            clean_loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            _bookkeeping.apply_gradients(self.optimizer, gradients, self.trainable_weights)
            self._report_loss(clean_loss, batch_size, weights)
            return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _weighted_gradients(self, x, y, sample_weight, weights):
        """`G W + grad R` as the gradient of the re-weighted loss: one backward pass."""
        y_pred = []

        def noisy_loss():
            y_pred.append(self(x, training=True))
            with _per_output_loss_metrics_untouched(self, y_pred[0]):  # they must see the clean loss only
                loss = self.compute_loss(
                    x=x, y=y, y_pred=y_pred[0], sample_weight=_combine_weights(sample_weight, weights), training=True
                )
            return self.optimizer.scale_loss(loss)

        gradients = _bookkeeping.gradients(noisy_loss, lambda: self.trainable_weights)
        return y_pred[0], gradients

    def _per_example_gradients(self, x, y, sample_weight, weights, chunk_size):
        """`G W + grad R` with `G` formed: the same update, through `per_example._compute` (TensorFlow, PyTorch)."""
        from keras_noisygd import per_example

        # The scaling `compute_loss` and `scale_loss` apply: 1/replicas (tf.distribute) and the loss scale.
        loss_scale = self.optimizer.scale_loss(ops.convert_to_tensor(1.0 / _bookkeeping.num_replicas(), weights.dtype))
        result = per_example._compute(
            self, x, y, sample_weight, weights=weights, chunk_size=chunk_size, loss_scale=loss_scale
        )
        # The engine's batched training-mode forward pass is this step's forward pass: its predictions feed
        # the metrics, and its new state (BN statistics, seeds) is the update `self(x, training=True)` makes.
        for variable, value in zip(self.non_trainable_variables, result.state):
            if value is not None:
                variable.assign(value)
        gradients = per_example._update(result)
        return result.y_pred, gradients

    def compile(self, *args, **kwargs):
        """`keras.Model.compile`; also records `loss_weights` for the per-example engine."""
        self._noisy_loss_weights = args[2] if len(args) > 2 else kwargs.get("loss_weights")
        super().compile(*args, **kwargs)

    def compile_from_config(self, config):
        """As `keras.Model.compile_from_config`, which skips a model whose `compile` is overridden."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)  # the slots, for the saved values to load into

    def _report_loss(self, loss, batch_size, weights):
        # As in the keras.io custom-train-step guide: the "loss" metric tracks the loss,
        # un-scaled from tf.distribute's per-replica scaling like `Model.train_step` does.
        # Weights that are NaN (a compiled step's stand-in for a failed run-time check, `_checks.guarded`)
        # or empty (an empty batch) make the reported loss NaN, so `TerminateOnNaN` stops.
        usable = ops.logical_and(ops.size(weights) > 0, ops.all(ops.isfinite(weights)))
        loss = ops.where(usable, loss, ops.cast(float("nan"), loss.dtype))
        replicas = _bookkeeping.num_replicas()
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss * replicas, sample_weight=batch_size)
                return


_NOISE_PRESERVING_REDUCTIONS = ("sum_over_batch_size", "mean", "sum")


def _check_reductions(loss):
    """The noisy loss must be `sum_i m_i l_i` over a constant: no division by `sum_i m_i`."""
    for loss_fn in tree.flatten(loss):
        reduction = getattr(loss_fn, "reduction", "sum_over_batch_size")
        if reduction not in _NOISE_PRESERVING_REDUCTIONS:
            raise ValueError(
                f"The compiled loss {loss_fn!r} must reduce with one of {list(_NOISE_PRESERVING_REDUCTIONS)} "
                "so that the noise weights enter as G W (a reduction that divides by the sum of the "
                f"weights, or none, changes the noise). Received: reduction={reduction!r}"
            )


class _per_output_loss_metrics_untouched:
    """Restores the per-output loss metrics on exit: `compute_loss` updates them.

    Keras keeps one `"<output>_loss"` metric per output of a multi-output
    model; a single output has none, and then this costs nothing.
    """

    def __init__(self, model, y_pred):
        single_output = len(tree.flatten(y_pred)) == 1
        metrics = [] if single_output else [m for m in model.metrics if m.name.endswith("_loss")]
        self.variables = [v for m in metrics for v in m.variables]

    def __enter__(self):
        self.saved = [ops.copy(v.value) for v in self.variables]

    def __exit__(self, *exc_info):
        for variable, value in zip(self.variables, self.saved):
            variable.assign(value)


@_register
class NoisyModel(NoisyTrainStep, keras.Model):
    """A `keras.Model` (functional or subclassed) whose `fit` injects the optimizer's noise.

    Use it exactly like `keras.Model`: `NoisyModel(inputs, outputs)` or subclass
    it. Compiled with `NoisyGD` (or another noise-carrying optimizer) each
    training step descends the re-weighted loss `(1/B) sum_i m_i l_i`; with any
    other optimizer it trains like `keras.Model`.

    Example:

    ```python
    inputs = keras.Input((64,))
    outputs = keras.layers.Dense(10, activation="softmax")(inputs)
    model = keras_noisygd.NoisyModel(inputs, outputs)
    model.compile(keras_noisygd.NoisyGD(0.1, emulate_batch_size=32),
                  "sparse_categorical_crossentropy", metrics=["accuracy"])
    ```
    """

    def __new__(cls, *args, **kwargs):
        # Like `keras.Model`, hand the functional form to a functional class. Keras
        # would otherwise graft its functional base onto `NoisyModel` (or the user's
        # subclass) itself, and every later subclass would then demand inputs/outputs.
        if _functional_arguments(args, kwargs) and not issubclass(cls, NoisyFunctional):
            cls = _functional_version(cls)
        return super().__new__(cls, *args, **kwargs)


_FUNCTIONAL_VERSIONS = {}


def _functional_version(cls):
    """`NoisyFunctional` for `NoisyModel`; for a user subclass, one that also derives from it."""
    if cls is NoisyModel:
        return NoisyFunctional
    if cls not in _FUNCTIONAL_VERSIONS:
        namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        _FUNCTIONAL_VERSIONS[cls] = type(cls.__name__, (cls, NoisyFunctional), namespace)
    return _FUNCTIONAL_VERSIONS[cls]


def _functional_arguments(args, kwargs):
    return len(args) == 2 or (len(args) == 1 and "outputs" in kwargs) or {"inputs", "outputs"} <= kwargs.keys()


def _keras_functional_class():
    """The class of `keras.Model(inputs, outputs)`, through the public API.

    `keras.Model.__new__` picks the functional class from the arguments alone;
    nothing is initialised (no layer, name or dtype policy is created).
    """
    return type(keras.Model.__new__(keras.Model, None, None))


@_register
class NoisyFunctional(NoisyModel, _keras_functional_class()):
    """What `NoisyModel(inputs, outputs)` builds: a Keras functional model with the noisy step."""


@_register
class NoisySequential(NoisyTrainStep, keras.Sequential):
    """A `keras.Sequential` whose `fit` injects the optimizer's noise; see `NoisyModel`."""


@_register
class NoisyWrapper(NoisyModel):
    """Wraps a subclassed model that cannot be rebuilt from its graph."""

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.model = model

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def get_config(self):
        return {"model": keras.saving.serialize_keras_object(self.model), "name": self.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        return cls(**config)


def noisy(model):
    """A noisy version of `model` that shares its layers and weights.

    A `Sequential` model becomes a `NoisySequential` of the same layers, a
    functional model a `NoisyModel` on the same graph, and a subclassed model is
    wrapped. Training the result trains `model`'s own variables.

    Args:
        model: A `keras.Model`.

    Returns:
        A `NoisyTrainStep` model; `model` itself if it already is one.
    """
    if isinstance(model, NoisyTrainStep):
        return model
    if not isinstance(model, keras.Model):
        raise ValueError(f"Argument `model` must be a `keras.Model`. Received: model={model!r}")
    if isinstance(model, keras.Sequential):
        sequential = NoisySequential(model.layers, name=model.name)
        if model.built:
            sequential.build(model.input_shape)
        return sequential
    if _is_functional(model):
        # `input`/`output` keep dict and nested structures; `inputs`/`outputs` are flat lists.
        return NoisyModel(model.input, model.output, name=model.name)
    return NoisyWrapper(model, name=model.name)


def _is_functional(model):
    # A plain `keras.Model(inputs, outputs)`: Keras's own class, with a graph to rebuild on.
    # A user subclass is wrapped instead, so its own `call` and methods are kept.
    return type(model).__module__.startswith("keras.") and getattr(model, "inputs", None) is not None
