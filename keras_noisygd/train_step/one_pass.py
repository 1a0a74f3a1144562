"""The noisy and the clean loss from one vector of per-example losses, where Keras's `compute_loss` allows it.

The stateful step needs two losses of one forward pass: the re-weighted one it
descends, `(1/B) sum_i m_i s_i l_i + R`, and the clean one it reports,
`(1/B) sum_i s_i l_i + R`. Two `compute_loss` calls evaluate the loss twice,
and in an eager PyTorch step each is mostly Python dispatch, more than the
loss's arithmetic (`benchmarks/step_phases.py`, `step_time.py`). Here the
`[B]` values `s_i l_i` are computed once (the per-example engine's loss
adapter) and reduced twice.

It applies only where that is provably what `compute_loss` computes: Keras's
own `compute_loss` (not overridden), one output without a Keras mask, one
compiled loss without `loss_weights` (a `Loss` without its own `__call__`),
per-example `sample_weight`, one replica (tf.distribute's per-replica
scaling stays Keras's). Elsewhere `losses(...)` returns `None` and the step
calls `compute_loss` twice.
"""

from __future__ import annotations

import weakref

import keras
from keras import ops, tree

from keras_noisygd import _backend
from keras_noisygd.per_example.losses import loss_function

_ADAPTERS = weakref.WeakKeyDictionary()  # model -> (its compiled loss, the adapter of that loss)


def losses(model, y, y_pred, sample_weight, weights, batch_size):
    """`(noisy, clean)` scalar losses from one `[B]` vector, or `None` where `compute_loss` must run."""
    adapter = _adapter(model)
    if adapter is None or not _applies(y, y_pred, sample_weight):
        return None
    values = adapter(y, y_pred, sample_weight, batch_size)  # s_i l_i, the mean of which is the compiled loss
    floatx = keras.config.floatx()  # the dtype Keras's loss container casts each compiled loss to
    noisy = ops.cast(ops.mean(values * ops.cast(weights, values.dtype)), floatx)
    clean = ops.cast(ops.mean(values), floatx)
    for extra in model.losses:  # regularizers and `add_loss`, as `Trainer.compute_loss` aggregates them
        if not keras.backend.is_float_dtype(extra.dtype):
            extra = ops.cast(extra, keras.config.floatx())
        extra = ops.sum(extra)
        noisy, clean = noisy + extra, clean + extra
    return noisy, clean


def _adapter(model):
    if type(model).compute_loss is not keras.Model.compute_loss or _backend.num_replicas() != 1:
        return None
    loss = getattr(model, "loss", None)
    if loss is None or len(tree.flatten(loss)) != 1 or getattr(model, "noisy_loss_weights", True) is not None:
        return None  # no loss, one per output, or loss weights (or a model that does not record them)
    loss_class = type(tree.flatten(loss)[0])
    if issubclass(loss_class, keras.losses.Loss) and loss_class.__call__ is not keras.losses.Loss.__call__:
        return None  # its own __call__ (not only `call`): only compute_loss runs it
    cached = _ADAPTERS.get(model)
    if cached is None or cached[0] is not loss:  # compiled again since
        cached = _ADAPTERS[model] = (loss, loss_function(model, loss))
    return cached[1]


def _applies(y, y_pred, sample_weight):
    if not ops.is_tensor(y) or not ops.is_tensor(y_pred) or getattr(y_pred, "_keras_mask", None) is not None:
        return False
    if sample_weight is None:
        return True
    return ops.is_tensor(sample_weight) and all(d == 1 for d in sample_weight.shape[1:])
