"""Example: noisy GD on two worker processes with `tf.distribute.MultiWorkerMirroredStrategy`.

Starts two workers on 127.0.0.1, each with its own `TF_CONFIG`, that train one
`NoisyModel` on scikit-learn's bundled digits. Every step the global batch is
split between the workers; each worker draws the noise weights of the whole
global batch from the shared seed and keeps the slice of its own examples, so
the noise is calibrated to SGD(b) out of the global batch, exactly as on one
device. Then this process checks that both workers ended with identical
weights and runs the same training on its own to compare.

    python examples/multi_worker.py [--steps 200] [--batch-size 256] [--emulate-batch-size 32]

Keras 3's `fit` does not run under `MultiWorkerMirroredStrategy`
(keras-team/keras#20585), so the workers train in a custom loop:
`optimizer.noise_weights`, `keras_noisygd.noisy_gradients`, `apply_gradients`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_noisygd as kn  # noqa: E402

WORKERS = 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_digits(train_size=1400, seed=0):
    """scikit-learn's 1,797 8x8 digits (shipped with the package), split and scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    x = (data.data[order] / 16.0).astype("float32")
    y = data.target[order].astype("int32")
    return (x[:train_size], y[:train_size]), (x[train_size:], y[train_size:])


def train(args, strategy):
    """`args.steps` noisy steps on global batches of `args.batch_size`; returns the model.

    The same function runs on each worker (under the multi-worker strategy) and
    in the launcher (under the default, single-device strategy).
    """
    (x, y), _ = load_digits()
    with strategy.scope():
        keras.utils.set_random_seed(0)  # the same initial weights everywhere
        model = kn.NoisySequential(
            [keras.Input((64,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)]
        )
        optimizer = kn.NoisyGD(0.2, noise=args.noise, emulate_batch_size=args.emulate_batch_size, seed=0)
        model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        optimizer.build(model.trainable_variables)
    # Every worker builds the same global batches; tf.distribute hands each its share.
    batches = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0).repeat().batch(args.batch_size)

    def replica_step(x, y):
        weights = optimizer.noise_weights(tf.shape(x)[0])  # this replica's slice of the global draw
        gradients = kn.noisy_gradients(model, x, y, weights)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))

    step = tf.function(lambda batch: strategy.run(replica_step, args=batch))
    for batch in strategy.experimental_distribute_dataset(batches.take(args.steps)):
        step(batch)
    return model


def accuracy(model):
    _, (x_test, y_test) = load_digits()
    return float(np.mean(np.argmax(model.predict(x_test, verbose=0), axis=1) == y_test))


def worker(args):
    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # reads TF_CONFIG
    model = train(args, strategy)
    weights = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    np.savez(os.path.join(args.out, f"worker_{args.worker}.npz"), **weights)


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def launch(args, out):
    """Starts the workers with their TF_CONFIG and waits for both."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(WORKERS)]}
    processes = []
    for index in range(WORKERS):
        task = {"type": "worker", "index": index}
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": task}))
        env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])  # this checkout's keras_noisygd
        command = [sys.executable, os.path.abspath(__file__), "--worker", str(index), "--out", out, *args.forwarded]
        processes.append(subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True))
    try:
        errors = [p.communicate(timeout=args.timeout)[1] for p in processes]
    finally:
        for p in processes:  # a worker whose peer died would wait for it forever
            if p.poll() is None:
                p.kill()
    for index, (p, error) in enumerate(zip(processes, errors)):
        if p.returncode != 0:
            raise RuntimeError(f"worker {index} failed (exit code {p.returncode}):\n{error[-3000:]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="global batch size, split between the workers (default 256)")
    parser.add_argument("--emulate-batch-size", type=int, default=32,
                        help="the SGD batch size b the noise emulates (default 32)")
    parser.add_argument("--noise", default="gaussian_centered", help="noise class (default gaussian_centered)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the workers (default 600)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set by the launcher
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker(args)
    args.forwarded = ["--steps", str(args.steps), "--batch-size", str(args.batch_size),
                      "--emulate-batch-size", str(args.emulate_batch_size), "--noise", args.noise]

    print(f"{WORKERS} workers on 127.0.0.1: {args.steps} steps of NoisyGD {args.noise} ~ SGD({args.emulate_batch_size}),"
          f" global batch {args.batch_size} ({args.batch_size // WORKERS} per worker)")
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        launch(args, out)
        seconds = time.perf_counter() - start
        workers = [np.load(os.path.join(out, f"worker_{i}.npz")) for i in range(WORKERS)]
        workers = [[w[f"w{i}"] for i in range(len(w.files))] for w in workers]
    identical = all(np.array_equal(a, b) for a, b in zip(workers[0], workers[1]))
    single = train(args, tf.distribute.get_strategy())
    difference = max(float(np.abs(a - b).max()) for a, b in zip(workers[0], single.get_weights()))
    single_accuracy = accuracy(single)
    single.set_weights(workers[0])
    print(f"workers finished in {seconds:.0f} s")
    print(f"both workers ended with identical weights: {identical}")
    print(f"largest weight difference to the single-process run: {difference:.1e} (float32 summation order)")
    print(f"test accuracy: {accuracy(single):.3f} (multi-worker), {single_accuracy:.3f} (single process)")
    return {"identical": identical, "difference": difference, "workers": workers}


if __name__ == "__main__":
    main()
