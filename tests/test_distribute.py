"""tf.distribute: `MirroredStrategy` on two logical CPUs, `MultiWorkerMirroredStrategy` with two processes.

A strategy needs its devices (or `TF_CONFIG`) before TensorFlow starts, so the
distributed runs are subprocesses (tests/support/distribute_scripts/) that write their
results to a temporary folder. This process runs the same code
(`distribute_scripts/common.py`) without a strategy as the single-device
reference.

Tolerance of the exact comparisons: the distributed and the single-device runs
do the same float64 operations but sum the per-example gradients in another
order (two per-replica sums, then an all-reduce), a relative rounding of
~1e-16 per step; 4 steps of lr 0.2 on O(1) weights keep the difference near
1e-16 (observed <= 2.2e-16: benchmarks/distributed_equality.py). `atol=1e-12` leaves ~10^3 headroom while any error in
the noise, such as both replicas using the same draw or a mis-placed slice,
moves the weights by ~1e-2 (the same run with another seed differs by ~0.1,
checked below).
"""

import numpy as np
import pytest
import tensorflow as tf
from distribute_scripts import common, launch

import keras_noisygd as kn

N, BATCH, EPOCHS = 16, 8, 2  # as in the scripts: 4 steps of a global batch of 8
STEPS = N // BATCH * EPOCHS
ATOL = 1e-12  # see the module docstring


def flat(model):
    return np.concatenate([w.ravel() for w in model.get_weights()])


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    return launch.mirrored(tmp_path_factory.mktemp("mirrored"))


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    return launch.workers(tmp_path_factory.mktemp("multi_worker"), common.load_example().free_ports)


# -- MirroredStrategy ----------------------------------------------------------


@pytest.mark.parametrize("noise", list(common.NOISES))
def test_mirrored_fit_is_the_single_device_fit_of_the_global_batch(mirrored, noise, float64):
    assert mirrored["replicas"] == 2
    reference = flat(common.train(noise, common.NOISES[noise], N, BATCH, EPOCHS))
    np.testing.assert_allclose(mirrored[f"fit/{noise}/weights"], reference, rtol=0, atol=ATOL)


@pytest.mark.parametrize("noise", list(common.ALL_NOISES))
def test_mirrored_accumulation_is_the_single_device_whole_batch_fit(mirrored, noise, float64):
    # Full-batch noisy GD in micro-batches on two replicas: each update of 8 examples is 2 micro-batches of 4,
    # each split 2 + 2 over the replicas, and one draw of 8 weights per update is sliced over both. Keras's own
    # accumulation fails there (keras-team/keras#20582); the package's optimizers take its tf.cond in
    # cross-replica context. The reference is one device on whole batches of 8, no accumulation.
    reference = flat(common.train(noise, common.ALL_NOISES[noise], N, BATCH, EPOCHS))
    np.testing.assert_allclose(mirrored[f"accumulation/{noise}/weights"], reference, rtol=0, atol=ATOL)
    micro_steps = STEPS * common.ACCUMULATION  # the counter counts micro-steps; both copies agree
    np.testing.assert_array_equal(mirrored[f"accumulation/{noise}/noise_state"], [[7, micro_steps]] * 2)


def test_mirrored_accumulation_in_a_custom_loop_is_the_single_device_fit(mirrored, float64):
    reference = flat(common.train("sgd", 4, N, BATCH, EPOCHS))
    np.testing.assert_allclose(mirrored["accumulation/loop/weights"], reference, rtol=0, atol=ATOL)


def test_mirrored_accumulation_keeps_weight_decay(mirrored, float64):
    reference = flat(common.train("gaussian_centered", 4, N, BATCH, EPOCHS, **common.DECAY))
    plain = flat(common.train("gaussian_centered", 4, N, BATCH, EPOCHS))
    np.testing.assert_allclose(mirrored["accumulation/decay/weights"], reference, rtol=0, atol=ATOL)
    assert np.abs(reference - plain).max() > 1e3 * ATOL  # the decay did change the run


def test_keras_clips_each_replicas_gradient_before_the_sum(mirrored, float64):
    # Keras's own semantics under tf.distribute, noise or not (docs/distributed.md says so): `clipnorm`
    # clips each replica's partial gradient, so the step is not the single-device one, even without accumulation.
    reference = flat(common.train("gaussian_centered", 4, N, BATCH, EPOCHS, **common.CLIP))
    assert np.abs(mirrored["clip/weights"] - reference).max() > 1e3 * ATOL


def test_mirrored_accumulation_with_ema_is_a_clear_error(mirrored):
    message = str(mirrored["accumulation/ema_error"])
    assert message.startswith("`use_ema=True` cannot be combined with `gradient_accumulation_steps` under")
    assert "keras-team/keras#20582" in message and "Received: use_ema=True, gradient_accumulation_steps=2, 2" in message


def test_the_accumulation_comparison_can_tell_another_draw_apart(float64):
    # The tests above would pass with any draw if the runs hardly moved: another seed (a different draw,
    # same micro-batches) ends ~0.1 away, 1e8 times the tolerance.
    reference = flat(common.train("bernoulli", 4, N, BATCH, EPOCHS))
    other = flat(common.train("bernoulli", 4, N, BATCH // 2, EPOCHS, seed=8, accumulation=common.ACCUMULATION))
    assert np.abs(reference - other).max() > 1e3 * ATOL


def test_mirrored_per_example_engine_is_the_single_device_fit(mirrored, float64):
    # engine="per_example" forms each replica's G for its slice; the 1/replicas share matches Keras's loss scaling.
    reference = flat(common.train("gaussian_centered", 4, N, BATCH, EPOCHS))
    np.testing.assert_allclose(mirrored["fit/per_example_engine/weights"], reference, rtol=0, atol=ATOL)


def test_the_exact_comparison_can_tell_the_noise_draws_apart(mirrored, float64):
    noise = "gaussian_centered"
    other_seed = flat(common.train(noise, common.NOISES[noise], N, BATCH, EPOCHS, seed=8))
    assert np.abs(mirrored[f"fit/{noise}/weights"] - other_seed).max() > 1e3 * ATOL


@pytest.mark.parametrize("noise", list(common.NOISES))
def test_mirrored_noise_state_copies_agree_and_advance_once_per_step(mirrored, noise):
    np.testing.assert_array_equal(mirrored[f"fit/{noise}/noise_state"], [[7, STEPS], [7, STEPS]])


@pytest.mark.parametrize("loss", ["compiled", "sparse_categorical_crossentropy"])
def test_mirrored_custom_loop_is_the_single_device_fit(mirrored, loss, float64):
    # `noise_weights` per replica and `noisy_gradients` with the compiled loss or a loss
    # function (scaled by 1/replicas like Keras's losses, regularization included).
    reference = flat(common.train("gaussian_centered", 4, N, BATCH, EPOCHS))
    np.testing.assert_allclose(mirrored[f"loop/{loss}/weights"], reference, rtol=0, atol=ATOL)


@pytest.mark.parametrize("sizes", [(4, 4), (2, 1)], ids=["even", "uneven"])
def test_each_replica_gets_its_own_slice_of_the_global_draw(mirrored, sizes, float64):
    drawn = mirrored["draws/" + "+".join(map(str, sizes))]
    single = kn.NoisyGD(noise="gaussian_centered", emulate_batch_size=2, seed=5).noise_weights(sum(sizes), "float64")
    np.testing.assert_array_equal(drawn, single.numpy())  # same seed, same global batch: the same weights
    first, second = drawn[: sizes[0]], drawn[sizes[0]:]
    assert not np.isin(second, first).any()  # independent weights: no replica repeats another's


def test_one_seed_on_every_replica_would_repeat_the_draws(mirrored):
    # What the global draw avoids: the same sampler and seed on both replicas.
    naive = mirrored["naive"]
    np.testing.assert_array_equal(naive[0], naive[1])
    assert np.ptp(naive[0]) > 0.1  # real noise, not all ones


def test_uneven_split_keeps_keras_per_replica_mean(mirrored, float64):
    # 11 examples in batches of 4 end with a batch of 3 that tf.distribute splits 2 + 1.
    # Keras scales each replica's mean loss by 1/replicas, so that step averages the two
    # replicas' means: the single-device step with examples weighted B / (R B_r), i.e.
    # 3/4 on replica 0's two examples and 3/2 on replica 1's one. The noise weights
    # themselves are still the global draw (test above).
    sample_weight = np.ones(11)
    sample_weight[8:10], sample_weight[10] = 3 / 4, 3 / 2
    keras_convention = flat(common.train("gaussian_centered", 2, 11, 4, 1, sample_weight=sample_weight))
    np.testing.assert_allclose(mirrored["uneven/weights"], keras_convention, rtol=0, atol=ATOL)
    global_mean = flat(common.train("gaussian_centered", 2, 11, 4, 1))
    assert np.abs(mirrored["uneven/weights"] - global_mean).max() > 1e3 * ATOL


# -- MultiWorkerMirroredStrategy --------------------------------------------------


@pytest.mark.parametrize("noise", list(common.NOISES))
def test_two_workers_end_identical_and_equal_the_single_process_fit(workers, noise, float64):
    assert [int(w["replicas"]) for w in workers] == [2, 2]
    np.testing.assert_array_equal(workers[0][f"{noise}/weights"], workers[1][f"{noise}/weights"])
    reference = flat(common.train(noise, common.NOISES[noise], N, BATCH, EPOCHS))
    np.testing.assert_allclose(workers[0][f"{noise}/weights"], reference, rtol=0, atol=ATOL)
    for w in workers:
        np.testing.assert_array_equal(w[f"{noise}/noise_state"], [7, STEPS])


@pytest.mark.parametrize("noise", list(common.ALL_NOISES))
def test_two_workers_accumulate_to_the_single_device_whole_batch_fit(workers, noise, float64):
    # The custom loop with gradient_accumulation_steps=2: micro-batches of 4 (2 per worker), updates of 8.
    np.testing.assert_array_equal(workers[0][f"accumulation/{noise}/weights"], workers[1][f"accumulation/{noise}/weights"])
    reference = flat(common.train(noise, common.ALL_NOISES[noise], N, BATCH, EPOCHS))
    np.testing.assert_allclose(workers[0][f"accumulation/{noise}/weights"], reference, rtol=0, atol=ATOL)


def test_the_example_trains_identically_on_two_workers_and_in_one_process(workers):
    # examples/multi_worker.py's training function, 3 steps in float32: the workers agree
    # bit for bit; against one process, float32 summation order (~6e-8 relative per
    # step) leaves differences near 1e-7, and 1e-5 still fails on any noise error (~1e-2).
    np.testing.assert_array_equal(workers[0]["example/weights"], workers[1]["example/weights"])
    single = flat(common.load_example().train(common.EXAMPLE_ARGS, tf.distribute.get_strategy()))
    np.testing.assert_allclose(workers[0]["example/weights"], single, rtol=0, atol=1e-5)


# -- Unsupported strategies ----------------------------------------------------------


def test_parameter_server_strategy_is_a_clear_error(monkeypatch):
    # Building a real one needs a cluster; the check only looks at the strategy's type.
    strategy = object.__new__(tf.distribute.experimental.ParameterServerStrategy)
    monkeypatch.setattr(tf.distribute, "get_strategy", lambda: strategy)
    message = "NoisyGD does not support `ParameterServerStrategy`.*Received: strategy=ParameterServerStrategyV2"
    with pytest.raises(ValueError, match=message):
        kn.NoisyGD(noise="none").noise_weights(4)
