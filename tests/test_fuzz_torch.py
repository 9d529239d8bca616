"""Property-based fuzzing of the PyTorch module (batchnorm.torch.BatchNormalization) with the
strategies of tests/test_fuzz.py: random shapes, axes, options, masks and strided tensors
(transposed, stepped, expanded), training and inference, then autograd's backward. Each case
matches the float64 reference or raises ValueError/TypeError with the module's state unchanged;
the input is never written. A quarter of the suite profile's cases (the module's calls cost more
than the layer's)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st
from test_fuzz import (
    ERRORS,
    TOLERANCE,
    assert_close,
    configs,
    dx_terms,
    make_adjustment,
    masks,
    random_weights,
    shapes,
)

from reference import ReferenceBN

torch = pytest.importorskip("torch")
bnt = pytest.importorskip("batchnorm.torch")
pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::RuntimeWarning")]


@st.composite
def tensors(draw: st.DrawFn) -> tuple[Any, str]:
    """A float32/float64 tensor of a random shape, stored contiguous, transposed, stepped or as a
    stride-0 expansion, with NaN/infinities now and then."""
    shape = draw(shapes(max_rank=5))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    layout = draw(
        st.sampled_from(["contiguous", "contiguous", "transposed", "stepped", "expanded"])
    )
    scale = draw(st.sampled_from([0.01, 1.0, 100.0]))

    def make(s: tuple[int, ...]) -> Any:
        values = rng.normal(0.5, scale, s)
        if values.size and draw(st.integers(0, 9)) == 0:
            values.flat[int(rng.integers(values.size))] = rng.choice([np.nan, np.inf, -np.inf])
        return torch.from_numpy(values.astype(dtype))

    if layout == "transposed" and len(shape) > 1:
        return make(shape[::-1]).permute(*reversed(range(len(shape)))), layout
    if layout == "stepped" and shape:
        return make((shape[0] * 2, *shape[1:]))[::2], layout
    if layout == "expanded" and shape and shape[0] > 1:
        return make((1, *shape[1:])).expand(shape), layout
    return make(shape), layout


def state(module: Any) -> list[bytes]:
    return [t.detach().numpy().tobytes() for t in module.state_dict().values()]


@settings(max_examples=max(1, settings().max_examples // 4))
@given(case=tensors(), data=st.data())
def test_torch_module_matches_the_reference_or_refuses(case: tuple[Any, str], data: Any) -> None:
    x, layout = case
    shape = tuple(x.shape)
    config = data.draw(configs(shape), label="config")
    mask = data.draw(masks(shape), label="mask")
    training = data.draw(st.booleans(), label="training")
    note(f"shape={shape} dtype={x.dtype} layout={layout} config={config} training={training}")
    kwargs = dict(config)
    if "adjustment" in config:
        kwargs["adjustment"] = make_adjustment(config["adjustment"])
    reference_kwargs = dict(kwargs)
    try:
        module = bnt.BatchNormalization(**kwargs)
    except ERRORS:
        with pytest.raises(ERRORS):
            ReferenceBN(**reference_kwargs).build(shape)
        return
    if x.dtype == torch.float64:
        module = module.double()
    module.train(training)
    reference = ReferenceBN(**reference_kwargs)
    x64 = x.double().numpy()
    x_before = x.clone()
    try:
        reference.build(shape)
        expected_error = None
    except ERRORS as error:
        expected_error = error
    if expected_error is None:
        module.initialize_parameters(x)  # the lazy build, with the reference's weights next
        seed = data.draw(st.integers(0, 2**31), label="weights")
        module.set_weights(
            random_weights(module.options.weight_names(), reference.weight_shape, seed)
        )
        reference.set_weights(module.get_weights())
        try:
            expected = reference.forward(x64, training=training, mask=mask)
        except ERRORS as error:
            expected_error = error
    torch_mask = None if mask is None else torch.from_numpy(np.asarray(mask))
    if expected_error is not None:
        before = state(module) if not module.has_uninitialized_params() else []
        with pytest.raises(ERRORS):
            module(x, mask=torch_mask)
        if before:
            assert state(module) == before, "a refused call changed the module's state"
        assert torch.equal(x.nan_to_num(), x_before.nan_to_num()), "a refused call wrote x"
        return

    # Autograd through contiguous inputs (a leaf); the strided views are forward-only.
    leaf = x.detach().clone().requires_grad_(layout == "contiguous")
    y = module(leaf if leaf.requires_grad else x, mask=torch_mask)
    tol = TOLERANCE[str(x.dtype).rpartition(".")[2]]
    assert_close(y.detach().numpy(), expected, tol, "y")
    for name, got, want in zip(
        module.options.weight_names(), module.get_weights(), reference.get_weights()
    ):
        assert_close(got, want, TOLERANCE["float32"] if x.dtype == torch.float32 else tol, name)
    if leaf.requires_grad and y.numel():
        dy = torch.from_numpy(np.random.default_rng(1).normal(size=shape).astype(np.float64))
        y.backward(dy.to(y.dtype))
        want_dx, want_dgamma, _ = reference.backward(dy.numpy())
        assert_close(leaf.grad.numpy(), want_dx, tol, "dx", scale=dx_terms(reference, dy.numpy()))
        gamma = module._parameters.get("gamma")
        if want_dgamma is not None and gamma is not None and gamma.grad is not None:
            sums = float(np.abs(dy.numpy()).sum()) + 1.0
            assert_close(gamma.grad.numpy(), want_dgamma.reshape(-1), tol * sums * 4, "dgamma")
    assert torch.equal(x.nan_to_num(), x_before.nan_to_num()), "the module wrote x"
