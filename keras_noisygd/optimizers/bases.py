"""The Keras optimizer classes the noisy optimizers derive from, as Keras builds them on each backend."""

from __future__ import annotations


def keras_class(optimizer_class):
    """The class Keras builds for `optimizer_class(...)` on this backend, to derive a noisy optimizer from.

    PyTorch's Keras swaps `SGD`, `Adam`, `AdamW` and others for subclasses that
    update every variable in one fused `torch._foreach` call; a subclass of the
    generic class would update them one by one, an operation each, and would
    not be the update rule Keras itself uses there. Elsewhere it is
    `optimizer_class` itself.
    """
    return type(optimizer_class.__new__(optimizer_class))
