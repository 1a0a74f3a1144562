"""Example: watch what the injected noise does during full-batch noisy GD, with `NoiseMonitor`.

Trains the same MLP on scikit-learn's bundled digits (offline) from the same
initialisation with full-batch GD and with full-batch noisy GD (Gaussian-centred
noise calibrated to SGD(b)), both with a `NoiseMonitor` on the training set, and
plots over training (a matplotlib PNG):

  * the gradient norm |g| and the injected noise's norm |xi|;
  * the trace of the injected noise's covariance next to SGD(b)'s;
  * the gradient noise scale tr(Sigma)/|g|^2 (McCandlish et al. 2018).

    python examples/noise_monitor.py [--steps 400] [--every 10] [--out noise_monitor.png]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_noisygd as kn  # noqa: E402


def load_digits(train_size, seed=0):
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    x = (data.data[order] / 16.0).astype("float32")
    return x[:train_size], data.target[order][:train_size].astype("int32")


def run(noise, x, y, steps, every, batch_size, lr, seed=0):
    keras.utils.set_random_seed(seed)
    model = kn.NoisySequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)])
    optimizer = kn.NoisyGD(lr, noise=noise, emulate_batch_size=None if noise == "none" else batch_size, seed=seed)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    monitor = kn.NoiseMonitor((x, y), every_n_steps=every, sgd_batch_size=batch_size)
    history = model.fit(x, y, batch_size=len(x), epochs=steps, verbose=0, callbacks=[monitor])
    return monitor.history, history.history["accuracy"][-1]


def plot(runs, batch_size, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for (label, history), color in zip(runs.items(), ("tab:gray", "tab:blue")):
        steps = [h["step"] for h in history]
        axes[0].plot(steps, [h["grad_norm"] for h in history], color=color, label=f"{label}: |g|")
        if label != "GD":
            axes[0].plot(steps, [h["noise_norm"] for h in history], color=color, ls=":", label=f"{label}: |xi|")
            axes[1].plot(steps, [h["noise_cov_trace"] for h in history], color=color, label=f"{label}: tr Cov(xi)")
        axes[1].plot(steps, [h["sgd_cov_trace"] for h in history], color=color, ls="--", label=f"SGD({batch_size}) on {label}'s path")
        axes[2].plot(steps, [h["noise_scale"] for h in history], color=color, label=label)
    axes[0].set_title("gradient and injected-noise norm")
    axes[1].set_title("noise covariance trace")
    axes[2].set_title("gradient noise scale tr(Sigma)/|g|^2")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--train-size", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16, help="the SGD batch size b the noise emulates")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--out", default="noise_monitor.png")
    args = parser.parse_args(argv)
    x, y = load_digits(args.train_size)
    runs = {}
    for label, noise in (("GD", "none"), ("NoisyGD", "gaussian_centered")):
        runs[label], accuracy = run(noise, x, y, args.steps, args.every, args.batch_size, args.lr)
        last = runs[label][-1]
        print(
            f"{label:8} train acc {accuracy:.3f}  |g| {last['grad_norm']:.4f}  |xi|/|g| {last['noise_to_grad']:.2f}  "
            f"tr Cov(xi) {last['noise_cov_trace']:.3g}  SGD({args.batch_size}) {last['sgd_cov_trace']:.3g}  "
            f"noise scale {last['noise_scale']:.1f}"
        )
    plot(runs, args.batch_size, args.out)
    print(f"wrote {args.out}")
    return runs


if __name__ == "__main__":
    main()
