"""Example: full-batch noisy GD on a training set streamed from files, one update per pass.

The training set is written once to TFRecord shards (MNIST-1D, generated offline by the
`mnist1d` package) and read back by a `tf.data` pipeline that holds one micro-batch of `c`
examples at a time, never the data set. With `gradient_accumulation_steps=k = n / c`, every
pass over the files is **one** optimizer update over all `n` examples:

  * GD:       stock `keras.optimizers.SGD` with Keras's own accumulation (exact full-batch GD),
  * NoisyGD:  the same, plus one noise draw of length `n` per update, sliced over the `k`
              micro-batches and calibrated to emulate SGD(b) (here "gaussian_centered").

    python examples/streaming_full_batch.py [--num-samples 12500] [--micro-batch-size 1000] [--updates 150]

`train()` is also what the test suite uses to check that the streamed, accumulated updates equal
`fit(x, y, batch_size=n)` on the same data held in memory.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_noisygd as kn  # noqa: E402
from keras_noisygd.experiments import architectures, data  # noqa: E402


def write_shards(x, y, directory, num_shards=4):
    """Writes `(x, y)` to `num_shards` TFRecord files, in order; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, rows in enumerate(np.array_split(np.arange(len(x)), num_shards)):
        path = directory / f"train-{i:05d}-of-{num_shards:05d}.tfrecord"
        with tf.io.TFRecordWriter(str(path)) as writer:
            for j in rows:
                features = {
                    "x": tf.train.Feature(float_list=tf.train.FloatList(value=x[j].reshape(-1))),
                    "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(y[j])])),
                }
                writer.write(tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())
        paths.append(str(path))
    return paths


def stream(paths, input_shape, micro_batch_size):
    """An endless, file-backed stream of micro-batches, in file order (one pass = one update)."""
    spec = {
        "x": tf.io.FixedLenFeature(input_shape, tf.float32),
        "y": tf.io.FixedLenFeature([], tf.int64),
    }

    def parse(record):
        example = tf.io.parse_single_example(record, spec)
        return tf.cast(example["x"], keras.backend.floatx()), tf.cast(example["y"], tf.int32)

    records = tf.data.TFRecordDataset(paths)  # read sequentially: the update does not depend on the order
    # drop_remainder: every micro-batch of an update has the same size (the draw is sliced in k equal parts).
    return records.map(parse).batch(micro_batch_size, drop_remainder=True).repeat().prefetch(2)


def check_micro_batch_size(n, c):
    if not 1 <= c <= n or n % c:
        raise ValueError(
            f"Argument `--micro-batch-size` must divide the training set size {n}, so that one pass over the "
            f"files is one update of k = n / c equal micro-batches. Received: micro_batch_size={c}"
        )
    return n // c


def train(method, paths, n, input_shape, num_classes, *, micro_batch_size, updates, lr, emulate_batch_size,
          seed=0, momentum=0.0):
    """Trains the paper's CNN on the streamed files; returns the model after `updates` updates."""
    k = check_micro_batch_size(n, micro_batch_size)
    keras.utils.set_random_seed(seed)
    model = architectures.build("cnn", input_shape, num_classes)
    if method == "GD":
        optimizer = keras.optimizers.SGD(lr, momentum=momentum, gradient_accumulation_steps=k)
    else:
        optimizer = kn.NoisyGD(
            lr, momentum=momentum, noise="gaussian_centered", emulate_batch_size=emulate_batch_size, seed=seed,
            gradient_accumulation_steps=k,
        )
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    # One "epoch" is one pass over the files, k micro-steps: exactly one optimizer update.
    model.fit(stream(paths, input_shape, micro_batch_size), steps_per_epoch=k, epochs=updates, shuffle=False,
              verbose=0)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=12500, help="MNIST-1D examples, 80%% train (default 12500)")
    parser.add_argument("--micro-batch-size", type=int, default=1000, help="c, examples in memory (default 1000)")
    parser.add_argument("--updates", type=int, default=150, help="full-batch updates = passes (default 150)")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate (default 0.1)")
    parser.add_argument("--batch-size", type=int, default=32, help="the SGD batch size b emulated (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the noise (default 0)")
    parser.add_argument("--data-dir", default=None, help="where to write the shards (default: a temporary folder)")
    args = parser.parse_args(argv)

    dataset = data.load("mnist1d", args.num_samples)
    n, input_shape = len(dataset.x_train), dataset.x_train.shape[1:]
    k = check_micro_batch_size(n, args.micro_batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shards(dataset.x_train, dataset.y_train, args.data_dir or tmp)
        size_mb = sum(os.path.getsize(p) for p in paths) / 1e6
        print(
            f"MNIST-1D: {n} training examples in {len(paths)} TFRecord files ({size_mb:.1f} MB), streamed in "
            f"micro-batches of {args.micro_batch_size}: k = {k} micro-steps per update, {args.updates} updates, "
            f"lr {args.lr}, seed {args.seed}"
        )
        results = {}
        for method in ("GD", "NoisyGD"):
            start = time.perf_counter()
            model = train(
                method, paths, n, input_shape, dataset.num_classes, micro_batch_size=args.micro_batch_size,
                updates=args.updates, lr=args.lr, emulate_batch_size=args.batch_size, seed=args.seed,
            )
            seconds = time.perf_counter() - start
            _, train_acc = model.evaluate(dataset.x_train, dataset.y_train, batch_size=2000, verbose=0)
            _, test_acc = model.evaluate(dataset.x_test, dataset.y_test, batch_size=2000, verbose=0)
            results[method] = {"train_acc": train_acc, "test_acc": test_acc, "seconds": seconds,
                               "updates": int(model.optimizer.iterations.numpy())}
    label = {"GD": "GD (full batch, streamed)", "NoisyGD": f"NoisyGD gaussian_centered ~ SGD({args.batch_size})"}
    print(f"{'method':<40} {'test acc':>9} {'train acc':>10} {'updates':>8} {'s/update':>9}")
    for method, r in results.items():
        print(f"{label[method]:<40} {r['test_acc']:>9.4f} {r['train_acc']:>10.4f} {r['updates']:>8} "
              f"{r['seconds'] / r['updates']:>9.3f}")
    return results


if __name__ == "__main__":
    main()
