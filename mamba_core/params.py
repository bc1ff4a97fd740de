"""Parameter initialisation (the official Mamba scheme) and state-dict checking, in NumPy.

Initialisation is done in NumPy float64 from a seed and then cast, so the same seed gives
the same weights on every backend and every dtype (up to the dtype's rounding).

The official scheme (state-spaces/mamba `Mamba.__init__`, HuggingFace `MambaMixer`):
- `in_proj`, `x_proj`, `out_proj`, `conv1d`: PyTorch's default `nn.Linear` / `nn.Conv1d`
  init, weight and bias uniform in +-1/sqrt(fan_in) (fan_in = K for the depthwise conv);
- `dt_proj.weight` uniform in +-dt_rank**-0.5 * dt_scale;
- `dt_proj.bias` = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max], floored at
  dt_init_floor, so that softplus(bias) = dt at init;
- `A_log[e, n] = log(n + 1)` (S4D-real), `D = 1`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .config import MambaConfig
from .mixer import param_shapes

__all__ = ["check_state_dict", "init_params", "to_numpy"]


def init_params(config: MambaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Official-scheme parameters as float64 NumPy arrays, keyed by official names."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, received {type(seed).__name__} {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative int (0, 1, 2, ...), received {seed!r}")
    rng = np.random.default_rng(seed)
    shapes = param_shapes(config)
    h, e, n, r, k = config.dims

    def uniform(shape, bound):
        return rng.uniform(-bound, bound, size=shape)

    params: dict[str, np.ndarray] = {}
    params["in_proj.weight"] = uniform((2 * e, h), 1 / math.sqrt(h))
    if config.use_bias:
        params["in_proj.bias"] = uniform((2 * e,), 1 / math.sqrt(h))
    params["conv1d.weight"] = uniform((e, 1, k), 1 / math.sqrt(k))
    if config.use_conv_bias:
        params["conv1d.bias"] = uniform((e,), 1 / math.sqrt(k))
    params["x_proj.weight"] = uniform((r + 2 * n, e), 1 / math.sqrt(e))
    params["dt_proj.weight"] = uniform((e, r), r**-0.5 * config.dt_scale)
    log_lo, log_hi = math.log(config.dt_min), math.log(config.dt_max)
    dt = np.exp(rng.uniform(size=e) * (log_hi - log_lo) + log_lo)
    dt = np.maximum(dt, config.dt_init_floor)
    params["dt_proj.bias"] = dt + np.log(-np.expm1(-dt))  # inverse of softplus
    params["A_log"] = np.log(np.broadcast_to(np.arange(1, n + 1, dtype=np.float64), (e, n)))
    params["D"] = np.ones(e)
    params["out_proj.weight"] = uniform((h, e), 1 / math.sqrt(e))
    if config.use_bias:
        params["out_proj.bias"] = uniform((h,), 1 / math.sqrt(e))
    # keep the official state-dict order
    return {name: np.ascontiguousarray(params[name]) for name in shapes}


def to_numpy(value: Any) -> np.ndarray:
    """Any array-like (NumPy, JAX, PyTorch on any device, lists) -> a NumPy array.

    PyTorch tensors are detached and moved to the CPU; bfloat16 (which NumPy lacks) becomes
    float32, a lossless widening.
    """
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    out = np.asarray(value)
    if out.dtype.name == "bfloat16":  # ml_dtypes (JAX)
        out = out.astype(np.float32)
    return out


def _is_float_name(dtype: str) -> bool:
    return dtype in ("float16", "bfloat16", "float32", "float64")


def raise_mismatch(
    found: Mapping[str, tuple[tuple[int, ...], str]],
    expected: Mapping[str, tuple[int, ...]],
    *,
    config: MambaConfig,
    source: str | None = None,
) -> None:
    """Compare {name: (shape, dtype name)} with the expected {name: shape}; raise one
    `ValueError` listing every missing key, unexpected key and shape or dtype mismatch."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    problems = []
    for name, shape in expected.items():
        if name not in found:
            continue
        got_shape, got_dtype = found[name]
        if tuple(got_shape) != tuple(shape):
            problems.append(f"{name}: expected shape {shape}, received {tuple(got_shape)}")
        elif not _is_float_name(got_dtype):
            problems.append(f"{name}: expected a floating dtype, received {got_dtype}")
    if missing or unexpected or problems:
        where = f" {source!r}" if source else ""
        lines = [f"state dict{where} does not match the config:"]
        if missing:
            lines.append(f"  missing keys: {missing}")
        if unexpected:
            lines.append(f"  unexpected keys: {unexpected}")
        if problems:
            lines.append("  shape/dtype mismatches:")
            lines.extend(f"    {p}" for p in problems)
        lines.append(f"  (config: {config.describe()})")
        raise ValueError("\n".join(lines))


def check_state_dict(state_dict: Mapping[str, Any], config: MambaConfig) -> dict[str, np.ndarray]:
    """Validate keys and shapes against `config`; return NumPy arrays in official order.

    Raises one `ValueError` listing every missing key, unexpected key and shape mismatch
    (expected vs received), or a non-floating array.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"a state dict must be a mapping of parameter names to arrays, received "
            f"{type(state_dict).__name__}"
        )
    expected = param_shapes(config)
    arrays = {name: to_numpy(value) for name, value in state_dict.items()}
    found = {
        name: (tuple(a.shape), a.dtype.name if a.dtype.kind == "f" else str(a.dtype))
        for name, a in arrays.items()
    }
    raise_mismatch(found, expected, config=config)
    return {name: arrays[name] for name in expected}
