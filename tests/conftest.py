"""Shared fixtures: every backend is a test parameter.

Set MAMBA_CORE_REQUIRE_BACKENDS=1 (CI does) to turn "framework not installed" from a skip
into a failure, so that a missing backend can never pass as a green run.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from mamba_core import MambaConfig

REQUIRE_BACKENDS = os.environ.get("MAMBA_CORE_REQUIRE_BACKENDS", "").lower() not in (
    "",
    "0",
    "false",
    "no",
)

# the framework each test parameter needs
FRAMEWORK = {
    "numpy": "numpy",
    "array_api_strict": "array_api_strict",
    "jax": "jax",
    "torch": "torch",
    "flax": "flax",
    "optax": "optax",
    "safetensors": "safetensors",
}

BACKENDS = ["numpy", "jax", "torch"]
NAMESPACES = ["array_api_strict", "numpy", "jax", "torch"]


def require(name: str, *, module_level: bool = False) -> None:
    """Skip (or, with MAMBA_CORE_REQUIRE_BACKENDS, fail) when `name` is not installed."""
    module = FRAMEWORK.get(name, name)
    if importlib.util.find_spec(module) is None:
        message = f"{module} is not installed"
        if REQUIRE_BACKENDS:
            pytest.fail(f"{message} and MAMBA_CORE_REQUIRE_BACKENDS is set", pytrace=False)
        pytest.skip(message, allow_module_level=module_level)


if importlib.util.find_spec("jax") is not None:
    # float64 tests need 64-bit JAX; every library path passes explicit dtypes, and the
    # float32 tests check that their outputs stay float32 with this on.
    import jax

    jax.config.update("jax_enable_x64", True)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    require(request.param)
    return request.param


@pytest.fixture(params=NAMESPACES)
def xp(request):
    """An Array API namespace: array_api_strict first (proves the core uses only the standard)."""
    require(request.param)
    if request.param == "array_api_strict":
        import array_api_strict

        return array_api_strict
    if request.param == "numpy":
        import array_api_compat.numpy

        return array_api_compat.numpy
    if request.param == "jax":
        import jax.numpy

        return jax.numpy
    import array_api_compat.torch

    return array_api_compat.torch


def to_xp(xp, value, dtype=None):
    """A NumPy array as an array of namespace `xp` (float64 unless `dtype`)."""
    arr = np.asarray(value)
    dtype = dtype if dtype is not None else xp.float64
    return xp.asarray(arr.astype(np.float64), dtype=dtype)


def small_config(**overrides) -> MambaConfig:
    """A small layer for fast tests (E=32, N=8, R=4, K=4, chunk 8)."""
    base = dict(hidden_size=16, d_state=8, d_conv=4, expand_factor=2, dt_rank=4, chunk_size=8)
    base.update(overrides)
    return MambaConfig(**base)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
