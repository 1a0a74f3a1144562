"""The noisy train step on JAX, where the trainer passes the state in and out.

JAX's `fit` compiles `train_step(state, data)` with every variable passed in
as a value: a variable read otherwise yields its initial value inside the
compiled step (the optimizer's noise state would be `[0, 0]` at every step,
the user's seed ignored, and no error). So the weights are drawn in a
`keras.StatelessScope` that maps the optimizer's variables to the state's
values, and the step returns the state with the noise counter advanced by
`optimizer.stateless_apply`. Modelled on `JAXTrainer.train_step`, with only
public Keras APIs.
"""

from __future__ import annotations

import jax
import keras

from keras_noisygd import per_example
from keras_noisygd._batch import batch_size_of, combine_weights
from keras_noisygd.optimizers import find_noisy_optimizer
from keras_noisygd.train_step.common import check_reductions, report_loss


def train_step(model, state, data):
    """`(logs, state)` of one noisy step: descend the re-weighted loss, report the clean one."""
    trainable, non_trainable, optimizer_values, metrics_values = state
    check_reductions(model.loss)
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    batch_size = batch_size_of(x)  # a Python int: JAX traces with static shapes

    with keras.StatelessScope(state_mapping=list(zip(model.optimizer.variables, optimizer_values))) as scope:
        weights = find_noisy_optimizer(model.optimizer).noise_weights(batch_size, keras.config.floatx())
    optimizer_values = [scope.get_current_value(v) for v in model.optimizer.variables]  # the micro-batch record
    noisy_weights = combine_weights(sample_weight, weights)

    def scaled_noisy_loss(trainable):
        mapping = [
            *zip(model.trainable_variables, trainable),
            *zip(model.non_trainable_variables, non_trainable),
            *zip(model.metrics_variables, metrics_values),
        ]
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as forward:
            y_pred = model(x, training=True)
            clean_loss = model.compute_loss(x, y, y_pred, sample_weight, training=True)
            # compute_loss updates the per-output loss metrics: they keep the clean loss's update only.
            metrics_after = [forward.get_current_value(v) for v in model.metrics_variables]
            noisy_loss = model.compute_loss(x, y, y_pred, noisy_weights, training=True)
            state_after = [forward.get_current_value(v) for v in model.non_trainable_variables]
        with keras.StatelessScope(state_mapping=list(zip(model.optimizer.variables, optimizer_values))):
            scaled = model.optimizer.scale_loss(noisy_loss)
        return scaled, (clean_loss, y_pred, state_after, metrics_after)

    if find_noisy_optimizer(model.optimizer).engine == "per_example":
        clean_loss, y_pred, non_trainable, metrics_values, gradients = per_example_step(
            model, (trainable, non_trainable, optimizer_values, metrics_values), (x, y, sample_weight), weights
        )
    else:
        (_, aux), gradients = jax.value_and_grad(scaled_noisy_loss, has_aux=True)(trainable)
        clean_loss, y_pred, non_trainable, metrics_values = aux
    new_trainable, new_optimizer_values = model.optimizer.stateless_apply(optimizer_values, gradients, trainable)
    if find_noisy_optimizer(model.optimizer).checks_in_step:
        new_trainable, new_optimizer_values, non_trainable = kept_if_failed(
            model, (trainable, optimizer_values, state[1]), (new_trainable, new_optimizer_values, non_trainable)
        )
    trainable, optimizer_values = new_trainable, new_optimizer_values

    with keras.StatelessScope(state_mapping=list(zip(model.metrics_variables, metrics_values))) as scope:
        report_loss(model, clean_loss, batch_size, weights)
        logs = model.compute_metrics(x, y, y_pred, sample_weight)
    metrics_values = [scope.get_current_value(v) for v in model.metrics_variables]
    return logs, (trainable, non_trainable, optimizer_values, metrics_values)


def kept_if_failed(model, before, after):
    """`after`'s `(trainable, optimizer, non-trainable)` values, or `before`'s where the draw's check failed.

    A `jax.jit` step cannot raise: a failed run-time check leaves the weights,
    slots, noise counter and layer state as they were, with the failure kept
    in `noise_check` for `fit` to report.
    """
    record = find_noisy_optimizer(model.optimizer).noise_check
    index = next(i for i, v in enumerate(model.optimizer.variables) if v is record)
    passed = jax.numpy.equal(after[1][index][0], 0)
    kept = [[jax.numpy.where(passed, new, old) for new, old in zip(a, b)] for a, b in zip(after, before)]
    kept[1][index] = after[1][index]
    return kept


def per_example_step(model, state, data, weights):
    """`engine="per_example"`: `G W + grad R` from the state's values, and the clean loss of the same pass."""
    trainable, non_trainable, optimizer_values, metrics_values = state
    x, y, sample_weight = data
    with keras.StatelessScope(state_mapping=list(zip(model.optimizer.variables, optimizer_values))):
        loss_scale = model.optimizer.scale_loss(keras.ops.convert_to_tensor(1.0, weights.dtype))
    result = per_example.compute(
        model, x, y, sample_weight, weights=weights, chunk_size=find_noisy_optimizer(model.optimizer).chunk_size,
        loss_scale=loss_scale, values=(trainable, non_trainable),
    )
    gradients = result.update()
    # The engine's batched forward pass is the step's: its predictions feed the loss and metrics, its new
    # state (BN statistics, seeds) is the step's update.
    non_trainable = [old if new is None else new for new, old in zip(result.state, non_trainable)]
    y_pred = keras.tree.map_structure(jax.lax.stop_gradient, result.y_pred)
    mapping = [
        *zip(model.trainable_variables, trainable),
        *zip(model.non_trainable_variables, non_trainable),
        *zip(model.metrics_variables, metrics_values),
    ]
    with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
        clean_loss = model.compute_loss(x, y, y_pred, sample_weight, training=True)
        metrics_values = [scope.get_current_value(v) for v in model.metrics_variables]
    return clean_loss, y_pred, non_trainable, metrics_values, gradients
