"""One worker of a `MultiWorkerMirroredStrategy` run; `tests/test_distribute.py` starts two.

    TF_CONFIG='{"cluster": {"worker": ["127.0.0.1:P0", "127.0.0.1:P1"]}, "task": {"type": "worker", "index": I}}' \
        python tests/distribute_scripts/multi_worker.py OUT_DIR

Each worker runs a few steps of examples/multi_worker.py's training function
(float32), then the `common.NOISES` runs in the custom training loop (Keras 3's
`fit` does not run under `MultiWorkerMirroredStrategy`), and every noise class
with gradient accumulation (micro-batches), and writes the final
weights and noise states to OUT_DIR/worker_I.npz.
"""

import json
import os
import sys

import common
import numpy as np
import tensorflow as tf

N, BATCH, EPOCHS = 16, 8, 2  # the runs of mirrored.py: 4 steps of a global batch of 8, 4 examples per worker

if __name__ == "__main__":
    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # reads TF_CONFIG; first, before any other op
    results = {"replicas": np.array(strategy.num_replicas_in_sync)}
    example = common.load_example().train(common.EXAMPLE_ARGS, strategy)
    results["example/weights"] = np.concatenate([w.ravel() for w in example.get_weights()])
    common.use_float64()
    for noise, b in common.NOISES.items():
        model = common.train_loop(noise, b, N, BATCH, EPOCHS, strategy=strategy)
        results[f"{noise}/weights"] = np.concatenate([w.ravel() for w in model.get_weights()])
        results[f"{noise}/noise_state"] = np.asarray(model.optimizer.noise_state.value)
    for noise, b in common.ALL_NOISES.items():  # full-batch noisy GD in micro-batches across the two workers
        model = common.train_loop(noise, b, N, BATCH // common.ACCUMULATION, EPOCHS, strategy=strategy,
                                  accumulation=common.ACCUMULATION)
        results[f"accumulation/{noise}/weights"] = np.concatenate([w.ravel() for w in model.get_weights()])
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    np.savez(os.path.join(sys.argv[1], f"worker_{index}.npz"), **results)
