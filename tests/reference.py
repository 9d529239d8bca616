"""Float64 NumPy reference of Keras' BatchNormalization math (training and inference forward,
moving statistics, masks, ghost batches, batch renormalization, adjustment, backward): the
test oracle.

Written for clarity rather than speed: ghost batches are an explicit loop, masks are explicit
0/1 weights, every formula appears once in its textbook form.

Where Keras leaves room, this reference decides (as docs/numerics.md does):
- adjustment terms are broadcast to the Keras weight shape ((C,) for one feature axis), so a
  (C,) pair works for any axis;
- mask values must be booleans or 0/1 (anything else is an error); a mask of rank ndim - 1 is
  Keras' form (the input's leading axes, broadcast along the last axis), one of rank ndim has
  each dimension equal to the input's or 1;
- with masks and ghost batches, the moving update and renorm's r, d use the mean over the
  ghost batches that have valid positions; if no position is valid at all, r, d come from
  μ = σ² = 0 (what Keras' masked moments give) and every moving/renorm statistic is kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

Adjustment = Callable[[tuple[int, ...]], tuple[Any, Any]]


class ReferenceBN:
    """Keras BatchNormalization semantics in float64 (forward, moving updates, backward)."""

    def __init__(
        self,
        *,
        axis: int | Sequence[int] = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        renorm: bool = False,
        renorm_clipping: dict[str, float] | None = None,
        renorm_momentum: float = 0.99,
        virtual_batch_size: int | None = None,
        adjustment: Adjustment | None = None,
        trainable: bool = True,
    ) -> None:
        if isinstance(axis, (list, tuple)):
            axes = list(axis)
        else:
            axes = [axis]
        if not axes or not all(
            isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in axes
        ):
            raise TypeError(f"axis must be an int or a non-empty list of ints, got {axis!r}")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        for name, m in (("momentum", momentum), ("renorm_momentum", renorm_momentum)):
            if not 0.0 <= m <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {m}")
        clipping = dict(renorm_clipping or {})
        unknown = set(clipping) - {"rmax", "rmin", "dmax"}
        if unknown:
            raise ValueError(f"renorm_clipping has unknown keys {sorted(unknown)}")
        if clipping.get("rmax") is not None and clipping.get("rmin") is not None:
            if clipping["rmax"] < clipping["rmin"]:
                raise ValueError("renorm_clipping: rmax < rmin")
        if clipping.get("dmax") is not None and clipping["dmax"] < 0:
            raise ValueError("renorm_clipping: dmax < 0")
        if virtual_batch_size is not None:
            if int(virtual_batch_size) != virtual_batch_size or virtual_batch_size <= 0:
                raise ValueError(
                    f"virtual_batch_size must be a positive int, got {virtual_batch_size!r}"
                )
            if adjustment is not None:
                raise ValueError("virtual_batch_size cannot be combined with adjustment")
        self.axis_arg = [int(a) for a in axes]
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = center
        self.scale = scale
        self.renorm = renorm
        self.renorm_clipping = clipping
        self.renorm_momentum = float(renorm_momentum)
        self.virtual_batch_size = None if virtual_batch_size is None else int(virtual_batch_size)
        self.adjustment = adjustment
        self.trainable = trainable
        self.built = False
        self._cache: dict[str, Any] | None = None

    # ------------------------------------------------------------------ build / weights
    def build(self, input_shape: Sequence[int]) -> None:
        shape = tuple(int(d) for d in input_shape)
        ndim = len(shape)
        axes = []
        for a in self.axis_arg:
            if not -ndim <= a < ndim:
                raise ValueError(f"axis {a} out of range for input rank {ndim}")
            axes.append(a % ndim)
        if len(set(axes)) != len(axes):
            raise ValueError(f"duplicate axes in {self.axis_arg} for input rank {ndim}")
        if self.virtual_batch_size is not None and 0 in axes:
            raise ValueError("axis 0 cannot be a feature axis with virtual_batch_size")
        self.ndim = ndim
        self.axes = tuple(sorted(axes))
        self.reduced_axes = tuple(a for a in range(ndim) if a not in self.axes)
        # bshape: full rank, feature sizes at feature axes, 1 elsewhere (broadcasts with x).
        bshape = [1] * ndim
        for a in self.axes:
            bshape[a] = shape[a]
        self.param_shape = tuple(bshape)
        # Keras weight shape: (C,) for one feature axis, the full-rank bshape otherwise.
        self.weight_shape = (shape[self.axes[0]],) if len(self.axes) == 1 else self.param_shape
        ws = self.weight_shape
        self.gamma = np.ones(ws) if self.scale else None
        self.beta = np.zeros(ws) if self.center else None
        self.moving_mean = np.zeros(ws)
        self.moving_variance = np.ones(ws)
        if self.renorm:
            self.moving_stddev = np.sqrt(self.moving_variance)
            self.renorm_mean = self.moving_mean.copy()
            self.renorm_stddev = np.sqrt(self.moving_variance)
        self.built = True

    def _weight_names(self) -> list[str]:
        names = []
        if self.scale:
            names.append("gamma")
        if self.center:
            names.append("beta")
        names += ["moving_mean", "moving_variance"]
        if self.renorm:
            names += ["moving_stddev", "renorm_mean", "renorm_stddev"]
        return names

    def get_weights(self) -> list[np.ndarray]:
        return [getattr(self, n).copy() for n in self._weight_names()]

    def set_weights(self, weights: Sequence[Any]) -> None:
        names = self._weight_names()
        if len(weights) != len(names):
            raise ValueError(f"expected {len(names)} weights ({names}), got {len(weights)}")
        size = int(np.prod(self.weight_shape))
        new = []
        for n, w in zip(names, weights):
            arr = np.asarray(w, dtype=np.float64)
            if arr.size != size:
                raise ValueError(f"weight {n}: expected {size} elements, got shape {arr.shape}")
            new.append(arr.reshape(self.weight_shape).copy())
        for n, arr in zip(names, new):  # all checked first: nothing changes on error
            setattr(self, n, arr)

    def _b(self, w: np.ndarray) -> np.ndarray:
        """A weight (or anything of weight size) in the shape that broadcasts with x."""
        return np.reshape(w, self.param_shape)

    def _to_weight(self, a: np.ndarray) -> np.ndarray:
        return np.reshape(a, self.weight_shape)

    def _gamma_b(self) -> np.ndarray:
        return self._b(self.gamma) if self.scale else np.ones(self.param_shape)

    def _beta_b(self) -> np.ndarray:
        return self._b(self.beta) if self.center else np.zeros(self.param_shape)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Any, training: bool = False, mask: Any = None) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if not self.built:
            self.build(x.shape)
        if x.ndim != self.ndim or any(x.shape[a] != self.param_shape[a] for a in self.axes):
            raise ValueError(f"input shape {x.shape} does not match the built layer")
        if training and self.trainable:
            return self._forward_training(x, mask)
        return self._forward_inference(x)

    def _forward_inference(self, x: np.ndarray) -> np.ndarray:
        mean = self._b(self.moving_mean)
        inv_std = 1.0 / np.sqrt(self._b(self.moving_variance) + self.epsilon)
        gamma = self._gamma_b()
        y = (x - mean) * (gamma * inv_std) + self._beta_b()
        self._cache = {
            "mode": "inference",
            "x": x,
            "mean": mean,
            "inv_std": inv_std,
            "gamma": gamma,
        }
        return y

    def _mask_weights(self, shape: tuple[int, ...], mask: Any) -> np.ndarray:
        """0/1 float array of the input shape: 1 where a position counts for statistics."""
        if mask is None:
            return np.ones(shape)
        m = np.asarray(mask)
        if m.dtype != bool:
            if not np.all((m == 0) | (m == 1)):
                raise ValueError("mask values must be booleans or 0/1")
        m = m.astype(np.float64)
        if m.ndim == len(shape) - 1:
            m = m[..., None]  # Keras: the leading axes, broadcast along the last axis
        elif m.ndim != len(shape):
            raise ValueError(f"mask of rank {m.ndim} for an input of rank {len(shape)}")
        try:
            return np.broadcast_to(m, shape).copy()  # equal ranks: each dim equal or 1
        except ValueError as exc:
            raise ValueError(
                f"mask of shape {np.shape(mask)} does not fit the input shape {shape}"
            ) from exc

    def _ghost_groups(self, n: int) -> list[np.ndarray]:
        """Sample indices of each ghost batch (one group = the whole batch without ghosts)."""
        if self.virtual_batch_size is None:
            return [np.arange(n)]
        v = self.virtual_batch_size
        if n % v != 0:
            raise ValueError(f"batch size {n} is not a multiple of virtual_batch_size {v}")
        g = n // v
        # Keras views the batch as (V, G, ...): sample v*G + j lies in ghost batch j, so ghost
        # batch j holds samples j, j+G, j+2G, ... (interleaved).
        return [np.arange(j, n, g) for j in range(g)]

    def _renorm_correction(
        self, mean: np.ndarray, var: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """r, d of §4 from the batch statistics and the pre-update renorm statistics."""
        s = np.sqrt(var + self.epsilon)
        s_hat = np.maximum(self._b(self.renorm_stddev), math.sqrt(self.epsilon))
        r = s / s_hat
        d = (mean - self._b(self.renorm_mean)) / s_hat
        c = self.renorm_clipping
        if c.get("rmin") is not None:
            r = np.maximum(r, c["rmin"])
        if c.get("rmax") is not None:
            r = np.minimum(r, c["rmax"])
        if c.get("dmax") is not None:
            d = np.clip(d, -c["dmax"], c["dmax"])
        return r, d

    def _adjustment_terms(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        if self.adjustment is None:
            return np.ones(self.param_shape), np.zeros(self.param_shape)
        a_s, a_b = self.adjustment(shape)
        # "Broadcastable to the feature shape" = to the Keras weight shape.
        a_s = self._b(np.broadcast_to(np.asarray(a_s, dtype=np.float64), self.weight_shape))
        a_b = self._b(np.broadcast_to(np.asarray(a_b, dtype=np.float64), self.weight_shape))
        return a_s, a_b

    def _forward_training(self, x: np.ndarray, mask: Any) -> np.ndarray:
        R = self.reduced_axes
        valid = self._mask_weights(x.shape, mask)
        groups = []
        for idx in self._ghost_groups(x.shape[0]):
            xg, wg = x[idx], valid[idx]
            count = wg.sum(axis=R, keepdims=True)  # per feature
            has = count > 0
            safe = np.where(has, count, 1.0)
            # Masked positions are excluded with where(), so NaN there cannot leak in.
            mean = np.where(wg > 0, xg, 0.0).sum(axis=R, keepdims=True) / safe
            mean = np.where(has, mean, 0.0)  # no valid position: μ = 0 (as Keras)
            var = np.where(wg > 0, (xg - mean) ** 2, 0.0).sum(axis=R, keepdims=True) / safe
            var = np.where(has, var, 0.0)  # ... and σ² = 0
            groups.append(
                {"idx": idx, "w": wg, "count": count, "has": has, "mean": mean, "var": var}
            )

        # Statistics for the moving update and renorm: mean over the ghost batches that
        # have valid positions of their means and of their (biased) variances.
        zeros = np.zeros(self.param_shape)
        n_valid = sum((g["has"].astype(np.float64) for g in groups), zeros)
        sum_mean = sum((np.where(g["has"], g["mean"], 0.0) for g in groups), zeros)
        sum_var = sum((np.where(g["has"], g["var"], 0.0) for g in groups), zeros)
        any_valid = n_valid > 0
        denom = np.where(any_valid, n_valid, 1.0)
        batch_mean = sum_mean / denom
        batch_var = sum_var / denom

        if self.renorm:
            r, d = self._renorm_correction(batch_mean, batch_var)
        else:
            r, d = np.ones(self.param_shape), np.zeros(self.param_shape)
        a_s, a_b = self._adjustment_terms(x.shape)
        gamma, beta = self._gamma_b(), self._beta_b()

        y = np.empty_like(x)
        z = np.empty_like(x)  # the value multiplied by gamma
        for g in groups:
            idx = g["idx"]
            s = np.sqrt(g["var"] + self.epsilon)
            xhat = (x[idx] - g["mean"]) / s
            z[idx] = (xhat * r + d) * a_s + a_b
            y[idx] = z[idx] * gamma + beta
            g["s"], g["xhat"] = s, xhat

        self._cache = {
            "mode": "training",
            "groups": groups,
            "k": r * a_s,
            # Kept for tests: the renorm correction and the statistics it came from.
            "r": r,
            "d": d,
            "batch_mean": batch_mean,
            "batch_var": batch_var,
            "z": z,
            "gamma": gamma,
            "x_shape": x.shape,
        }
        self._update_moving(batch_mean, batch_var, any_valid)
        return y

    def _update_moving(self, mean: np.ndarray, var: np.ndarray, valid: np.ndarray) -> None:
        """§3/§4 updates, per feature, only where some position was valid."""
        m, rm, eps = self.momentum, self.renorm_momentum, self.epsilon
        valid = self._to_weight(valid)
        mean, var = self._to_weight(mean), self._to_weight(var)

        def keep_or(new: np.ndarray, old: np.ndarray) -> np.ndarray:
            return np.where(valid, new, old)

        if not self.renorm:
            self.moving_mean = keep_or(self.moving_mean * m + mean * (1 - m), self.moving_mean)
            self.moving_variance = keep_or(
                self.moving_variance * m + var * (1 - m), self.moving_variance
            )
            return
        s = np.sqrt(var + eps)
        self.renorm_mean = keep_or(self.renorm_mean * rm + mean * (1 - rm), self.renorm_mean)
        self.renorm_stddev = keep_or(self.renorm_stddev * rm + s * (1 - rm), self.renorm_stddev)
        self.moving_mean = keep_or(self.moving_mean * m + mean * (1 - m), self.moving_mean)
        self.moving_stddev = keep_or(self.moving_stddev * m + s * (1 - m), self.moving_stddev)
        self.moving_variance = keep_or(
            np.maximum(self.moving_stddev**2 - eps, 0.0), self.moving_variance
        )

    # ------------------------------------------------------------------ backward
    def backward(self, dy: Any) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(dx, dgamma, dbeta) of the last forward; dgamma/dbeta None when absent."""
        c = self._cache
        if c is None:
            raise RuntimeError("backward() needs a forward() first")
        dy = np.asarray(dy, dtype=np.float64)
        R = self.reduced_axes
        if c["mode"] == "inference":
            x = c["x"]
            if dy.shape != x.shape:
                raise ValueError(f"dy shape {dy.shape} != input shape {x.shape}")
            dx = dy * c["gamma"] * c["inv_std"]
            dgamma = (dy * (x - c["mean"]) * c["inv_std"]).sum(axis=R, keepdims=True)
        else:
            if dy.shape != c["x_shape"]:
                raise ValueError(f"dy shape {dy.shape} != input shape {c['x_shape']}")
            dx = np.empty_like(dy)
            for g in c["groups"]:
                idx, s, xhat = g["idx"], g["s"], g["xhat"]
                gg = dy[idx] * c["gamma"] * c["k"]
                # Sums run over all positions: masked outputs depend on μ, σ² too.
                sum_g = gg.sum(axis=R, keepdims=True)
                sum_gx = (gg * xhat).sum(axis=R, keepdims=True)
                safe = np.where(g["has"], g["count"], 1.0)
                # With no valid position μ, σ² are the constants 0: no correction at all.
                corr = np.where(g["has"], (sum_g + xhat * sum_gx) / (safe * s), 0.0)
                # Masked positions feed no statistic: no correction (not 0 * corr, which a NaN
                # or infinity elsewhere in the feature would make NaN).
                dx[idx] = gg / s - np.where(g["w"] > 0, corr, 0.0)
            dgamma = (dy * c["z"]).sum(axis=R, keepdims=True)
        dbeta = dy.sum(axis=R, keepdims=True)
        return (
            dx,
            self._to_weight(dgamma) if self.scale else None,
            self._to_weight(dbeta) if self.center else None,
        )
