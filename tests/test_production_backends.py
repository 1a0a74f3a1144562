"""Production on every backend: a `.keras` file resumes exactly in a new process (mid-accumulation too),
export (SavedModel where Keras can, a clear error on PyTorch with the way round it), the CLI end to end.

The resume comparisons are exact: both processes run the same float32 ops on the same inputs on the CPU,
and the noise comes from the restored `[seed, counter]` state.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_noisygd.experiments import cli

pytestmark = pytest.mark.all_backends

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "support" / "keras_file_worker.py"
BACKEND = keras.backend.backend()


def worker(*args, backend=BACKEND):
    env = dict(os.environ, PYTHONPATH=str(ROOT), KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, *map(str, args)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("optimizer", ["adam_accumulating", "momentum_gd"])
def test_a_keras_file_resumes_exactly_in_a_new_process(tmp_path, optimizer):
    # adam_accumulating is saved after 3 micro-steps of 2 per update: the pending half-update (Keras's
    # accumulators) and the noise counter are in the file, so the resumed run is the uninterrupted one.
    worker(WORKER, "save", tmp_path, optimizer)
    worker(WORKER, "resume", tmp_path, optimizer)
    with np.load(tmp_path / "uninterrupted.npz") as a, np.load(tmp_path / "resumed.npz") as b:
        assert sorted(a) == sorted(b) and sum(k.startswith("opt") for k in a) >= 6
        for key in a:
            np.testing.assert_array_equal(b[key], a[key], err_msg=key)


def trained_model():
    from helpers import classification_data, mlp

    import keras_noisygd as kn

    x, y = classification_data(64)
    model = mlp()
    model.compile(kn.NoisyGD(0.1, noise="gaussian_centered", emulate_batch_size=8, seed=3), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    return model, x


SERVE = """
import sys, numpy as np, tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
np.save(sys.argv[3], loaded.serve(tf.constant(np.load(sys.argv[2]))).numpy())
"""

EXPORT_FROM_KERAS_FILE = """
import sys, keras, keras_noisygd  # the import registers the package's classes for loading
keras.saving.load_model(sys.argv[1]).export(sys.argv[2], verbose=False)
"""


def test_export_serves_the_predictions_or_says_how_to_export(tmp_path):
    model, x = trained_model()
    expected = model.predict(x, batch_size=len(x), verbose=0)
    np.save(tmp_path / "x.npy", x)
    if BACKEND == "torch":
        with pytest.raises(RuntimeError, match=r"could not export this model on the PyTorch backend .*"
                           r"model.save\('model.keras'\).*KERAS_BACKEND=tensorflow"):
            model.export(tmp_path / "exported", verbose=False)
        # The way round it: the .keras file, exported by a TensorFlow process.
        model.save(tmp_path / "model.keras")
        worker("-c", EXPORT_FROM_KERAS_FILE, tmp_path / "model.keras", tmp_path / "exported", backend="tensorflow")
    else:
        model.export(tmp_path / "exported", verbose=False)  # JAX: through jax2tf
    worker("-c", SERVE, tmp_path / "exported", tmp_path / "x.npy", tmp_path / "served.npy", backend="tensorflow")
    # TensorFlow serves what this backend predicts: float32 softmax outputs, computed by another library's
    # kernels off TensorFlow (rounding ~1e-7 relative); on TensorFlow the same ops give the same bits.
    tolerance = 0 if BACKEND == "tensorflow" else 1e-5
    np.testing.assert_allclose(np.load(tmp_path / "served.npy"), expected, rtol=tolerance, atol=tolerance)


def test_a_keras_file_reloads_with_equal_predictions(tmp_path):
    model, x = trained_model()
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert loaded.optimizer.get_config() == model.optimizer.get_config()


TINY = ["--dataset", "digits", "--train-size", "64", "--steps", "20", "--eval-every", "10", "-b", "8", "--seeds", "1"]


@pytest.mark.parametrize("command", ["compare", "large-batch"])
def test_the_cli_runs_end_to_end(tmp_path, command, capsys):
    extra = ["-B", "32"] if command == "large-batch" else []
    assert cli.main([command, *TINY, *extra, "--noise", "gaussian_centered", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["runs"]) == 3 and all(0 <= r["test_acc"] <= 1 for r in results["runs"])
    assert [p["updates"] for p in results["runs"][2]["curve"]] == [10, 20]
    # --xla auto: off for TensorFlow's CNN on a CPU, on for JAX, and PyTorch trains without torch.compile.
    assert f"jit_compile={BACKEND == 'jax'}" in capsys.readouterr().out
