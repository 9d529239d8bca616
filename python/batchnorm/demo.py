"""A short demonstration: trains a BatchNormalization layer on a drifting stream of NCHW batches
with SGD, then evaluates it in inference mode. Run with `python -m batchnorm.demo`."""

from __future__ import annotations

import time

import numpy as np

from . import BatchNormalization, cuda_available


def main(steps: int = 200, shape: tuple[int, int, int, int] = (32, 16, 16, 16)) -> None:
    rng = np.random.default_rng(0)
    channel_mean = rng.uniform(-5, 5, size=(1, shape[1], 1, 1))
    channel_std = rng.uniform(0.5, 4, size=(1, shape[1], 1, 1))
    layer = BatchNormalization(axis=1, momentum=0.9, gamma_regularizer="l2")
    print(f"batchnorm demo: {steps} training steps on {shape} float32 NCHW batches")
    print(f"CUDA backend available: {cuda_available()}")
    # Loss 0.5 * mean((y - target)^2) per channel with target = 2 * standardized(x) + 0.5, so
    # SGD should drive gamma towards 2 and beta towards 0.5.
    per_channel = shape[0] * shape[2] * shape[3]
    y = np.empty(shape, np.float32)
    layer_seconds = 0.0  # the layer's own calls only, not the data the demo makes around them
    for step in range(1, steps + 1):
        x = (rng.normal(size=shape) * channel_std + channel_mean).astype(np.float32)
        start = time.perf_counter()
        layer(x, training=True, out=y)
        layer_seconds += time.perf_counter() - start
        target = 2.0 * (x - channel_mean) / channel_std + 0.5
        dy = ((y - target) / per_channel).astype(np.float32)
        start = time.perf_counter()
        layer.backward(dy)
        layer.apply_gradients(learning_rate=0.5)
        layer_seconds += time.perf_counter() - start
        if step % (steps // 5) == 0:
            print(
                f"  step {step:4d}: mean gamma {layer.gamma.numpy().mean():.3f} (target 2), "
                f"mean beta {layer.beta.numpy().mean():+.3f} (target 0.5), "
                f"L2 penalty {layer.losses[0]:.4f}"
            )
    print(
        f"  the layer took {layer_seconds / steps * 1e3:.2f} ms per step "
        "(forward + backward + update; data generation not counted)"
    )

    x = (rng.normal(size=shape) * channel_std + channel_mean).astype(np.float32)
    y_eval = layer(x)  # inference: moving statistics
    error = np.abs(layer.moving_mean.numpy() - channel_mean.ravel()).max()
    print(f"moving_mean vs the true channel means: max error {error:.3f}")
    print(f"inference output: mean {y_eval.mean():+.3f}, std {y_eval.std():.3f}")


if __name__ == "__main__":
    main()
