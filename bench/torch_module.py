"""batchnorm.torch.BatchNormalization against torch.nn.BatchNorm2d/1d on the CPU, as PyTorch users
call them (autograd, fresh outputs, PyTorch's own thread pool in the same process), in one run with
interleaved rounds (ratios measured together hold on a noisy machine; absolute times drift):

- forward + backward through autograd on the performance shapes, NCHW and channels_last;
- the per-call cost on a small (64, 256) batch: forward, and forward + backward;
- one training step (forward, loss, backward, SGD update) of a small CNN, batch 64 of 32x32 images,
  with each normalization layer.

    python bench/torch_module.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

if __name__ == "__main__":  # OpenMP reads its settings at start-up: fix them first
    from _threads import restart_with_threads

    restart_with_threads()

import torch  # noqa: E402

import batchnorm.torch as bnt  # noqa: E402

SHAPES = [(32, 64, 112, 112), (64, 256, 28, 28), (256, 2048, 7, 7)]


def timed(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each, interleaved round by round; a call shorter than a
    millisecond repeats within its round (the mean of the repeats is kept)."""
    repeats = {}
    for name, call in calls.items():
        call()
        start = time.perf_counter()
        call()
        repeats[name] = max(1, int(1e-3 / max(time.perf_counter() - start, 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(repeats[name]):
                calls[name]()
            times[name].append((time.perf_counter() - start) / repeats[name])
    return {name: statistics.median(t) for name, t in times.items()}


def forward_backward(module: Any, x: Any, dy: Any) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        module(x).backward(dy)

    return step


def cnn(norm: Callable[[int], Any]) -> Any:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1),
        norm(32),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, stride=2, padding=1),
        norm(64),
        torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, stride=2, padding=1),
        norm(64),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    )


def training_step(model: Any, x: Any, target: Any) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="threads of both libraries")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per case")
    parser.add_argument("--skip-large", action="store_true", help="only the small cases")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, {args.rounds} interleaved rounds, median per call")
    print(f"{'case':40} {'batchnorm':>11} {'torch':>11} {'torch/batchnorm':>16}", flush=True)

    def report(label: str, result: dict[str, float]) -> None:
        ours, theirs = result["batchnorm"], result["torch"]
        unit, scale = ("ms", 1e3) if ours > 1e-3 else ("us", 1e6)
        print(
            f"{label:40} {ours * scale:8.2f} {unit} {theirs * scale:8.2f} {unit} "
            f"{theirs / ours:15.2f}x",
            flush=True,
        )

    if not args.skip_large:
        for shape in SHAPES:
            for layout in ("NCHW", "channels_last"):
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_(True)
                dy = torch.randn(shape).contiguous(memory_format=fmt)
                ours = bnt.BatchNormalization(shape[1], axis=1)
                theirs = torch.nn.BatchNorm2d(shape[1], momentum=0.01, eps=1e-3)
                result = timed(
                    {
                        "batchnorm": forward_backward(ours, x, dy),
                        "torch": forward_backward(theirs, x, dy),
                    },
                    args.rounds,
                )
                report(f"fwd+bwd {shape} {layout}", result)
                del x, dy

    x = torch.randn(64, 256, requires_grad=True)
    dy = torch.randn(64, 256)
    ours, theirs = bnt.BatchNormalization(256), torch.nn.BatchNorm1d(256, momentum=0.01, eps=1e-3)
    forwards = {"batchnorm": lambda: ours(x), "torch": lambda: theirs(x)}
    report("forward (64, 256)", timed(forwards, 51))
    report(
        "fwd+bwd (64, 256)",
        timed(
            {"batchnorm": forward_backward(ours, x, dy), "torch": forward_backward(theirs, x, dy)},
            51,
        ),
    )

    torch.manual_seed(0)
    images, target = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    ours_model = cnn(lambda c: bnt.BatchNormalization(c, axis=1))
    theirs_model = cnn(lambda c: torch.nn.BatchNorm2d(c, momentum=0.01, eps=1e-3))
    result = timed(
        {
            "batchnorm": training_step(ours_model, images, target),
            "torch": training_step(theirs_model, images, target),
        },
        args.rounds * 2,
    )
    report("CNN training step, batch 64, 32x32", result)


if __name__ == "__main__":
    main()
