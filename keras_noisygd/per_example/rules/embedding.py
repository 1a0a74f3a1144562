"""Embedding: row `v` of example `i` sums the output gradients at the positions with id `v`."""

from __future__ import annotations

from keras import ops

from keras_noisygd.per_example.rules.base import Rule, f64


class EmbeddingRule(Rule):
    """An Embedding on integer ids of any rank: row `v` of example `i` sums `d_is` over its positions with id `v`.

    The rows are dense, `[B, input_dim, output_dim]` (a scatter-add). The Gram
    share needs no rows: `K_ij = sum_{s,t} [id_is = id_jt] <d_is, d_jt>`, a
    `[B S, B S]` product of the output gradients masked by id equality
    (`O(B^2 S^2 D)` for `S` positions per example), taken where it costs less
    than the rows' `O(B^2 V D)` (`S^2 < V`, the vocabulary size; both give the
    same `K`).
    """

    def __init__(self, layer, ids, out_grad):
        self.layer = layer
        batch = ops.shape(ids)[0]
        vocabulary = layer.input_dim
        if ids.dtype not in ("int32", "int64"):
            ids = ops.cast(ids, "int32")  # as Embedding.call
        ids = ops.where(ids < 0, ids + vocabulary, ids)  # as ops.take: -1 is the last row
        self.ids = ops.reshape(ids, [batch, -1])  # [B, S]
        self.d = ops.reshape(out_grad, [batch, -1, layer.output_dim])  # [B, S, D]

    @classmethod
    def capture(cls, layer, a, out, grads, values):
        return cls(layer, a, grads.output)

    @staticmethod
    def covers(layer, input_shape):
        return len(input_shape) >= 2  # ids of any rank >= 1 after the batch axis

    @staticmethod
    def variables(layer):
        return [layer.embeddings]

    @staticmethod
    def checked(layer):
        return layer.embeddings

    def rebuilt(self):
        d = ops.reshape(self.d, [-1, self.layer.output_dim])
        return ops.segment_sum(d, ops.reshape(self.ids, [-1]), num_segments=self.layer.input_dim)

    def rows(self):
        batch, vocabulary, dim = ops.shape(self.ids)[0], self.layer.input_dim, self.layer.output_dim
        offsets = ops.expand_dims(ops.arange(batch, dtype=self.ids.dtype) * vocabulary, 1)
        segments = ops.reshape(self.ids + offsets, [-1])  # example i's row v is segment i V + v
        table = ops.segment_sum(ops.reshape(self.d, [-1, dim]), segments, num_segments=batch * vocabulary)
        return [ops.reshape(table, [batch, vocabulary, dim])]

    def gram(self):
        positions = self.ids.shape[1]
        if positions is None or positions * positions >= self.layer.input_dim:
            return super().gram()
        batch = ops.shape(self.ids)[0]
        ids = ops.reshape(self.ids, [-1])
        d = ops.reshape(self.d, [-1, self.layer.output_dim])
        same = f64(ops.equal(ops.expand_dims(ids, 1), ops.expand_dims(ids, 0)))
        products = f64(ops.matmul(d, ops.transpose(d))) * same  # [B S, B S]
        return ops.sum(ops.reshape(products, [batch, positions, batch, positions]), axis=(1, 3))

    def cross(self, shared):
        r = ops.take(f64(shared[id(self.layer.embeddings)]), self.ids, axis=0)  # [B, S, D]: r at each id
        return ops.sum(f64(self.d) * r, axis=(1, 2))


class ReversibleEmbeddingRule(EmbeddingRule):
    """`ReversibleEmbedding` (tied weights: one table) called forward, as `Embedding`.

    Its reverse call (`reverse=True`, the projection back onto the vocabulary)
    is another function: refused where the output is not `ids.shape +
    (output_dim,)`, and a layer called both ways (a language model's head)
    runs twice, which the caller refuses too.
    """

    @classmethod
    def capture(cls, layer, a, out, grads, values):
        if tuple(out.shape) != (*a.shape, layer.output_dim):
            return None
        return super().capture(layer, a, out, grads, values)
