"""What the package reads off a batch: its number of examples, and the user's weights times the noise's."""

from __future__ import annotations

from keras import ops, tree


def batch_size_of(x):
    """Number of examples in `x` (a tensor or a nest of tensors): a Python int when static."""
    first = next(t for t in tree.flatten(x) if t is not None)
    static = first.shape[0]
    return int(static) if static is not None else ops.shape(first)[0]


def combine_weights(sample_weight, weights):
    """The user's `sample_weight` (None, a tensor or a nest of them) times the `[B]` noise weights.

    Each user weight tensor (`[B]`, `[B, 1]`, `[B, T]`, ...) is cast to the noise
    weights' float dtype (integer masks would otherwise truncate the noise) and
    multiplied by them along its first axis.
    """
    if sample_weight is None:
        return weights

    def times(w):
        if w is None:
            return weights
        w = ops.cast(w, weights.dtype)
        if w.shape is None or len(w.shape) is None:
            raise ValueError(f"Argument `sample_weight` must have a known rank. Received: sample_weight={w!r}")
        return w * ops.reshape(weights, [-1] + [1] * (len(w.shape) - 1))

    return tree.map_structure(times, sample_weight)
