"""bench/compare.py's interleaving of the libraries: a call is slower right after another
library's (cold caches, a sleeping OpenMP team), so every library runs once a round, never right
after itself, and follows every other about equally often."""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import pytest
from bench_scripts import load


@pytest.mark.parametrize(("libraries", "reps"), [(3, 15), (3, 25), (4, 15), (5, 9)])
def test_each_library_follows_every_other_about_equally_often(libraries: int, reps: int) -> None:
    names = [f"library{i}" for i in range(libraries)]
    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name)) for name in names}

    def seconds(call: Callable[[], Any]) -> float:
        call()
        return 1.0

    times = load("compare").interleaved(calls, reps, seconds)
    assert all(len(times[name]) == reps for name in names)
    timed = order[2 * libraries :]  # (after each library's warm-up call and its timing)
    rounds = [timed[i : i + libraries] for i in range(0, len(timed), libraries)]
    assert all(sorted(r) == names for r in rounds)
    pairs = Counter(zip(timed, timed[1:]))
    assert all(before != after for before, after in pairs)
    counts = [pairs[(a, b)] for a in names for b in names if a != b]
    # (The greedy choice is even to one transition for up to four libraries; compare.py runs
    # five at most: batchnorm, its out= call, PyTorch, NumPy, TensorFlow.)
    assert max(counts) - min(counts) <= (1 if libraries <= 4 else 2)
