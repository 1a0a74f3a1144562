"""Layers reached inside another layer's `call`: the projections of a `MultiHeadAttention`, a block's Dense.

The layer path captures a layer's input and output from the model's graph
(`layer.input`, `layer.output`), which a layer called inside another
layer's `call` does not have. `covered(layer, rules)` finds, before any
data, the sublayers with a rule that together hold every trainable variable
of `layer`; `intercepting(layers, records)` records each one's input and
output while the batched pass runs, by wrapping its `call` on the instance
for that pass only (Keras's `Layer.__call__` runs `self.call`). A sublayer
must run exactly once per pass: `layer_rows.capture` falls back to `G`
otherwise, and the rebuilt batch gradients check the rest.
"""

from __future__ import annotations

import contextlib

import keras

from keras_noisygd.per_example import rules as rules_lib


def _sublayers(layer):
    """The layers `layer` holds as attributes (in lists, tuples and dicts too), in attribute order."""
    found, seen = [], {id(layer)}

    def visit(value):
        if isinstance(value, keras.layers.Layer):
            if id(value) not in seen:
                seen.add(id(value))
                found.append(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    for value in vars(layer).values():
        visit(value)
    return found


def covered(layer, rules):
    """`[(sublayer, rule class)]` holding every trainable variable of `layer`, or `None` where one has no rule.

    A sublayer with a rule is taken whole (not descended into); one without a
    rule is descended into; one that has trainable variables and neither a
    rule nor sublayers leaves `layer` uncovered. `covers` is checked on the
    input each sublayer meets (`layer_rows.capture`): there is no graph to
    read its shape from here.
    """
    pairs, pending = [], [sub for sub in _sublayers(layer) if sub.trainable_weights]
    while pending:
        sub = pending.pop(0)
        rule = rules_lib.rule_for(sub, None, rules)
        if rule is not None:
            pairs.append((sub, rule))
            continue
        inner = [s for s in _sublayers(sub) if s.trainable_weights]
        if not inner:
            return None
        pending.extend(inner)
    held = {id(v) for sub, _ in pairs for v in sub.trainable_weights}
    if held != {id(v) for v in layer.trainable_weights} or len({id(sub) for sub, _ in pairs}) != len(pairs):
        return None
    return pairs


@contextlib.contextmanager
def intercepting(layers, records, transform=None):
    """While open, each call of a layer of `layers` appends `(input, output)` to `records[id(layer)]`.

    `transform(output)`, where given, replaces the output the layer returns
    (and records): `_backend.gradient_point`, so the pass can be differentiated there.
    """
    for layer in layers:
        call = layer.call  # the bound method of the layer's class

        def recording(inputs, *args, _call=call, _key=id(layer), **kwargs):
            outputs = _call(inputs, *args, **kwargs)
            if transform is not None:
                outputs = transform(outputs)
            records.setdefault(_key, []).append((inputs, outputs))
            return outputs

        object.__setattr__(layer, "call", recording)  # plain Python: not a Keras-tracked attribute
    try:
        yield records
    finally:
        for layer in layers:
            object.__delattr__(layer, "call")
