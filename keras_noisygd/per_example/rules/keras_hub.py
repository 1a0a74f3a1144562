"""KerasHub's embedding layers, so that its transformers (BERT and the like) get the layer path.

KerasHub's own `ReversibleEmbedding` (older releases; newer ones use
Keras's) takes `ReversibleEmbeddingRule` (`embedding.py`). `PositionEmbedding` adds
rows `0..T-1` of its table to every example: example `i`'s gradient of the
table is `d_i` in those rows (zeros below). A call with `start_index` or
`positions` puts the rows elsewhere, which the rebuilt batch gradient shows
(the caller then forms `G`). Registered by `rules.lookup` on the first
KerasHub layer it meets, so KerasHub stays optional.
"""

from __future__ import annotations

from keras import ops

from keras_noisygd.per_example.rules.base import Rule
from keras_noisygd.per_example.rules.embedding import ReversibleEmbeddingRule


class PositionEmbeddingRule(Rule):
    """`PositionEmbedding` on `[B, ..., T, D]`: example `i`'s table rows are `d_i` summed over the axes before `T`."""

    def __init__(self, layer, out_grad):
        self.layer = layer
        rank = len(out_grad.shape)
        d = ops.sum(out_grad, axis=tuple(range(1, rank - 2))) if rank > 3 else out_grad  # [B, T, D]
        below = layer.sequence_length - d.shape[1]
        self.table_rows = ops.pad(d, [[0, 0], [0, below], [0, 0]]) if below else d  # [B, sequence_length, D]

    @classmethod
    def capture(cls, layer, a, out, grads, values):
        if grads.output.shape[-2] is None:  # a traced step without the sequence length: form G
            return None
        return cls(layer, grads.output)

    @staticmethod
    def covers(layer, input_shape):
        return len(input_shape) >= 3

    @staticmethod
    def variables(layer):
        return [layer.position_embeddings]

    @staticmethod
    def checked(layer):
        return layer.position_embeddings

    def rebuilt(self):
        return ops.sum(self.table_rows, axis=0)

    def rows(self):
        return [self.table_rows]


def table():
    """`{KerasHub layer class: rule class}`."""
    import keras_hub

    return {
        keras_hub.layers.ReversibleEmbedding: ReversibleEmbeddingRule,
        keras_hub.layers.PositionEmbedding: PositionEmbeddingRule,
    }
