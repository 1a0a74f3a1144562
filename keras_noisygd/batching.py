"""`micro_batches`: the batch size and accumulation steps that split a training set into equal micro-batches."""

from __future__ import annotations

from keras_noisygd._checks import check_int

__all__ = ["micro_batches"]


def micro_batches(num_examples, max_batch_size):
    """`(batch_size, gradient_accumulation_steps)` for full-batch noisy GD in micro-batches of at most `max_batch_size`.

    Every micro-batch of an update must have the same size (the update's noise
    is drawn once for all of them), so `batch_size` is the largest divisor of
    `num_examples` that is at most `max_batch_size`: `fit` then has no partial
    last batch, and `batch_size * gradient_accumulation_steps == num_examples`.
    A prime `num_examples` larger than `max_batch_size` gives micro-batches of
    one; drop a few examples (or pad) for a better split.

    Example:

    ```python
    batch_size, k = keras_noisygd.micro_batches(len(x), 4096)   # 50,000 -> (3125, 16)
    model.compile(optimizer=keras_noisygd.NoisyGD(0.1, gradient_accumulation_steps=k), loss=...)
    model.fit(x, y, batch_size=batch_size, epochs=100, shuffle=False)   # one full-batch step per epoch
    ```

    Args:
        num_examples: The training set's size `N`, an integer >= 1.
        max_batch_size: The largest micro-batch that fits in memory, an integer >= 1.

    Returns:
        `(batch_size, steps)`, with `steps = num_examples // batch_size`; `steps`
        is 1 when the whole set fits (pass `gradient_accumulation_steps=None` then).
    """
    n = check_int("num_examples", num_examples, 1)
    c = check_int("max_batch_size", max_batch_size, 1)
    if n <= c:
        return n, 1
    divisor = max(d for d in _divisors(n) if d <= c)
    return divisor, n // divisor


def _divisors(n):
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return small + [n // d for d in small]
