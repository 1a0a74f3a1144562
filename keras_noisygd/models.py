"""Keras models whose `train_step` injects the optimizer's sampling noise.

`NoisyTrainStep` is the mixin; `NoisyModel`, `NoisySequential` and `noisy()`
put it on Keras's functional, subclassed and sequential models. The step
itself lives in `keras_noisygd.train_step`.
"""

from __future__ import annotations

import inspect
import math

import keras

from keras_noisygd import _backend
from keras_noisygd import train_step as steps
from keras_noisygd.optimizers import find_noisy_optimizer
from keras_noisygd.train_step.common import check_reductions

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

    Attributes:
        noisy_loss_weights: The `loss_weights` passed to `compile` (the
            per-example engine weights each output's loss by them).
    """

    if _backend.STATELESS:  # JAX: the trainer passes the state in and out

        def train_step(self, state, data):
            """One noisy step on JAX: `train_step(state, data) -> (logs, state)`, as `JAXTrainer`'s."""
            if find_noisy_optimizer(self.optimizer) is None:
                return super().train_step(state, data)
            return steps.step(self, state, data)

    else:

        def train_step(self, data):
            """One noisy step: draw `m`, descend `(1/B) sum_i m_i s_i l_i + reg`, report clean values.

            Args:
                data: A batch `(x, y, sample_weight)` as `fit` passes it.

            Returns:
                The logs dict of `compute_metrics`, with the clean `loss`.
            """
            if find_noisy_optimizer(self.optimizer) is None:
                return super().train_step(data)
            return steps.step(self, data)

    def fit(self, *args, **kwargs):
        """`keras.Model.fit`, plus two safeguards when the optimizer carries noise.

        * A `FailedNoiseCheck` callback: a compiled step (XLA, `jax.jit`) whose
          run-time check fails cannot raise; it skips its update and `fit`
          raises the check's message at the end of that execution chunk.
        * A warning when `batch_size` makes the noise vanish (`b >= B`).

        A compiled loss whose reduction would change the noise raises here, before
        Keras's own first pass (which on JAX and PyTorch fails obscurely on it).
        """
        optimizer = find_noisy_optimizer(getattr(self, "optimizer", None))
        if optimizer is None:
            return super().fit(*args, **kwargs)
        check_reductions(getattr(self, "loss", None))
        bound = inspect.signature(keras.Model.fit).bind(self, *args, **kwargs)
        arguments = bound.arguments
        callbacks = arguments.get("callbacks") or []
        callbacks = list(callbacks if isinstance(callbacks, (list, tuple)) else [callbacks])
        if not any(isinstance(c, FailedNoiseCheck) for c in callbacks):
            callbacks.append(FailedNoiseCheck(optimizer))
        arguments["callbacks"] = callbacks
        update_size = _update_size(optimizer, arguments)
        if update_size is not None:
            optimizer.warn_if_noiseless(update_size)
        return super().fit(*bound.args[1:], **bound.kwargs)

    def compile(self, *args, **kwargs):
        """`keras.Model.compile`; also records `loss_weights` for the per-example engine."""
        self.noisy_loss_weights = args[2] if len(args) > 2 else kwargs.get("loss_weights")
        super().compile(*args, **kwargs)

    def export(self, filepath, *args, **kwargs):
        """`keras.Model.export`; where Keras cannot export on PyTorch, a RuntimeError that says how to.

        A `.keras` file holds no backend: load it under `KERAS_BACKEND=tensorflow`
        (or jax) and export there.
        """
        try:
            return super().export(filepath, *args, **kwargs)
        except Exception as error:
            if _backend.NAME != "torch":
                raise
            first_line = (str(error).strip().splitlines() or [""])[0]
            raise RuntimeError(
                f"Keras {keras.__version__} could not export this model on the PyTorch backend "
                f"({type(error).__name__}: {first_line}). Save it with `model.save('model.keras')`, then load it "
                "(after `import keras_noisygd`) with `keras.saving.load_model` under KERAS_BACKEND=tensorflow (or jax) and call `export` there: "
                "the .keras file holds no backend."
            ) from error

    def compile_from_config(self, config):
        """As `keras.Model.compile_from_config`, which skips a model whose `compile` is overridden."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)  # the slots, for the saved values to load into


class FailedNoiseCheck(keras.callbacks.Callback):
    """Raises the message of a run-time check that a compiled step could not raise; `NoisyTrainStep.fit` adds it.

    The step skipped its update (weights, optimizer slots and noise counter
    are as before it) and reported the loss as NaN; at the end of that
    execution chunk this callback reads the optimizer's `noise_check` record
    and raises `ValueError` with the check's message.
    """

    def __init__(self, optimizer):
        super().__init__()
        self.optimizer = optimizer

    def on_train_begin(self, logs=None):
        self.optimizer.reset_noise_check()

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(float(keras.ops.convert_to_numpy(loss))):
            return
        _backend.sync_state(self.model)
        message = self.optimizer.failed_check_message()
        if message is not None:
            self.model.stop_training = True
            raise ValueError(f"{message} (the step that failed this check was skipped: the weights, the "
                             "optimizer's slots and the noise counter are as they were before it)")


def _update_size(optimizer, arguments):
    """The examples of one update that `fit(x, batch_size=...)` will draw for, where its arguments tell."""
    x = arguments.get("x")
    if getattr(x, "shape", None) is None or len(x.shape) == 0 or x.shape[0] is None:
        return None  # a dataset, a generator or a nest of arrays: the draw itself warns where it can
    n = int(int(x.shape[0]) * (1 - float(arguments.get("validation_split") or 0.0)))
    batch = min(arguments.get("batch_size") or 32, n)  # 32: Keras's default
    return batch * (optimizer.gradient_accumulation_steps or 1) * _backend.num_replicas()


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

    def call(self, inputs, training=None, **kwargs):
        return self.model(inputs, training=training, **kwargs)  # the model's own call arguments (masks, ...)

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
    own = [m for m in ("train_step", "compute_loss", "compute_metrics") if _overrides(model, m)]
    if own:
        raise ValueError(
            f"Argument `model` overrides {own}, which a wrapper would drop: `noisy()` cannot keep them. Add the "
            "noise in your own train_step instead: draw `weights = self.optimizer.noise_weights(batch_size)` "
            "(on JAX `optimizer.stateless_noise_weights(optimizer_variables, batch_size)`) and pass them as "
            "`sample_weight` to your loss, or use `keras_noisygd.noisy_gradients` (docs/quickstart.md, \"Your own "
            f"train_step\"). Received: model={type(model).__name__}"
        )
    wrapper = NoisyWrapper(model, name=model.name)
    if model.built:
        wrapper.built = True
    return wrapper


def _overrides(model, method):
    """Whether `model`'s class defines `method` itself, rather than inheriting Keras's."""
    return getattr(type(model), method) is not getattr(keras.Model, method)


def _is_functional(model):
    # A plain `keras.Model(inputs, outputs)`: Keras's own class, with a graph to rebuild on.
    # A user subclass is wrapped instead, so its own `call` and methods are kept.
    return type(model).__module__.startswith("keras.") and getattr(model, "inputs", None) is not None
