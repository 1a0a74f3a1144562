"""`MirroredStrategy` over two logical CPUs: writes what `tests/test_distribute.py` checks.

    python tests/distribute_scripts/mirrored.py OUT.npz

Logical devices must be configured before TensorFlow initialises, hence a
process of its own.
"""

import sys

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import common  # noqa: E402

import keras_noisygd as kn  # noqa: E402

N, BATCH, EPOCHS = 16, 8, 2  # 4 steps of a global batch of 8: 4 examples per replica


def local(value):
    return [np.asarray(v) for v in strategy.experimental_local_results(value)]


def flat(model):
    return np.concatenate([w.ravel() for w in model.get_weights()])


def draws(optimizer, sizes):
    """Each replica's `noise_weights` for one global batch that tf.distribute splits as `sizes`."""
    batch = tf.data.Dataset.range(sum(sizes)).batch(sum(sizes))
    x = next(iter(strategy.experimental_distribute_dataset(batch)))
    assert [len(v) for v in local(x)] == sizes, local(x)
    step = tf.function(lambda x: strategy.run(lambda x: optimizer.noise_weights(tf.shape(x)[0], "float64"), args=(x,)))
    return local(step(x))


def naive_draws(optimizer):
    """The pitfall: one sampler and one seed on every replica give every replica the same draws."""
    sampler = optimizer.noise.calibrated(2, 4)
    return local(strategy.run(lambda: sampler.sample(optimizer.noise_state.value, 4, "float64")))


if __name__ == "__main__":
    common.use_float64()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    results = {"replicas": np.array(strategy.num_replicas_in_sync)}
    for noise, b in common.NOISES.items():
        model = common.train(noise, b, N, BATCH, EPOCHS, strategy=strategy)
        results[f"fit/{noise}/weights"] = flat(model)
        results[f"fit/{noise}/noise_state"] = np.stack(local(model.optimizer.noise_state.value))
    engine = common.train("gaussian_centered", 4, N, BATCH, EPOCHS, strategy=strategy, engine="per_example")
    results["fit/per_example_engine/weights"] = flat(engine)
    for loss in (None, "sparse_categorical_crossentropy"):  # the compiled loss; a loss function
        model = common.train_loop("gaussian_centered", 4, N, BATCH, EPOCHS, strategy=strategy, loss=loss)
        results[f"loop/{loss or 'compiled'}/weights"] = flat(model)
    # An uneven split: 11 examples in batches of 4 end with a batch of 3, split 2 + 1.
    results["uneven/weights"] = flat(common.train("gaussian_centered", 2, 11, 4, 1, strategy=strategy))
    with strategy.scope():
        optimizer = kn.NoisyGD(noise="gaussian_centered", emulate_batch_size=2, seed=5)
    for sizes in ([4, 4], [2, 1]):
        results["draws/" + "+".join(map(str, sizes))] = np.concatenate(draws(optimizer, sizes))
    results["naive"] = np.stack(naive_draws(optimizer))
    # Full-batch noisy GD in micro-batches on two replicas: Keras's accumulation runs in cross-replica
    # context there (keras-team/keras#20582 workaround); updates of BATCH in micro-batches of BATCH // 2.
    micro = BATCH // common.ACCUMULATION
    for noise, b in common.ALL_NOISES.items():
        model = common.train(noise, b, N, micro, EPOCHS, strategy=strategy, accumulation=common.ACCUMULATION)
        results[f"accumulation/{noise}/weights"] = flat(model)
        results[f"accumulation/{noise}/noise_state"] = np.stack(local(model.optimizer.noise_state.value))
    loop = common.train_loop("sgd", 4, N, micro, EPOCHS, strategy=strategy, accumulation=common.ACCUMULATION)
    results["accumulation/loop/weights"] = flat(loop)
    decayed = common.train("gaussian_centered", 4, N, micro, EPOCHS, strategy=strategy,
                           accumulation=common.ACCUMULATION, **common.DECAY)
    results["accumulation/decay/weights"] = flat(decayed)
    results["clip/weights"] = flat(common.train("gaussian_centered", 4, N, BATCH, EPOCHS, strategy=strategy,
                                                **common.CLIP))
    try:  # the workaround does not cover Keras's moving average: a clear error instead of a wrong update
        common.train("sgd", 4, N, micro, 1, strategy=strategy, accumulation=common.ACCUMULATION, use_ema=True)
        results["accumulation/ema_error"] = np.array("no error")
    except ValueError as error:
        results["accumulation/ema_error"] = np.array(str(error))
    np.savez(sys.argv[1], **results)
