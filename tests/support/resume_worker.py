"""Worker processes for tests/test_resume.py: train, save, get killed, resume.

Run as `python tests/resume_worker.py MODE DIR`. Every mode writes what it
ends with to `DIR/<name>.npz` (model weights and every optimizer variable:
slots, `iterations` and the noise state), so the test compares runs that
happened in different processes.

Modes:
    save     NoisyAdam, 2 epochs (8 steps); save `.keras` and a tf.train.Checkpoint;
             then 1 more epoch in the same process: the uninterrupted 12-step run.
    restore  A fresh process: load the `.keras` file, and separately restore the
             checkpoint into a model built with another init and another noise seed;
             train each 1 more epoch.
    killed   NoisyGD with momentum under three `BackupAndRestore` callbacks (saving at
             every epoch end, every 2 steps, every 4 steps = once per epoch);
             SIGKILLed before step 8 of 12.
    resume   A fresh process: each callback's backup resumes a fresh model; then the
             uninterrupted run and the replays that BackupAndRestore actually performs.
    first    save, then killed (in one process, which ends killed).
    second   restore, then resume (in a second process).
"""

import os
import signal
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import keras_noisygd as kn

BATCH, EPOCHS, STEPS_PER_EPOCH = 8, 3, 4
KILL_AT_STEP = 7  # steps 0..6 run; the process dies as step 7 (epoch 1, batch 3) begins


def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(BATCH * STEPS_PER_EPOCH, 5)).astype("float32"), rng.integers(0, 3, BATCH * STEPS_PER_EPOCH)


def model(init_seed=0):
    keras.utils.set_random_seed(init_seed)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(7, activation="tanh", kernel_regularizer=keras.regularizers.L2(1e-2))(inputs)
    return kn.NoisyModel(inputs, keras.layers.Dense(3, activation="softmax")(hidden))


def adam(seed=11):
    return kn.NoisyAdam(0.01, noise="gaussian_centered", emulate_batch_size=4, seed=seed)


def momentum_gd(seed=11):
    # Momentum 0.5 is float32-exact (the exactness does not hinge on a rounded constant).
    return kn.NoisyGD(0.1, noise="bernoulli", emulate_batch_size=4, momentum=0.5, seed=seed)


def compiled(optimizer, init_seed=0):
    net = model(init_seed)
    net.compile(optimizer, "sparse_categorical_crossentropy", metrics=["accuracy"], jit_compile=False)
    return net


def fit(net, epochs, initial_epoch=0, callbacks=(), x_y=None):
    x, y = data() if x_y is None else x_y
    return net.fit(x, y, batch_size=BATCH, epochs=epochs, initial_epoch=initial_epoch, shuffle=False,
                   verbose=0, callbacks=list(callbacks))


def write(directory, name, net, history=None):
    state = {f"w{i}": w for i, w in enumerate(net.get_weights())}
    # By position: variable paths carry per-process name suffixes (`dense_4`, `noisy_gd_2`).
    state.update({f"opt{i:02d}": v.numpy() for i, v in enumerate(net.optimizer.variables)})
    state.update(iterations=net.optimizer.iterations.numpy(), noise_state=net.optimizer.noise_state.numpy())
    if history is not None:
        state.update({f"history:{k}": np.asarray(v) for k, v in history.history.items()})
    np.savez(Path(directory) / f"{name}.npz", **state)


class KillAt(keras.callbacks.Callback):
    """SIGKILLs this process as global step `step` begins: no cleanup, no `on_train_end`."""

    def __init__(self, step):
        super().__init__()
        self.step, self.seen = step, 0

    def on_train_batch_begin(self, batch, logs=None):
        if self.seen == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
        self.seen += 1


def backups(directory):
    return {
        "epoch": keras.callbacks.BackupAndRestore(str(Path(directory) / "backup_epoch"), save_freq="epoch"),
        "steps": keras.callbacks.BackupAndRestore(str(Path(directory) / "backup_steps"), save_freq=2),
        "epoch_steps": keras.callbacks.BackupAndRestore(
            str(Path(directory) / "backup_epoch_steps"), save_freq=STEPS_PER_EPOCH
        ),
    }


def main(mode, directory):
    if mode in COMBINED:  # one process start instead of two (each costs seconds of TF import)
        for part in COMBINED[mode]:
            main(part, directory)
    elif mode == "save":
        net = compiled(adam())
        fit(net, epochs=2)
        net.save(Path(directory) / "model.keras")
        checkpoint(net).save(str(Path(directory) / "ckpt"))
        write(directory, "uninterrupted", net, fit(net, epochs=EPOCHS, initial_epoch=2))
    elif mode == "restore":
        loaded = keras.models.load_model(Path(directory) / "model.keras")
        write(directory, "from_keras", loaded, fit(loaded, epochs=EPOCHS, initial_epoch=2))
        fresh = compiled(adam(seed=12345), init_seed=99)
        fresh.optimizer.build(fresh.trainable_variables)
        checkpoint(fresh).restore(str(Path(directory) / "ckpt-1")).assert_consumed()
        write(directory, "from_checkpoint", fresh, fit(fresh, epochs=EPOCHS, initial_epoch=2))
    elif mode == "killed":
        net = compiled(momentum_gd())
        fit(net, epochs=EPOCHS, callbacks=[*backups(directory).values(), KillAt(KILL_AT_STEP)])
        raise AssertionError("the process was to be killed")
    elif mode == "resume":
        for name, callback in backups(directory).items():
            net = compiled(momentum_gd(seed=12345), init_seed=99)  # everything comes from the backup
            write(directory, f"resumed_{name}", net, fit(net, epochs=EPOCHS, callbacks=[callback]))
        net = compiled(momentum_gd())
        write(directory, "uninterrupted_gd", net, fit(net, epochs=EPOCHS))
        # The replay: the 6 steps before the last 2-step backup (epoch 0, then epoch 1's batches
        # 0-1), then BackupAndRestore restarts epoch 1 at its first batch and runs epochs 1 and 2.
        net = compiled(momentum_gd())
        x, y = data()
        fit(net, epochs=1)
        fit(net, epochs=1, x_y=(x[: 2 * BATCH], y[: 2 * BATCH]))
        write(directory, "replayed_gd", net, fit(net, epochs=EPOCHS, initial_epoch=1))
        # save_freq = steps per epoch: the backup after step 4 still says epoch 0, so epoch 0 is replayed.
        net = compiled(momentum_gd())
        fit(net, epochs=1)
        write(directory, "replayed_epoch_gd", net, fit(net, epochs=EPOCHS))
    else:
        raise ValueError(f"Argument `mode` must be one of {MODES}. Received: mode={mode!r}")


COMBINED = {"first": ("save", "killed"), "second": ("restore", "resume")}
MODES = ["save", "restore", "killed", "resume", *COMBINED]


def checkpoint(net):
    return tf.train.Checkpoint(model=net, optimizer=net.optimizer)


if __name__ == "__main__":
    main(*sys.argv[1:])
