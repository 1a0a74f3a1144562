"""Fashion-MNIST / MNIST from their IDX files: the reader, the search path, the paper's split, ConvSmall."""

import gzip
import os
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_noisygd.experiments import architectures, cli, data, idx


def write_idx(path, array):
    """An IDX file as the format defines it: 0, 0, type 0x08 (ubyte), ndim, then big-endian sizes and the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_folder(folder, seed, n_train=12, n_test=8):
    rng = np.random.default_rng(seed)
    arrays = dict(
        x_train=rng.integers(0, 256, (n_train, 28, 28)), y_train=rng.integers(0, 10, n_train),
        x_test=rng.integers(0, 256, (n_test, 28, 28)), y_test=rng.integers(0, 10, n_test),
    )
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in idx.FILES.items():
        write_idx(folder / name, arrays[key])
    return arrays


@pytest.fixture
def no_real_data(tmp_path, monkeypatch):
    """Home, Keras's cache and the system folder all point into `tmp_path`: only what a test writes is found."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.delenv(idx.ENV_VAR, raising=False)
    monkeypatch.setattr(idx, "SYSTEM_DIR", tmp_path / "usr-share-datasets")
    return tmp_path


def test_read_idx_gives_the_arrays_written(tmp_path):
    arrays = write_folder(tmp_path, seed=0)
    for key, name in idx.FILES.items():
        got = idx.read_idx(tmp_path / name)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, arrays[key])


def test_read_idx_refuses_another_format_and_a_short_file(tmp_path):
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(bytes([0, 0, 0x0D, 1]) + (3).to_bytes(4, "big") + bytes(12))  # 0x0D: float32, not ubyte
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        idx.read_idx(tmp_path / "bad.gz")
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(bytes([0, 0, 0x08, 1]) + (5).to_bytes(4, "big") + bytes(3))
    with pytest.raises(ValueError, match=r"promises shape \(5,\), the file holds 3 bytes"):
        idx.read_idx(tmp_path / "short.gz")


def test_the_search_path_order(no_real_data, monkeypatch):
    tmp = no_real_data
    folders = {
        "system": tmp / "usr-share-datasets" / "fashion-mnist",
        "keras": tmp / "keras" / "datasets" / "fashion-mnist",
        "env": tmp / "env",
        "user": tmp / "user" / "fashion-mnist",  # a sub-folder named for the dataset is looked in too
    }
    seeds = {}
    for i, (where, folder) in enumerate(folders.items()):
        seeds[where] = write_folder(folder, seed=i)
    monkeypatch.setenv(idx.ENV_VAR, str(tmp / "env"))
    # Each folder wins over the ones written before it; remove the winner to see the next one.
    for where in ("user", "env", "keras", "system"):
        x_train = idx.load("fashion_mnist", data_dir=tmp / "user", online=False)[0]
        np.testing.assert_array_equal(x_train, seeds[where]["x_train"])
        for f in folders[where].iterdir():
            f.unlink()
    cache = write_folder(idx.cache_dir("fashion_mnist"), seed=9)  # last offline place: the package's cache
    np.testing.assert_array_equal(idx.load("fashion_mnist", online=False)[0], cache["x_train"])


def test_nothing_found_lists_where_it_looked_and_how_to_get_the_files(no_real_data):
    with pytest.raises(FileNotFoundError) as error:
        idx.load("fashion_mnist", data_dir=no_real_data / "mine", online=False)
    message = str(error.value)
    for expected in ("mine", "keras/datasets/fashion-mnist", "usr-share-datasets", ".cache/keras_noisygd",
                     "apt-get download dataset-fashion-mnist", "dpkg-deb -x", "--data-dir", idx.ENV_VAR, ".npz"):
        assert expected in message, (expected, message)


def test_keras_datasets_is_the_last_resort(no_real_data, monkeypatch):
    rng = np.random.default_rng(0)
    fake = ((rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 3, 6)), (rng.integers(0, 256, (2, 28, 28)), rng.integers(0, 3, 2)))
    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", lambda: fake)
    dataset = data.load("fashion_mnist")
    np.testing.assert_allclose(dataset.x_train[..., 0], fake[0][0] / 255.0, rtol=1e-6)
    assert dataset.x_train.shape == (6, 28, 28, 1) and dataset.y_test.shape == (2,)

    def offline():
        raise OSError("no network")

    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", offline)
    with pytest.raises(FileNotFoundError, match="load_data\\(\\) failed with OSError: no network"):
        data.load("fashion_mnist")


def test_paper_split_and_raw_pixels(no_real_data):
    arrays = write_folder(no_real_data / "d", seed=3)
    paper = data.load("fashion_mnist", data_dir=no_real_data / "d", split="paper", pixels="raw")
    # Swapped on purpose, as the reference code does: train on the official test file, test on the training file.
    np.testing.assert_array_equal(paper.x_train[..., 0], arrays["x_test"].astype("float32"))
    np.testing.assert_array_equal(paper.y_train, arrays["y_test"])
    np.testing.assert_array_equal(paper.y_test, arrays["y_train"])
    standard = data.load("fashion_mnist", data_dir=no_real_data / "d")
    np.testing.assert_allclose(standard.x_train[..., 0], arrays["x_train"] / 255.0, rtol=1e-6)
    with pytest.raises(ValueError, match="apply to fashion_mnist and mnist only. Received: split='paper'"):
        data.load("digits", split="paper")
    with pytest.raises(ValueError, match=r"Received: split='swapped'"):
        data.load("fashion_mnist", split="swapped")


def test_random_labels_append_the_next_examples_with_seeded_labels(no_real_data):
    write_folder(no_real_data / "d", seed=4, n_train=30)
    dataset = data.load("fashion_mnist", data_dir=no_real_data / "d")
    corrupted = dataset.with_random_labels(20, 6)
    assert len(corrupted.x_train) == 26
    np.testing.assert_array_equal(corrupted.x_train, dataset.x_train[:26])  # the next 6 images...
    np.testing.assert_array_equal(corrupted.y_train[:20], dataset.y_train[:20])  # clean labels kept
    expected = np.random.default_rng(0).integers(0, dataset.num_classes, 6)  # ...with these labels
    np.testing.assert_array_equal(corrupted.y_train[20:], expected)
    with pytest.raises(ValueError, match=r"at most the 30 training examples .* Received: train_size=28, random_labels=6"):
        dataset.with_random_labels(28, 6)
    with pytest.raises(ValueError, match="Received: random_labels=-1"):
        dataset.with_random_labels(20, -1)


def test_convsmall_is_the_papers_11330_parameter_cnn():
    model = architectures.build("convsmall", (28, 28, 1), 10)
    assert model.count_params() == 11_330
    shapes = [tuple(w.shape) for w in model.trainable_weights]
    assert shapes == [(5, 5, 1, 10), (10,), (5, 5, 10, 10), (10,), (160, 50), (50,), (50, 10), (10,)]
    # N(0, 0.02^2) everywhere: the 8,000 dense weights' sample std is within ~1% (1/sqrt(2*8000)) of 0.02,
    # so 5% fails any other initialiser (Glorot's would be ~0.11 here).
    dense = keras.ops.convert_to_numpy(model.trainable_weights[4])
    assert abs(dense.std() / 0.02 - 1) < 0.05 and abs(dense.mean()) < 0.002
    # Pooling comes before the ReLU, as in the reference code.
    names = [type(layer).__name__ for layer in model.layers]
    assert names == ["Conv2D", "MaxPooling2D", "ReLU", "Conv2D", "MaxPooling2D", "ReLU", "Flatten", "Dense", "ReLU", "Dense"]


def _real_fashion_mnist():
    try:
        return idx.load("fashion_mnist", online=False)
    except FileNotFoundError as error:
        pytest.skip(f"Fashion-MNIST not on this machine ({error})")


def test_the_real_fashion_mnist_files():
    x_train, y_train, x_test, y_test = _real_fashion_mnist()
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    # The dataset's documented balance: 6,000 training and 1,000 test images per class.
    np.testing.assert_array_equal(np.bincount(y_train), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(y_test), [1000] * 10)
    assert x_train.dtype == np.uint8 and x_train.max() == 255 and x_train.min() == 0
    paper = data.load("fashion_mnist", split="paper", pixels="raw").subset(1000)
    assert paper.x_train.shape == (1000, 28, 28, 1) and paper.x_test.shape == (60000, 28, 28, 1)
    np.testing.assert_array_equal(paper.y_train, y_test[:1000])
    assert paper.x_train.max() == 255.0  # raw pixels


def test_available_tells_whether_the_files_are_there_without_reading_them(no_real_data, tmp_path):
    assert not idx.available("fashion_mnist")
    write_folder(tmp_path / "mine", seed=0)
    assert idx.available("fashion_mnist", data_dir=tmp_path / "mine") and not idx.available("fashion_mnist")


def test_the_demo_runs_the_paper_protocol_where_the_data_is_and_says_when_it_falls_back(no_real_data, tmp_path, monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tasks", Path(__file__).resolve().parents[2] / "tasks.py")
    tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tasks)
    monkeypatch.setattr(tasks, "PYTHON", sys.executable)
    monkeypatch.setattr(tasks, "ENV", dict(os.environ))  # the fixture's HOME/KERAS_HOME, for the child
    if not (Path("/usr/share/datasets") / "fashion-mnist").exists():  # the child process sees the real system folder
        assert tasks.demo_preset() == [] and "the demo runs the MNIST-1D comparison instead" in capsys.readouterr().out
    write_folder(idx.cache_dir("fashion_mnist"), seed=0)
    assert tasks.demo_preset() == ["--preset", "fashion-mnist-demo"]
    args = cli.parse(["compare", "--preset", "fashion-mnist-demo"])
    assert (args.split, args.model, args.steps, args.noise, args.seeds) == ("paper", "convsmall", 2000, ["gaussian_centered"], ["2"])
