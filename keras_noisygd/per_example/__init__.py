"""The per-example engine: the gradient matrix `G`, one row per example, on every Keras backend.

Two general, exact ways to form `G_i = d l_i / d theta`, both from `model.stateless_call`
(so computing `G` leaves the model's state alone):

* `"vectorized"`: `vmap` (`tf.vectorized_map`, `jax.vmap`, `torch.func.vmap`)
  over the examples of a forward and backward pass on one example. Costs about one batched step, but it is only
  right for a model whose training-mode forward pass treats every example on
  its own.
* `"jacobian"`: one batched forward pass gives the `[B]` per-example losses,
  and `vmap` runs the backward pass once per example on them (the Jacobian of
  the loss vector). Exact for every model, BatchNormalization
  (whose batch statistics couple the examples) and Dropout (one mask per
  example, as in the batched step) included, at `O(B)` times the cost of the
  batched backward pass.

`"auto"` first takes the layer rows (`layer_rows.py`; TensorFlow and
PyTorch: a model without state whose
trainable layers are all Dense, EinsumDense, Conv1D/Conv2D, Embedding or
LayerNormalization, and no `chunk_size`; BatchNormalization,
GhostBatchNormalization and Dropout models never take them): one
batched forward and backward pass, each layer's rows formed from its input and
output gradient, checked against the backward pass's batch gradient, the
general method where the check fails; the result's `method` is then
`"layers"`. Otherwise it picks `"jacobian"` exactly when the training-mode
forward pass updates model state (BatchNormalization's moving statistics, the
seed of Dropout, GaussianNoise or a random augmentation layer) and
`"vectorized"` otherwise. A custom layer that mixes examples without keeping
state must be given `method="jacobian"`.

The package:

* `compute.py`: `per_example_gradients` and `compute`, the entry point every
  caller goes through (the train step's `engine="per_example"`, `NoiseMonitor`);
* `tape_engine.py` (TensorFlow) and `vjp_engine.py` (JAX, PyTorch): the
  general methods on each backend;
* `result.py`: the `PerExample` result, `METHODS`, the weighted contraction;
* `losses.py`: the loss adapter (per-example values of the compiled loss);
* `layer_rows.py`: the layer path (a capture model, one batched pass, the
  rows and their check); `gram.py`: `K = G G^T` from it, or from `G`;
* `rules/`: one module per layer type and the explicit table `RULES`;
  `register_rule(layer_type, rule)` adds a user's rule (the `Rule` contract).
"""

from keras_noisygd.per_example.compute import compute, per_example_gradients
from keras_noisygd.per_example.result import METHODS, PerExample
from keras_noisygd.per_example.rules import Rule, register_rule

__all__ = ["per_example_gradients", "METHODS", "compute", "PerExample", "Rule", "register_rule"]
