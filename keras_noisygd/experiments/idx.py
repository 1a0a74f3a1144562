"""Fashion-MNIST and MNIST from their original IDX files, offline first.

The four files (`train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`,
`t10k-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz`) are looked for, in
order, in:

1. the folder the caller names (`data_dir`, the CLI's `--data-dir`), then the
   one in the environment variable `KERAS_NOISYGD_DATA` (each holding the files
   directly or in a `fashion-mnist/` / `mnist/` sub-folder);
2. Keras's cache, where `keras.datasets` downloads them
   (`$KERAS_HOME/datasets/<name>/`, default `~/.keras/datasets/`; for MNIST
   Keras keeps one `mnist.npz` in `datasets/`, which is read too);
3. `/usr/share/datasets/<name>/`, where Debian's package `dataset-fashion-mnist`
   installs them;
4. `~/.cache/keras_noisygd/datasets/<name>/`, which `fetch_debian` (and so
   `python3 tasks.py demo|test` on a Debian-family machine) fills with
   `apt-get download` and `dpkg-deb -x`, no root needed;
5. `keras.datasets.<name>.load_data()`, which needs the network.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
FOLDER = {"fashion_mnist": "fashion-mnist", "mnist": "mnist"}
DEBIAN_PACKAGE = {"fashion_mnist": "dataset-fashion-mnist"}
ENV_VAR = "KERAS_NOISYGD_DATA"
SYSTEM_DIR = Path("/usr/share/datasets")  # where Debian's dataset-* packages install
# The IDX header: two zero bytes, the element type (0x08: unsigned byte) and the number of dimensions.
_UBYTE = 0x08


def cache_dir(name):
    """The package's own cache for `name`, filled by `fetch_debian`."""
    return Path.home() / ".cache" / "keras_noisygd" / "datasets" / FOLDER[name]


def search_path(name, data_dir=None):
    """The folders `load` looks in for `name`'s IDX files, in order."""
    folder = FOLDER[name]
    user = [Path(d) for d in (data_dir, os.environ.get(ENV_VAR)) if d]
    return [
        *(p for d in user for p in (d, d / folder)),
        _keras_home() / "datasets" / folder,
        SYSTEM_DIR / folder,
        cache_dir(name),
    ]


def _keras_home():
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))


def read_idx(path):
    """One IDX file (gzipped or not) as a uint8 array of the shape its header gives."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (header {raw[:4].hex()!r})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: the header promises shape {shape}, the file holds {data.size} bytes")
    return data.reshape(shape)


def available(name, data_dir=None):
    """Whether a folder on `name`'s search path holds its four files (nothing is read or downloaded)."""
    return any(all((folder / f).exists() for f in FILES.values()) for folder in search_path(name, data_dir))


def load(name, data_dir=None, online=True):
    """`name`'s four arrays `(x_train, y_train, x_test, y_test)` as uint8, from the first place that has them.

    Raises:
        FileNotFoundError: nowhere on the search path, and `keras.datasets`
            failed or `online` is False. The message lists where it looked and
            how to get the files.
    """
    if name not in FOLDER:
        raise ValueError(f"Argument `name` must be one of {sorted(FOLDER)}. Received: name={name!r}")
    looked = []
    for folder in search_path(name, data_dir):
        if all((folder / f).exists() for f in FILES.values()):
            return tuple(read_idx(folder / FILES[k]) for k in ("x_train", "y_train", "x_test", "y_test"))
        looked.append(str(folder))
    npz = _keras_home() / "datasets" / "mnist.npz"  # Keras keeps MNIST as one file beside the folders
    if name == "mnist" and npz.exists():
        with np.load(npz) as f:
            return f["x_train"], f["y_train"], f["x_test"], f["y_test"]
    error = None
    if online:
        try:
            import keras

            (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, name).load_data()
            return x_train, y_train, x_test, y_test
        except Exception as e:  # offline: urllib's URLError, or Keras's wrapper of it
            error = f"{type(e).__name__}: {e}"
    how = (
        f"`apt-get download {DEBIAN_PACKAGE[name]}` and `dpkg-deb -x` the .deb (what "
        f"`keras_noisygd.experiments.idx.fetch_debian()` and `python3 tasks.py test` do), or "
        if name in DEBIAN_PACKAGE else ""
    )
    raise FileNotFoundError(
        f"Could not find {name}'s IDX files {sorted(FILES.values())}. Looked in: {looked}"
        + (f"; keras.datasets.{name}.load_data() failed with {error}" if error else "; keras.datasets not tried (offline)")
        + f". To get them: {how}pass `--data-dir` (or set {ENV_VAR}) to a folder holding them, or pass a .npz "
        "with x_train, y_train, x_test, y_test as `--data`."
    )


def fetch_debian(name="fashion_mnist", quiet=False):
    """Fills `cache_dir(name)` from Debian's package with `apt-get download` + `dpkg-deb -x` (no root).

    Returns the folder, or None when it cannot (no apt-get, no package list
    entry, no network to the mirror); the reason is printed unless `quiet`.
    """
    target = cache_dir(name)
    if all((target / f).exists() for f in FILES.values()):
        return target
    package = DEBIAN_PACKAGE.get(name)
    if package is None or not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob(f"{package}_*.deb"))
        if got.returncode or not debs:
            if not quiet:
                print(f"apt-get download {package} failed (a fresh machine may need `apt-get update`, as root): "
                      f"{(got.stderr or got.stdout).strip()[-300:]}")
            return None
        extracted = Path(tmp) / "x"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(extracted)], check=True)
        source = extracted / "usr" / "share" / "datasets" / FOLDER[name]
        target.mkdir(parents=True, exist_ok=True)
        for f in FILES.values():
            shutil.copyfile(source / f, target / f)
    return target
