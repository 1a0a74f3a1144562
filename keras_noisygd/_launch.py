"""A quiet start for the `keras-noisygd` command: TensorFlow's C++ start-up lines are not its output.

TensorFlow's native libraries write `I0000 ... cudart_stub.cc ...` lines
straight to file descriptor 2 while `import tensorflow` runs, before its
logging is initialised, so no environment variable hides them; once imported,
its C++ logging reads `TF_CPP_MIN_LOG_LEVEL` (XLA's `service.cc` lines and
the like). When, and only when, this process *is* the command line
(`python -m keras_noisygd ...` or the `keras-noisygd` console script), the
package imports TensorFlow through `quiet_start()`: it sets
`TF_CPP_MIN_LOG_LEVEL=3` unless the user set it, and drops the known
start-up lines while replaying anything else TensorFlow printed. A program
that imports the package as a library keeps TensorFlow's own behaviour.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

COMMAND = "keras-noisygd"
PACKAGE = "keras_noisygd"

# Start-up lines of a TensorFlow import that say nothing about this program.
_STARTUP_NOISE = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "cudart_stub.cc",  # "Could not find cuda drivers on your machine, GPU will not be used."
    "cpu_feature_guard.cc",
    "To enable the following instructions:",
    "oneDNN custom operations are on",
)


def launched_as_command(orig_argv=None, argv0=None):
    """Whether this process was started as the command line (`python -m keras_noisygd`, `keras-noisygd`)."""
    orig_argv = list(getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv)
    argv0 = (sys.argv[0] if sys.argv else "") if argv0 is None else argv0
    args = iter(orig_argv[1:])  # orig_argv[0] is the interpreter
    for arg in args:
        if arg == "-m":
            module = next(args, "")
            return module == PACKAGE or module.startswith(PACKAGE + ".")
        if arg in ("-X", "-W"):  # options with a value
            next(args, None)
        elif arg == "-c" or not arg.startswith("-"):  # `-c code` or a script: the interpreter's options end
            break
    return os.path.splitext(os.path.basename(argv0))[0] in (COMMAND, COMMAND + "-script")


def _keras_backend():
    """The backend Keras will pick: `KERAS_BACKEND`, else its `keras.json`, else TensorFlow."""
    if "KERAS_BACKEND" in os.environ:
        return os.environ["KERAS_BACKEND"]
    path = os.path.join(os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras")), "keras.json")
    try:
        with open(path) as config:
            return json.load(config).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


def is_startup_noise(line):
    return any(marker in line for marker in _STARTUP_NOISE)


def quiet_start():
    """Imports TensorFlow without its start-up lines, if this process is the command line."""
    if "tensorflow" in sys.modules or not launched_as_command():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            if _keras_backend() != "tensorflow":
                import keras  # noqa: F401  (its backend first: TensorFlow imported before PyTorch crashes it)
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace")
            kept = [line for line in text.splitlines(keepends=True) if not is_startup_noise(line)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()
