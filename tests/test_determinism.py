"""Bitwise reproducibility of the CPU kernels across thread counts and instruction sets.

Every result (y, dx, dgamma, dbeta, moving statistics, inference output) must be bitwise the same
for OMP_NUM_THREADS = 1, 2, 3: the reductions run in fixed chunks merged in a fixed order, and a
fused per-feature pass computes exactly what the separate passes compute. The cases cover row
layouts (channels-last, dense) and plane layouts (NCHW with long and short runs), masks, ghost
batches, a feature count (3) for which some thread counts fuse and others do not, and wide rows
in cache, whose threads split the features instead of the rows. Each thread
count runs in its own process, since OpenMP reads the variable once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

batchnorm = pytest.importorskip("batchnorm")

# Runs every case and prints {case: {result: sha256 of its bytes}} as JSON.
_CHILD = r"""
import hashlib, json
import numpy as np
import batchnorm

def digest(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()

CASES = {
    # name: (shape, axis, dtype, virtual_batch_size, masked)
    "nchw": ((16, 64, 24, 24), 1, "float32", None, False),
    "nchw_mask_ghost": ((16, 64, 24, 24), 1, "float32", 4, True),
    "nchw_short_runs": ((64, 96, 7, 7), 1, "float32", None, False),
    "nchw_short_runs_mask": ((64, 96, 7, 7), 1, "float32", 16, True),
    "nchw_three_features": ((32, 3, 40, 40), 1, "float32", 8, True),
    "nchw_float64": ((8, 32, 30, 30), 1, "float64", 2, False),
    "nhwc": ((16, 24, 24, 64), -1, "float32", None, False),
    "nhwc_mask_ghost": ((16, 24, 24, 64), -1, "float32", 4, True),
    "dense": ((4096, 96), -1, "float32", None, False),
    "sequence_mask": ((32, 100, 40), -1, "float32", None, True),
    "rows_of_three": ((50000, 3), -1, "float32", None, False),
    "rows_of_three_mask": ((50000, 3), -1, "float32", None, True),
    # 16.8 MB of output: streaming stores, spans that start with a head block.
    "rows_of_three_streamed_mask": ((1400003, 3), -1, "float32", None, True),
    "nhwc_five_ghost": ((32, 20, 20, 5), -1, "float32", 4, False),
    "rows_of_twenty_four": ((20001, 24), -1, "float32", None, False),
    "rows_of_twenty_four_mask": ((20001, 24), -1, "float32", None, True),
    "rows_of_nine_mask": ((20001, 9), -1, "float32", None, True),
    "nhwc_forty_ghost": ((16, 10, 10, 40), -1, "float32", 4, False),
    "bfloat16": ((16, 48, 20, 20), 1, "bfloat16", None, False),
    "bfloat16_rows": ((16, 20, 20, 48), -1, "bfloat16", None, False),
    # Rows of many features in cache: two or three threads split the features, not the rows
    # (a block of features with a tail, a mask, float64, bfloat16).
    "wide_rows_split": ((128, 1000), -1, "float32", None, False),
    "wide_rows_split_mask": ((96, 1024), -1, "float32", None, True),
    "wide_rows_split_float64": ((64, 1024), -1, "float64", None, False),
    "wide_rows_split_bfloat16": ((64, 1536), -1, "bfloat16", None, False),
}

# Rows that overlap in memory (a strided view, rows 504 values apart): whole rows per thread, as
# a block of columns 504 wide would have taken other kernels than the full rows.
def overlapping(seed):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(40 * 504 + 1000) * 3.0 + 5.0
    return np.lib.stride_tricks.as_strided(base, (40, 1000), (504 * 8, 8))

out = {}
layer = batchnorm.BatchNormalization(momentum=0.9, dtype="float64")
y = layer(overlapping(100), training=True)
dx = layer.backward(overlapping(101))
out["overlapping_rows"] = {
    "y": digest(y), "dx": digest(dx), "dgamma": digest(layer.gradients["gamma"]),
    "dbeta": digest(layer.gradients["beta"]),
    "weight2": digest(layer.get_weights()[2]), "weight3": digest(layer.get_weights()[3])}
for seed, (name, (shape, axis, dtype, vbs, masked)) in enumerate(CASES.items()):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3.0 + 5.0)
    dy = rng.standard_normal(shape)
    if dtype == "bfloat16":
        import ml_dtypes
        x, dy = x.astype(ml_dtypes.bfloat16), dy.astype(ml_dtypes.bfloat16)
    else:
        x, dy = x.astype(dtype), dy.astype(dtype)
    mask = None
    if masked:
        positions = tuple(1 if i == axis % len(shape) else s for i, s in enumerate(shape))
        mask = rng.random(positions) < 0.7
    layer = batchnorm.BatchNormalization(
        axis=axis, momentum=0.9, virtual_batch_size=vbs,
        dtype="mixed_bfloat16" if dtype == "bfloat16" else dtype)
    y = layer(x, training=True, mask=mask)
    dx = layer.backward(dy)
    results = {"y": y, "dx": dx}
    results.update({"d" + k: v for k, v in layer.gradients.items()})
    for i, w in enumerate(layer.get_weights()):
        results[f"weight{i}"] = w
    results["inference"] = layer(x)
    results["inference_dx"] = layer.backward(dy)
    out[name] = {k: digest(v) for k, v in results.items()}
print(json.dumps(out))
"""


def _run(**env: str) -> dict[str, dict[str, str]]:
    package_root = str(Path(batchnorm.__file__).absolute().parent.parent)
    child_env = dict(os.environ)
    child_env.update(env)
    child_env["PYTHONPATH"] = os.pathsep.join(
        [package_root, *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    done = subprocess.run(
        [sys.executable, "-c", _CHILD],
        env=child_env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def one_thread() -> dict[str, dict[str, str]]:
    return _run(OMP_NUM_THREADS="1")


@pytest.mark.parametrize("threads", ["2", "3"])
def test_bitwise_identical_for_every_thread_count(one_thread, threads):
    many = _run(OMP_NUM_THREADS=threads)
    for case, results in one_thread.items():
        for name, digest in results.items():
            assert many[case][name] == digest, f"{case}: {name} differs with {threads} threads"


# Reductions add in the same order with the same operations on every instruction set, so the
# statistics and parameter gradients agree bitwise; elementwise outputs use a fused multiply-add
# where the instruction set has one (AVX2 and AVX-512 alike, not the portable baseline), so on
# AVX2 every output agrees too, bfloat16 ones included (each instruction set widens bfloat16
# inputs and rounds bfloat16 outputs with integer operations of its own).
_REDUCED = ("dgamma", "dbeta", "weight2", "weight3")


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_results_identical_on_every_instruction_set(one_thread, isa):
    other = _run(OMP_NUM_THREADS="2", BATCHNORM_CPU_ISA=isa)
    for case, results in one_thread.items():
        for name in results if isa == "avx2" else _REDUCED:
            assert other[case][name] == results[name], f"{case}: {name} differs with {isa}"


def test_concurrent_calls_match_a_lone_call():
    # Calls from several Python threads at once share the cores (each gets fewer threads than a
    # lone call): their results must still be bitwise those of a call made alone.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((32, 64, 24, 24)).astype(np.float32) * 3.0 + 5.0
    dy = rng.standard_normal(x.shape).astype(np.float32)

    def train(results, i):
        layer = batchnorm.BatchNormalization(axis=1)
        for _ in range(5):
            y = layer(x, training=True)
            dx = layer.backward(dy)
        results[i] = (y, dx)

    alone = {}
    train(alone, 0)
    together = {}
    threads = [threading.Thread(target=train, args=(together, i)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for y, dx in together.values():
        assert np.array_equal(y, alone[0][0]) and np.array_equal(dx, alone[0][1])
