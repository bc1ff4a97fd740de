"""Parameter initialisation and state-dict checking, in NumPy.

Initialisation is done in NumPy float64 from a seed and then cast, so the same seed gives
the same weights on every backend and every dtype (up to the dtype's rounding).  Each mixer
writes its own official scheme (`mamba_core.mixers.mamba1.init_params`, `...mamba2...`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .config import MambaConfig
from .mixer import param_shapes
from .mixers import mixer_for

__all__ = ["check_state_dict", "init_params", "to_numpy"]


def init_params(config: MambaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Official-scheme parameters of `config`'s mixer as float64 NumPy arrays, keyed by the
    official names in state-dict order (see each mixer's `init_params`)."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, received {type(seed).__name__} {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative int (0, 1, 2, ...), received {seed!r}")
    params = mixer_for(config).init_params(config, np.random.default_rng(seed))
    return {name: np.ascontiguousarray(params[name]) for name in param_shapes(config)}


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
