"""The pure Array-API core on every namespace, array_api_strict first."""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import array_namespace
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba_core import init_params, mixer_forward, mixer_step, selective_scan
from mamba_core.mixer import MambaState
from mamba_core.ops import causal_conv1d, gelu_tanh, relu, silu, softplus
from mamba_core.scan import ALGORITHMS
from tests.conftest import small_config, to_xp
from tests.reference import _act, reference_forward, reference_scan
from tests.tolerances import assert_close, to_np

ALGOS = sorted(ALGORITHMS)


def scan_inputs(rng, B, L, E, N, dt_scale=0.5):
    return dict(
        u=rng.standard_normal((B, L, E)),
        dt=rng.uniform(0.0, dt_scale, (B, L, E)),
        A=-np.exp(rng.uniform(-1.0, 1.5, (E, N))),
        Bm=rng.standard_normal((B, L, N)),
        Cm=rng.standard_normal((B, L, N)),
        h0=rng.standard_normal((B, E, N)),
    )


def run_scan(xp, inputs, algorithm, chunk_size=None, dtype=None):
    args = [to_xp(xp, inputs[k], dtype) for k in ("u", "dt", "A", "Bm", "Cm", "h0")]
    return selective_scan(*args, algorithm=algorithm, chunk_size=chunk_size)


# ---------------------------------------------------------------- elementwise pieces
def test_softplus_is_stable_and_exact(xp):
    x = np.array([-1000.0, -50.0, -1.0, 0.0, 1e-8, 1.0, 30.0, 50.0, 1000.0])
    got = to_np(softplus(to_xp(xp, x)))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, np.logaddexp(0.0, x), rtol=1e-15, atol=1e-300)


@pytest.mark.parametrize("name,fn", [("swish", silu), ("gelu", gelu_tanh), ("relu", relu)])
def test_activations_match_their_formulas(xp, name, fn):
    x = np.linspace(-30, 30, 301)
    got = to_np(fn(to_xp(xp, x)))
    np.testing.assert_allclose(got, _act(name)(x), rtol=1e-14, atol=1e-13)
    assert np.isnan(to_np(fn(to_xp(xp, np.array([np.nan]))))).all()


def test_causal_conv_matches_numpy_convolve_and_carries_state(xp, rng):
    B, L, E, K = 2, 11, 3, 4
    x = rng.standard_normal((B, L, E))
    w = rng.standard_normal((E, 1, K))
    bias = rng.standard_normal(E)
    out, state = causal_conv1d(to_xp(xp, x), to_xp(xp, w), to_xp(xp, bias))
    expected = np.empty((B, L, E))
    for b in range(B):
        for e in range(E):
            # cross-correlation with K-1 zeros on the left == convolve with the flipped kernel
            expected[b, :, e] = np.convolve(x[b, :, e], w[e, 0, ::-1])[:L] + bias[e]
    np.testing.assert_allclose(to_np(out), expected, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(to_np(state), np.transpose(x[:, -K:], (0, 2, 1)))
    # splitting the sequence and carrying the state gives the same output
    out1, st1 = causal_conv1d(to_xp(xp, x[:, :5]), to_xp(xp, w), to_xp(xp, bias))
    out2, st2 = causal_conv1d(to_xp(xp, x[:, 5:]), to_xp(xp, w), to_xp(xp, bias), st1)
    np.testing.assert_allclose(np.concatenate([to_np(out1), to_np(out2)], 1), expected, atol=1e-13)
    np.testing.assert_array_equal(to_np(st2), to_np(state))


# ---------------------------------------------------------------- the scans
@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("L,chunk", [(1, None), (3, None), (37, 8), (64, 16), (40, 40), (9, 1)])
def test_scan_matches_reference(xp, rng, algorithm, L, chunk):
    inputs = scan_inputs(rng, 2, L, 5, 3)
    y, h = run_scan(xp, inputs, algorithm, chunk)
    y_ref, h_ref = reference_scan(**inputs)
    assert_close(y, y_ref, "float64")
    assert_close(h, h_ref, "float64")
    assert array_namespace(y) is xp


@pytest.mark.parametrize("algorithm", ALGOS)
def test_scan_float32_matches_reference(xp, rng, algorithm):
    inputs = scan_inputs(rng, 2, 50, 6, 4)
    y, h = run_scan(xp, inputs, algorithm, 16, dtype=xp.float32)
    assert y.dtype == xp.float32 and h.dtype == xp.float32
    y_ref, h_ref = reference_scan(**inputs)
    assert_close(y, y_ref, "float32")
    assert_close(h, h_ref, "float32")


@pytest.mark.parametrize("algorithm", ALGOS)
def test_scan_is_stable_for_huge_decays(xp, rng, algorithm):
    """dt*A down to -143 per step, over long chunks: nothing overflows, nothing is lost."""
    inputs = scan_inputs(rng, 1, 96, 4, 3)
    inputs["A"] = -np.array([[1.0, 10.0, 50.0]] * 4)
    inputs["dt"] = rng.uniform(0.0, 2.86, (1, 96, 4))  # 2.86 * 50 = 143
    inputs["dt"][0, 10:20] = 1e-4  # slow stretches between the fast ones
    for dtype, tol in ((xp.float64, "float64"), (xp.float32, "float32")):
        y, h = run_scan(xp, inputs, algorithm, 32, dtype=dtype)
        assert np.isfinite(to_np(y)).all() and np.isfinite(to_np(h)).all()
        y_ref, h_ref = reference_scan(**inputs)
        assert_close(y, y_ref, tol)
        assert_close(h, h_ref, tol)


@pytest.mark.parametrize("algorithm", ALGOS)
def test_scan_nan_reaches_only_later_steps_of_its_row(xp, rng, algorithm):
    inputs = scan_inputs(rng, 2, 20, 3, 2)
    inputs["u"][0, 6, 1] = np.nan
    y, _ = run_scan(xp, inputs, algorithm, 8)
    y = to_np(y)
    assert np.isfinite(y[0, :6]).all(), "NaN leaked to earlier steps"
    assert np.isnan(y[0, 6:, 1]).all()
    assert np.isfinite(y[1]).all(), "NaN leaked to another batch row"


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3),
    L=st.integers(1, 40),
    E=st.integers(1, 6),
    N=st.integers(1, 5),
    chunk=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_scans_agree_on_random_shapes(B, L, E, N, chunk, seed):
    import array_api_compat.numpy as xp

    inputs = scan_inputs(np.random.default_rng(seed), B, L, E, N, dt_scale=3.0)
    y_ref, h_ref = reference_scan(**inputs)
    for algorithm in ALGOS:
        y, h = run_scan(xp, inputs, algorithm, chunk)
        assert_close(y, y_ref, "float64")
        assert_close(h, h_ref, "float64")


# ---------------------------------------------------------------- the mixer
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"use_bias": True, "use_conv_bias": False},
        {"activation": "gelu", "scan_type": "associative"},
        {"activation": "relu", "scan_type": "cumulative"},
        {"d_conv": 1, "chunk_size": 3},
    ],
    ids=["default", "bias", "gelu-assoc", "relu-cumul", "k1"],
)
def test_mixer_forward_matches_reference(xp, rng, overrides):
    cfg = small_config(**overrides)
    params = init_params(cfg, seed=5)
    x = rng.standard_normal((2, 13, cfg.hidden_size))
    p = {k: to_xp(xp, v) for k, v in params.items()}
    out, state = mixer_forward(p, to_xp(xp, x), cfg)
    ref, (conv_ref, h_ref) = reference_forward(params, x, cfg)
    assert_close(out, ref, "float64")
    assert_close(state.conv_state, conv_ref, "float64")
    assert_close(state.ssm_state, h_ref, "float64")
    assert array_namespace(out) is xp


def test_mixer_step_and_continuation_equal_forward(xp, rng):
    cfg = small_config()
    params = {k: to_xp(xp, v) for k, v in init_params(cfg, seed=2).items()}
    x = rng.standard_normal((2, 9, cfg.hidden_size))
    full, full_state = mixer_forward(params, to_xp(xp, x), cfg)
    # prefill 5 tokens, then 4 single steps
    out, state = mixer_forward(params, to_xp(xp, x[:, :5]), cfg)
    outs = [to_np(out)]
    for t in range(5, 9):
        y_t, state = mixer_step(params, state, to_xp(xp, x[:, t]), cfg)
        outs.append(to_np(y_t)[:, None])
    assert_close(np.concatenate(outs, axis=1), full, "float64")
    assert isinstance(state, MambaState)
    assert_close(state.ssm_state, full_state.ssm_state, "float64")
    assert_close(state.conv_state, full_state.conv_state, "float64")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 40])
def test_numpy_dense_matches_the_product_for_every_row_count(rng, dtype, rows):
    # `backends.numpy.dense` computes weight @ x.T for a few rows (a decode step's batch) and
    # x @ weight.T otherwise: both against a float64 product, with and without bias, in x's
    # leading shape and owning its memory (the kernels read its column blocks in place)
    from mamba_core.backends.numpy import dense

    d = np.dtype(dtype)
    x = rng.standard_normal((rows, 1, 24)).astype(d)
    weight = rng.standard_normal((40, 24)).astype(d)
    bias = rng.standard_normal(40).astype(d)
    exact = np.float64(x) @ np.float64(weight).T
    for b, want in ((None, exact), (bias, exact + bias)):
        got = dense(x, weight, b)
        assert got.shape == (rows, 1, 40) and got.dtype == d
        assert got.flags.c_contiguous and got.flags.owndata
        assert_close(got, want, dtype)
