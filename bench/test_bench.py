"""pytest-benchmark suite: backends x scan types x L, plus decode.

Not collected by `make test` (pytest's testpaths is tests/); run it with
`make bench-pytest` or `python -m pytest bench --benchmark-only`.  Sizes are the seed layer
(hidden 768, d_state 64, expand 2, d_conv 4, dt_rank 48), batch 2, float32.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from bench.worker import SEED
from mamba_core import MambaConfig, MambaModule

BACKENDS = [b for b in ("numpy", "jax", "torch") if importlib.util.find_spec(b)]


def _sync(out):
    if hasattr(out, "block_until_ready"):
        out.block_until_ready()
    return out


@pytest.mark.parametrize("length", [256, 1024])
@pytest.mark.parametrize("scan", ["linear", "associative", "cumulative"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward(benchmark, backend, scan, length):
    module = MambaModule(MambaConfig(**SEED, scan_type=scan), backend=backend)
    x = module.backend.asarray(
        np.random.default_rng(0).standard_normal((2, length, 768), dtype=np.float32)
    )
    _sync(module(x)["output"])  # compile / warm up
    benchmark.extra_info.update(backend=backend, scan=scan, length=length)
    benchmark.pedantic(lambda: _sync(module(x)["output"]), rounds=3, iterations=1)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_step(benchmark, backend, batch):
    module = MambaModule(MambaConfig(**SEED), backend=backend)
    x_t = module.backend.asarray(
        np.random.default_rng(0).standard_normal((batch, 768), dtype=np.float32)
    )
    state = module.init_state(batch)
    _sync(module.step(x_t, state)[0])

    def one_step():
        return _sync(module.step(x_t, state)[0])

    benchmark.extra_info.update(backend=backend, batch=batch)
    benchmark.pedantic(one_step, rounds=50, iterations=5, warmup_rounds=5)
