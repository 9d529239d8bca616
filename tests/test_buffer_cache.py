"""The cache of large output buffers: results from it are correct, independent and ordinary
arrays of their framework; freed results give their buffer back; the limit holds; nothing
leaks."""

from __future__ import annotations

import copy
import gc
import pickle
import sys
import threading
from collections.abc import Iterator

import numpy as np
import pytest

import batchnorm
from batchnorm import _arrays

from resident import resident_bytes

SHAPE = (16, 64, 32, 32)  # 4 MiB of float32: above the cache's threshold


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    """Each test starts from an empty cache under the default limit, and leaves it so."""
    gc.collect()
    batchnorm.empty_buffer_cache()
    limit = batchnorm.buffer_cache_info()["limit"]
    yield
    gc.collect()
    batchnorm.set_buffer_cache_limit(limit)
    batchnorm.empty_buffer_cache()


def data(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(1.0, 2.0, size=shape).astype(np.float32)


def test_results_are_correct_and_independent() -> None:
    x = data()
    layer = batchnorm.BatchNormalization(axis=1)
    expected = layer(x, training=True, out=np.empty_like(x))
    y1 = layer(x, training=True)
    y2 = layer(x, training=True)
    assert not np.shares_memory(y1, y2)
    np.testing.assert_array_equal(y1, expected)
    np.testing.assert_array_equal(y2, expected)
    y1[...] = 0.0  # writable, and the other result is unaffected
    np.testing.assert_array_equal(y2, expected)


def test_reuse_gives_back_the_freed_buffer() -> None:
    x = data()
    layer = batchnorm.BatchNormalization(axis=1)
    y = layer(x)
    pointer = y.ctypes.data
    assert pointer % 64 == 0
    del y
    info = batchnorm.buffer_cache_info()
    assert info["cached_buffers"] == 1 and info["cached_bytes"] >= x.nbytes
    again = layer(x)
    assert again.ctypes.data == pointer
    assert batchnorm.buffer_cache_info()["cached_buffers"] == 0


def test_views_keep_the_buffer_alive() -> None:
    layer = batchnorm.BatchNormalization(axis=1)
    x = data()
    y = layer(x)
    expected = y.copy()
    view = y[1:3]
    del y
    assert batchnorm.buffer_cache_info()["cached_buffers"] == 0  # the view still holds it
    other = layer(x + 1.0)
    assert not np.shares_memory(other, view)
    np.testing.assert_array_equal(view, expected[1:3])
    del view
    assert batchnorm.buffer_cache_info()["cached_buffers"] == 1


def test_results_pickle_and_copy_like_ordinary_arrays() -> None:
    y = batchnorm.BatchNormalization(axis=1)(data())
    for clone in (pickle.loads(pickle.dumps(y)), copy.deepcopy(y), copy.copy(y)):
        assert type(clone) is np.ndarray and clone.flags.writeable
        np.testing.assert_array_equal(clone, y)
        assert not np.shares_memory(clone, y)
    assert y.flags.writeable and y.flags.c_contiguous


def test_layout_follows_the_input() -> None:
    x = np.asfortranarray(data())
    y = batchnorm.BatchNormalization(axis=1)(x)
    assert y.flags.f_contiguous
    transposed = data().transpose(0, 2, 3, 1)  # NHWC view of NCHW data
    y = batchnorm.BatchNormalization(axis=-1)(transposed)
    assert y.strides == np.empty_like(transposed).strides


def test_subclasses_keep_their_type() -> None:
    x = data().view(np.ma.MaskedArray)
    before = batchnorm.buffer_cache_info()["misses"]
    y = batchnorm.BatchNormalization(axis=1)(x)
    assert type(y) is np.ma.MaskedArray
    assert batchnorm.buffer_cache_info()["misses"] == before


def test_backward_dx_comes_from_the_cache() -> None:
    x, dy = data(), data(seed=1)
    layer = batchnorm.BatchNormalization(axis=1)
    layer(x, training=True)
    expected = layer.backward(dy, out=np.empty_like(x))
    before = batchnorm.buffer_cache_info()
    dx = layer.backward(dy)
    np.testing.assert_array_equal(dx, expected)
    after = batchnorm.buffer_cache_info()
    assert after["hits"] + after["misses"] == before["hits"] + before["misses"] + 1


def test_bfloat16_results() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = data().astype(ml_dtypes.bfloat16)
    layer = batchnorm.BatchNormalization(axis=1)
    y = layer(x)
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(y, layer(x, out=np.empty_like(x)))


def test_small_results_bypass_the_cache() -> None:
    x = data((4, 8))
    layer = batchnorm.BatchNormalization()
    layer(x)
    before = batchnorm.buffer_cache_info()
    layer(x, training=True)
    layer.backward(x)
    after = batchnorm.buffer_cache_info()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])


def test_limit_is_honoured_and_empty_frees() -> None:
    layer = batchnorm.BatchNormalization(axis=1)
    x = data()
    results = [layer(x) for _ in range(4)]
    del results
    cached = batchnorm.buffer_cache_info()["cached_bytes"]
    assert cached >= 4 * x.nbytes
    previous = batchnorm.set_buffer_cache_limit(cached // 2)
    assert previous >= cached
    assert batchnorm.buffer_cache_info()["cached_bytes"] <= cached // 2
    batchnorm.set_buffer_cache_limit(0)
    del layer
    y = batchnorm.BatchNormalization(axis=1)(x)
    del y
    assert batchnorm.buffer_cache_info()["cached_bytes"] == 0  # nothing is kept under limit 0
    batchnorm.set_buffer_cache_limit(previous)
    results = [batchnorm.BatchNormalization(axis=1)(x) for _ in range(2)]
    del results
    assert batchnorm.empty_buffer_cache() >= 2 * x.nbytes
    assert batchnorm.buffer_cache_info()["cached_bytes"] == 0


def test_torch_results_are_ordinary_tensors() -> None:
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(data())
    layer = batchnorm.BatchNormalization(axis=1)
    expected = layer(x, out=torch.empty_like(x))
    y = layer(x)
    assert type(y) is torch.Tensor and not y.requires_grad and y.is_contiguous()
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    array = y.numpy()
    y.add_(1.0)  # in place, seen through the NumPy view of the same memory
    np.testing.assert_array_equal(array, (expected + 1.0).numpy())
    clone = pickle.loads(pickle.dumps(y))
    torch.testing.assert_close(clone, y, rtol=0, atol=0)
    channels_last = x.to(memory_format=torch.channels_last)
    z = layer(channels_last)
    assert z.is_contiguous(memory_format=torch.channels_last)
    del y, array, z
    assert batchnorm.buffer_cache_info()["cached_buffers"] == 2


def test_threads_allocate_concurrently() -> None:
    x = data()
    layer = batchnorm.BatchNormalization(axis=1)
    expected = layer(x, out=np.empty_like(x))
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                np.testing.assert_array_equal(layer(x), expected)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert batchnorm.buffer_cache_info()["cached_bytes"] <= batchnorm.buffer_cache_info()["limit"]


def test_no_growth_over_many_calls() -> None:
    x = data()
    layer = batchnorm.BatchNormalization(axis=1)
    for _ in range(5):
        y = layer(x, training=True)
        dx = layer.backward(x)
    del y, dx
    settled = batchnorm.buffer_cache_info()
    for _ in range(200):
        y = layer(x, training=True)
        dx = layer.backward(x)
    del y, dx
    info = batchnorm.buffer_cache_info()
    assert info["cached_bytes"] == settled["cached_bytes"]
    assert info["misses"] == settled["misses"]  # every later call reused a freed buffer


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_resident_memory_stays_flat() -> None:
    torch = pytest.importorskip("torch")
    x = data()
    for array in (x, torch.from_numpy(x)):
        layer = batchnorm.BatchNormalization(axis=1)
        for _ in range(5):
            y = layer(array, training=True)
            dx = layer.backward(array)
        start = resident_bytes()
        for _ in range(100):
            y = layer(array, training=True)
            dx = layer.backward(array)
        del y, dx
        assert resident_bytes() - start < x.nbytes


def test_dense_strides() -> None:
    assert _arrays.dense_strides((2, 3, 4), (48, 16, 4)) == [12, 4, 1]
    assert _arrays.dense_strides((2, 3, 4), (4, 8, 24)) == [1, 2, 6]
    assert _arrays.dense_strides((2, 3), (-12, 4)) == [3, 1]
