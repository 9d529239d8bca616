"""Replay the recorded Keras reference fixtures against ``batchnorm.BatchNormalization``.

The fixtures in ``tests/keras_reference/cases/*.npz`` were recorded from tf-keras 2 (``k2_*``,
``fused=False``) and Keras 3 (``k3_*``) by ``tests/keras_reference/record_cases.py``; see that
script for the file format. No TensorFlow is needed here.

For every case the layer is built with the recorded constructor arguments, given exactly the
recorded initial weights, and then every step is replayed: forward (output), backward (input
gradient and gamma/beta gradients of sum(y*dy)), regularization losses, an optional SGD step
(regularizer gradients + constraints included), and all weights after the step.

Tolerances (relative tolerance ``rtol`` per element, plus an absolute floor ``atol`` that is a
small fraction of the reference array's largest magnitude):

* float32: rtol 2e-4, atol 1e-5 * max|ref|. The floor exists only for elements that are
  near zero through cancellation (x - mean, the centred sums of the input gradient): their
  float32 rounding error is proportional to the magnitude of the whole array, not of the element.
  It is 20x tighter than rtol, so ordinary elements are held to rtol.
* float64: rtol 1e-7, atol 5e-8 * max|ref|. Keras evaluates some constants in float32 even
  for float64 layers: regularizer factors (0.01 -> 0.009999999776, both versions) and
  tf-keras' moving-average decay ``1 - momentum``; Keras 3's masked moments divide by
  ``count + 1e-7``. These relative ~2e-8 deviations propagate into array-scale absolute
  differences (seen up to ~1e-8 * max|ref| on near-zero outputs after an SGD step).
* 16-bit (16-bit inputs or a 16-bit/mixed dtype policy): float16 rtol 1e-2, bfloat16 rtol 2e-2,
  atol 2e-3 * max|ref|. Two implementations that round slightly different float32 values to
  16 bits can disagree by one unit in the last place: 2**-10 (~1e-3) relative for float16,
  up to 2**-7 (~8e-3) for bfloat16, so bfloat16 needs ~2.5 ulp of room. Keras 3 16-bit layers
  also keep 16-bit weights (rounded moving statistics) while this package keeps float32.

The gamma/beta gradients are sums over the ``n`` reduced positions of each feature. Their
rounding error scales with the sum of the magnitudes of the terms, about ``sqrt(n)`` times the
typical result (terms of random sign), so for them the atol floor above is multiplied by
``sqrt(n)``. This matters only for near-zero gradient entries; measured against an exact
float64 model, tf-keras' own float32 dgamma already uses half of the unscaled floor
(e.g. -0.39614 vs -0.39624 next to 12.86 for n=180).
"""

import json
import pathlib

import numpy as np
import pytest

from batchnorm import BatchNormalization

HERE = pathlib.Path(__file__).resolve().parent / "keras_reference"
CASE_FILES = sorted((HERE / "cases").glob("*.npz"))
CONFIGS = json.loads((HERE / "configs.json").read_text())

SIXTEEN_BIT_DTYPES = {"float16", "bfloat16", "mixed_float16", "mixed_bfloat16"}


def _load(path):
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop("meta")))
    return meta, arrays


def _np_dtype(name):
    if name == "bfloat16":
        import ml_dtypes  # test dependency (pyproject: [project.optional-dependencies] test)

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _tolerance(meta):
    layer_dtype = meta["config"].get("dtype")
    if meta.get("input_dtype") or layer_dtype in SIXTEEN_BIT_DTYPES:
        bf16 = "bfloat16" in (meta.get("input_dtype"), meta["output_dtype"])
        return (2e-2 if bf16 else 1e-2), 2e-3
    if layer_dtype == "float64":
        return 1e-7, 5e-8
    return 2e-4, 1e-5


def _close(what, got, ref, tol):
    rtol, atol_frac = tol
    got = np.asarray(got)
    if got.dtype.kind not in "fiub":  # e.g. ml_dtypes.bfloat16
        got = got.astype(np.float32)
    got = got.astype(np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.size == ref.size, f"{what}: size {got.shape} != reference {ref.shape}"
    # Weights/gradients may use another Keras layout (e.g. (1,1,C) with virtual_batch_size):
    # same values in the same order, only singleton axes differ.
    got = got.reshape(ref.shape)
    atol = atol_frac * float(np.abs(ref).max()) if ref.size else 0.0
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol, err_msg=what)


def _output_dtype_is_specified(meta):
    # A float32 layer fed 16-bit inputs returns float32 in both Keras versions, while this
    # package keeps the input's 16-bit dtype (docs/numerics.md); values are compared, the
    # dtype is not.
    return not (meta.get("input_dtype") and meta["config"].get("dtype") in (None, "float32"))


def test_fixtures_present():
    # An empty parametrization would silently pass; the recorder writes 133 cases.
    assert len(CASE_FILES) >= 100 and len(CONFIGS) >= 20


@pytest.mark.parametrize("path", CASE_FILES, ids=[p.stem for p in CASE_FILES])
def test_keras_reference_case(path):
    meta, a = _load(path)
    tol = _tolerance(meta)
    kwargs = dict(meta["config"])
    if meta["adjustment"]:
        adj_scale, adj_bias = a["adj_scale"], a["adj_bias"]
        kwargs["adjustment"] = lambda shape: (adj_scale, adj_bias)

    layer = BatchNormalization(**kwargs)
    layer.build(tuple(meta["input_shape"]))
    n = meta["n_weights"]
    w0 = [a[f"w0_{i}"] for i in range(n)]
    assert len(layer.get_weights()) == n
    # Passed as recorded: set_weights accepts same-size arrays in another Keras layout
    # (tf-keras gives (1,1,C) etc. with virtual_batch_size).
    layer.set_weights(w0)
    for i, (got, ref) in enumerate(zip(layer.get_weights(), w0)):
        _close(f"w0_{i}", got, ref, tol)

    present = [
        p
        for p, on in (("gamma", kwargs.get("scale", True)), ("beta", kwargs.get("center", True)))
        if on
    ]
    in_dtype = _np_dtype(meta["input_dtype"]) if meta.get("input_dtype") else None

    for s, step in enumerate(meta["steps"]):
        where = f"{meta['name']} step {s}"
        x = a[f"x_{s}"]
        if in_dtype is not None:
            x = x.astype(in_dtype)  # exact: the recorded values are 16-bit values
        call_kw = {"training": step["training"]}
        if step["has_mask"]:
            call_kw["mask"] = a[f"mask_{s}"]
        y = layer(x, **call_kw)
        if _output_dtype_is_specified(meta):
            assert np.asarray(y).dtype == _np_dtype(meta["output_dtype"]), where
        _close(f"{where}: y", y, a[f"y_{s}"], tol)

        dy = a[f"dy_{s}"].astype(np.asarray(y).dtype)  # exact for 16-bit outputs as well
        dx = layer.backward(dy)
        _close(f"{where}: dx", dx, a[f"dx_{s}"], tol)

        grads = layer.gradients
        assert sorted(grads) == sorted(present), where
        n_reduced = x.size // a["w0_0"].size  # every weight has one entry per feature
        tol_sum = (tol[0], tol[1] * np.sqrt(n_reduced))
        for p in present:
            _close(f"{where}: d{p}", grads[p], a[f"d{p}_{s}"], tol_sum)

        losses = [float(v) for v in layer.losses]
        ref_losses = a[f"losses_{s}"]
        assert len(losses) == len(ref_losses), f"{where}: losses {losses} vs {ref_losses}"
        _close(f"{where}: losses", np.array(losses), ref_losses, tol)

        if step["sgd_lr"] is not None:
            layer.apply_gradients(step["sgd_lr"])

        weights = layer.get_weights()
        assert len(weights) == n, where
        for i, got in enumerate(weights):
            _close(f"{where}: weight {i} ({meta['weight_names'][i]})", got, a[f"w_{s}_{i}"], tol)


# ---------------------------------------------------------------------------------------------
# Configs written by tf-keras 2 and Keras 3 (before and after build)
# ---------------------------------------------------------------------------------------------

OBJECT_KEYS = [
    "beta_initializer",
    "gamma_initializer",
    "moving_mean_initializer",
    "moving_variance_initializer",
    "beta_regularizer",
    "gamma_regularizer",
    "beta_constraint",
    "gamma_constraint",
]


def _same_object(what, ours, keras):
    """Our serialized initializer/regularizer/constraint describes the same object as Keras'."""
    if keras is None:
        assert ours is None, what
        return
    assert isinstance(ours, dict), f"{what}: {ours!r}"
    assert ours["class_name"] == keras["class_name"], what
    for k, v in keras.get("config", {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            assert ours["config"][k] == pytest.approx(v, rel=1e-6), f"{what}.{k}"
        else:
            assert ours["config"][k] == v, f"{what}.{k}"


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_keras_config_from_config(key):
    cfg = CONFIGS[key]
    layer = BatchNormalization.from_config(cfg)
    ours = layer.get_config()

    axis = cfg["axis"]
    assert ours["axis"] == axis or list(np.atleast_1d(ours["axis"])) == list(np.atleast_1d(axis))
    for k in ("momentum", "epsilon"):
        assert ours[k] == pytest.approx(cfg[k]), k
    for k in ("center", "scale", "trainable", "name"):
        assert ours[k] == cfg[k], k
    assert ours["renorm"] == cfg.get("renorm", False)
    if cfg.get("renorm"):
        assert ours["renorm_clipping"] == cfg["renorm_clipping"]
        assert ours["renorm_momentum"] == pytest.approx(cfg["renorm_momentum"])
    assert ours.get("virtual_batch_size") == cfg.get("virtual_batch_size")
    for k in OBJECT_KEYS:
        _same_object(f"{key}.{k}", ours[k], cfg[k])

    # Our own config round-trips.
    again = BatchNormalization.from_config(ours)
    assert again.get_config() == ours
