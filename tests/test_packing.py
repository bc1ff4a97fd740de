"""Packed variable-length sequences (`seq_idx`, `cu_seqlens`): a packed row equals the
separate runs of its sequences, on every backend, scan and mixer version, forward and
gradients; and bad packing arguments get clear errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mamba_core import MambaConfig, MambaModule, init_params
from tests.conftest import require
from tests.tolerances import assert_close, to_np

SCANS = ["linear", "associative", "cumulative"]
VERSIONS = {
    "mamba1": dict(hidden_size=8, d_state=4, dt_rank=2, d_conv=4, chunk_size=4),
    "mamba2": dict(version="mamba2", hidden_size=8, d_state=4, head_dim=4, d_conv=4, chunk_size=4),
}
#: lengths with 1, lengths < d_conv, boundaries on chunk edges (4, 8) and inside chunks
LENGTHS = [3, 1, 4, 2, 6, 1, 5]


def _cu(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


@pytest.mark.parametrize("version", sorted(VERSIONS))
@pytest.mark.parametrize("scan", SCANS)
def test_packed_row_equals_separate_runs(backend, version, scan, rng):
    cfg = MambaConfig(**VERSIONS[version], scan_type=scan)
    module = MambaModule(cfg, backend=backend, dtype="float64", seed=3)
    x = rng.standard_normal((1, sum(LENGTHS), 8))
    seq_idx = np.repeat(np.arange(len(LENGTHS)), LENGTHS)[None, :]
    packed = module(x, seq_idx=seq_idx)
    out = to_np(packed["output"])
    varlen = module(x, cu_seqlens=_cu(LENGTHS))  # one state per sequence
    assert_close(varlen["output"], out, "float64")
    start = 0
    for i, length in enumerate(LENGTHS):
        alone = module(x[:, start : start + length])
        assert_close(out[:, start : start + length], alone["output"], "float64")
        for field in ("conv_state", "ssm_state"):
            got = to_np(getattr(varlen["state"], field))[i : i + 1]
            assert_close(got, getattr(alone["state"], field), "float64")
        start += length
    # with seq_idx the state after the row is the last sequence's, conv window included
    assert_close(packed["state"].ssm_state, alone["state"].ssm_state, "float64")
    assert_close(packed["state"].conv_state, alone["state"].conv_state, "float64")


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_cu_seqlens_takes_and_returns_one_state_per_sequence(backend, version, rng):
    cfg = MambaConfig(**VERSIONS[version], use_bias=True)
    module = MambaModule(cfg, backend=backend, dtype="float64", seed=5)
    x = rng.standard_normal((1, sum(LENGTHS), 8))
    initial = module(rng.standard_normal((len(LENGTHS), 4, 8)))["state"]
    result = module(x, cu_seqlens=_cu(LENGTHS), state=initial)
    out = to_np(result["output"])
    start = 0
    for i, length in enumerate(LENGTHS):
        own = (to_np(initial.conv_state)[i : i + 1], to_np(initial.ssm_state)[i : i + 1])
        alone = module(x[:, start : start + length], state=own)
        assert_close(out[:, start : start + length], alone["output"], "float64")
        for field in ("conv_state", "ssm_state"):
            got = to_np(getattr(result["state"], field))[i : i + 1]
            assert_close(got, getattr(alone["state"], field), "float64")
        start += length
    # decode continues every sequence from its own state
    y_t, _ = module.step(rng.standard_normal((len(LENGTHS), 8)), result["state"])
    assert tuple(y_t.shape) == (len(LENGTHS), 8)


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_rows_pack_independently_and_state_continues_the_first_sequence(backend, version, rng):
    cfg = MambaConfig(**VERSIONS[version])
    module = MambaModule(cfg, backend=backend, dtype="float64", seed=1)
    x = rng.standard_normal((2, 9, 8))
    seq_idx = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1], [5, 5, 5, 5, 5, 5, 7, 7, 9]])
    state = module(rng.standard_normal((2, 5, 8)))["state"]
    packed = to_np(module(x, seq_idx=seq_idx, state=state)["output"])
    for row, cuts in ((0, [0, 3, 9]), (1, [0, 6, 8, 9])):
        one = module.init_state(1)
        first = (state.conv_state[row : row + 1], state.ssm_state[row : row + 1])
        for k, (a, b) in enumerate(itertools.pairwise(cuts)):
            alone = module(x[row : row + 1, a:b], state=first if k == 0 else one)
            assert_close(packed[row : row + 1, a:b], alone["output"], "float64")


@pytest.mark.parametrize("version", sorted(VERSIONS))
@pytest.mark.parametrize("scan", SCANS)
def test_packed_gradients_equal_separate_gradients_torch(version, scan, rng):
    require("torch")
    import torch

    from mamba_core.backends.torch import torch_forward

    cfg = MambaConfig(**VERSIONS[version], scan_type=scan)
    params = {k: torch.tensor(v, requires_grad=True) for k, v in init_params(cfg, 2).items()}
    x = torch.tensor(rng.standard_normal((1, sum(LENGTHS), 8)), requires_grad=True)
    weights = torch.tensor(rng.standard_normal((1, sum(LENGTHS), 8)))
    seq_idx = torch.from_numpy(np.repeat(np.arange(len(LENGTHS)), LENGTHS)[None, :])
    (torch_forward(params, x, cfg, seq_idx=seq_idx)[0] * weights).sum().backward()
    packed = {k: v.grad.clone() for k, v in params.items()}
    packed_x = x.grad.clone()
    for v in (*params.values(), x):
        v.grad = None
    start, total = 0, 0
    for length in LENGTHS:
        sl = slice(start, start + length)
        total = total + (torch_forward(params, x[:, sl], cfg)[0] * weights[:, sl]).sum()
        start += length
    total.backward()
    for name, value in params.items():
        assert_close(packed[name], value.grad, "float64", factor=10)
    assert_close(packed_x, x.grad, "float64", factor=10)


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_packed_gradients_and_traced_cu_seqlens_on_jax(version, rng):
    require("jax")
    import jax
    import jax.numpy as jnp

    from mamba_core.backends import jax as mj

    cfg = MambaConfig(**VERSIONS[version], scan_type="cumulative")
    params = {k: jnp.asarray(v) for k, v in init_params(cfg, 2).items()}
    x = jnp.asarray(rng.standard_normal((1, sum(LENGTHS), 8)))
    cu = jnp.asarray(_cu(LENGTHS))

    def packed_loss(p, v, c):
        return jnp.sum(mj.forward(p, v, cfg, cu_seqlens=c)[0] ** 2)

    def separate_loss(p, v):
        bounds = _cu(LENGTHS)
        return sum(
            jnp.sum(mj.forward(p, v[:, a:b], cfg)[0] ** 2) for a, b in itertools.pairwise(bounds)
        )

    g_packed = jax.jit(jax.grad(packed_loss, argnums=(0, 1)))(params, x, cu)  # cu traced
    g_separate = jax.grad(separate_loss, argnums=(0, 1))(params, x)
    for name in params:
        assert_close(g_packed[0][name], g_separate[0][name], "float64", factor=10)
    assert_close(g_packed[1], g_separate[1], "float64", factor=10)


def test_flax_and_torch_modules_take_packing(rng):
    require("torch")
    require("flax")
    import jax.numpy as jnp
    import torch

    from mamba_core.backends.flax import MambaFlax
    from mamba_core.backends.torch import MambaTorch

    cfg = MambaConfig(**VERSIONS["mamba2"])
    x = rng.standard_normal((1, sum(LENGTHS), 8)).astype(np.float32)
    expected = to_np(
        MambaModule(cfg, backend="numpy", seed=4)(x, cu_seqlens=_cu(LENGTHS))["output"]
    )
    with torch.no_grad():
        got = MambaTorch(cfg, seed=4)(torch.from_numpy(x), cu_seqlens=_cu(LENGTHS))
    assert_close(got, expected, "float32", factor=5)
    got = MambaFlax(cfg, seed=4)(jnp.asarray(x), cu_seqlens=jnp.asarray(_cu(LENGTHS)))
    assert_close(got, expected, "float32", factor=5)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(seq_idx=np.array([[0, 1, 1, 0, 2, 2]])), ValueError, "non-decreasing"),
        (
            dict(seq_idx=np.zeros((1, 5), np.int64)),
            ValueError,
            r"seq_idx must have shape \(batch, seq_len\) = \(1, 6\)",
        ),
        (dict(seq_idx=np.zeros((1, 6))), ValueError, "seq_idx must be integers"),
        (dict(cu_seqlens=np.array([1, 3, 6])), ValueError, "start at 0"),
        (dict(cu_seqlens=np.array([0, 3, 3, 6])), ValueError, "increase strictly"),
        (dict(cu_seqlens=np.array([0, 3, 5])), ValueError, "end at seq_len=6"),
        (dict(cu_seqlens=np.array([0.0, 6.0])), ValueError, "cu_seqlens must be integers"),
        (
            dict(cu_seqlens=np.array([0, 6]), seq_idx=np.zeros((1, 6), np.int64)),
            ValueError,
            "not both",
        ),
    ],
)
def test_bad_packing_arguments(backend, kwargs, error, message, rng):
    module = MambaModule(MambaConfig(**VERSIONS["mamba1"]), backend=backend)
    with pytest.raises(error, match=message):
        module(rng.standard_normal((1, 6, 8)), **kwargs)
    with pytest.raises(ValueError, match="cu_seqlens describes one packed row"):
        module(rng.standard_normal((2, 6, 8)), cu_seqlens=np.array([0, 6]))
