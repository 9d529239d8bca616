"""Record reference fixtures for ``batchnorm.BatchNormalization`` from the real Keras layers.

Run (needs TensorFlow, tf-keras and Keras 3 in a private environment; CI never runs this):

    /tmp/kenv/bin/python tests/keras_reference/record_cases.py

``--mask-axis1 DIR`` records only the ``k3_mask_axis1_*`` cases (``MASK_AXIS1_CASES`` below) into
``DIR`` instead of ``cases/``:

    /tmp/kenv/bin/python tests/keras_reference/record_cases.py --mask-axis1 /tmp/mask_cases

It drives the Keras ``BatchNormalization`` of

* tf-keras 2 (``import tf_keras``), always with ``fused=False``: tf-keras' fused kernel feeds a
  Bessel-corrected variance ``sigma^2 * n/(n-1)`` into the moving variance, which the project
  deliberately does not do (SPEC.md section 1); the non-fused path implements the documented
  formula. Case names start with ``k2_``.
* Keras 3 (``import keras``, TensorFlow backend). Case names start with ``k3_``. Keras 3 has
  no ``axis`` lists, ``virtual_batch_size``, ``adjustment`` or ``fused``; those cases are
  tf-keras only.

and writes one ``cases/<name>.npz`` per case, replayed by ``tests/test_keras_reference.py``
without TensorFlow. It also writes ``configs.json`` (``get_config()`` of a few layers of both
libraries, before and after build) for the ``from_config`` compatibility test.

Fixture format (the test depends on it exactly):

* ``meta``: 0-d unicode array holding JSON ``{"name", "library": "tf_keras"|"keras3",
  "library_version", "tensorflow_version", "config": {constructor kwargs}, "adjustment": bool,
  "input_shape": [...], "input_dtype": "float16"|"bfloat16" (only for 16-bit inputs),
  "output_dtype", "steps": [{"training", "has_mask", "sgd_lr"}], "n_weights"}``.
* ``w0_<i>``: the weights in Keras order after ``set_weights`` of random non-trivial values.
* ``adj_scale``/``adj_bias`` when ``adjustment`` is true (the layer gets
  ``adjustment=lambda shape: (adj_scale, adj_bias)``).
* per step ``s``: ``x_<s>``, ``mask_<s>`` (bool, only if has_mask), ``dy_<s>``, ``y_<s>``,
  ``dx_<s>`` = d sum(y*dy)/dx, ``dgamma_<s>``/``dbeta_<s>`` (gradient of sum(y*dy) only, without
  regularizer terms; only for present parameters), ``losses_<s>`` (the layer's regularization
  losses after the call, possibly empty), ``w_<s>_<i>`` (all weights after the step, after the
  SGD update when ``sgd_lr`` is set). 16-bit arrays are stored as float32 (exact values).

Facts about the two libraries this script relies on / documents (tf-keras 2.21, Keras 3.15):

* Regularizer string identifiers:
    - tf-keras 2: ``"l1"`` -> ``L1(l1=0.01)``, ``"l2"`` -> ``L2(l2=0.01)``, ``"l1_l2"`` ->
      ``L1L2(l1=0.01, l2=0.01)`` (special-cased: the ``L1L2`` class itself defaults to 0.0/0.0,
      so ``"L1L2"`` -> ``L1L2(0, 0)``). Factors are stored as float32 (config shows
      0.009999999776482582).
    - Keras 3: ``"l1"`` -> ``L1(l1=0.01)`` (factor kept as a float32 tensor; config shows
      0.009999999776482582), ``"l2"`` -> ``L2(l2=0.01)`` (python float 0.01). ``"l1_l2"`` is
      REJECTED (ValueError); ``"l1l2"`` / ``"L1L2"`` give ``L1L2(l1=0.0, l2=0.0)``, i.e. no
      penalty at all.
* Constraint strings ``"non_neg"``, ``"max_norm"`` (max_value=2, axis=0), ``"min_max_norm"``
  (0.0, 1.0, rate=1.0, axis=0), ``"unit_norm"`` (axis=0) mean the same in both libraries; both
  optimizers apply the constraint after the SGD update.
* Masks: both libraries accept ``mask`` in training and ignore it in inference. Both append the
  feature axis at the END of the mask (``expand_dims(mask, -1)``), so a mask is only meaningful
  for channels-last inputs, or for channels-first inputs when it is constant along the non-batch
  axes (per-sample masks ``(B,1)`` / ``(B,1,1)``). A ``(B,T)`` mask on ``(B,C,T)`` with ``axis=1``
  is silently mis-broadcast (or rejected), so those cases use per-sample masks. Keras 3 requires
  ``mask.ndim == x.ndim - 1`` and divides by ``count + 1e-7`` (relative effect < 1e-8 here).
  Keras 3's own convention for ``axis=1`` is a mask of the input's shape without its LAST axis:
  a ``(B,C)`` mask on ``(B,C,T)`` (or ``(B,C,H)`` on ``(B,C,H,W)``) is broadcast along that last
  axis, so channel ``c`` uses the positions ``(b, t)`` with ``mask[b, c]`` set and its count is
  the broadcast count ``T * sum_b mask[b, c]``. The ``k3_mask_axis1_*`` cases record it; they
  are kept out of ``cases/`` (``--mask-axis1``) until the layer implements that convention.
  tf-keras cannot combine masks with ``virtual_batch_size`` (the mask is not regrouped).
* ``virtual_batch_size`` (tf-keras) makes every weight full rank plus one: ``(1,1,C)`` for
  ``(N,C)``, ``(1,1,1,1,C)`` for NHWC, ``(1,1,C,1,1)`` for NCHW with axis=1, and shifts the stored
  ``axis`` by one at build (so ``get_config()`` after build reports e.g. ``axis=[4]`` for a rank-4
  input). ``axis`` lists give ``(1,H,1,C)``-style weights.
* 16-bit: a float32 layer fed float16/bfloat16 returns float32 in both libraries. Layer dtype
  ``"float16"``/``"bfloat16"``: tf-keras keeps float32 weights, Keras 3 keeps 16-bit weights
  (so its moving statistics are rounded to 16 bits; the test's 16-bit tolerance covers it).
* (*) tf-keras cannot run renorm in float64: ``tf.maximum(renorm_stddev, tf.sqrt(epsilon))``
  mixes a float64 variable with a float32 constant (InvalidArgumentError), so that case is
  Keras 3 only.
* tf-keras' ``NonNeg`` constraint fails on float64 weights (multiplies by a float32 mask).
* ``trainable=False``: tf-keras still reports the regularization losses of gamma/beta, Keras 3
  reports none. SPEC.md does not decide this, so no fixture combines trainable=False with
  regularizers.
"""

import json
import os
import sys
import zlib

# Make sure ``import keras`` is Keras 3 on the TensorFlow backend and that nothing redirects
# tf.keras; tf-keras 2 is imported explicitly by its own package name.
os.environ.pop("TF_USE_LEGACY_KERAS", None)
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

assert tf_keras.__version__.startswith("2."), tf_keras.__version__
assert keras.__version__.startswith("3."), keras.__version__
assert keras.backend.backend() == "tensorflow"

HERE = os.path.dirname(os.path.abspath(__file__))
CASES_DIR = os.path.join(HERE, "cases")

LIBS = {
    "k2": ("tf_keras", tf_keras),
    "k3": ("keras3", keras),
}

SIXTEEN_BIT = {"float16": tf.float16, "bfloat16": tf.bfloat16}


# ----------------------------------------------------------------------------------------------
# Case definitions
# ----------------------------------------------------------------------------------------------


def T(mask=False, sgd=None):
    """A training step."""
    return {"training": True, "mask": mask, "sgd_lr": sgd}


def I(mask=False, sgd=None, training=False):  # noqa: E743 - short name reads well in tables
    """An inference step (training=False, or None when asked)."""
    return {"training": training, "mask": mask, "sgd_lr": sgd}


def case(
    name,
    input_shape,
    config=None,
    steps=None,
    libs=("k2", "k3"),
    mask_shape=None,
    input_dtype=None,
    adjustment=False,
    scale_data="normal",
):
    return {
        "name": name,
        "input_shape": tuple(input_shape),
        "config": dict(config or {}),
        "steps": steps or [T(), T(), I()],
        "libs": libs,
        "mask_shape": mask_shape,
        "input_dtype": input_dtype,
        "adjustment": adjustment,
        "scale_data": scale_data,
    }


CLIP = {"rmax": 1.5, "rmin": 0.7, "dmax": 0.3}
K2 = ("k2",)

CASES = [
    # --- layouts ------------------------------------------------------------------------------
    case("2d", (16, 6)),
    case("2d_training_none", (16, 6), steps=[T(), I(training=None), T(), I()]),
    case("nhwc", (4, 5, 5, 3)),
    case("nchw", (4, 3, 5, 5), {"axis": 1}),
    case("nchw_axis_neg3", (4, 3, 5, 5), {"axis": -3}),
    case("nhwc_axis_3", (4, 5, 5, 3), {"axis": 3}),
    case("btc", (6, 7, 4)),
    case("bct", (6, 4, 7), {"axis": 1}),
    case("ncdhw", (3, 2, 4, 3, 5), {"axis": 1}),
    case("ndhwc", (3, 4, 3, 5, 2)),
    case("axis_1_3", (4, 3, 5, 6), {"axis": [1, 3]}, libs=K2),
    case("axis_m1_m2_3d", (5, 4, 3), {"axis": [-1, -2]}, libs=K2),
    case("axis_m1_m2_4d", (3, 4, 5, 6), {"axis": [-1, -2]}, libs=K2),
    case("axis_list_single", (4, 3, 5, 5), {"axis": [1]}, libs=K2),
    # --- float64 ------------------------------------------------------------------------------
    case("f64_2d", (16, 6), {"dtype": "float64"}),
    case("f64_nchw", (4, 3, 5, 5), {"axis": 1, "dtype": "float64"}),
    case("f64_btc", (6, 7, 4), {"dtype": "float64"}),
    case("f64_axis_1_3", (4, 3, 5, 6), {"axis": [1, 3], "dtype": "float64"}, libs=K2),
    # --- center / scale / trainable ---------------------------------------------------------
    case("nhwc_no_center", (4, 5, 5, 3), {"center": False}),
    case("nhwc_no_scale", (4, 5, 5, 3), {"scale": False}),
    case("nhwc_no_center_no_scale", (4, 5, 5, 3), {"center": False, "scale": False}),
    case("nhwc_frozen", (4, 5, 5, 3), {"trainable": False}, steps=[T(), T(), I()]),
    case(
        "nchw_frozen_renorm",
        (4, 3, 5, 5),
        {"axis": 1, "trainable": False, "renorm": True},
        steps=[T(), I()],
    ),
    # --- odd sizes ----------------------------------------------------------------------------
    case("batch1_nhwc", (1, 5, 5, 3)),
    case("batch1_2d", (1, 4)),
    case("primes_nhwc", (7, 5, 3, 11)),
    case("feature1_2d", (8, 1)),
    case("feature1_nchw", (4, 1, 5, 5), {"axis": 1}),
    # --- momentum / epsilon -------------------------------------------------------------------
    case("nhwc_mom09_eps1e5", (4, 5, 5, 3), {"momentum": 0.9, "epsilon": 1e-5}),
    case("2d_mom0_eps05", (16, 6), {"momentum": 0.0, "epsilon": 0.5}),
    case("2d_mom1", (16, 6), {"momentum": 1.0, "epsilon": 1e-2}),
    case("f64_2d_mom05_eps1e6", (16, 6), {"momentum": 0.5, "epsilon": 1e-6, "dtype": "float64"}),
    # --- masks (training uses them, inference ignores them) ---------------------------------
    case("mask_btc", (6, 7, 4), mask_shape=(6, 7), steps=[T(True), T(True), T(), I(True)]),
    case("mask_nhwc", (4, 5, 5, 3), mask_shape=(4, 5, 5), steps=[T(True), T(True), I(True)]),
    case(
        "mask_bct_per_sample",
        (6, 4, 7),
        {"axis": 1},
        mask_shape=(6, 1),
        steps=[T(True), T(True), I(True)],
    ),
    case(
        "mask_nchw_per_sample",
        (5, 3, 4, 4),
        {"axis": 1},
        mask_shape=(5, 1, 1),
        steps=[T(True), T(True), I(True)],
    ),
    case(
        "mask_btc_renorm",
        (6, 7, 4),
        {"renorm": True, "renorm_clipping": CLIP},
        mask_shape=(6, 7),
        steps=[T(True), T(True), I(True)],
    ),
    case(
        "f64_mask_btc",
        (6, 7, 4),
        {"dtype": "float64"},
        mask_shape=(6, 7),
        steps=[T(True), T(True), I(True)],
    ),
    case(
        "mask_btc_frozen",
        (6, 7, 4),
        {"trainable": False},
        mask_shape=(6, 7),
        steps=[T(True), I(True)],
    ),
    # --- batch renormalization ------------------------------------------------------------------
    case("renorm_nhwc", (4, 5, 5, 3), {"renorm": True}, steps=[T(), T(), T(), I()]),
    case(
        "renorm_clip_nhwc",
        (4, 5, 5, 3),
        {"renorm": True, "renorm_clipping": CLIP, "renorm_momentum": 0.9},
        steps=[T(), T(), T(), I()],
    ),
    case(
        "renorm_clip_2d",
        (16, 6),
        {"renorm": True, "renorm_clipping": CLIP, "renorm_momentum": 0.5, "momentum": 0.8},
        steps=[T(), T(), T(), I()],
    ),
    case(
        "renorm_clip_nchw",
        (4, 3, 5, 5),
        {"axis": 1, "renorm": True, "renorm_clipping": CLIP, "renorm_momentum": 0.9},
        steps=[T(), T(), I()],
    ),
    case(
        "renorm_rmax_only",
        (16, 6),
        {"renorm": True, "renorm_clipping": {"rmax": 1.2}},
        steps=[T(), T(), I()],
    ),
    case(
        "renorm_no_scale",
        (4, 5, 5, 3),
        {"renorm": True, "renorm_clipping": CLIP, "scale": False},
        steps=[T(), T(), I()],
    ),
    case(
        "renorm_no_center",
        (4, 5, 5, 3),
        {"renorm": True, "renorm_clipping": CLIP, "center": False},
        steps=[T(), T(), I()],
    ),
    case(
        "f64_renorm_clip_btc",
        (6, 7, 4),
        {"renorm": True, "renorm_clipping": CLIP, "renorm_momentum": 0.9, "dtype": "float64"},
        steps=[T(), T(), T(), I()],
        libs=("k3",),
    ),  # tf-keras: float64 renorm crashes (*)
    case(
        "renorm_axis_1_3",
        (4, 3, 5, 6),
        {"axis": [1, 3], "renorm": True, "renorm_clipping": CLIP},
        libs=K2,
    ),
    # --- ghost batches (tf-keras only) -----------------------------------------------------------
    case("ghost_2d", (12, 5), {"virtual_batch_size": 3}, libs=K2),
    case("ghost_nhwc", (6, 4, 4, 3), {"virtual_batch_size": 2}, libs=K2),
    case("ghost_nchw", (6, 3, 4, 4), {"axis": 1, "virtual_batch_size": 3}, libs=K2),
    case("ghost_btc_one_group", (4, 5, 3), {"virtual_batch_size": 4}, libs=K2),
    case(
        "ghost_renorm_nhwc",
        (6, 4, 4, 3),
        {"virtual_batch_size": 2, "renorm": True, "renorm_clipping": CLIP, "renorm_momentum": 0.9},
        steps=[T(), T(), T(), I()],
        libs=K2,
    ),
    case("ghost_no_center", (12, 5), {"virtual_batch_size": 4, "center": False}, libs=K2),
    case(
        "f64_ghost_nchw",
        (6, 3, 4, 4),
        {"axis": 1, "virtual_batch_size": 2, "dtype": "float64"},
        libs=K2,
    ),
    # --- adjustment (tf-keras only) ------------------------------------------------------------
    case("adjust_2d", (16, 6), adjustment=True, libs=K2),
    case("adjust_nhwc", (4, 5, 5, 3), adjustment=True, libs=K2),
    case(
        "adjust_renorm_nhwc",
        (4, 5, 5, 3),
        {"renorm": True, "renorm_clipping": CLIP},
        adjustment=True,
        steps=[T(), T(), I()],
        libs=K2,
    ),
    # --- regularizers, constraints, SGD ----------------------------------------------------------
    case(
        "reg_l2_l1_nonneg_maxnorm",
        (16, 6),
        {
            "gamma_regularizer": "l2",
            "beta_regularizer": "l1",
            "gamma_constraint": "non_neg",
            "beta_constraint": {"class_name": "MaxNorm", "config": {"max_value": 0.5, "axis": 0}},
        },
        steps=[T(sgd=0.1), T(sgd=0.1), I(sgd=0.1), I()],
    ),
    case(
        "reg_dicts_unitnorm_minmax",
        (4, 5, 5, 3),
        {
            "gamma_regularizer": {"class_name": "L1L2", "config": {"l1": 0.02, "l2": 0.03}},
            "beta_regularizer": {"class_name": "L2", "config": {"l2": 0.05}},
            "gamma_constraint": "unit_norm",
            "beta_constraint": {
                "class_name": "MinMaxNorm",
                "config": {"min_value": 0.5, "max_value": 1.0, "rate": 0.7, "axis": 0},
            },
        },
        steps=[T(sgd=0.1), T(sgd=0.1), I()],
    ),
    case(
        "reg_string_constraints",
        (4, 3, 5, 5),
        {
            "axis": 1,
            "gamma_regularizer": "l1",
            "beta_regularizer": "l2",
            "gamma_constraint": "max_norm",
            "beta_constraint": "min_max_norm",
        },
        steps=[T(sgd=0.1), T(sgd=0.1), I()],
    ),
    case(
        "reg_nonneg_class_dict",
        (16, 6),
        {
            "gamma_constraint": {"class_name": "NonNeg", "config": {}},
            "beta_constraint": "non_neg",
            "gamma_regularizer": "l2",
        },
        steps=[T(sgd=0.1), T(sgd=0.1), I()],
    ),
    case(
        "reg_l1_l2_string",
        (16, 6),
        {"gamma_regularizer": "l1_l2", "beta_regularizer": "l1_l2"},
        steps=[T(sgd=0.1), I()],
        libs=K2,
    ),
    case(
        "reg_renorm_sgd",
        (4, 5, 5, 3),
        {
            "renorm": True,
            "renorm_clipping": CLIP,
            "gamma_regularizer": "l2",
            "beta_regularizer": "l2",
            "gamma_constraint": "non_neg",
        },
        steps=[T(sgd=0.1), T(sgd=0.1), I()],
    ),
    case(
        "f64_reg_sgd",
        (16, 6),
        {
            "dtype": "float64",
            "gamma_regularizer": "l2",
            "beta_regularizer": "l1",
            # not "non_neg": tf-keras' NonNeg multiplies by a float32 mask and fails on float64
            "gamma_constraint": {"class_name": "MaxNorm", "config": {"max_value": 1.0, "axis": 0}},
            "beta_constraint": "unit_norm",
        },
        steps=[T(sgd=0.1), T(sgd=0.1), I()],
    ),
    case(
        "reg_sgd_no_center",
        (16, 6),
        {"center": False, "gamma_regularizer": "l2", "gamma_constraint": "non_neg"},
        steps=[T(sgd=0.1), T(sgd=0.1), I()],
    ),
    case(
        "ghost_reg_sgd",
        (12, 5),
        {
            "virtual_batch_size": 3,
            "gamma_regularizer": "l2",
            "beta_regularizer": "l1",
            "gamma_constraint": "non_neg",
        },
        steps=[T(sgd=0.1), T(sgd=0.1), I()],
        libs=K2,
    ),
    # --- 16-bit ---------------------------------------------------------------------------------
    case("f16_in_f32_layer", (4, 5, 5, 3), input_dtype="float16", scale_data="large"),
    case("bf16_in_f32_layer", (4, 5, 5, 3), input_dtype="bfloat16", scale_data="large"),
    case(
        "mixed_float16",
        (4, 5, 5, 3),
        {"dtype": "mixed_float16"},
        input_dtype="float16",
        scale_data="large",
    ),
    case(
        "mixed_bfloat16",
        (4, 5, 5, 3),
        {"dtype": "mixed_bfloat16"},
        input_dtype="bfloat16",
        scale_data="large",
    ),
    case(
        "float16_layer",
        (4, 5, 5, 3),
        {"dtype": "float16", "momentum": 0.5},
        input_dtype="float16",
        scale_data="large",
    ),
    case(
        "bfloat16_layer",
        (4, 5, 5, 3),
        {"dtype": "bfloat16", "momentum": 0.5},
        input_dtype="bfloat16",
        scale_data="large",
    ),
    case("mixed_float16_f32_input", (16, 6), {"dtype": "mixed_float16"}),
    case(
        "mixed_float16_renorm_nchw",
        (4, 3, 5, 5),
        {"axis": 1, "dtype": "mixed_float16", "renorm": True, "renorm_clipping": CLIP},
        input_dtype="float16",
        scale_data="large",
    ),
    case(
        "f16_mask_btc",
        (6, 7, 4),
        mask_shape=(6, 7),
        input_dtype="float16",
        scale_data="large",
        steps=[T(True), T(True), I(True)],
    ),
]

# Keras 3's axis=1 mask convention (see the module docstring): recorded only with --mask-axis1.
K3 = ("k3",)
MASK_AXIS1_STEPS = [T(True), T(True), T(True), I(True)]
MASK_AXIS1_CASES = [
    case(
        "mask_axis1_bct", (6, 5, 7), {"axis": 1}, mask_shape=(6, 5), steps=MASK_AXIS1_STEPS, libs=K3
    ),
    case(
        "mask_axis1_nchw",
        (4, 3, 5, 6),
        {"axis": 1},
        mask_shape=(4, 3, 5),
        steps=MASK_AXIS1_STEPS,
        libs=K3,
    ),
    case(
        "mask_axis1_bct_f64",
        (6, 5, 7),
        {"axis": 1, "dtype": "float64"},
        mask_shape=(6, 5),
        steps=MASK_AXIS1_STEPS,
        libs=K3,
    ),
]


# ----------------------------------------------------------------------------------------------
# Data generation
# ----------------------------------------------------------------------------------------------


def feature_axes(axis, rank):
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return sorted(a % rank for a in axes)


def feature_broadcast_shape(input_shape, axis):
    """Input shape with 1 at every reduced axis (the per-feature broadcast shape)."""
    rank = len(input_shape)
    fa = feature_axes(axis, rank)
    return tuple(input_shape[i] if i in fa else 1 for i in range(rank))


def round_to(arr, dtype_name):
    """Round float values to a 16-bit dtype and back to float32 (exact in both)."""
    if dtype_name is None:
        return arr
    return tf.cast(
        tf.cast(tf.constant(arr, tf.float32), SIXTEEN_BIT[dtype_name]), tf.float32
    ).numpy()


def make_input(rng, c, np_dtype):
    """Inputs with distinct per-feature means and scales so the statistics are non-trivial.

    "normal": means ~ 3 * N(0,1), stds in [0.5, 3]; "large": 16-bit stress data with values up
    to ~1e3 (means in +-600, stds in [5, 60]) so that a float16 variance would overflow.
    """
    fshape = feature_broadcast_shape(c["input_shape"], c["config"].get("axis", -1))
    if c["scale_data"] == "large":
        mean = rng.uniform(-600.0, 600.0, fshape)
        std = rng.uniform(5.0, 60.0, fshape)
    else:
        mean = 3.0 * rng.standard_normal(fshape)
        std = rng.uniform(0.5, 3.0, fshape)
    x = mean + std * rng.standard_normal(c["input_shape"])
    return round_to(x.astype(np_dtype), c["input_dtype"]).astype(np_dtype)


def make_dy(rng, c, np_dtype):
    """Upstream gradient with a non-zero per-feature mean (so dbeta is not ~0)."""
    fshape = feature_broadcast_shape(c["input_shape"], c["config"].get("axis", -1))
    dy = rng.uniform(-1.0, 1.0, fshape) + 1.5 * rng.standard_normal(c["input_shape"])
    # Round to the 16-bit type so the same dy is exactly representable whatever output dtype
    # the layer under test picks.
    return round_to(dy.astype(np_dtype), c["input_dtype"]).astype(np_dtype)


def make_mask(rng, mask_shape, min_valid=2):
    """Random boolean mask, ~70% valid, with at least `min_valid` valid positions."""
    while True:
        m = rng.random(mask_shape) < 0.7
        if m.sum() >= min_valid and not m.all():
            return m


def initial_weight_values(rng, names, shapes):
    """Non-trivial weights (by role) so that set_weights really matters."""
    values = {}
    for name, shape in zip(names, shapes):
        if name == "gamma":
            v = rng.uniform(0.5, 1.5, shape)
        elif name == "beta":
            v = rng.normal(0.0, 0.5, shape)
        elif name == "moving_mean":
            v = rng.normal(0.0, 1.0, shape)
        elif name == "moving_variance":
            v = rng.uniform(0.5, 2.0, shape)
        elif name == "moving_stddev":
            v = np.sqrt(values["moving_variance"]) * rng.uniform(0.9, 1.1, shape)
        elif name == "renorm_mean":
            v = values["moving_mean"] + rng.normal(0.0, 0.5, shape)
        elif name == "renorm_stddev":
            v = rng.uniform(0.5, 2.0, shape)
        else:
            raise ValueError(name)
        values[name] = v
    return [values[n] for n in names]


# ----------------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------------


def weight_role(w):
    return w.name.split("/")[-1].split(":")[0]


def to_np32(t):
    """Tensor -> numpy; 16-bit values widened to float32 (exactly)."""
    t = tf.convert_to_tensor(t)
    if t.dtype in (tf.float16, tf.bfloat16):
        t = tf.cast(t, tf.float32)
    return t.numpy()


def record(c, lib_key, out_dir=CASES_DIR):
    lib_name, lib = LIBS[lib_key]
    name = f"{lib_key}_{c['name']}"
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    config = dict(c["config"])
    kwargs = dict(config)
    if lib_key == "k2":
        kwargs["fused"] = False
        config["fused"] = False  # recorded so the replayed config is exactly what ran

    adj_scale = adj_bias = None
    if c["adjustment"]:
        n_feat = c["input_shape"][feature_axes(config.get("axis", -1), len(c["input_shape"]))[0]]
        adj_scale = rng.uniform(0.5, 1.5, (n_feat,)).astype(np.float32)
        adj_bias = rng.normal(0.0, 0.5, (n_feat,)).astype(np.float32)
        kwargs["adjustment"] = lambda shape: (tf.constant(adj_scale), tf.constant(adj_bias))

    layer = lib.layers.BatchNormalization(**kwargs)
    layer.build(c["input_shape"])
    roles = [weight_role(w) for w in layer.weights]
    shapes = [tuple(w.shape) for w in layer.weights]
    layer.set_weights(initial_weight_values(rng, roles, shapes))
    # Read back what the layer holds (Keras 3 16-bit layers round their weights to 16 bits).
    w0 = [to_np32(w) for w in layer.weights]

    float_dtype = np.float64 if config.get("dtype") == "float64" else np.float32
    tf_float = tf.float64 if float_dtype is np.float64 else tf.float32
    in_tf_dtype = SIXTEEN_BIT[c["input_dtype"]] if c["input_dtype"] else tf_float

    arrays = {f"w0_{i}": w for i, w in enumerate(w0)}
    if c["adjustment"]:
        arrays["adj_scale"], arrays["adj_bias"] = adj_scale, adj_bias

    params = [("gamma", layer.gamma), ("beta", layer.beta)]
    params = [(n, v) for n, v in params if v is not None]

    def handle(v):
        # Keras 3 wraps the tf.Variable; the tape must watch the real one.
        return v.value if lib_key == "k3" else v

    steps_meta = []
    output_dtype = None
    for s, step in enumerate(c["steps"]):
        x_np = make_input(rng, c, float_dtype)
        dy_np = make_dy(rng, c, float_dtype)
        mask_np = make_mask(rng, c["mask_shape"]) if step["mask"] else None
        x = tf.constant(x_np, dtype=in_tf_dtype)
        dy = tf.constant(dy_np, dtype=tf_float)
        call_kw = {"training": step["training"]}
        if mask_np is not None:
            call_kw["mask"] = tf.constant(mask_np)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            for _, v in params:
                tape.watch(handle(v))
            y = layer(x, **call_kw)
            main = tf.reduce_sum(tf.cast(y, tf_float) * dy)
            losses = [tf.cast(l_, tf.float64) for l_ in layer.losses]
            reg = tf.add_n(losses) if losses else tf.constant(0.0, tf.float64)
        grads = tape.gradient(main, [x] + [handle(v) for _, v in params])
        reg_grads = tape.gradient(reg, [handle(v) for _, v in params])
        del tape
        output_dtype = y.dtype.name

        arrays[f"x_{s}"] = to_np32(x) if c["input_dtype"] else x_np
        if mask_np is not None:
            arrays[f"mask_{s}"] = mask_np
        arrays[f"dy_{s}"] = dy_np
        arrays[f"y_{s}"] = to_np32(y)
        arrays[f"dx_{s}"] = to_np32(grads[0])
        for (pname, _), g in zip(params, grads[1:]):
            arrays[f"d{pname}_{s}"] = to_np32(g)
        arrays[f"losses_{s}"] = np.array([float(l_) for l_ in losses], dtype=np.float64)

        if step["sgd_lr"] is not None:
            total = []
            for g, rg in zip(grads[1:], reg_grads):
                total.append(g if rg is None else g + tf.cast(rg, g.dtype))
            before = [v.numpy().copy() for _, v in params]
            opt = lib.optimizers.SGD(learning_rate=step["sgd_lr"])
            opt.apply_gradients(list(zip(total, [v for _, v in params])))
            # Report whether a constraint actually changed the plain SGD result.
            for (pname, v), b, g in zip(params, before, total):
                plain = b - step["sgd_lr"] * g.numpy()
                if not np.allclose(plain, v.numpy(), rtol=1e-5, atol=1e-6):
                    print(f"  {name} step {s}: constraint on {pname} is active")

        for i, w in enumerate(layer.weights):
            arrays[f"w_{s}_{i}"] = to_np32(w)
        steps_meta.append(
            {
                "training": step["training"],
                "has_mask": mask_np is not None,
                "sgd_lr": step["sgd_lr"],
            }
        )

    meta = {
        "name": name,
        "library": lib_name,
        "library_version": lib.__version__,
        "tensorflow_version": tf.__version__,
        "config": config,
        "adjustment": bool(c["adjustment"]),
        "input_shape": list(c["input_shape"]),
        "output_dtype": output_dtype,
        "steps": steps_meta,
        "n_weights": len(w0),
        "weight_names": roles,
        "weight_shapes": [list(sh) for sh in shapes],
    }
    if c["input_dtype"]:
        meta["input_dtype"] = c["input_dtype"]
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(os.path.join(out_dir, name + ".npz"), **arrays)
    return name


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


def jsonable(obj):
    """Make get_config() output JSON-able (ListWrapper, tuples, numpy scalars)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "ListWrapper":
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def record_configs():
    rich = {
        "momentum": 0.9,
        "epsilon": 1e-5,
        "renorm": True,
        "renorm_clipping": dict(CLIP),
        "renorm_momentum": 0.95,
        "gamma_initializer": {"class_name": "Constant", "config": {"value": 0.5}},
        "beta_initializer": {
            "class_name": "RandomNormal",
            "config": {"mean": 0.0, "stddev": 0.1, "seed": 7},
        },
        "moving_variance_initializer": "ones",
        "gamma_regularizer": "l2",
        "beta_regularizer": {"class_name": "L1L2", "config": {"l1": 0.01, "l2": 0.02}},
        "gamma_constraint": "non_neg",
        "beta_constraint": {"class_name": "MaxNorm", "config": {"max_value": 1.5, "axis": 0}},
    }
    specs = [
        ("k2_default", tf_keras, {"fused": False}, (4, 5, 5, 3)),
        ("k2_default_fused_none", tf_keras, {}, (4, 5, 5, 3)),
        ("k2_rich", tf_keras, dict(rich), (4, 5, 5, 3)),
        ("k2_virtual_batch", tf_keras, {"virtual_batch_size": 2}, (4, 5, 5, 3)),
        ("k2_virtual_batch_nchw", tf_keras, {"virtual_batch_size": 2, "axis": 1}, (4, 3, 5, 5)),
        ("k2_axis_list", tf_keras, {"axis": [1, 3]}, (4, 3, 5, 6)),
        ("k2_mixed_float16", tf_keras, {"dtype": "mixed_float16"}, (4, 3)),
        ("k2_float64_nchw", tf_keras, {"dtype": "float64", "axis": 1}, (4, 3, 5, 5)),
        ("k3_default", keras, {}, (4, 5, 5, 3)),
        ("k3_rich", keras, dict(rich), (4, 5, 5, 3)),
        ("k3_nchw", keras, {"axis": 1}, (4, 3, 5, 5)),
        ("k3_mixed_bfloat16", keras, {"dtype": "mixed_bfloat16"}, (4, 3)),
        ("k3_float64", keras, {"dtype": "float64", "center": False}, (4, 3)),
    ]
    out = {}
    for name, lib, kwargs, shape in specs:
        # Explicit names keep configs.json stable across re-recordings.
        layer = lib.layers.BatchNormalization(name=name, **kwargs)
        out[name] = jsonable(layer.get_config())
        layer.build(shape)
        out[name + "_built"] = jsonable(layer.get_config())
    with open(os.path.join(HERE, "configs.json"), "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")
    return list(out)


def main(argv):
    if argv[1:2] == ["--mask-axis1"]:
        if len(argv) != 3:
            sys.exit("usage: record_cases.py --mask-axis1 DIR")
        os.makedirs(argv[2], exist_ok=True)
        written = [record(c, lib_key, argv[2]) for c in MASK_AXIS1_CASES for lib_key in c["libs"]]
        print(f"wrote {written} to {argv[2]} with Keras {keras.__version__}")
        return
    os.makedirs(CASES_DIR, exist_ok=True)
    only = set(argv[1:])
    if not only:
        # Full re-recording: drop fixtures of cases that no longer exist.
        for f in os.listdir(CASES_DIR):
            if f.endswith(".npz"):
                os.remove(os.path.join(CASES_DIR, f))
    written = []
    for c in CASES:
        for lib_key in c["libs"]:
            name = f"{lib_key}_{c['name']}"
            if only and name not in only:
                continue
            written.append(record(c, lib_key))
    if not only:
        names = record_configs()
        print(f"configs.json: {len(names)} entries")
    print(
        f"wrote {len(written)} cases with tf-keras {tf_keras.__version__}, "
        f"Keras {keras.__version__}, TensorFlow {tf.__version__}"
    )


if __name__ == "__main__":
    main(sys.argv)
