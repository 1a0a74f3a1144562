"""Memory and time of the paper's CIFAR-10 full-batch run, estimated from XLA's own analysis of one micro-step.

Full-batch noisy GD over CIFAR-10's n = 50,000 images with ResNet-18 (CIFAR variant, 11.2M parameters, ghost
batch normalisation as in the reference runs; ghosts of 125 here, so that every device's share of c = 1,000
is whole) takes k = n / c micro-steps of c images per update (`gradient_accumulation_steps=k`). On N devices
(`keras.distribution.DataParallel` on JAX) each micro-step's c images split N ways. This script compiles one
training micro-step of c / N images on JAX (forward, backward, no update) for each c and N asked, and prints
XLA's figures for it: the FLOPs (`cost_analysis`) and the memory of the compiled step (`memory_analysis`:
arguments, outputs and temporaries, i.e. weights, one micro-batch and its activations). Per device, a run
needs about that memory plus the optimizer's state (weights, Keras's accumulators, momentum: 3 x 45 MB in
float32), and an update takes `k x FLOPs(c / N) / throughput`. The throughput is an assumption you pass
(`--tflops`, achieved float32 TFLOP/s per device, default 50 for an H100's fp32 without TF32); nothing here
was measured on a GPU. XLA's CPU compiler makes the analysis; a GPU's differs in layout and fusion, so take
the memory as an order of magnitude.

    KERAS_BACKEND=jax python benchmarks/cifar10_recipe.py [--micro-batch 1000] [--devices 1 2 4 8] [--tflops 50]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_noisygd as kn  # noqa: E402

N_TRAIN = 50_000  # one full-batch update is one pass over the training set


def resnet18(ghost_batch_size):
    def block(x, filters, strides):
        shortcut = x
        y = keras.layers.Conv2D(filters, 3, strides, padding="same", use_bias=False)(x)
        y = keras.layers.ReLU()(kn.layers.GhostBatchNormalization(ghost_batch_size)(y))
        y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
        y = kn.layers.GhostBatchNormalization(ghost_batch_size)(y)
        if strides != 1 or shortcut.shape[-1] != filters:
            shortcut = keras.layers.Conv2D(filters, 1, strides, use_bias=False)(shortcut)
            shortcut = kn.layers.GhostBatchNormalization(ghost_batch_size)(shortcut)
        return keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(64, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.ReLU()(kn.layers.GhostBatchNormalization(ghost_batch_size)(x))
    for filters, strides in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)):
        x = block(x, filters, strides)
    outputs = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(x))
    return kn.NoisyModel(inputs, outputs)


def analyse(model, batch):
    """XLA's (FLOPs, bytes) of one forward and backward pass on `batch` images."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss(trainable, non_trainable, x, y, weights):
        logits, state = model.stateless_call(trainable, non_trainable, x, training=True)
        return keras.ops.mean(weights * loss_fn(y, logits)), state  # the noisy loss: weights m_i

    step = jax.jit(jax.grad(loss, has_aux=True))
    args = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
            jax.ShapeDtypeStruct((batch, 32, 32, 3), "float32"), jax.ShapeDtypeStruct((batch,), "int32"),
            jax.ShapeDtypeStruct((batch,), "float32"))
    compiled = step.lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    memory = compiled.memory_analysis()
    used = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    return cost["flops"], used


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[1000], help="c: images per micro-step, a divisor of 50,000")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8], help="N devices sharing each micro-step")
    parser.add_argument("--ghost-batch-size", type=int, default=125)
    parser.add_argument("--tflops", type=float, default=50.0, help="assumed achieved float32 TFLOP/s per device")
    args = parser.parse_args(argv)
    model = resnet18(args.ghost_batch_size)
    params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    state_mb = 3 * 4 * params / 2**20
    print(f"ResNet-18 (CIFAR), {params:,} parameters; optimizer state (weights, accumulators, momentum) "
          f"{state_mb:.0f} MB per device; n = {N_TRAIN:,}; {args.tflops:g} TFLOP/s per device assumed")
    print(f"{'c':>5} {'N':>3} {'per device':>10} {'GFLOP/step':>10} {'step MB':>8} {'device MB':>9} "
          f"{'s/update':>8} {'h / 1,000 updates':>17}")
    for c in args.micro_batch:
        for devices in args.devices:
            if N_TRAIN % c or c % devices or (c // devices) % args.ghost_batch_size:
                print(f"{c:>5} {devices:>3}  skipped: c must divide {N_TRAIN:,} and c / N be a multiple of the ghost batch")
                continue
            flops, used = analyse(model, c // devices)
            seconds = (N_TRAIN // c) * flops / (args.tflops * 1e12)
            print(f"{c:>5} {devices:>3} {c // devices:>10} {flops / 1e9:>10.1f} {used / 2**20:>8.0f} "
                  f"{used / 2**20 + state_mb:>9.0f} {seconds:>8.2f} {1000 * seconds / 3600:>17.2f}")


if __name__ == "__main__":
    main()
