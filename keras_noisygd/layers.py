"""Layers for large-batch training: ghost batch normalization."""

from __future__ import annotations

import keras
from keras import ops

from keras_noisygd._checks import check_int

__all__ = ["GhostBatchNormalization"]


@keras.saving.register_keras_serializable(package="keras_noisygd")
class GhostBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalization with the statistics of "ghost batches" of `ghost_batch_size` examples.

    A large batch gives BatchNormalization statistics with little noise; ghost
    batch normalization (Hoffer et al., 2017) gives back the noise of small
    batches. In training, the batch is split into consecutive ghost batches of
    `ghost_batch_size` examples, and each is normalized with its own mean and
    variance, as `keras.layers.BatchNormalization` would normalize it on its
    own. Wu et al. (2020) use it in their large-batch runs (a batch of 2,000
    split into 4 ghost batches of 500). In inference the layer is
    `keras.layers.BatchNormalization`: it normalizes with the moving
    statistics.

    Training, for ghost batches `x_1, ..., x_k` of sizes `n_1, ..., n_k`
    (`sum_j n_j = B`):

    ```
    mean_j, var_j = moments of x_j over all axes but `axis`   # biased variance
    y_j = gamma * (x_j - mean_j) / sqrt(var_j + epsilon) + beta
    batch_mean = sum_j (n_j / B) mean_j            # = the batch's mean
    batch_var  = sum_j (n_j / B) var_j             # the mean within-ghost variance
    moving_mean     = momentum * moving_mean     + (1 - momentum) * batch_mean
    moving_variance = momentum * moving_variance + (1 - momentum) * batch_var
    ```

    **Conventions.**

    - *A batch that is not a multiple of `ghost_batch_size`* (such as the last
      batch of an epoch) is handled exactly: its last ghost batch holds the
      `B mod ghost_batch_size` remaining examples and is normalized with its
      own statistics. A batch of at most `ghost_batch_size` examples is one
      ghost batch: the layer is then `BatchNormalization`.
    - *The moving statistics* are updated once per call, with the mean of the
      ghost batches' statistics weighted by their sizes (a plain mean when
      `B` is a multiple of `ghost_batch_size`). The moving variance therefore
      tracks the variance within a ghost batch, the one that training
      normalizes by, not the variance of the whole batch.
    - *Keras 2's* `BatchNormalization(virtual_batch_size=v)` also updated the
      moving statistics once per call with the plain mean of the ghost
      batches' means and variances. Its ghost batches were strided (ghost
      batch `j` held examples `j, j + B/v, j + 2B/v, ...`), not consecutive;
      on shuffled data the two are the same in distribution. It required `B`
      to be a multiple of `v`. Keras 3 dropped the argument.
    - *Mixed precision*: as in `BatchNormalization`, float16 and bfloat16
      inputs are normalized in float32 (statistics and moving statistics in
      float32), and the output is cast to the layer's compute dtype.
    - *Distribution*: `synchronized=True` is refused. Ghost batches are parts
      of each replica's own batch, so there are no statistics to share
      across replicas. `renorm=True` (Batch Renormalization) and masks in
      training are refused too.

    Args:
        ghost_batch_size: Examples per ghost batch, an int >= 1.
        **kwargs: The arguments of `keras.layers.BatchNormalization` (`axis`,
            `momentum`, `epsilon`, `center`, `scale`, the initializers,
            regularizers and constraints, with Keras's defaults, such as
            `momentum=0.99` and `epsilon=1e-3`) and base layer keyword
            arguments (`name`, `dtype`, ...). `axis` must not be the batch
            axis 0.

    Example:

    ```python
    model = keras_noisygd.NoisySequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(32, 3),
        keras_noisygd.layers.GhostBatchNormalization(ghost_batch_size=128),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])
    model.fit(x, y, batch_size=1024)   # 8 ghost batches of 128 per step
    ```

    References:
        - [Hoffer et al., 2017](https://arxiv.org/abs/1705.08741), "Train
          longer, generalize better: closing the generalization gap in large
          batch training of neural networks".
        - [Wu et al., 2020](https://arxiv.org/abs/1906.07405), "On the
          Noisy Gradient Descent that Generalizes as SGD", ICML 2020.
    """

    def __init__(self, ghost_batch_size, **kwargs):
        ghost_batch_size = check_int("ghost_batch_size", ghost_batch_size, 1)
        if kwargs.get("synchronized"):
            raise ValueError(
                "Argument `synchronized` must be False for GhostBatchNormalization: ghost batches are parts of "
                "each replica's batch, whose statistics are not shared across replicas. "
                f"Received: synchronized={kwargs['synchronized']!r}"
            )
        if kwargs.get("renorm"):
            raise ValueError(
                "Argument `renorm` must be False for GhostBatchNormalization (Batch Renormalization with ghost "
                f"batches is not implemented). Received: renorm={kwargs['renorm']!r}"
            )
        super().__init__(**kwargs)
        self.ghost_batch_size = int(ghost_batch_size)

    def build(self, input_shape):
        if self.axis % len(input_shape) == 0:
            raise ValueError(
                "Argument `axis` must not be the batch axis 0: ghost batches split the batch axis. "
                f"Received: axis={self.axis} for inputs of shape {tuple(input_shape)}"
            )
        super().build(input_shape)

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable):
            return super().call(inputs, training=False, mask=mask)  # inference: BatchNormalization
        if mask is not None:
            raise ValueError(
                "GhostBatchNormalization does not support masks in training (the ghost-batch statistics would "
                "count the masked positions). Received: a mask of shape "
                f"{tuple(mask.shape)} with inputs of shape {tuple(inputs.shape)}"
            )
        # As BatchNormalization: float16/bfloat16 inputs are normalized in float32.
        dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = ops.cast(inputs, dtype)
        rank = len(x.shape)
        channel = self.axis % rank + 1  # the channel axis of the [ghosts, ghost_batch_size, ...] tensor
        reduce_axes = [a for a in range(1, rank + 1) if a != channel]  # within each ghost batch

        ghosts, valid, batch = self._split(x)
        # Per-ghost moments, as ops.moments but counting only the ghost's real examples (the padding is 0).
        examples = ops.sum(valid, axis=1, keepdims=True)  # n_j: [ghosts, 1, 1, ...]
        count = examples * _positions(x, [a - 1 for a in reduce_axes[1:]], dtype)
        mean = ops.sum(ghosts, reduce_axes, keepdims=True) / count
        squares = ops.square(ghosts - ops.stop_gradient(mean)) * valid
        variance = ops.sum(squares, reduce_axes, keepdims=True) / count

        # The moving statistics: one update with the size-weighted mean of the ghosts' statistics.
        share = examples / ops.cast(batch, dtype)
        other_axes = [a for a in range(rank + 1) if a != channel]
        for moving, value in ((self.moving_mean, mean), (self.moving_variance, variance)):
            value = ops.sum(share * value, other_axes)
            moving.assign(ops.cast(moving, dtype) * self.momentum + value * (1.0 - self.momentum))

        shape = [1] * (rank + 1)
        shape[channel] = -1
        outputs = (ghosts - mean) * ops.rsqrt(variance + self.epsilon)
        if self.scale:
            outputs = outputs * ops.reshape(ops.cast(self.gamma, dtype), shape)
        if self.center:
            outputs = outputs + ops.reshape(ops.cast(self.beta, dtype), shape)
        outputs = ops.reshape(outputs, [-1, *_dims(outputs)[2:]])[:batch]  # drop the padding
        return ops.cast(outputs, self.compute_dtype)

    def _split(self, x):
        """`x` as `[ghosts, ghost_batch_size, ...]` (the last ghost padded with zeros), the `[ghosts,
        ghost_batch_size, 1, ...]` 0/1 indicator of real examples, and the batch size (an int when static)."""
        size = self.ghost_batch_size
        batch = _dims(x)[0]
        ghosts = (batch + size - 1) // size
        padding = ghosts * size - batch
        x = ops.concatenate([x, ops.zeros([padding, *_dims(x)[1:]], x.dtype)], axis=0)
        x = ops.reshape(x, [ghosts, size, *_dims(x)[1:]])
        valid = ops.reshape(ops.arange(ghosts * size) < batch, [ghosts, size] + [1] * (len(x.shape) - 2))
        return x, ops.cast(valid, x.dtype), batch

    def get_config(self):
        return {**super().get_config(), "ghost_batch_size": self.ghost_batch_size}


def _dims(x):
    """Each dimension of `x`: a Python int where static, a scalar tensor where not."""
    dynamic = ops.shape(x)
    return [d if d is not None else dynamic[i] for i, d in enumerate(x.shape)]


def _positions(x, axes, dtype):
    """The number of positions per example and channel: the product of `x`'s sizes along `axes`."""
    count = 1
    for d in (_dims(x)[a] for a in axes):
        count = count * d
    return ops.cast(count, dtype)
