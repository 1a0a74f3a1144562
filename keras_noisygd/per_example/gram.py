"""`K = G G^T`, the Gram matrix of the per-example gradients: from the layers where that applies, else from `G`.

`gram` builds it from one batched pass of the layer path (`layer_rows.py`):
`O(B^2)` memory beside the activations, never the `B x d` rows.
`ProbeGram` is what `NoiseMonitor` measures a fixed probe batch with: the
layer path while its check holds, else the rows of `per_example.compute`.
"""

from __future__ import annotations

from keras import ops

from keras_noisygd import _backend
from keras_noisygd.per_example import layer_rows
from keras_noisygd.per_example.compute import compute
from keras_noisygd.per_example.rules.base import f64


def gram(plan_, model, x, y, sample_weight=None, loss=None, trainable_values=None):
    """`(K, mismatch)` in float64 for the probe batch, or `None` (a convolution's sizes unknown here).

    `K_ij = <G_i, G_j>` for the rows of `per_example_gradients`,
    `G_i = gamma_i + r` (`gamma_i` the gradient of `s_i l_i`, `r` that of the
    regularization losses), so `K = Gamma + u 1^T + 1 u^T + |r|^2` with
    `u_i = <gamma_i, r>`. `mismatch` is the largest relative difference
    between the rebuilt and the true batch gradients of the checked variables
    (~1e-7 in float32 when the path applies). `trainable_values`: as for
    `layer_rows.capture`.
    """
    captured = layer_rows.capture(plan_, model, x, y, sample_weight, loss, trainable_values=trainable_values)
    if captured is None:
        return None
    k = sum(f64(rule.gram()) for rule in captured.layers)
    if captured.regularization_gradients is not None:
        shared = {id(v): g for v, g in zip(model.trainable_variables, captured.regularization_gradients)}
        u = sum(f64(rule.cross(shared)) for rule in captured.layers)
        r_sq = sum(ops.sum(f64(g) ** 2) for g in shared.values())
        k = k + ops.expand_dims(u, 1) + ops.expand_dims(u, 0) + r_sq
    return k, captured.mismatch


class ProbeGram:
    """`K` of a probe batch, as a NumPy array; `source` says how the last one was formed.

    With `method="auto"` it takes the layer path where `layer_rows.plan`
    covers the model, compiled once (`_backend.compiled`), and forms `G`
    from then on if its check ever fails (a layer applied twice, say);
    `method="per_example"` always forms `G`. On a stateless backend (JAX)
    the variables' values are passed in: a compiled function would keep the
    values it was traced with.

    Args:
        model: A built Keras model.
        loss: The loss of the per-example values; `None` uses the compiled loss.
        chunk_size: `chunk_size` of `per_example.compute` where `G` is formed.
        method: `"auto"` or `"per_example"`.
    """

    def __init__(self, model, loss=None, chunk_size=None, method="auto"):
        self.model, self.loss, self.chunk_size = model, loss, chunk_size
        self._plan = layer_rows.cached_plan(model) if method == "auto" else None
        self._from_layers = None
        self._from_rows = _backend.compiled(self._rows_gram)
        self.source = None

    def __call__(self, x, y, sample_weight=None):
        if self._plan is not None:
            if self._from_layers is None:
                self._from_layers = _backend.compiled(self._layers_gram)
            result = self._from_layers(self._trainable_values(), x, y, sample_weight)
            if result is not None and float(result[1]) <= layer_rows.TOLERANCE:
                self.source = "layers"
                return ops.convert_to_numpy(result[0])
            self._plan = None  # the check failed: form G from now on
        self.source = "per_example"
        values = None
        if _backend.STATELESS:
            values = ([v.value for v in self.model.trainable_variables],
                      [v.value for v in self.model.non_trainable_variables])
        return ops.convert_to_numpy(self._from_rows(values, x, y, sample_weight))

    def _trainable_values(self):
        """The values a compiled JAX function must be passed (it would keep those it was traced with)."""
        return [v.value for v in self.model.trainable_variables] if _backend.STATELESS else None

    def _layers_gram(self, trainable_values, x, y, sample_weight):
        return gram(self._plan, self.model, x, y, sample_weight, self.loss, trainable_values)

    def _rows_gram(self, values, x, y, sample_weight):
        """`K` from the rows of `per_example_gradients` at the trainable and non-trainable `values`."""
        rows = compute(
            self.model, x, y, sample_weight=sample_weight, loss=self.loss, chunk_size=self.chunk_size, values=values
        ).rows()
        wide = _backend.wide_float()
        flat = [ops.reshape(ops.cast(g, wide), [ops.shape(g)[0], -1]) for g in rows]
        return sum(ops.matmul(f, ops.transpose(f)) for f in flat)
