"""A real KerasHub transformer (a two-layer BERT built from its config, nothing downloaded) trains with noise
through `fit`, and its per-example gradients are exact against one-example gradients, on every backend."""

import keras
import numpy as np
import pytest

import keras_noisygd as kn

keras_hub = pytest.importorskip("keras_hub")  # in the `test` extra

pytestmark = pytest.mark.all_backends


def bert_classifier():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=50, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32, max_sequence_length=8,
        dropout=0.0,  # dropout would make each example's gradient depend on the step's masks
    )
    return keras_hub.models.BertTextClassifier(backbone, num_classes=3, preprocessor=None, dropout=0.0)


def tokens(n, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 9, n)
    mask = (np.arange(8)[None, :] < lengths[:, None]).astype("int32")  # padded sequences of 3-8 tokens
    x = {"token_ids": rng.integers(1, 50, (n, 8)).astype("int32") * mask, "segment_ids": np.zeros((n, 8), "int32"),
         "padding_mask": mask}
    return x, rng.integers(0, 3, n)


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def test_a_keras_hub_bert_trains_with_noise_through_fit():
    model = kn.noisy(bert_classifier())
    model.compile(kn.NoisyGD(0.05, noise="gaussian_centered", emulate_batch_size=4, seed=0), LOSS)
    x, y = tokens(16)
    before = [w.copy() for w in model.get_weights()]
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert keras.ops.convert_to_numpy(model.optimizer.noise_state).tolist() == [0, 3]  # one draw per step
    assert sum(not np.array_equal(a, b) for a, b in zip(model.get_weights(), before)) > 20  # every block moved


def test_per_example_gradients_of_a_keras_hub_bert_are_one_example_gradients():
    model = kn.noisy(bert_classifier())
    model.compile(kn.NoisyGD(0.05, noise="none"), LOSS)
    x, y = tokens(4, seed=1)
    rows = kn.per_example_gradients(model, x, y)
    for i in range(4):
        xi = {k: v[i : i + 1] for k, v in x.items()}
        # A batch of one through the weighted engine: the plain gradient of example i's loss.
        expected = kn.noisy_gradients(model, xi, y[i : i + 1], np.ones(1, "float32"))
        for row, g in zip(rows, expected):
            # float32 on both sides, summed in other orders (attention over 8 tokens, 16-32 wide layers):
            # ~1e-7 relative; a wrong example or a dropped term is O(1).
            np.testing.assert_allclose(keras.ops.convert_to_numpy(row[i]), keras.ops.convert_to_numpy(g),
                                       rtol=1e-4, atol=1e-6)


@pytest.mark.tensorflow_only
def test_vectorized_map_over_attention_is_refused_rather_than_crashing():
    # TensorFlow 2.21's tf.vectorized_map aborts the process on MultiHeadAttention ("free(): invalid pointer"):
    # "auto" takes the exact jacobian method there (above), and asking for "vectorized" is a clear error.
    model = kn.noisy(bert_classifier())
    x, y = tokens(2)
    with pytest.raises(ValueError, match=r"method='vectorized'` would crash TensorFlow .* MultiHeadAttention layer"):
        kn.per_example_gradients(model, x, y, loss=LOSS, method="vectorized")


def test_noise_monitor_builds_the_gram_of_a_keras_hub_bert_from_the_layers():
    from keras_noisygd import per_example
    from keras_noisygd.per_example import gram as gram_lib

    model = kn.noisy(bert_classifier())
    model.compile(kn.NoisyGD(0.05, noise="none"), LOSS)
    x, y = tokens(6, seed=2)
    probe = gram_lib.ProbeGram(model)
    k = probe(x, y)
    # The layer path reaches the projections inside each block's attention, the block's Dense and
    # LayerNormalization layers, and KerasHub's ReversibleEmbedding and PositionEmbedding (their rules load
    # with the first KerasHub layer): K without G, on every backend.
    assert probe.source == "layers"
    assert per_example.compute(model, x, y).method == "layers"
    rows = kn.per_example_gradients(model, x, y, method="jacobian")
    flat = np.concatenate([np.reshape(keras.ops.convert_to_numpy(g), (6, -1)) for g in rows], axis=1)
    # float32 rows and products summed in other orders (~1e-6 of the largest entry); a missing layer's share
    # or a misplaced position row is O(1e-2) of it or more.
    np.testing.assert_allclose(k, flat.astype("float64") @ flat.T.astype("float64"), rtol=1e-4, atol=1e-5 * abs(k).max())
