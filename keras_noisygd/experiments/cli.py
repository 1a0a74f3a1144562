"""Command line: `python -m keras_noisygd compare|large-batch [options]` (or `keras-noisygd ...`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from keras_noisygd import noise as noise_lib
from keras_noisygd.experiments import report

NOISES = [n for n in noise_lib.NAMES if n != "none"]

# Each command's defaults are its preset of the same name (minutes on a 2-core CPU); `--preset NAME` picks
# another. See docs/results.md for how they were chosen and what they give.
_FASHION_PAPER = dict(  # the reference code's Fashion-MNIST protocol (paper-notes section 5)
    dataset="fashion_mnist", split="paper", pixels="raw", model="convsmall", train_size=1000, steps=10000,
    lr=0.01, batch_size=50, seeds=3, eval_every=200,
    curve_size=10000,  # 60,000 test images cost ~4 s per point on 2 cores; the final accuracy uses all of them
)
PRESETS = {
    "compare": ("compare", dict(dataset="mnist1d", model="cnn", train_size=500, steps=1000, lr=0.2, batch_size=16, seeds=3)),
    "large-batch": ("large-batch", dict(dataset="mnist1d", model="cnn", train_size=1000, steps=2000, lr=0.2,
                                        batch_size=16, large_batch_size=256, seeds=3)),
    "fashion-mnist-paper": ("compare", _FASHION_PAPER),
    # `python3 tasks.py demo` where Fashion-MNIST is at hand: the paper protocol shortened to ~5 minutes on 2 cores
    # (2 seeds; with `--seeds 3` it is the 3-seed result of docs/results.md, ~8 minutes).
    "fashion-mnist-demo": ("compare", dict(_FASHION_PAPER, steps=2000, noise=["gaussian_centered"], seeds=2)),
    # Zhu et al.'s harder setting, the reference code's "cl1000cr200": 200 more images with random labels.
    "fashion-mnist-corrupted": ("compare", dict(_FASHION_PAPER, random_labels=200)),
    # Claim 2 on Fashion-MNIST: all 10,000 images of the official test file, 2,000 of them with random labels
    # (so that memorising matters), b = 50 against B = 1,000.
    "fashion-mnist-large-batch": ("large-batch", dict(
        _FASHION_PAPER, train_size=8000, random_labels=2000, large_batch_size=1000, steps=2000,
        noise=["gaussian_centered", "bernoulli"],
    )),
    # The paper's Figure 3(a): sparse Gaussian noise with k = 10, 50, 100, 1000 noisy examples per step.
    "fashion-mnist-sparse": ("compare", dict(_FASHION_PAPER, noise=[
        f"{name}:{k}" for name in ("sparse_gaussian", "sparse_gaussian_centered") for k in (10, 50, 100, 1000)
    ])),
}


def parser(preset=None):
    """The argument parser; `preset` (a key of `PRESETS`) sets its command's defaults."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"Argument `--preset` must be one of {sorted(PRESETS)}. Received: --preset={preset!r}")
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
    preset_name = preset
    for sub, name in ((compare, "compare"), (large, "large-batch")):
        preset = dict(noise=NOISES, split="standard", pixels="unit", random_labels=0, **PRESETS[name][1])
        if preset_name is not None and PRESETS[preset_name][0] == name:
            preset.update(PRESETS[preset_name][1])
        sub.add_argument(
            "--preset", choices=[p for p, (command, _) in PRESETS.items() if command == name],
            help=f"a set of defaults (default {name}); the other flags override it",
        )
        sub.add_argument("--dataset", default=preset["dataset"], help="mnist1d, digits, fashion_mnist, mnist, cifar10 (default %(default)s)")
        sub.add_argument("--data-dir", help="fashion_mnist/mnist: a folder holding the four IDX .gz files, looked in first")
        sub.add_argument("--split", choices=["standard", "paper"], default=preset["split"],
                         help="fashion_mnist/mnist: 'paper' trains on the official test file and tests on the "
                              "60,000 training images, as the reference code does (default %(default)s)")
        sub.add_argument("--pixels", choices=["unit", "raw"], default=preset["pixels"],
                         help="images: 'unit' divides by 255, 'raw' keeps 0-255 (default %(default)s)")
        sub.add_argument("--random-labels", type=int, default=preset["random_labels"],
                         help="append this many more training examples with random labels (default %(default)s)")
        sub.add_argument("--data", help="a .npz file with x_train, y_train, x_test, y_test (overrides --dataset)")
        sub.add_argument("--num-samples", type=int, help="mnist1d: examples to generate (80%% train); default 5000")
        sub.add_argument("--train-size", type=int, default=preset["train_size"], help="training examples used (default %(default)s)")
        sub.add_argument("--model", default=preset["model"], choices=["mlp", "cnn", "convsmall"], help="default %(default)s")
        sub.add_argument("--width", type=int, help="MLP hidden units (default 128) or CNN channels (cnn 16, convsmall 10)")
        sub.add_argument("--steps", type=int, default=preset["steps"], help="training steps per run (default %(default)s)")
        sub.add_argument("--lr", type=float, default=preset["lr"], help="learning rate (default %(default)s)")
        sub.add_argument("--momentum", type=float, default=0.0, help="default %(default)s")
        sub.add_argument("--batch-size", "-b", type=int, default=preset["batch_size"], help="the SGD batch b to emulate (default %(default)s)")
        sub.add_argument("--noise", nargs="+", default=preset["noise"],
                         help=f"noise classes (default: all of {NOISES}); a sparse class takes its number k of "
                              "noisy examples per step after a colon, e.g. sparse_gaussian:10 (default k = b)")
        sub.add_argument("--seeds", nargs="+", default=[str(preset["seeds"])],
                         help="one number N: seeds 0..N-1; several: those seeds (e.g. --seeds 3 4); A:B: seeds A..B-1 "
                              "(default %(default)s)")
        sub.add_argument("--curve-size", type=int, default=preset.get("curve_size"),
                         help="test examples (the first ones) the curve is measured on; the final test accuracy "
                              "uses all (default: all)")
        sub.add_argument("--eval-every", type=int, default=preset.get("eval_every", 100),
                         help="steps between test evaluations; must divide --steps (default %(default)s)")
        sub.add_argument(
            "--micro-batch-size", "-c", type=int,
            help="train every batch larger than this in micro-batches of it (gradient accumulation: one update "
                 "still sees the whole batch); must divide each batch it splits (default: no micro-batches)",
        )
        sub.add_argument("--out", default=f"runs/{name}", help="output folder (default %(default)s)")
        sub.add_argument("--resume", action="store_true",
                         help="keep the runs already in OUT/runs.jsonl (same settings) and train only the others: "
                              "a long comparison can be stopped and continued, or run in parts")
        sub.add_argument("--xla", choices=["auto", "on", "off"], default="auto",
                         help="jit_compile: 'auto' picks what was measured fastest on this kind of machine "
                              "(runner.fastest_jit_compile; default %(default)s)")
        sub.add_argument("--no-xla", action="store_const", const="off", dest="xla", help="the same as --xla off")
    large_preset = dict(PRESETS["large-batch"][1], **PRESETS.get(preset_name, ("", {}))[1])
    large.add_argument("--large-batch-size", "-B", type=int, default=large_preset["large_batch_size"], help="B (default %(default)s)")
    large.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay (default %(default)s)")
    large.add_argument("--ghost-batch-size", type=int, help="ghost-batch normalisation with this ghost size (default: no normalisation)")
    return top


def parse(argv=None):
    """Parses `argv` (default `sys.argv[1:]`) with the defaults of the `--preset` it names."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset")
    preset = first.parse_known_args(argv)[0].preset
    if preset is not None and preset not in PRESETS:
        preset = None  # argparse's own error, with the choices, comes from the full parser
    return parser(preset).parse_args(argv)


def main(argv=None):
    args = parse(argv)
    try:
        dataset, methods, config, title = prepare(args)
        settings = {**vars(args), "dataset": dataset.name, "n": len(dataset.x_train), "config": dataclasses.asdict(config)}
        journal = report.Journal(args.out, settings, resume=args.resume)
    except (ValueError, FileNotFoundError) as error:  # bad input or missing data: one clear line, no traceback
        print(f"keras-noisygd {args.command}: error: {error}", file=sys.stderr)
        return 2
    return run(args, dataset, methods, config, title, journal)


def prepare(args):
    """Loads the data and builds the methods and the shared config; raises ValueError on bad input."""
    from keras_noisygd.experiments import data, runner

    dataset = data.load(args.data or args.dataset, args.num_samples, args.data_dir, args.split, args.pixels)
    dataset = dataset.with_random_labels(args.train_size, args.random_labels)
    n = len(dataset.x_train)
    args.seeds = seeds(args.seeds)
    jit_compile = {"on": True, "off": False}.get(args.xla)
    if jit_compile is None:
        jit_compile = runner.fastest_jit_compile(args.model)
    if args.command == "compare":
        methods = runner.compare_methods(n, args.batch_size, args.noise)
        config = runner.Config(
            args.model, args.steps, args.lr, args.momentum, eval_every=args.eval_every, width=args.width,
            jit_compile=jit_compile, micro_batch_size=args.micro_batch_size, curve_size=args.curve_size,
        )
        title = f"{dataset.name}, n={n}: GD vs SGD(b={args.batch_size}) vs noisy GD"
    else:
        methods = runner.large_batch_methods(n, args.batch_size, args.large_batch_size, args.noise)
        config = runner.Config(
            args.model, args.steps, args.lr, args.momentum, args.weight_decay, args.ghost_batch_size,
            args.eval_every, args.width, jit_compile=jit_compile, micro_batch_size=args.micro_batch_size,
            curve_size=args.curve_size,
        )
        title = f"{dataset.name}, n={n}: SGD(b={args.batch_size}) vs SGD(B={args.large_batch_size}) (+ noise)"
    if args.curve_size is not None and args.curve_size < 1:
        raise ValueError(f"Argument `curve_size` must be >= 1. Received: curve_size={args.curve_size}")
    if args.steps < 1 or args.eval_every < 1:
        raise ValueError(f"Arguments `steps` and `eval_every` must be >= 1. Received: {args.steps}, {args.eval_every}")
    if args.steps % args.eval_every:
        # Keras runs `steps_per_execution` steps at a time: a partial last chunk would train past `steps`.
        raise ValueError(
            f"Argument `eval_every` must divide `steps`. Received: eval_every={args.eval_every}, steps={args.steps}"
        )
    runner.check_micro_batch_size(args.micro_batch_size, methods)
    if args.micro_batch_size is not None:
        title += f", micro-batches of {args.micro_batch_size}"
    return dataset, methods, config, title


def seeds(values):
    """The seeds `--seeds` names: `["N"]` is 0..N-1, `["A:B"]` is A..B-1, several numbers are those seeds."""
    try:
        if len(values) == 1 and ":" in values[0]:
            start, stop = (int(v) for v in values[0].split(":"))
            chosen = list(range(start, stop))
        elif len(values) == 1:
            chosen = list(range(int(values[0])))
        else:
            chosen = [int(v) for v in values]
    except ValueError:
        chosen = []
    if not chosen or min(chosen) < 0 or len(set(chosen)) < len(chosen):
        raise ValueError(
            "Argument `seeds` must be a count N >= 1 (seeds 0..N-1), A:B with 0 <= A < B (seeds A..B-1), or "
            f"several distinct seeds >= 0. Received: --seeds {' '.join(values)}"
        )
    return chosen


def run(args, dataset, methods, config, title, journal):
    """Trains every (seed, method) not in `journal` yet, prints the table and writes the files."""
    from keras_noisygd.experiments import progress, runner

    print(f"{title}; model {args.model}, {args.steps} steps, lr {args.lr}, seeds {args.seeds}, "
          f"jit_compile={config.jit_compile}", flush=True)
    runs, total = [], len(methods) * len(args.seeds)
    for seed in args.seeds:
        for method in methods:
            label = f"run {len(runs) + 1}/{total}: {method.label}, seed {seed}"
            run_ = journal.get(method.label, seed)
            if run_ is None:
                print(label, flush=True)
                bar = progress.Progress(config.steps, runner.micro_steps(method, config))
                run_ = journal.add(runner.train(dataset, method, config, seed, callbacks=[bar]))
            else:
                print(f"{label}: in {journal.path} (test acc {run_['test_acc']:.4f})", flush=True)
            runs.append(run_)
    print(report.table(report.summarize(runs)))
    # The gap each noisy method should close: GD -> SGD(b), or SGD(B) -> SGD(b).
    baseline, target = (methods[0], methods[1]) if args.command == "compare" else (methods[1], methods[0])
    paths = report.write(args.out, journal.all_settings, runs, title, baseline.label, target.label)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
