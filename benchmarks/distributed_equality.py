"""How far each tf.distribute run of the test suite ends from one device: the table docs/distributed.md quotes.

Runs the scripts of `tests/test_distribute.py` (MirroredStrategy over two
logical CPUs; two MultiWorkerMirroredStrategy worker processes on 127.0.0.1)
and prints, for every run, the largest weight difference to the same run on
one device on whole global batches, in float64. Runs with
`gradient_accumulation_steps=2` train updates of 8 examples in micro-batches
of 4 (2 per replica) and are compared with one device on batches of 8
without accumulation. A run with another seed shows the size of a real
difference. About a minute on 2 CPU cores.

    python benchmarks/distributed_equality.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

from distribute_scripts import common, launch  # noqa: E402

N, BATCH, EPOCHS = 16, 8, 2


def flat(model):
    return np.concatenate([w.ravel() for w in model.get_weights()])


def main():
    with tempfile.TemporaryDirectory() as folder:
        mirrored = launch.mirrored(folder)
        workers = launch.workers(folder, common.load_example().free_ports)
    common.use_float64()
    rows = []  # (strategy, run, noise, largest difference)
    for noise, b in common.ALL_NOISES.items():
        reference = flat(common.train(noise, b, N, BATCH, EPOCHS))
        if noise in common.NOISES:
            rows.append(("Mirrored, 2 replicas", "fit", noise, mirrored[f"fit/{noise}/weights"] - reference))
            rows.append(("MultiWorker, 2 workers", "custom loop", noise, workers[0][f"{noise}/weights"] - reference))
        rows.append(("Mirrored, 2 replicas", "fit, accumulation 2", noise,
                     mirrored[f"accumulation/{noise}/weights"] - reference))
        rows.append(("MultiWorker, 2 workers", "custom loop, accumulation 2", noise,
                     workers[0][f"accumulation/{noise}/weights"] - reference))
        if noise == "sgd":
            rows.append(("Mirrored, 2 replicas", "custom loop, accumulation 2", noise,
                         mirrored["accumulation/loop/weights"] - reference))
        if noise == "gaussian_centered":
            decayed = flat(common.train(noise, b, N, BATCH, EPOCHS, **common.DECAY))
            rows.append(("Mirrored, 2 replicas", "fit, accumulation 2, weight_decay", noise,
                         mirrored["accumulation/decay/weights"] - decayed))
            other_seed = flat(common.train(noise, b, N, BATCH, EPOCHS, seed=8))
            rows.append(("(one device)", "another seed", noise, other_seed - reference))
    print(f"{'strategy':24} {'run':36} {'noise':26} largest |difference| to one device")
    for strategy, run, noise, difference in rows:
        print(f"{strategy:24} {run:36} {noise:26} {np.abs(difference).max():.1e}")
    same = all(np.array_equal(workers[0][key], workers[1][key]) for key in workers[0] if key.endswith("weights"))
    print(f"the two workers ended bit-identical in every run: {same}")


if __name__ == "__main__":
    main()
