"""The noisy train step on TensorFlow and PyTorch, where variables hold the state.

`train_step(model, data)` is `NoisyTrainStep.train_step` on these backends:
draw the weights, take `G W + grad R` by one of the optimizer's two engines,
apply it, and report the clean loss and metrics. What differs between the
two backends (a tape or autograd; `apply` under `no_grad`) is
`keras_noisygd._backend`'s.
"""

from __future__ import annotations

import keras
from keras import ops, tree

from keras_noisygd import _backend, per_example
from keras_noisygd._batch import batch_size_of, combine_weights
from keras_noisygd.optimizers import find_noisy_optimizer
from keras_noisygd.train_step import one_pass
from keras_noisygd.train_step.common import check_reductions, per_output_loss_metrics_untouched, report_loss


def train_step(model, data):
    """One noisy step: draw `m`, descend `(1/B) sum_i m_i s_i l_i + reg`, report clean values."""
    optimizer = find_noisy_optimizer(model.optimizer)
    check_reductions(model.loss)
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    batch_size = batch_size_of(x)
    weights = optimizer.noise_weights(batch_size, keras.config.floatx())  # float32 under mixed precision
    if optimizer.engine == "per_example":
        y_pred, gradients = per_example_gradients(model, x, y, sample_weight, weights, optimizer.chunk_size)
        clean_loss = None
    else:
        y_pred, gradients, clean_loss = weighted_gradients(model, x, y, sample_weight, weights, batch_size)
    # The clean loss is read before the update (regularizers see these weights).
    y_pred = tree.map_structure(ops.stop_gradient, y_pred)
    if clean_loss is None:
        clean_loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
    _backend.apply_gradients(model.optimizer, gradients, model.trainable_weights)
    report_loss(model, clean_loss, batch_size, weights, checked=optimizer.checked_on_host)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def weighted_gradients(model, x, y, sample_weight, weights, batch_size):
    """`(y_pred, G W + grad R, clean loss)` as the gradient of the re-weighted loss: one backward pass.

    The clean loss comes from the same per-example losses where `one_pass`
    applies, else it is `None` (the caller evaluates it).
    """
    pass_ = {}

    def noisy_loss():
        y_pred = pass_["y_pred"] = model(x, training=True)
        both = one_pass.losses(model, y, y_pred, sample_weight, weights, batch_size)
        if both is not None:
            loss, pass_["clean"] = both
        else:
            with per_output_loss_metrics_untouched(model, y_pred):  # they must see the clean loss only
                loss = model.compute_loss(
                    x=x, y=y, y_pred=y_pred, sample_weight=combine_weights(sample_weight, weights), training=True
                )
        return model.optimizer.scale_loss(loss)

    gradients = _backend.gradients(noisy_loss, lambda: model.trainable_weights)
    clean = pass_.get("clean")
    return pass_["y_pred"], gradients, None if clean is None else ops.stop_gradient(clean)


def per_example_gradients(model, x, y, sample_weight, weights, chunk_size):
    """`(y_pred, G W + grad R)` with `G` formed (`engine="per_example"`): the same update, through
    `per_example.compute`, whose batched forward pass is this step's."""
    # The scaling `compute_loss` and `scale_loss` apply: 1/replicas (tf.distribute) and the loss scale.
    loss_scale = model.optimizer.scale_loss(ops.convert_to_tensor(1.0 / _backend.num_replicas(), weights.dtype))
    result = per_example.compute(model, x, y, sample_weight, weights=weights, chunk_size=chunk_size, loss_scale=loss_scale)
    # Its new state (BN statistics, seeds) is the update `model(x, training=True)` makes.
    for variable, value in zip(model.non_trainable_variables, result.state):
        if value is not None:
            variable.assign(value)
    return result.y_pred, result.update()
