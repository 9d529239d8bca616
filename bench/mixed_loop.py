"""A training step as users write it: the batchnorm layer between PyTorch convolutions.

Times, per step and interleaved round by round, the PyTorch ops alone (the same step with the
layer replaced by a copy), the layer alone (its forward and backward on tensors of the same
shape) and the mixed step, and prints the overhead: mixed - (PyTorch + layer). Two OpenMP
runtimes share the cores here (PyTorch's and the library's); a team that spins after its call
or is sized past its work shows up as overhead.

    python bench/mixed_loop.py --threads 2 --rounds 15 --steps 20
"""

import argparse
import statistics
import time

import torch

import batchnorm


def make_model(channels):
    torch.manual_seed(0)
    conv1 = torch.nn.Conv2d(3, channels, 3, padding=1)
    conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1)
    head = torch.nn.Linear(channels, 10)
    return conv1, conv2, head, [*conv1.parameters(), *conv2.parameters(), *head.parameters()]


def step(x, target, model, normalize, lr=0.01):
    """One SGD step; normalize(h) returns (y, backward) where backward(dy) gives dh."""
    conv1, conv2, head, params = model
    h = conv1(x)
    y, backward = normalize(h.detach())
    y.requires_grad_(True)
    z = torch.relu(conv2(torch.relu(y)))
    loss = torch.nn.functional.cross_entropy(head(z.mean(dim=(2, 3))), target)
    for p in params:
        p.grad = None
    loss.backward()
    h.backward(backward(y.grad))
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad


def layer_normalize(layer):
    def normalize(h):
        return layer(h, training=True), layer.backward

    return normalize


def copy_normalize(h):
    return h.clone(), lambda dy: dy


def timed(run, steps):
    start = time.perf_counter()
    for _ in range(steps):
        run()
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="PyTorch's intra-op threads")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, default=16, help="image height and width")
    parser.add_argument("--steps", type=int, default=20, help="steps per timing")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timings, median kept")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    x = torch.randn(args.batch, 3, args.size, args.size)
    target = torch.randint(0, 10, (args.batch,))
    model = make_model(args.channels)
    layer = batchnorm.BatchNormalization(axis=1)
    h = torch.randn(args.batch, args.channels, args.size, args.size)
    dy = torch.randn_like(h)

    def layer_alone():
        layer(h, training=True)
        layer.backward(dy)

    runs = {
        "pytorch": lambda: step(x, target, model, copy_normalize),
        "layer": layer_alone,
        "mixed": lambda: step(x, target, model, layer_normalize(layer)),
    }
    for run in runs.values():  # warm-up: allocator, thread pools, the layer's weights
        timed(run, 3)
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name].append(timed(run, args.steps))
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    overhead = ms["mixed"] - (ms["pytorch"] + ms["layer"])
    print(
        f"input ({args.batch}, {args.channels}, {args.size}, {args.size}), "
        f"torch threads {torch.get_num_threads()}, median of {args.rounds} x {args.steps} steps"
    )
    for name in runs:
        print(f"  {name:8s} {ms[name]:8.3f} ms/step")
    print(
        f"  overhead {overhead:8.3f} ms/step "
        f"({100 * overhead / ms['mixed']:.0f}% of the mixed step)"
    )


if __name__ == "__main__":
    main()
