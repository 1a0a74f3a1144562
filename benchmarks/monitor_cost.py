"""Cost of `NoiseMonitor(every_n_steps=1)`: a `fit` step with the monitor / the same step without it.

The monitor measures at every step on a probe batch of the training batch's
size. Three ways, alternating rounds in one process (median of the per-round
ratios, with their range): no monitor, the monitor with `method="auto"` (the
Gram matrix from the layers' inputs and output gradients, where the
model allows it: both models here) and with `method="per_example"` (the Gram matrix
from `G`, as before the Gram path). Steps are timed inside one `fit`
(`_timing.py`), `steps_per_execution=1` so that the monitor runs at every step. Then whole `fit` calls
of `--fit-steps` steps, with the monitor (`auto`) and without: what a user's `fit` costs, the host-side
work of every measurement and `fit`'s start and end included.

Then a memory pass (`_memory.py`): for each model and `--memory-batch-sizes`
B, one fresh process per way fits `--steps` steps (after a warm-up fit of as
many) and reports its peak resident set above the resident set before them. Next to
the peaks the table prints the sizes the Gram path should follow, `B^2`
float64 values and the layers' captured inputs and outputs (`B` x their
per-example size, float32), and the size it should not, `B x d` float32: the
monitor's extra peak (`auto - none`) should grow with the first two, that of
`per_example` with `B x d`.

    python benchmarks/monitor_cost.py [--rounds 5] [--steps 20] [--batch-size 128]
        [--memory-batch-sizes 32 128 512] [--no-memory] [--models paper_cnn,mlp_784_256_256_10,bert_tiny]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _memory import child_peak, peak_mib, report, settings  # noqa: E402  (benchmarks/ is the script's folder)
from _timing import seconds_per_step  # noqa: E402
from step_time import MODELS, _RepeatedBatch, synthetic_batch  # noqa: E402

import keras_noisygd as kn  # noqa: E402
from keras_noisygd.per_example import layer_rows  # noqa: E402

WAYS = ("none", "auto", "per_example")  # no monitor, and the monitor's two methods


# A real transformer (KerasHub's BERT from a config, nothing downloaded; `--models bert_tiny`): the layer
# path reaches its attention's projections inside each block, so `auto` builds `K` without `G`.
BERT = dict(vocabulary_size=1000, num_layers=2, num_heads=4, hidden_dim=64, intermediate_dim=128,
            max_sequence_length=32, dropout=0.0)
CHOICES = (*MODELS, "bert_tiny")


def _bert(batch_size):
    """`(model, (x, y))`: the BERT classifier and one batch of padded random token sequences."""
    import keras_hub  # the `test` extra

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(**BERT)
    model = kn.noisy(keras_hub.models.BertTextClassifier(backbone, num_classes=10, preprocessor=None, dropout=0.0))
    rng = np.random.default_rng(0)
    length = BERT["max_sequence_length"]
    mask = (np.arange(length)[None, :] < rng.integers(8, length + 1, batch_size)[:, None]).astype("int32")
    x = {"token_ids": rng.integers(1, BERT["vocabulary_size"], (batch_size, length)).astype("int32") * mask,
         "segment_ids": np.zeros((batch_size, length), "int32"), "padding_mask": mask}
    return model, (x, rng.integers(0, 10, batch_size))


def _repeated(x, y):
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.data.Dataset.from_tensors((x, y)).repeat()
    return _RepeatedBatch(x, y)


def build(name, batch_size):
    """The noisy model `name` (seed 0), compiled as in the time pass, and a dataset repeating one batch."""
    if name == "bert_tiny":
        model, (x, y) = _bert(batch_size)
        data = _repeated(x, y)
    else:
        layers_fn, (x, y), data = synthetic_batch(name, batch_size, np.random.default_rng(0))
        keras.utils.set_random_seed(0)
        model = kn.NoisySequential(layers_fn())
    model.compile(
        kn.NoisyGD(0.01, noise="gaussian_centered", emulate_batch_size=max(1, batch_size // 4), seed=0),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=JIT,
    )
    return model, (x, y), data


# JAX's step compiled (`jax.jit`, its `fit`'s default: eager JAX runs op by op); TensorFlow without XLA (its
# convolutions are 4x slower with XLA on a CPU), PyTorch eager: each backend's fast way on this machine.
JIT = keras.backend.backend() == "jax"
COMPILED = "jax.jit" if JIT else "XLA off"


def callbacks(way, probe):
    return [] if way == "none" else [kn.NoiseMonitor(probe, every_n_steps=1, method=way)]


def time_pass(args):
    print(f"batch = probe = {args.batch_size}, monitor every step, {args.steps} steps x {args.rounds} rounds, {COMPILED}")
    print(f"{'model':<20} {'step ms':>8} {'auto ms':>8} {'source':>11} {'ratio':>14} {'per_ex ms':>10} {'ratio':>14}")
    for name in args.models.split(","):
        model, probe, data = build(name, args.batch_size)
        monitors = {way: callbacks(way, probe) for way in WAYS}
        runs = {way: [] for way in WAYS}
        for way in WAYS:  # trace outside the timing
            seconds_per_step(model, data, 2, 2, monitors[way])
        for round_ in range(args.rounds):
            order = list(WAYS) if round_ % 2 == 0 else list(reversed(WAYS))
            for way in order:
                runs[way].append(seconds_per_step(model, data, args.steps, 2, monitors[way]))
        ratio = {way: [a / b for a, b in zip(runs[way], runs["none"])] for way in WAYS[1:]}

        def show(way):
            return f"{statistics.median(ratio[way]):.2f} ({min(ratio[way]):.2f}-{max(ratio[way]):.2f})"

        print(
            f"{name:<20} {1e3 * statistics.median(runs['none']):>8.2f} {1e3 * statistics.median(runs['auto']):>8.2f} "
            f"{monitors['auto'][0].gram_source:>11} {show('auto'):>14} "
            f"{1e3 * statistics.median(runs['per_example']):>10.2f} {show('per_example'):>14}"
        )


def whole_fit_pass(args):
    """Whole `fit` calls of `--fit-steps` steps with `NoiseMonitor(every_n_steps=1)` (`auto`) against without:
    what a user's `fit` costs, host-side work of every measurement (syncs, NumPy statistics, the callback),
    `fit`'s start and end included."""
    print(f"\nwhole fit calls of {args.fit_steps} steps, batch = probe = {args.batch_size}, {args.rounds} rounds, {COMPILED}")
    print(f"{'model':<20} {'fit s':>8} {'with monitor s':>15} {'ratio':>18}")
    for name in args.models.split(","):
        model, probe, data = build(name, args.batch_size)
        monitors = {way: callbacks(way, probe) for way in ("none", "auto")}
        seconds = {way: [] for way in monitors}

        def fit(way):
            model.fit(data, steps_per_epoch=args.fit_steps, epochs=1, verbose=0, shuffle=False, callbacks=monitors[way])

        for way in monitors:  # trace outside the timing
            fit(way)
        for round_ in range(args.rounds):
            for way in (("none", "auto") if round_ % 2 == 0 else ("auto", "none")):
                start = time.perf_counter()
                fit(way)
                seconds[way].append(time.perf_counter() - start)
        ratio = [a / b for a, b in zip(seconds["auto"], seconds["none"])]
        print(f"{name:<20} {statistics.median(seconds['none']):>8.3f} {statistics.median(seconds['auto']):>15.3f} "
              f"{statistics.median(ratio):>6.2f} ({min(ratio):.2f}-{max(ratio):.2f})")


def memory_pass(args):
    print(f"\nPeak memory of a fit of {args.steps} steps (MiB above the resident set after a warm-up fit; "
          f"one process per way and B, {settings()})")
    print(f"{'model':<20} {'B':>4} {'none':>8} {'auto':>8} {'per_ex':>8} {'auto-none':>10} {'per_ex-none':>12} "
          f"{'B^2 f64':>8} {'captured':>9} {'B x d':>8}")
    for name in args.models.split(","):
        for batch_size in args.memory_batch_sizes:
            peaks = {
                way: child_peak(__file__, ["--memory-child", name, str(batch_size), way, "--steps", str(args.steps)],
                                f"{name}, B={batch_size}, {way}")
                for way in WAYS
            }
            gram, captured, rows = _sizes_mib(name, batch_size)
            print(
                f"{name:<20} {batch_size:>4} {peaks['none']:>8.1f} {peaks['auto']:>8.1f} {peaks['per_example']:>8.1f} "
                f"{peaks['auto'] - peaks['none']:>10.1f} {peaks['per_example'] - peaks['none']:>12.1f} "
                f"{gram:>8.2f} {captured:>9.1f} {rows:>8.1f}"
            )


def _sizes_mib(name, batch_size):
    """MiB of `K` (B^2 float64), of the Gram path's captured inputs and outputs (float32) and of `G` (B x d float32)."""
    model, _, _ = build(name, 1)
    plan = layer_rows.plan(model)
    per_example = 0
    for layer in plan.layers if plan is not None else []:
        for tensor in (layer.input, layer.output):
            per_example += int(np.prod(tensor.shape[1:]))
    # Layers captured inside another layer's call (a BERT's) have no static shapes here: not counted.
    captured = float("nan") if plan is not None and plan.nested else batch_size * per_example * 4 / 2**20
    return batch_size**2 * 8 / 2**20, captured, batch_size * model.count_params() * 4 / 2**20


def memory_child(args):
    """One memory subprocess: the peak of a fit of `--steps` steps of one way, after a warm-up fit of as many."""
    name, batch_size, way = args.memory_child
    model, probe, data = build(name, int(batch_size))
    monitor = callbacks(way, probe)
    # peak_mib's warm-up call (the same fit) traces the step and the monitor and makes the first allocations.
    report(peak_mib(lambda: model.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0, callbacks=monitor), 1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(CHOICES))
    parser.add_argument("--memory-batch-sizes", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--no-memory", action="store_true", help="skip the memory pass")
    parser.add_argument("--no-times", action="store_true", help="skip the time passes (memory needs no quiet machine)")
    parser.add_argument("--fit-steps", type=int, default=30, help="steps of each whole fit call (0: skip that pass)")
    parser.add_argument("--memory-child", nargs=3, metavar=("MODEL", "B", "WAY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return
    if not args.no_times:
        time_pass(args)
        if args.fit_steps:
            whole_fit_pass(args)
    if not args.no_memory:
        memory_pass(args)


if __name__ == "__main__":
    main()
