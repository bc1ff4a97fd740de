"""The compiled CPU kernels (`mamba_core.backends.kernels`, numba) against the pure-library
paths they replace and the independent float64 reference; the fallback when numba is absent.

The rest of the suite runs the NumPy backend's Mamba-1 calls through the kernels too (they
are its default whenever numba is installed, as in CI), so every shape and option that suite
covers is also a kernel-vs-reference check; this file adds the direct comparisons.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mamba_core import MambaConfig, MambaModule, init_params, mixer_forward
from mamba_core.backends import kernels
from mamba_core.backends import numpy as npb
from mamba_core.backends import threads as threads_mod
from mamba_core.mixer import MambaState, prepare_params
from mamba_core.ops import causal_conv1d, softplus
from tests.conftest import require, small_config
from tests.reference import reference_forward
from tests.tolerances import assert_close

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason=f"compiled kernels not running: {kernels.reason()}"
)
if os.environ.get("MAMBA_CORE_REQUIRE_BACKENDS") and not kernels.available():
    raise RuntimeError(f"CI requires the compiled kernels, but: {kernels.reason()}")

DTYPES = ["float32", "float64"]


def scan_inputs(rng, B, L, E, N, dtype, dt_scale=1.0):
    d = np.dtype(dtype)
    return dict(
        u=rng.standard_normal((B, L, E)).astype(d),
        dt=(rng.random((B, L, E)) * dt_scale).astype(d),
        A=-np.exp(rng.standard_normal((E, N))).astype(d),
        Bm=rng.standard_normal((B, L, N)).astype(d),
        Cm=rng.standard_normal((B, L, N)).astype(d),
        h0=rng.standard_normal((B, E, N)).astype(d),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 8, 4), (2, 37, 33, 16), (3, 70, 130, 13)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("packed", [False, True])
def test_scan_kernel_matches_numpy_scan(rng, dtype, shape, threads, packed):
    inp = scan_inputs(rng, *shape, dtype)
    keep = None
    if packed:
        keep = (rng.random(shape[:2]) > 0.2).astype(dtype)
    y, h = kernels.scan(**inp, keep=keep, threads=threads)
    y_ref, h_ref = npb.scan_linear(**inp, keep=keep, threads=1)
    assert y.dtype == np.dtype(dtype) and h.dtype == np.dtype(dtype)
    assert_close(y, y_ref, dtype)
    assert_close(h, h_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_exponential_is_accurate_over_its_range(dtype):
    # L = 1, u = 0, h0 = 1, C = 1 on one state: y = exp(dt*A) for every argument in
    # [-700, 0] (float64) / [-87, 0] (float32); the kernel's own exp against NumPy's
    low = -700.0 if dtype == "float64" else -87.0
    args = np.concatenate([np.linspace(low, 0.0, 20001), -np.logspace(-12, 0, 2001)])
    d = np.dtype(dtype)
    E = args.size
    u = np.zeros((1, 1, E), d)
    dt = np.ones((1, 1, E), d)
    A = args.astype(d)[:, None]
    h0 = np.ones((1, E, 1), d)
    ones = np.ones((1, 1, 1), d)
    y, _ = kernels.scan(u, dt, A, ones, ones, h0)
    expected = np.exp(args.astype(d).astype(np.float64))
    rel = np.abs(y[0, 0].astype(np.float64) - expected) / expected
    # a few ulps (float32: 5e-7).  float64: 1e-15 near 0, growing with |x| because fast-math
    # reassociation folds the two-part ln2 of the range reduction into one rounded constant
    # (2.3e-17 off), so k = x/ln2 multiples of that error reach the result: 2.4e-14 at
    # x = -700, where exp(x) ~ 1e-304 no longer moves any sum it enters.
    if dtype == "float32":
        assert rel.max() < 5e-7, rel.max()
    else:
        assert np.all(rel <= 1e-15 * (1.0 + np.abs(args) / 25.0)), rel.max()


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_exp_function_matches_numpy(dtype, blocks):
    # `kernels.exp` (the bench's measure of the kernels' exp rate): the same exponential as
    # the scans, any shape, split over threads or not
    d = np.dtype(dtype)
    x = -np.linspace(0.0, 80.0, 3 * 4001).astype(d).reshape(3, 4001)
    out = kernels.exp(x, threads=blocks)
    assert out.shape == x.shape and out.dtype == d
    assert_close(out, np.exp(x.astype(np.float64)), dtype)


@pytest.mark.parametrize("name", ["_sigmoid", "_silu", "_softplus"])
def test_kernel_helpers_compute_in_their_arguments_dtype(name):
    # numba types float32 + an int literal as float64: a helper written that way compiles,
    # gives float32 kernels nearly the right numbers, and runs their gate in float64 (it
    # did: half-width vectors plus conversions).  Each helper's float32 signature returns
    # float32, its float64 one float64.
    helper = getattr(kernels, name)
    helper(np.float32(0.3))
    helper(0.3)
    returns = {str(sig.args[0]): str(sig.return_type) for sig in helper.nopython_signatures}
    assert returns == {"float32": "float32", "float64": "float64"}, returns


@pytest.mark.parametrize("dtype", DTYPES)
def test_scan_kernel_stays_finite_for_huge_decays(rng, dtype):
    # dt*A far below the exponential's range (-1e4): the decay is (numerically) 0, never NaN
    inp = scan_inputs(rng, 2, 50, 16, 8, dtype, dt_scale=1e4)
    y, h = kernels.scan(**inp)
    y_ref, h_ref = npb.scan_linear(**inp)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(h))
    assert_close(y, y_ref, dtype)
    assert_close(h, h_ref, dtype)


def test_scan_kernel_propagates_nan(rng):
    inp = scan_inputs(rng, 2, 10, 8, 4, "float64")
    inp["dt"][0, 3, 2] = np.nan
    y, h = kernels.scan(**inp)
    assert np.all(np.isnan(y[0, 3:, 2])) and np.all(np.isfinite(y[0, :3]))
    assert np.all(np.isfinite(y[1])) and np.isnan(h[0, 2]).all()


def silu(a):
    return a / (1.0 + np.exp(-a))


def conv_inputs(rng, L, dtype):
    """xz (B, L, 2E), weight (E, 1, K), bias (E,), state (B, E, K) of the conv kernels."""
    d = np.dtype(dtype)
    B, E, K = 2, 24, 4
    xz = (rng.standard_normal((B, L, 2 * E)) * 3).astype(d)
    w = rng.standard_normal((E, 1, K)).astype(d)
    bias = rng.standard_normal(E).astype(d)
    state = rng.standard_normal((B, E, K)).astype(d)
    return xz, w, bias, state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [1, 2, 3, 5, 41])
def test_conv_kernel_matches_core_conv(rng, dtype, L):
    xz, w, bias, state = conv_inputs(rng, L, dtype)
    E = w.shape[0]
    u, new_state = kernels.conv_silu(xz, w[:, 0], bias, state)
    ref, ref_state = causal_conv1d(xz[..., :E], w, bias, state)
    assert_close(u, silu(ref), dtype)
    np.testing.assert_array_equal(new_state, ref_state)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [1, 3, 41])
def test_conv_kernel_backward_matches_autograd(rng, dtype, L):
    # every gradient of conv + SiLU (x, weight, bias, the state in) against torch autograd
    # through the core's conv in float64, a loss on both u and the new state; L < K - 1 reads
    # the state past the first step.  dLoss/dx lands in the first E columns of a wider buffer
    require("torch")
    import torch

    d = np.dtype(dtype)
    xz, w, bias, state = conv_inputs(rng, L, dtype)
    (B, E, K), L = state.shape, xz.shape[1]
    d_u = rng.standard_normal((B, L, E)).astype(d)
    d_new = rng.standard_normal((B, E, K)).astype(d)
    buffer = np.full((B, L, 2 * E), 7.0, d)
    out, d_w, d_b, d_state = kernels.conv_silu_backward(xz, w[:, 0], bias, state, d_u, d_new,
                                                        buffer)  # fmt: skip
    assert out is buffer
    np.testing.assert_array_equal(buffer[..., E:], 7.0)  # the other columns untouched

    ref = {k: torch.tensor(np.float64(v), requires_grad=True)
           for k, v in {"x": xz[..., :E], "w": w, "b": bias, "s": state}.items()}  # fmt: skip
    conv, new_state = causal_conv1d(ref["x"], ref["w"], ref["b"], ref["s"])
    loss = (torch.nn.functional.silu(conv) * torch.from_numpy(np.float64(d_u))).sum()
    loss = loss + (new_state * torch.from_numpy(np.float64(d_new))).sum()
    loss.backward()
    assert_close(buffer[..., :E], ref["x"].grad.numpy(), dtype)
    assert_close(d_w, ref["w"].grad.numpy()[:, 0], dtype)
    assert_close(d_b, ref["b"].grad.numpy(), dtype)
    assert_close(d_state, ref["s"].grad.numpy(), dtype)


def fused_inputs(rng, B, L, E, N, r, dtype):
    """Inputs of `kernels.fused_scan`, B, C and z as column blocks of larger arrays (as the
    projections' outputs give them)."""
    d = np.dtype(dtype)
    inp = scan_inputs(rng, B, L, E, N, dtype)
    xbc = rng.standard_normal((B, L, r + 2 * N)).astype(d)
    xz = (rng.standard_normal((B, L, 2 * E)) * 6).astype(d)
    return {
        "u": inp["u"],
        "dt_pre": (rng.standard_normal((B, L, E)) * 8).astype(d),  # softplus both sides of 0
        "dt_bias": rng.standard_normal(E).astype(d),
        "A": inp["A"],
        "Bm": xbc[..., r : r + N],
        "Cm": xbc[..., r + N :],
        "D": rng.standard_normal(E).astype(d),
        "z": xz[..., E:],
        "h0": inp["h0"],
    }


FUSED_ARGS = ("u", "dt_pre", "dt_bias", "A", "Bm", "Cm", "D", "z", "h0")


@pytest.fixture(params=[False, True], ids=["one-block", "blocks"])
def blocks(request, monkeypatch):
    """Thread count for the fused kernels: None (the seed-size inputs here run as one block)
    or 3, with the thresholds lowered so that the work splits into ragged channel blocks
    (and the backward into ragged tiles inside them): block offsets e0 > 0 are exercised."""
    if not request.param:
        return None
    monkeypatch.setattr(threads_mod, "MIN_PARALLEL_WORK", 0)
    monkeypatch.setattr(threads_mod, "_MIN_BLOCK_CHANNELS", 8)
    monkeypatch.setattr(kernels, "_ADJOINT_TILE", 16)
    return 3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 2])
def test_fused_scan_matches_its_parts(rng, dtype, batch, blocks):
    f = fused_inputs(rng, batch, 23, 40, 12, 5, dtype)
    y, h = kernels.fused_scan(*(f[k] for k in FUSED_ARGS), threads=blocks)
    dt = softplus(f["dt_pre"] + f["dt_bias"])
    y_ref, h_ref = npb.scan_linear(f["u"], dt, f["A"], f["Bm"], f["Cm"], f["h0"])
    assert_close(y, (y_ref + f["D"] * f["u"]) * silu(f["z"]), dtype)
    assert_close(h, h_ref, dtype)
    # the training forward: the same numbers, and the state before every chunk-th step
    y2, h2, starts = kernels.fused_scan(*(f[k] for k in FUSED_ARGS), chunk=8, threads=blocks)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(h2, h)
    for index, t in enumerate(range(0, 23, 8)):
        if t == 0:
            np.testing.assert_array_equal(starts[0], f["h0"])
        else:
            cut = slice(None, t)
            _, h_t = npb.scan_linear(f["u"][:, cut], dt[:, cut], f["A"], f["Bm"][:, cut],
                                     f["Cm"][:, cut], f["h0"])  # fmt: skip
            assert_close(starts[index], h_t, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 23, 40, 12, 5, 8), (1, 70, 130, 16, 4, 32)])
def test_fused_scan_backward_matches_autograd(rng, dtype, shape, blocks):
    # every gradient of the fused scan (softplus, scan, skip, gate) against torch autograd
    # through a plain float64 step loop, a ragged last chunk included
    require("torch")
    import torch

    B, L, E, N, r, chunk = shape
    f = fused_inputs(rng, B, L, E, N, r, dtype)
    y, h, starts = kernels.fused_scan(*(f[k] for k in FUSED_ARGS), chunk=chunk, threads=blocks)
    dout = rng.standard_normal(y.shape).astype(dtype)
    dh = rng.standard_normal(h.shape).astype(dtype)
    grads = kernels.fused_scan_backward(
        *(f[k] for k in FUSED_ARGS[:-1]), starts, dout, dh, chunk=chunk, threads=blocks
    )

    ref = {k: torch.tensor(np.asarray(f[k], np.float64), requires_grad=True) for k in FUSED_ARGS}
    v = ref["dt_pre"] + ref["dt_bias"]
    dt = torch.clamp(v, min=0) + torch.log1p(torch.exp(-v.abs()))  # F.softplus cuts off at 20
    state, ys = ref["h0"], []
    for t in range(L):
        decay = torch.exp(dt[:, t, :, None] * ref["A"])
        state = decay * state + (dt[:, t] * ref["u"][:, t])[..., None] * ref["Bm"][:, t, None]
        ys.append((state * ref["Cm"][:, t, None]).sum(-1))
    y_ref = (torch.stack(ys, 1) + ref["D"] * ref["u"]) * torch.nn.functional.silu(ref["z"])
    assert_close(y, y_ref.detach().numpy(), dtype)
    loss = (y_ref * torch.from_numpy(np.float64(dout))).sum() + (state * torch.from_numpy(
        np.float64(dh))).sum()  # fmt: skip
    loss.backward()
    for name, grad in zip(FUSED_ARGS, grads, strict=True):
        assert grad.dtype == np.dtype(dtype) and grad.shape == f[name].shape, name
        assert_close(grad, ref[name].grad.numpy(), dtype)


CONFIGS = [
    {},
    {"use_bias": True},
    {"use_conv_bias": False, "d_conv": 3},
    {"d_state": 13, "expand_factor": 3},
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("overrides", CONFIGS)
@pytest.mark.parametrize("with_state", [False, True])
def test_fused_forward_matches_core_and_reference(rng, dtype, overrides, with_state):
    cfg = small_config(**overrides)
    d = np.dtype(dtype)
    params = {k: v.astype(d) for k, v in init_params(cfg, 3).items()}
    x = rng.standard_normal((2, 19, cfg.hidden_size)).astype(d)
    state = None
    if with_state:
        state = MambaState(
            rng.standard_normal((2, cfg.d_inner, cfg.d_conv)).astype(d),
            rng.standard_normal((2, cfg.d_inner, cfg.d_state)).astype(d),
        )
    assert npb.fuses(x, cfg, state)
    out, new = npb.fused_forward(params, x, cfg, state)
    core, core_state = mixer_forward(params, x, cfg, state, scan=npb.scan_linear)
    ref, (ref_conv, ref_h) = reference_forward(params, x, cfg, state)
    assert out.dtype == d
    assert_close(out, core, dtype)
    assert_close(out, ref, dtype)
    assert_close(new.ssm_state, ref_h, dtype)
    assert_close(new.conv_state, ref_conv, dtype)
    np.testing.assert_array_equal(new.conv_state, core_state.conv_state)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("overrides", CONFIGS)
def test_decode_step_kernel_matches_core_and_reference(rng, dtype, overrides, blocks,
                                                       monkeypatch):  # fmt: skip
    # a one-token call (a decode step) runs `kernels.fused_step`: against the core's step and
    # the independent reference, from a non-zero state, batch rows split over threads or not
    cfg = small_config(**overrides)
    d = np.dtype(dtype)
    params = {k: v.astype(d) for k, v in init_params(cfg, 3).items()}
    x = rng.standard_normal((3, 1, cfg.hidden_size)).astype(d)
    state = MambaState(
        rng.standard_normal((3, cfg.d_inner, cfg.d_conv)).astype(d),
        rng.standard_normal((3, cfg.d_inner, cfg.d_state)).astype(d),
    )
    calls = []
    step_kernel = kernels.fused_step
    monkeypatch.setattr(
        kernels, "fused_step", lambda *a, **k: calls.append(1) or step_kernel(*a, threads=blocks)
    )  # fmt: skip
    out, new = npb.fused_forward(params, x, cfg, state)
    assert calls == [1]
    prepared = prepare_params(params, cfg, xp=npb.xp_numpy)
    core, core_state = npb.mixer_step(prepared, state, x[:, 0], cfg, xp=npb.xp_numpy)
    ref, (ref_conv, ref_h) = reference_forward(params, x, cfg, state)
    assert out.dtype == new.ssm_state.dtype == new.conv_state.dtype == d
    assert_close(out[:, 0], core, dtype)
    assert_close(out, ref, dtype)
    assert_close(new.ssm_state, core_state.ssm_state, dtype)
    assert_close(new.ssm_state, ref_h, dtype)
    assert_close(new.conv_state, ref_conv, dtype)
    # the state's older inputs move down a place, unchanged
    np.testing.assert_array_equal(new.conv_state[..., :-1], state.conv_state[..., 1:])


MAMBA2_CONFIGS = [
    {},
    {"n_groups": 2, "use_bias": True},
    {"use_conv_bias": False, "d_conv": 3, "time_step_limit": (0.3, 0.9)},  # both clamps hit
    {"d_state": 13, "head_dim": 4, "expand_factor": 3, "layer_norm_epsilon": 1e-3},
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("overrides", MAMBA2_CONFIGS)
def test_mamba2_decode_step_kernel_matches_core_and_reference(rng, dtype, overrides, blocks,
                                                              monkeypatch):  # fmt: skip
    # a Mamba-2 step on the NumPy backend runs `kernels.fused_step2`: against the core's step
    # and the independent reference, from a non-zero state, batch rows over threads or not
    from mamba_core.mixers.mamba2 import Mamba2State, conv_dim
    from tests.reference import reference_forward_mamba2

    cfg = MambaConfig(**{"version": "mamba2", "hidden_size": 16, "d_state": 8, "head_dim": 8,
                         **overrides})  # fmt: skip
    d = np.dtype(dtype)
    params = {k: v.astype(d) for k, v in init_params(cfg, 3).items()}
    x = rng.standard_normal((3, cfg.hidden_size)).astype(d)
    state = Mamba2State(
        rng.standard_normal((3, conv_dim(cfg), cfg.d_conv)).astype(d),
        rng.standard_normal((3, cfg.num_heads, cfg.head_dim, cfg.d_state)).astype(d),
    )
    calls = []
    step_kernel = kernels.fused_step2
    monkeypatch.setattr(
        kernels, "fused_step2", lambda *a, **k: calls.append(1) or step_kernel(*a, **k, threads=blocks)
    )  # fmt: skip
    backend = npb.get_backend()
    prepared = backend.prepare(params, cfg)
    out, new = backend.step(prepared, state, x, cfg)
    assert calls == [1]
    core, core_state = npb.mixer_step(prepared, state, x, cfg, xp=npb.xp_numpy)
    ref, (ref_conv, ref_h) = reference_forward_mamba2(params, x[:, None, :], cfg, state)
    assert out.dtype == new.ssm_state.dtype == new.conv_state.dtype == d
    assert_close(out, core, dtype)
    assert_close(out, ref[:, 0], dtype)
    assert_close(new.ssm_state, core_state.ssm_state, dtype)
    assert_close(new.ssm_state, ref_h, dtype)
    assert_close(new.conv_state, ref_conv, dtype)
    np.testing.assert_array_equal(new.conv_state[..., :-1], state.conv_state[..., 1:])
    # a fresh state (None) is zeros, as the core's
    out0, new0 = backend.step(prepared, None, x, cfg)
    core0, core0_state = npb.mixer_step(prepared, None, x, cfg, xp=npb.xp_numpy)
    assert_close(out0, core0, dtype)
    assert_close(new0.ssm_state, core0_state.ssm_state, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("overrides", MAMBA2_CONFIGS)
@pytest.mark.parametrize("with_state", [False, True])
def test_mamba2_fused_forward_matches_core_and_reference(rng, dtype, overrides, with_state,
                                                         blocks, monkeypatch):  # fmt: skip
    # a Mamba-2 sequence on the NumPy backend (scan "linear", what "auto" runs with the
    # kernels) runs `fused_forward_mamba2`: conv kernel, `kernels.ssd_scan` (softplus, clamp,
    # skip), `kernels.gated_rmsnorm`; against the core's chunked form and the independent
    # reference, from zeros or a random state, (batch, head) pairs over threads or not,
    # every parameter perturbed off its init
    from mamba_core.mixers.mamba2 import Mamba2State, conv_dim
    from tests.reference import reference_forward_mamba2

    cfg = MambaConfig(**{"version": "mamba2", "hidden_size": 16, "d_state": 8, "head_dim": 8,
                         **overrides})  # fmt: skip
    d = np.dtype(dtype)
    params = {
        k: (v + 0.2 * rng.standard_normal(v.shape)).astype(d)
        for k, v in init_params(cfg, 3).items()
    }
    x = rng.standard_normal((3, 37, cfg.hidden_size)).astype(d)
    state = None
    if with_state:
        state = Mamba2State(
            rng.standard_normal((3, conv_dim(cfg), cfg.d_conv)).astype(d),
            rng.standard_normal((3, cfg.num_heads, cfg.head_dim, cfg.d_state)).astype(d),
        )
    calls = []
    for name in ("ssd_scan", "gated_rmsnorm"):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _k=kernel, **k: calls.append(1)
                            or _k(*a, **k, threads=blocks))  # fmt: skip
    backend = npb.get_backend()
    out, new = backend.forward(params, x, cfg, state, "linear")
    assert len(calls) == 2
    core, core_state = npb.mixer_forward(params, x, cfg, state, xp=npb.xp_numpy)
    ref, (ref_conv, ref_h) = reference_forward_mamba2(params, x, cfg, state)
    assert out.dtype == new.ssm_state.dtype == new.conv_state.dtype == d
    assert_close(out, core, dtype)
    assert_close(out, ref, dtype)
    assert_close(new.ssm_state, core_state.ssm_state, dtype)
    assert_close(new.ssm_state, ref_h, dtype)
    assert_close(new.conv_state, ref_conv, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("packed", [False, True])
def test_mamba2_native_scan_matches_the_core_scan(rng, dtype, groups, packed, blocks):
    # the plain compiled Mamba-2 scan (`ssd_native`: what masked and packed calls on NumPy
    # run) against the core's step-by-step recurrence: outputs and final state, packed
    # restarts included, large dt (decays underflowing to 0) in some steps
    from mamba_core.ssd import ssd_scan

    d = np.dtype(dtype)
    B, L, H, P, N = 3, 41, 4, 5, 7
    x = rng.standard_normal((B, L, H, P)).astype(d)
    dt = (rng.random((B, L, H)) * np.where(rng.random((B, L, 1)) < 0.1, 200, 1)).astype(d)
    A = -np.exp(rng.standard_normal(H)).astype(d)
    Bm, Cm = (rng.standard_normal((B, L, groups, N)).astype(d) for _ in range(2))
    S0 = rng.standard_normal((B, H, P, N)).astype(d)
    keep = (rng.random((B, L)) > 0.15).astype(d) if packed else None
    before = S0.copy()
    y, s = npb.ssd_native(x, dt, A, Bm, Cm, S0, keep=keep, threads=blocks)
    y_ref, s_ref = ssd_scan(x, dt, A, Bm, Cm, S0, algorithm="linear", keep=keep)
    assert y.shape == y_ref.shape and y.dtype == d and s.dtype == d
    assert_close(y, y_ref, dtype)
    assert_close(s, s_ref, dtype)
    np.testing.assert_array_equal(S0, before)  # the state in is only read


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_mamba2_steps_equal_the_forward_and_nan_stays_nan(rng, backend, monkeypatch):
    # the module's decode loop on the kernel (NumPy, PyTorch on the CPU) equals one forward;
    # a NaN input reaches the outputs through the clamp instead of being clipped away
    require(backend)
    calls = []
    step_kernel = kernels.fused_step2
    monkeypatch.setattr(
        kernels, "fused_step2", lambda *a, **k: calls.append(1) or step_kernel(*a, **k)
    )
    cfg = MambaConfig(version="mamba2", hidden_size=16, d_state=8, head_dim=8,
                      time_step_limit=(0.01, 0.5))  # fmt: skip
    module = MambaModule(cfg, backend=backend, seed=1, dtype="float64")
    x = rng.standard_normal((2, 9, 16))
    full = np.asarray(module(x)["output"])
    state = module(x[:, :5])["state"]
    outs = []
    for t in range(5, 9):
        y, state = module.step(x[:, t], state)
        outs.append(np.asarray(y))
    assert len(calls) == 4
    assert_close(np.stack(outs, axis=1), full[:, 5:], "float64")
    bad = x[:, 5].copy()
    bad[0, 3] = np.nan
    y, state = module.step(bad, module(x[:, :5])["state"])
    assert np.isnan(np.asarray(y)[0]).all() and np.isfinite(np.asarray(y)[1]).all()


MAMBA3_CONFIGS = [
    {},
    {"mimo": True, "mimo_rank": 2},
    {"mimo": True, "mimo_rank": 3, "n_groups": 2, "outproj_norm": True},
    {"rope_fraction": 1.0, "outproj_norm": True, "d_state": 16, "A_floor": 0.5},
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("overrides", MAMBA3_CONFIGS)
def test_mamba3_decode_step_kernel_matches_core_and_reference(rng, dtype, overrides, blocks,
                                                              monkeypatch):  # fmt: skip
    # a Mamba-3 step on the NumPy backend runs `kernels.fused_step3`: against the core's step
    # and the independent per-token reference, from a random state (angles past 2 pi
    # included), every parameter perturbed off its constant init, batch rows split or not
    from mamba_core.mixer import state_shapes
    from mamba_core.mixers.mamba3 import Mamba3State
    from tests.reference3 import mamba3_reference
    from tests.test_mamba3 import assert_state_close, cfg3, params3

    cfg = cfg3(**overrides)
    d = np.dtype(dtype)
    params = {k: v.astype(d) for k, v in params3(cfg, 3).items()}
    x = rng.standard_normal((3, cfg.hidden_size)).astype(d)
    state = Mamba3State(
        *(4 * rng.standard_normal(shape).astype(d) for shape, _ in state_shapes(cfg, 3).values())
    )
    before = [np.array(s, copy=True) for s in state]
    calls = []
    step_kernel = kernels.fused_step3
    monkeypatch.setattr(
        kernels, "fused_step3", lambda *a, **k: calls.append(1) or step_kernel(*a, **k, threads=blocks)
    )  # fmt: skip
    backend = npb.get_backend()
    prepared = backend.prepare(params, cfg)
    out, new = backend.step(prepared, state, x, cfg)
    assert calls == [1]
    for old, kept in zip(state, before, strict=True):
        np.testing.assert_array_equal(old, kept)  # the step made a new state
    core, core_state = npb.mixer_step(prepared, state, x, cfg, xp=npb.xp_numpy)
    ref, ref_state = mamba3_reference(params, x[:, None, :].astype(np.float64), cfg, state)
    assert out.dtype == d and all(s.dtype == d for s in new)
    assert_close(out, core, dtype)
    assert_close(out, ref[:, 0], dtype)
    assert_state_close(new, core_state, dtype)
    assert_state_close(new, ref_state, dtype)
    assert np.all((new.angle >= 0) & (new.angle <= 2 * np.pi))  # reduced, as the core's
    # a fresh state (None) is zeros, as the core's
    out0, new0 = backend.step(prepared, None, x, cfg)
    core0, core0_state = npb.mixer_step(prepared, None, x, cfg, xp=npb.xp_numpy)
    assert_close(out0, core0, dtype)
    assert_state_close(new0, core0_state, dtype)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("mimo", [False, True])
def test_mamba3_module_decode_runs_the_kernel_and_equals_the_forward(rng, backend, mimo,
                                                                   monkeypatch):  # fmt: skip
    # float32 (test_mamba3's decode test runs float64): the module's decode loop on NumPy and
    # PyTorch's CPU path calls the kernel once a token and equals one forward; a NaN input
    # stays NaN in its own row and does not reach the other
    require(backend)
    from tests.test_mamba3 import cfg3, params3

    calls = []
    step_kernel = kernels.fused_step3
    monkeypatch.setattr(
        kernels, "fused_step3", lambda *a, **k: calls.append(1) or step_kernel(*a, **k)
    )
    cfg = cfg3(mimo=mimo, mimo_rank=2, outproj_norm=mimo)
    module = MambaModule(cfg, backend=backend, dtype="float32", state_dict=params3(cfg, 1))
    x = rng.standard_normal((2, 9, 16)).astype(np.float32)
    full = np.asarray(module(x)["output"])
    state = module(x[:, :5])["state"]
    outs = []
    for t in range(5, 9):
        y, state = module.step(x[:, t], state)
        outs.append(np.asarray(y))
    assert len(calls) == 4
    assert_close(np.stack(outs, axis=1), full[:, 5:], "float32")
    bad = x[:, 5].copy()
    bad[0, 3] = np.nan
    y, _ = module.step(bad, module(x[:, :5])["state"])
    assert np.isnan(np.asarray(y)[0]).all() and np.isfinite(np.asarray(y)[1]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_products_equal_numpy_and_restore_the_blas_threads(rng, dtype, monkeypatch):
    # `dense` and `product` with many rows: row slices on the pool with the BLAS at one
    # thread; the same numbers as one NumPy product, the BLAS's thread count restored
    # (also after a failing product), nothing split from a pool thread or without a BLAS
    # control
    libs = threads_mod._blas_libs()
    assert libs, "threadpoolctl (the `fast` extra) finds no BLAS"
    before = [lib.num_threads for lib in libs]
    d = np.dtype(dtype)
    x = rng.standard_normal((3, 700, 48)).astype(d)
    w = rng.standard_normal((37, 48)).astype(d)
    seen = []
    matmul = np.matmul

    def spy(a, b, **kw):
        seen.append((a.shape[0], [lib.num_threads for lib in libs]))
        return matmul(a, b, **kw)

    monkeypatch.setenv("MAMBA_CORE_NUM_THREADS", "2")
    monkeypatch.setattr(np, "matmul", spy)  # (the numpy module: threads.py's and ours)
    y = npb.dense(x, w, bias=w[:, 0])
    g = npb.product(x.reshape(-1, 48), w.T)
    few = npb.product(x.reshape(-1, 48).T, x.reshape(-1, 48))  # 48 rows: one product
    monkeypatch.setattr(np, "matmul", matmul)
    assert [n for n, _ in seen] == [1050, 1050, 1050, 1050, 48]  # two slices each
    assert all(counts == [1] * len(libs) for _, counts in seen[:4])
    assert seen[4][1] == before
    assert [lib.num_threads for lib in libs] == before
    assert_close(y, x @ w.T + w[:, 0], dtype)
    assert_close(g, x.reshape(-1, 48) @ w.T, dtype)
    assert_close(few, x.reshape(-1, 48).T @ x.reshape(-1, 48), dtype)
    with pytest.raises(ValueError):
        threads_mod.split_product(x.reshape(-1, 48), w, np.empty((2100, 5), d), threads=2)
    assert [lib.num_threads for lib in libs] == before
    out = np.empty((2100, 37), d)
    in_pool = (
        threads_mod._pool(1)
        .submit(threads_mod.split_product, x.reshape(-1, 48), w.T, out, 2)
        .result()
    )
    assert in_pool is False  # (it would wait on its own pool)
    monkeypatch.setattr(threads_mod, "_BLAS_LIBS", ())
    assert threads_mod.split_product(x.reshape(-1, 48), w.T, out, 2) is False
    assert_close(npb.dense(x, w), x @ w.T, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_step_equals_forward_and_keeps_old_state(rng, dtype):
    cfg = small_config()
    module = MambaModule(cfg, backend="numpy", seed=1, dtype=dtype)
    x = rng.standard_normal((3, 9, cfg.hidden_size)).astype(dtype)
    full = module(x)["output"]
    state = module(x[:, :6])["state"]
    before = [np.array(s, copy=True) for s in state]
    outs = []
    for t in range(6, 9):
        y, new = module.step(x[:, t], state)
        for old, kept in zip(state, before, strict=True):
            np.testing.assert_array_equal(old, kept)  # the step made a new state
        outs.append(y)
        state, before = new, [np.array(s, copy=True) for s in new]
    assert_close(np.stack(outs, axis=1), full[:, 6:], dtype)
    prepared = prepare_params(module.params, cfg, xp=npb.xp_numpy)
    state = module(x[:, :6])["state"]
    generic, _ = npb.mixer_step(prepared, state, x[:, 6], cfg, xp=npb.xp_numpy)
    assert_close(outs[0], generic, dtype)


def test_module_reports_the_kernels_in_its_metrics(rng):
    module = MambaModule(small_config(), backend="numpy", seed=0)
    metrics = module(rng.standard_normal((1, 4, 16)).astype(np.float32))["metrics"]
    assert metrics["kernels"].startswith("numba ")
    assert metrics["kernel_compile_s"] >= 0.0


def test_masked_and_packed_calls_take_the_core_mixer(rng):
    cfg = small_config()
    x = rng.standard_normal((2, 7, 16))
    assert not npb.fuses(x, cfg, None, attention_mask=np.ones((2, 7)))
    assert not npb.fuses(x, cfg, None, seq_idx=np.zeros((2, 7), int))
    assert not npb.fuses(x.astype(np.float16), cfg, None)
    assert not npb.fuses(x, small_config(activation="gelu"), None)


_FALLBACK = r"""
import json, sys
import numpy as np
{prelude}
from mamba_core import MambaModule
from mamba_core.backends import kernels
from tests.conftest import require, small_config
module = MambaModule(small_config(), backend="numpy", seed=0, dtype="float64")
x = np.random.default_rng(0).standard_normal((2, 11, 16))
res = module(x)
y, _ = module.step(x[:, 0], res["state"])
print(json.dumps({{"available": kernels.available(), "reason": kernels.reason(),
    "metric": res["metrics"]["kernels"], "out": res["output"].tolist(), "step": y.tolist(),
    "numba_loaded": sys.modules.get("numba") is not None}}))
"""


def _run(prelude: str, env_extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MAMBA_CORE_KERNELS"}
    env.update(env_extra or {})
    proc = subprocess.run(
        [sys.executable, "-c", _FALLBACK.format(prelude=prelude)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fallback_without_numba_gives_the_same_numbers():
    # numba made unimportable (as on an install without the `fast` extra)
    without = _run("sys.modules['numba'] = None")
    assert without["available"] is False and not without["numba_loaded"]
    assert "numba not installed" in without["reason"] and without["metric"] == without["reason"]
    switched_off = _run("", {"MAMBA_CORE_KERNELS": "numpy"})
    assert switched_off["available"] is False and "MAMBA_CORE_KERNELS" in switched_off["reason"]
    with_kernels = _run("")
    assert with_kernels["available"] is True
    for key in ("out", "step"):
        assert_close(np.array(without[key]), np.array(with_kernels[key]), "float64")
        np.testing.assert_array_equal(np.array(without[key]), np.array(switched_off[key]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blas", ["torch", "numpy"])
def test_torch_cpu_inference_runs_the_kernels_and_matches_autograd_path(rng, dtype, blas,
                                                                       monkeypatch):  # fmt: skip
    require("torch")
    import torch

    from mamba_core.backends import torch as mt
    from mamba_core.backends.torch import MambaTorch, get_backend

    monkeypatch.setattr(mt, "_BLAS", {dtype: (blas, float("nan"), float("nan"))})

    cfg = small_config()
    model = MambaTorch(cfg, seed=2, dtype=getattr(torch, dtype))
    x = torch.from_numpy(rng.standard_normal((2, 13, cfg.hidden_size)).astype(dtype))
    y_grad, s_grad = model(x, return_state=True)  # parameters need grad: the training path
    with torch.no_grad():
        y, s = model(x, return_state=True)  # the kernels
        step, _ = model.step(x[:, 12], model(x[:, :12], return_state=True)[1])
    assert y.dtype == x.dtype and not y.requires_grad
    assert_close(y, y_grad.detach(), dtype)
    assert_close(s.ssm_state, s_grad.ssm_state.detach(), dtype)
    assert_close(step, y[:, 12], dtype)
    assert get_backend().call_info()["kernels"].startswith("numba ")
    assert get_backend().call_info()["kernel_blas"] == {dtype: blas}


def test_torch_kernel_blas_is_measured_or_forced(monkeypatch):
    # the kernel paths' BLAS: measured once per dtype (both rates real), or forced by the
    # environment variable; anything else there is an error naming it
    require("torch")
    import torch

    from mamba_core.backends import torch as mt

    monkeypatch.delenv(mt.BLAS_ENV, raising=False)
    monkeypatch.setattr(mt, "_BLAS", {})
    choice = mt._blas(torch.float32)
    name, numpy_rate, torch_rate = mt._BLAS["float32"]
    assert choice == name and numpy_rate > 0 and torch_rate > 0
    assert (name == "numpy") == (numpy_rate >= mt.NUMPY_BLAS_MARGIN * torch_rate)
    assert mt._blas(torch.float32) == choice and list(mt._BLAS) == ["float32"]  # measured once
    assert mt.kernel_blas(torch.float32) == {
        "choice": name, "numpy_gflops": numpy_rate, "torch_gflops": torch_rate,
    }  # fmt: skip
    for forced in ("numpy", "torch"):
        monkeypatch.setattr(mt, "_BLAS", {})
        monkeypatch.setenv(mt.BLAS_ENV, forced)
        assert mt._blas(torch.float64) == forced
    monkeypatch.setattr(mt, "_BLAS", {})
    monkeypatch.setenv(mt.BLAS_ENV, "mkl")
    with pytest.raises(ValueError, match="MAMBA_CORE_TORCH_BLAS must be 'numpy' or 'torch'"):
        mt._blas(torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 70, 40, 12), (1, 5, 130, 16)])
def test_torch_training_scan_kernels_match_the_torch_scan(rng, dtype, shape, monkeypatch):
    # `_LinearScan` (the PyTorch linear scan with its hand-written backward) on the compiled
    # forward/backward kernels against its own torch loops: outputs and every gradient
    require("torch")
    import torch

    from mamba_core.backends import torch as mt

    inp = scan_inputs(rng, *shape, dtype)
    results = []
    for compiled in (True, False):
        monkeypatch.setattr(kernels, "_DISABLED", not compiled)
        tensors = [
            torch.tensor(inp[k], requires_grad=True) for k in ("u", "dt", "A", "Bm", "Cm", "h0")
        ]
        y, h = mt._LinearScan.apply(*tensors)
        (torch.sin(y).square().sum() + h.pow(3).sum()).backward()
        results.append([y.detach(), h.detach(), *(t.grad for t in tensors)])
    for fast, slow in zip(*results, strict=True):
        assert fast.dtype == slow.dtype
        assert_close(fast, slow, dtype)


def _graph_names(tensor) -> set[str]:
    """The names of the autograd nodes behind `tensor`."""
    seen, todo, names = set(), [tensor.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(fn for fn, _ in node.next_functions)
    return names


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "overrides", [{"use_bias": True}, {"use_conv_bias": False, "d_conv": 3}], ids=["bias", "K3"]
)
@pytest.mark.parametrize("L", [70, 2])
@pytest.mark.parametrize("blas", ["torch", "numpy"])
def test_torch_training_runs_the_fused_kernels_and_matches_the_torch_path(
    rng, dtype, overrides, L, blas, monkeypatch
):  # fmt: skip
    # a training call of MambaTorch on the CPU from a non-zero state that itself needs a
    # gradient, over a ragged last chunk (70 = 64 + 6 steps: `kernels.BACKWARD_CHUNK`) or
    # fewer steps than the conv
    # reaches back (2): in_proj and out_proj under autograd, the rest on the kernels
    # (`_MambaInner`), against the same module with the kernels off (autograd through the
    # core's conv, SiLU, projections, scan and gate): output, both final states, every
    # parameter's gradient and those of the input and both states in, with a loss on the
    # output and both states out; the kernel path's products on either BLAS (`_blas`)
    require("torch")
    import torch

    from mamba_core.backends import torch as mt
    from mamba_core.backends.torch import MambaTorch

    monkeypatch.setattr(mt, "_BLAS", {dtype: (blas, float("nan"), float("nan"))})

    cfg = small_config(**overrides)
    x_np = rng.standard_normal((2, L, cfg.hidden_size)).astype(dtype)
    prefix = rng.standard_normal((2, 6, cfg.hidden_size)).astype(dtype)
    results = []
    for compiled in (True, False):
        monkeypatch.setattr(kernels, "_DISABLED", not compiled)
        model = MambaTorch(cfg, seed=3, dtype=getattr(torch, dtype))
        with torch.no_grad():
            _, state = model(torch.from_numpy(prefix), return_state=True)
        state = MambaState(*(t.clone().requires_grad_(True) for t in state))
        x = torch.tensor(x_np, requires_grad=True)
        y, s = model(x, state=state, return_state=True)
        assert ("_MambaInnerBackward" in _graph_names(y)) == compiled
        assert ("_NumpyLinearBackward" in _graph_names(y)) == (compiled and blas == "numpy")
        loss = y.square().sum() + s.ssm_state.pow(3).sum() + (s.conv_state * 0.5).exp().sum()
        loss.backward()
        grads = [p.grad for _, p in sorted(model.named_parameters())]
        results.append([y.detach(), s.ssm_state.detach(), s.conv_state.detach(), x.grad,
                        state.conv_state.grad, state.ssm_state.grad, *grads])  # fmt: skip
    for fast, slow in zip(*results, strict=True):
        assert fast.dtype == slow.dtype and fast.shape == slow.shape
        assert_close(fast, slow, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "overrides", [{"use_bias": True}, {"use_conv_bias": False, "d_conv": 3}], ids=["bias", "K3"]
)
@pytest.mark.parametrize("L", [70, 2])
def test_jax_layer_runs_on_the_kernels_and_matches_xla(rng, dtype, overrides, L, monkeypatch):
    # the JAX Mamba-1 layer on the CPU as one callback of the kernels (`_host_mamba1`), its
    # gradients as another, against XLA's layer (the kernels off): from non-zero states over
    # a ragged last chunk (70 = 64 + 6 steps: `kernels.BACKWARD_CHUNK`) or fewer steps than
    # the conv reaches back (2), with a loss on the output and both states out: every
    # parameter's gradient and those of the input and both states in, and the plain forward;
    # vmap of the gradient equals the gradient of each example
    require("jax")
    import jax
    import jax.numpy as jnp

    from mamba_core.backends import jax as mj

    cfg = small_config(**overrides)
    params = {k: jnp.asarray(v, dtype) for k, v in init_params(cfg, 4).items()}
    x = jnp.asarray(rng.standard_normal((2, L, cfg.hidden_size)), dtype)
    conv0 = jnp.asarray(rng.standard_normal((2, cfg.d_inner, cfg.d_conv)), dtype)
    h0 = jnp.asarray(rng.standard_normal((2, cfg.d_inner, cfg.d_state)), dtype)

    def loss(p, v, c, h):
        y, s = mj.forward(p, v, cfg, state=MambaState(c, h))
        return jnp.sum(y**2) + jnp.sum(s.ssm_state**3) + jnp.sum(jnp.exp(s.conv_state * 0.5))

    results = []
    for compiled in (True, False):
        monkeypatch.setattr(kernels, "_DISABLED", not compiled)
        # fresh functions: an outer jit would keep its first trace whatever the switch says
        grad = jax.jit(jax.grad(lambda *a: loss(*a), argnums=(0, 1, 2, 3)))
        plain = jax.jit(lambda p, v, c, h: mj.forward(p, v, cfg, state=MambaState(c, h)))
        # the programs XLA runs: callbacks exactly when the kernels are on
        assert ("callback" in grad.lower(params, x, conv0, h0).as_text()) == compiled
        assert ("callback" in plain.lower(params, x, conv0, h0).as_text()) == compiled
        results.append([*jax.tree.leaves(grad(params, x, conv0, h0)),
                        *jax.tree.leaves(plain(params, x, conv0, h0))])  # fmt: skip
    for fast, slow in zip(*results, strict=True):
        assert fast.dtype == slow.dtype and fast.shape == slow.shape
        assert_close(np.asarray(fast), np.asarray(slow), dtype)
    # vmap over a leading axis of single examples: the callbacks run one example at a time
    monkeypatch.setattr(kernels, "_DISABLED", False)
    one = jax.grad(lambda p, v, c, h: loss(p, v[None], c[None], h[None]), argnums=(0, 1, 2, 3))
    batched = jax.vmap(one, in_axes=(None, 0, 0, 0))(params, x, conv0, h0)
    for index in range(2):
        each = one(params, x[index], conv0[index], h0[index])
        for b, e in zip(jax.tree.leaves(batched), jax.tree.leaves(each), strict=True):
            assert_close(np.asarray(b)[index], np.asarray(e), dtype)


def test_torch_second_derivatives_are_refused_not_wrong():
    # the hand-written backward passes are not differentiable again: a second derivative
    # through them raises instead of silently treating their gradients as constants
    require("torch")
    import torch

    from mamba_core.backends.torch import MambaTorch

    cfg = small_config()
    model = MambaTorch(cfg, seed=0, dtype=torch.float64)
    x = torch.randn(1, 9, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_jax_second_derivatives_raise_on_the_kernels_and_work_elsewhere(rng):
    # the kernels' VJP runs through callbacks, which JAX cannot differentiate again: a clear
    # error, not a wrong number; scan_type="associative" (all XLA) takes second derivatives
    require("jax")
    import jax
    import jax.numpy as jnp

    from mamba_core.backends import jax as mj

    cfg = small_config()
    params = {k: jnp.asarray(v) for k, v in init_params(cfg, 0).items()}
    x = jnp.asarray(rng.standard_normal((1, 5, cfg.hidden_size)), jnp.float32)

    def curvature(scan_type):
        def f(v):
            return jnp.sum(mj.forward(params, v, cfg, scan_type=scan_type)[0] ** 2)

        return jax.grad(lambda v: jnp.sum(jax.grad(f)(v) ** 2))(x)

    with pytest.raises(ValueError, match="callbacks do not support JVP"):
        curvature("linear")
    assert np.all(np.isfinite(np.asarray(curvature("associative"))))


_SHARDED = """
import json
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from mamba_core import init_params
from mamba_core.backends import jax as mj
from tests.conftest import small_config
cfg = small_config()
p = {k: jnp.asarray(v) for k, v in init_params(cfg, 0).items()}
x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 9, 16)), jnp.float32)
mesh = Mesh(np.array(jax.devices()), ("data",))
grad = jax.grad(lambda p, v: jnp.sum(mj.forward(p, v, cfg)[0] ** 2))
ref = grad(p, x)
per_shard = jax.jit(jax.shard_map(lambda p, v: jax.lax.psum(grad(p, v), "data"), mesh=mesh,
                                  in_specs=(P(), P("data")), out_specs=P(), check_vma=False))
partitioned = jax.jit(grad)(p, jax.device_put(x, NamedSharding(mesh, P("data"))))
err = lambda out: max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                      for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
print(json.dumps({"devices": len(jax.devices()), "shard_map": err(per_shard(p, x)),
                  "partitioned": err(partitioned),
                  "callback": "callback" in per_shard.lower(p, x).as_text()}))
"""


def test_jax_kernel_gradients_under_shard_map_and_partitioned_inputs():
    # the kernels' VJP on 2 forced host devices: inside shard_map (each device's callbacks on
    # its own shard) and on inputs XLA partitions by itself (it gathers them for the callback)
    require("jax")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env.pop("MAMBA_CORE_KERNELS", None)
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED], capture_output=True, text=True, cwd=ROOT, env=env,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2 and out["callback"]
    assert out["shard_map"] < 1e-5 and out["partitioned"] < 1e-5, out
