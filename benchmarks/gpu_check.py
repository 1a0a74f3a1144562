"""One short check of the package on a GPU, through JAX and PyTorch: step costs, the engines, the draw, a paper run.

Runs itself once per backend (`KERAS_BACKEND=jax`, then `torch`, each in a process of its own) and prints
one table. Needs only jax or torch, keras, numpy and the package (no TensorFlow: the GPU machines have
none). Every time is a median over rounds taken inside one `fit` (or over repeated calls), synchronised on
the device before each clock read, and each ratio is against a baseline measured in the same process.

Rows, per backend:

* `weighted step / stock`: `NoisyModel` + `NoisyGD` (gaussian_centered ~ SGD(32)) against `keras.Model` +
  `keras.optimizers.SGD`, the same network, weights and batch: the paper's CNN at B = 1,000 (the
  full-batch step of its Fashion-MNIST protocol) and the 784-256-256-10 MLP at B = 512.
* `per_example step / stock`: `engine="per_example"` (forms `G`) on the paper CNN at B = 128.
* `monitor fit / fit`: whole `fit` calls of 30 steps of the MLP at B = 128, with `NoiseMonitor(every_n_steps=1)`
  on a probe of 128 against without it.
* `draw N=50,000`: one compiled draw of each noise class's weights (`jax.jit`; eager on PyTorch).
* `paper run`: GD, full-batch noisy GD (gaussian_centered ~ SGD(50)) and SGD(50) on the paper's protocol
  (the first 1,000 images of Fashion-MNIST's t10k file, raw pixels, ConvSmall with N(0, 0.02^2) weights,
  lr 0.01), test accuracy on the 60,000 training images; synthetic images of that shape where the files
  are not in `--data-dir`.

    python benchmarks/gpu_check.py [--size full|tiny] [--data-dir DIR] [--out FILE.md] [--budget SECONDS]

`--size tiny` is the CPU smoke run of the test suite (seconds). `--budget` bounds each backend's process:
checks that would start past it are reported as skipped, so one run always prints its table.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {
    # batch sizes, timed steps, rounds, paper-run steps and evaluation size
    "full": dict(cnn_batch=1000, mlp_batch=512, engine_batch=128, steps=50, rounds=5, monitor_steps=30,
                 draw_n=50_000, noises=6, paper_steps=2000, paper_eval=60_000),
    "tiny": dict(cnn_batch=16, mlp_batch=16, engine_batch=8, steps=1, rounds=1, monitor_steps=2,
                 draw_n=500, noises=2, paper_steps=2, paper_eval=64),
}
NOISES = ("sgd", "gaussian", "gaussian_centered", "bernoulli", "sparse_gaussian", "sparse_gaussian_centered")


# -- the parent: one process per backend, one table ------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="full", choices=sorted(SIZES))
    parser.add_argument("--data-dir", help="a folder with Fashion-MNIST's four .gz files (default: synthetic)")
    parser.add_argument("--backends", nargs="+", default=["jax", "torch"], choices=["jax", "torch", "tensorflow"])
    parser.add_argument("--budget", type=float, default=200.0, help="seconds per backend (default %(default)s)")
    parser.add_argument("--out", help="also write the table (Markdown) to this file")
    parser.add_argument("--one-backend", action="store_true", help=argparse.SUPPRESS)  # the child's mode
    args = parser.parse_args(argv)
    if args.one_backend:
        rows = run_checks(args)
        print("ROWS " + json.dumps(rows))
        return 0
    rows, failed = [], []
    for backend in args.backends:
        child = [sys.executable, __file__, "--one-backend", "--size", args.size, "--budget", str(args.budget)]
        if args.data_dir:
            child += ["--data-dir", args.data_dir]
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        start = time.perf_counter()
        done = subprocess.run(child, env=env, capture_output=True, text=True)
        found = [line for line in done.stdout.splitlines() if line.startswith("ROWS ")]
        if done.returncode or not found:
            failed.append(backend)
            print(f"{backend}: failed (exit {done.returncode})\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}", file=sys.stderr)
            continue
        rows += json.loads(found[-1][5:])
        rows.append(dict(backend=backend, check="process", setting="all checks", value=time.perf_counter() - start,
                         unit="s"))
    text = table(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 1 if failed else 0


def table(rows):
    lines = ["| backend | check | setting | value | baseline | ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        value = r["value"] if isinstance(r["value"], str) else f"{r['value']:.4g} {r.get('unit', '')}".strip()
        baseline = f"{r['baseline']:.4g} {r.get('unit', '')}".strip() if r.get("baseline") is not None else ""
        ratio = f"{r['ratio']:.3f}" if r.get("ratio") is not None else ""
        lines.append(f"| {r['backend']} | {r['check']} | {r['setting']} | {value} | {baseline} | {ratio} |")
    return "\n".join(lines)


# -- the child: the checks of one backend --------------------------------------------------------------


def run_checks(args):
    import keras

    size = SIZES[args.size]
    backend = keras.backend.backend()
    deadline = time.perf_counter() + args.budget
    rows = [dict(backend=backend, check="device", setting=f"keras {keras.__version__}", value=device_name())]
    checks = [
        ("weighted step / stock", lambda: step_rows("paper_cnn", size["cnn_batch"], "weighted", size)),
        ("weighted step / stock", lambda: step_rows("mlp", size["mlp_batch"], "weighted", size)),
        ("per_example step / stock", lambda: step_rows("paper_cnn", size["engine_batch"], "per_example", size)),
        ("monitor fit / fit", lambda: monitor_rows(size)),
        ("draw", lambda: draw_rows(size)),
        ("paper run", lambda: paper_rows(size, args.data_dir)),
    ]
    for name, check in checks:
        if time.perf_counter() > deadline:
            rows.append(dict(backend=backend, check=name, setting="", value="skipped: past --budget"))
            continue
        try:
            rows += [dict(backend=backend, **r) for r in check()]
        except Exception as error:  # one failed check must not cost the table (a GPU run is short and rare)
            rows.append(dict(backend=backend, check=name, setting="", value=f"error: {type(error).__name__}: {error}"[:300]))
    return rows


def device_name():
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return str(jax.devices()[0].device_kind)
    if keras.backend.backend() == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return "cpu"


def layers_of(name):
    import keras

    if name == "mlp":
        return [keras.Input((784,)), keras.layers.Dense(256, activation="relu"),
                keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10)]
    init = keras.initializers.RandomNormal(stddev=0.02, seed=0)  # the paper's ConvSmall, N(0, 0.02^2)
    kw = dict(kernel_initializer=init, bias_initializer=init)
    return [
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(10, 5, **kw), keras.layers.MaxPooling2D(), keras.layers.ReLU(),
        keras.layers.Conv2D(10, 5, **kw), keras.layers.MaxPooling2D(), keras.layers.ReLU(),
        keras.layers.Flatten(), keras.layers.Dense(50, activation="relu", **kw), keras.layers.Dense(10, **kw),
    ]


def execution():
    import keras

    return 1 if keras.backend.backend() == "torch" else 10  # steps_per_execution (PyTorch allows only 1)


def build(name, noisy, lr=0.01, **noise):
    import keras

    import keras_noisygd as kn

    keras.utils.set_random_seed(0)
    if noisy:
        model = kn.NoisySequential(layers_of(name))
        optimizer = kn.NoisyGD(lr, noise=noise.pop("noise", "gaussian_centered"),
                               emulate_batch_size=noise.pop("b", 32), seed=0, **noise)
    else:
        model = keras.Sequential(layers_of(name))
        optimizer = keras.optimizers.SGD(lr)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
                  steps_per_execution=execution(), jit_compile=keras.backend.backend() == "jax")
    return model


class Repeated:
    """The same batch, many times, as a `keras.utils.PyDataset` (no tf.data on the GPU machine)."""

    def __new__(cls, x, y, length=10**6):
        import keras

        class _Data(keras.utils.PyDataset):
            def __len__(self):
                return length

            def __getitem__(self, index):
                return x, y

        return _Data()


def batch(name, size, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (784,) if name == "mlp" else (28, 28, 1)
    return rng.normal(size=(size, *shape)).astype("float32"), rng.integers(0, 10, size)


def seconds_per_step(model, data, steps, warmup):
    """Seconds per step between the end of `warmup` steps and the end of `warmup + steps`, device-synced."""
    import keras

    marks = {}

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])  # waits for the device: JAX and CUDA dispatch asynchronously
            marks[batch] = time.perf_counter()

    model.fit(data, steps_per_epoch=warmup + steps, epochs=1, verbose=0, shuffle=False, callbacks=[Clock()])
    return (marks[warmup + steps - 1] - marks[warmup - 1]) / steps


def step_rows(name, batch_size, engine, size):
    x, y = batch(name, batch_size)
    data = Repeated(x, y)
    stock, noisy = build(name, False), build(name, True, b=min(32, batch_size // 2), engine=engine)
    steps, warmup = size["steps"] * execution(), 2 * execution()
    for model in (stock, noisy):
        seconds_per_step(model, data, execution(), warmup)  # compiles
    times = {"stock": [], "noisy": []}
    for round_ in range(size["rounds"]):
        for key in (("stock", "noisy") if round_ % 2 == 0 else ("noisy", "stock")):
            times[key].append(seconds_per_step(stock if key == "stock" else noisy, data, steps, warmup))
    ratios = [n / s for n, s in zip(times["noisy"], times["stock"])]
    check = "weighted step / stock" if engine == "weighted" else "per_example step / stock"
    return [dict(check=check, setting=f"{name} B={batch_size}", value=1e3 * statistics.median(times["noisy"]),
                 baseline=1e3 * statistics.median(times["stock"]), ratio=statistics.median(ratios), unit="ms")]


def monitor_rows(size):
    import keras_noisygd as kn

    x, y = batch("mlp", 128)
    steps = size["monitor_steps"]
    times = {"plain": [], "monitor": []}
    for key in ("plain", "monitor", "plain", "monitor", "monitor", "plain")[: 2 + 4 * (size["rounds"] > 1)]:
        model = build("mlp", True, b=32)
        callbacks = [kn.NoiseMonitor((x[:128], y[:128]), every_n_steps=1)] if key == "monitor" else []
        model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, callbacks=list(callbacks))  # compiles
        callbacks = [kn.NoiseMonitor((x[:128], y[:128]), every_n_steps=1)] if key == "monitor" else []
        start = time.perf_counter()
        model.fit(x, y, batch_size=len(x), epochs=steps, verbose=0, callbacks=callbacks)
        times[key].append(time.perf_counter() - start)
    plain, monitored = statistics.median(times["plain"]), statistics.median(times["monitor"])
    return [dict(check="monitor fit / fit", setting=f"mlp B=128, probe 128, {steps} steps",
                 value=monitored, baseline=plain, ratio=monitored / plain, unit="s")]


def draw_rows(size):
    import keras
    import numpy as np

    from keras_noisygd import noise

    n = size["draw_n"]
    backend = keras.backend.backend()
    compiled = lambda f: f  # noqa: E731  (PyTorch: eager)
    if backend == "jax":
        import jax

        compiled = jax.jit
    elif backend == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(jit_compile=True)
    seed_dtype = np.uint32 if backend == "jax" else np.int64
    rows = []
    for name in NOISES[: size["noises"]]:
        sampler = noise.get(name).calibrated(50, n)
        draw = compiled(lambda seed, sampler=sampler: sampler.sample(seed, n))
        seeds = [keras.ops.convert_to_tensor(np.array([0, i], seed_dtype)) for i in range(12)]
        keras.ops.convert_to_numpy(draw(seeds[0]))  # compiles
        times = []
        for seed in seeds[1:]:
            start = time.perf_counter()
            keras.ops.convert_to_numpy(draw(seed))  # includes the copy to the host: an upper bound
            times.append(time.perf_counter() - start)
        rows.append(dict(check="draw", setting=f"{name} N={n}", value=1e3 * statistics.median(times), unit="ms"))
    return rows


def fashion_mnist(data_dir, eval_size):
    """`(x_train, y_train, x_test, y_test, source)`: the paper's split, or synthetic images of its shape."""
    import numpy as np

    folder = Path(data_dir) if data_dir else None
    names = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz",
             "train-labels-idx1-ubyte.gz")
    if folder is not None and all((folder / n).exists() for n in names):
        def idx(name, offset):
            with gzip.open(folder / name) as f:
                return np.frombuffer(f.read(), np.uint8, offset=offset)

        x_all = idx(names[0], 16).reshape(-1, 28, 28, 1).astype("float32")  # raw 0-255 pixels
        x_test = idx(names[2], 16).reshape(-1, 28, 28, 1).astype("float32")[:eval_size]
        return x_all[:1000], idx(names[1], 8)[:1000], x_test, idx(names[3], 8)[:eval_size], "fashion-mnist"
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(1000 + eval_size, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, 1000 + eval_size)
    return x[:1000], y[:1000], x[1000:], y[1000:], "synthetic"


def paper_rows(size, data_dir):
    import keras
    import numpy as np

    x, y, x_test, y_test, source = fashion_mnist(data_dir, size["paper_eval"])
    n, steps = len(x), size["paper_steps"]
    rows = []
    for label, batch_size, noisy in (("GD", n, None), ("GD+gaussian_centered", n, "gaussian_centered"),
                                     ("SGD(b=50)", 50, None)):
        model = build("paper_cnn", noisy is not None, noise=noisy, b=50) if noisy else build("paper_cnn", False)
        if batch_size < n:
            order = np.concatenate([np.random.default_rng(e).permutation(n) for e in range(steps * 50 // n + 1)])
            xs, ys = x[order[: steps * 50]], y[order[: steps * 50]]  # without replacement within each epoch
        else:
            xs, ys = np.tile(x, (min(steps, 10), 1, 1, 1)), np.tile(y, min(steps, 10))
        start = time.perf_counter()
        if batch_size < n:
            model.fit(xs, ys, batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
        else:
            model.fit(xs, ys, batch_size=n, epochs=-(-steps // min(steps, 10)), verbose=0, shuffle=False)
        seconds = time.perf_counter() - start
        predictions = np.concatenate([np.argmax(keras.ops.convert_to_numpy(model(x_test[i:i + 5000])), -1)
                                      for i in range(0, len(x_test), 5000)])
        train = np.argmax(keras.ops.convert_to_numpy(model(x)), -1)
        rows.append(dict(check="paper run", setting=f"{label}, {source} n={n}, {steps} steps",
                         value=f"test {np.mean(predictions == y_test):.4f}, train {np.mean(train == y):.4f}, "
                               f"{1e3 * seconds / steps:.2f} ms/step (compile included)"))
    return rows


if __name__ == "__main__":
    sys.exit(main())
