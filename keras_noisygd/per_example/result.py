"""What the per-example engines return (`PerExample`), the method `"auto"` stands for, and `sum_i w_i G_i`."""

from __future__ import annotations

import collections

from keras import ops

METHODS = ("auto", "vectorized", "jacobian")


class PerExample(
    collections.namedtuple("PerExample", ["gradients", "regularization_gradients", "losses", "method", "y_pred", "state"])
):
    """One engine call's result.

    Attributes:
        gradients: The per-example data-loss gradients `d (s_i l_i) / d theta`
            (`[B, ...]` per trainable variable), or, when the engine was given
            weights, their weighted mean `(1/B) sum_i weights_i G_i`.
        regularization_gradients: `d R / d theta` (one per variable), or `None`
            when the model has no losses.
        losses: The `[B]` values `s_i l_i` (times the engine's loss scale).
        method: The method used: `"layers"`, `"vectorized"` or `"jacobian"`.
        y_pred: The predictions of the batched training-mode forward pass.
        state: The new non-trainable values of that pass (BN statistics,
            seeds), `None` where a value is unchanged.
    """

    __slots__ = ()

    def rows(self):
        """The rows `G_i`: the data-loss rows plus the shared regularization gradient."""
        if self.regularization_gradients is None:
            return self.gradients
        return [g + ops.expand_dims(r, 0) for g, r in zip(self.gradients, self.regularization_gradients)]

    def update(self):
        """`G W + grad R` of a weighted call: the weighted rows plus the regularization gradient."""
        if self.regularization_gradients is None:
            return self.gradients
        return [g + r for g, r in zip(self.gradients, self.regularization_gradients)]


def weighted_sum(weights, rows):
    """`sum_i weights_i rows_i` for each `[B, ...]` tensor of `rows` (the contraction with the noise)."""
    return [ops.tensordot(ops.cast(weights, g.dtype), g, axes=1) for g in rows]


def choose_method(method, state_updated):
    """The method `"auto"` stands for (the general ones), or `method`, refused where it would be wrong."""
    if method == "auto":
        return "jacobian" if state_updated else "vectorized"
    if method == "vectorized" and state_updated:
        raise ValueError(
            "Argument `method='vectorized'` runs the model on one example at a time, but this model's "
            "training-mode forward pass updates its state (BatchNormalization statistics or the seed of "
            "Dropout/GaussianNoise/random layers), so each example would be normalised or masked on its own. "
            "Use method='jacobian' (exact, slower) or 'auto'. Received: method='vectorized'"
        )
    return method
