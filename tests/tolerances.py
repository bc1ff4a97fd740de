"""Per-dtype tolerances, written down once.

Errors are measured relative to the scale of the expected output: max|actual - expected| /
max|expected|.  float64 paths agree with the float64 reference to about 1e-12; float32 to
about 1e-5 (a few ulps of float32 accumulated over the matmul contractions and the scan);
16-bit compute dtypes are bounded by their own precision (bfloat16 has an 8-bit mantissa,
so a few 1e-2; float16 a few 1e-3).
"""

from __future__ import annotations

import numpy as np

RTOL = {
    "float64": 1e-12,
    "float32": 1e-5,
    "float16": 5e-3,
    "bfloat16": 4e-2,
}


def to_np(value) -> np.ndarray:
    from mamba_core.params import to_numpy

    return np.asarray(to_numpy(value), dtype=np.float64)


def rel_error(actual, expected) -> float:
    a, e = to_np(actual), to_np(expected)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    scale = float(np.max(np.abs(e))) if e.size else 0.0
    return float(np.max(np.abs(a - e))) / (scale if scale > 0 else 1.0)


def assert_close(actual, expected, dtype: str = "float32", factor: float = 1.0) -> None:
    """max|actual - expected| <= RTOL[dtype] * factor * max|expected|."""
    err = rel_error(actual, expected)
    tol = RTOL[dtype] * factor
    assert err <= tol, f"relative error {err:.3e} > tolerance {tol:.1e} ({dtype})"
