"""Command line: `python -m keras_noisygd compare|large-batch [options]` (or `keras-noisygd ...`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from keras_noisygd import noise as noise_lib

NOISES = [n for n in noise_lib.NAMES if n != "none"]

# Quick presets: minutes on a 2-core CPU. See docs/results.md for how they were chosen.
PRESETS = {
    "compare": dict(dataset="mnist1d", model="cnn", train_size=500, steps=1000, lr=0.2, batch_size=16, seeds=3),
    "large-batch": dict(dataset="mnist1d", model="cnn", train_size=1000, steps=2000, lr=0.2, batch_size=16,
                        large_batch_size=256, seeds=3),
}


def parser():
    top = argparse.ArgumentParser(
        prog="keras-noisygd",
        description="Reproduce the comparisons of Wu et al. (ICML 2020): noisy GD generalizes like SGD.",
    )
    commands = top.add_subparsers(dest="command", required=True)
    compare = commands.add_parser(
        "compare", help="GD vs SGD(b) vs full-batch noisy GD with each noise class",
        description="Full-batch GD, SGD(b), and full-batch noisy GD with each noise class calibrated to SGD(b).",
    )
    large = commands.add_parser(
        "large-batch", help="SGD(b) vs SGD(B) vs SGD(B) + noise emulating b",
        description="Small-batch SGD(b), large-batch SGD(B), and SGD(B) with noise emulating SGD(b) inside each batch.",
    )
    for sub, name in ((compare, "compare"), (large, "large-batch")):
        preset = PRESETS[name]
        sub.add_argument("--dataset", default=preset["dataset"], help="mnist1d (default), digits, fashion_mnist, mnist, cifar10")
        sub.add_argument("--data", help="a .npz file with x_train, y_train, x_test, y_test (overrides --dataset)")
        sub.add_argument("--num-samples", type=int, help="mnist1d: examples to generate (80%% train); default 5000")
        sub.add_argument("--train-size", type=int, default=preset["train_size"], help="training examples used (default %(default)s)")
        sub.add_argument("--model", default=preset["model"], choices=["mlp", "cnn"], help="default %(default)s")
        sub.add_argument("--width", type=int, help="MLP hidden units (default 128) or CNN channels (default 16)")
        sub.add_argument("--steps", type=int, default=preset["steps"], help="training steps per run (default %(default)s)")
        sub.add_argument("--lr", type=float, default=preset["lr"], help="learning rate (default %(default)s)")
        sub.add_argument("--momentum", type=float, default=0.0, help="default %(default)s")
        sub.add_argument("--batch-size", "-b", type=int, default=preset["batch_size"], help="the SGD batch b to emulate (default %(default)s)")
        sub.add_argument("--noise", nargs="+", default=NOISES, help=f"noise classes (default: all of {NOISES})")
        sub.add_argument("--seeds", type=int, default=preset["seeds"], help="seeds 0..N-1 (default %(default)s)")
        sub.add_argument("--eval-every", type=int, default=100, help="steps between test evaluations; must divide --steps (default %(default)s)")
        sub.add_argument(
            "--micro-batch-size", "-c", type=int,
            help="train every batch larger than this in micro-batches of it (gradient accumulation: one update "
                 "still sees the whole batch); must divide each batch it splits (default: no micro-batches)",
        )
        sub.add_argument("--out", default=f"runs/{name}", help="output folder (default %(default)s)")
        sub.add_argument("--no-xla", action="store_true", help="train without jit_compile (XLA is on by default)")
    large.add_argument("--large-batch-size", "-B", type=int, default=PRESETS["large-batch"]["large_batch_size"], help="B (default %(default)s)")
    large.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay (default %(default)s)")
    large.add_argument("--ghost-batch-size", type=int, help="ghost-batch normalisation with this ghost size (default: no normalisation)")
    return top


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        dataset, methods, config, title = prepare(args)
    except ValueError as error:  # bad input: one clear line, no traceback (training errors keep theirs)
        print(f"keras-noisygd {args.command}: error: {error}", file=sys.stderr)
        return 2
    return run(args, dataset, methods, config, title)


def prepare(args):
    """Loads the data and builds the methods and the shared config; raises ValueError on bad input."""
    from keras_noisygd.experiments import data, runner

    dataset = data.load(args.data or args.dataset, args.num_samples).subset(args.train_size)
    n = len(dataset.x_train)
    if args.command == "compare":
        methods = runner.compare_methods(n, args.batch_size, args.noise)
        config = runner.Config(
            args.model, args.steps, args.lr, args.momentum, eval_every=args.eval_every, width=args.width,
            jit_compile=not args.no_xla, micro_batch_size=args.micro_batch_size,
        )
        title = f"{dataset.name}, n={n}: GD vs SGD(b={args.batch_size}) vs noisy GD"
    else:
        methods = runner.large_batch_methods(n, args.batch_size, args.large_batch_size, args.noise)
        config = runner.Config(
            args.model, args.steps, args.lr, args.momentum, args.weight_decay, args.ghost_batch_size,
            args.eval_every, args.width, jit_compile=not args.no_xla, micro_batch_size=args.micro_batch_size,
        )
        title = f"{dataset.name}, n={n}: SGD(b={args.batch_size}) vs SGD(B={args.large_batch_size}) (+ noise)"
    if args.seeds < 1 or args.steps < 1 or args.eval_every < 1:
        raise ValueError(f"Arguments `seeds`, `steps` and `eval_every` must be >= 1. Received: {args.seeds}, {args.steps}, {args.eval_every}")
    if args.steps % args.eval_every:
        # Keras runs `steps_per_execution` steps at a time: a partial last chunk would train past `steps`.
        raise ValueError(
            f"Argument `eval_every` must divide `steps`. Received: eval_every={args.eval_every}, steps={args.steps}"
        )
    runner.check_micro_batch_size(args.micro_batch_size, methods)
    if args.micro_batch_size is not None:
        title += f", micro-batches of {args.micro_batch_size}"
    return dataset, methods, config, title


def run(args, dataset, methods, config, title):
    """Trains every (seed, method), prints the table and writes the files."""
    import keras

    from keras_noisygd.experiments import report, runner

    n = len(dataset.x_train)
    print(f"{title}; model {args.model}, {args.steps} steps, lr {args.lr}, seeds 0..{args.seeds - 1}")
    progress = keras.utils.Progbar(len(methods) * args.seeds, unit_name="run", stateful_metrics=["test_acc"])
    runs = []
    for seed in range(args.seeds):
        for method in methods:
            runs.append(runner.train(dataset, method, config, seed))
            progress.add(1, values=[("test_acc", runs[-1]["test_acc"])])
    print(report.table(report.summarize(runs)))
    settings = {**vars(args), "dataset": dataset.name, "n": n, "config": dataclasses.asdict(config)}
    # The gap each noisy method should close: GD -> SGD(b), or SGD(B) -> SGD(b).
    baseline, target = (methods[0], methods[1]) if args.command == "compare" else (methods[1], methods[0])
    paths = report.write(args.out, settings, runs, title, baseline.label, target.label)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
