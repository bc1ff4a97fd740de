"""`MambaModule` on every backend against the independent float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from mamba_core import MambaConfig, MambaModule, MambaState, available_modules, create_module
from tests.conftest import small_config
from tests.reference import reference_forward
from tests.tolerances import assert_close, rel_error, to_np

SCANS = ["linear", "associative", "cumulative"]

CASES = {
    "L1": dict(L=1),
    "L<K": dict(L=3),
    "odd-L": dict(L=13),
    "L%chunk": dict(L=21, chunk_size=8),
    "B1": dict(B=1, L=10),
    "B3": dict(B=3, L=10),
    "bias": dict(L=12, use_bias=True),
    "no-conv-bias": dict(L=12, use_conv_bias=False),
    "gelu": dict(L=12, activation="gelu"),
    "relu": dict(L=12, activation="relu"),
    "silu-alias": dict(L=5, activation="silu"),
}


def native_type(backend):
    if backend == "numpy":
        return np.ndarray
    if backend == "jax":
        import jax

        return jax.Array
    import torch

    return torch.Tensor


def as_backend(backend, x):
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.asarray(x)
    if backend == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(x))
    return x


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(backend, case, dtype, rng):
    opts = dict(CASES[case])
    batch, length = opts.pop("B", 2), opts.pop("L")
    cfg = small_config(**opts)
    module = MambaModule(cfg, backend=backend, dtype=dtype, seed=7)
    x = rng.standard_normal((batch, length, cfg.hidden_size))
    result = module(x)
    out = result["output"]
    assert isinstance(out, native_type(backend))
    assert str(out.dtype).endswith(dtype)
    expected, (conv_ref, h_ref) = reference_forward(module.state_dict(), x, cfg)
    assert_close(out, expected, dtype)
    assert_close(result["state"].conv_state, conv_ref, dtype)
    assert_close(result["state"].ssm_state, h_ref, dtype)


@pytest.mark.parametrize("scan", SCANS)
def test_every_scan_matches_reference(backend, scan, rng):
    cfg = small_config(scan_type=scan, chunk_size=4)
    module = MambaModule(cfg, backend=backend, dtype="float64", seed=1)
    x = rng.standard_normal((2, 19, cfg.hidden_size))
    result = module(x)
    expected, _ = reference_forward(module.state_dict(), x, cfg)
    assert_close(result["output"], expected, "float64")
    assert result["metrics"]["scan_used"] == scan


def test_seed_usage_example(backend):
    """The upstream README example, on every backend."""
    config = {"hidden_size": 768, "d_state": 64, "scan_type": "associative"}
    module = MambaModule(config, backend=backend)
    x = np.random.default_rng(0).standard_normal((2, 512, 768))  # float64, as upstream
    result = module(x, training=False)
    assert tuple(result["output"].shape) == (2, 512, 768)
    assert str(result["output"].dtype).endswith("float32")
    m = result["metrics"]
    assert m["mamba_active"] is True and m["selective_scan_used"] is True
    assert m["complexity"] == "O(log n)" and m["work_complexity"] == "O(n)"
    assert m["sequence_length"] == 512 and m["batch_size"] == 2 and m["d_state"] == 64
    assert m["tpu_optimized"] is False  # a CPU is not a TPU
    assert m["backend"] == backend and m["fallback_used"] is False
    assert m["scan_type"] == "associative" and m["scan_used"] == "associative"
    assert m["platform"] == "cpu" and m["device"].startswith("cpu")
    assert isinstance(m["chunk_size"], int) and m["chunk_size"] >= 1
    assert m["dtype"] == "float32"
    assert result["success"] is True
    assert np.isfinite(to_np(result["output"])).all()


def test_step_by_step_equals_forward(backend, rng):
    cfg = small_config()
    module = MambaModule(cfg, backend=backend, dtype="float64", seed=3)
    x = rng.standard_normal((2, 11, cfg.hidden_size))
    full = module(x)
    state = module.init_state(2)
    outs = []
    for t in range(x.shape[1]):
        y_t, state = module.step(x[:, t], state)
        assert tuple(y_t.shape) == (2, cfg.hidden_size)
        outs.append(to_np(y_t))
    assert_close(np.stack(outs, 1), full["output"], "float64")
    assert_close(state.ssm_state, full["state"].ssm_state, "float64")
    assert_close(state.conv_state, full["state"].conv_state, "float64")


@pytest.mark.parametrize("scan", SCANS)
def test_prefill_then_step_and_continuation_equal_one_call(backend, scan, rng):
    cfg = small_config(scan_type=scan)
    module = MambaModule(cfg, backend=backend, dtype="float64", seed=4)
    x = rng.standard_normal((2, 23, cfg.hidden_size))
    full = to_np(module(x)["output"])
    # prefill 9 tokens, then decode 3 one by one
    pre = module(x[:, :9])
    state = pre["state"]
    steps = []
    for t in range(9, 12):
        y_t, state = module.step(x[:, t], state)
        steps.append(to_np(y_t))
    assert_close(np.stack(steps, 1), full[:, 9:12], "float64")
    # then continue with a whole chunk through state=
    rest = module(x[:, 12:], state=state)
    assert_close(rest["output"], full[:, 12:], "float64")
    # and a NumPy copy of the state works as well as the backend's own
    np_state = MambaState(to_np(state.conv_state), to_np(state.ssm_state))
    assert_close(module(x[:, 12:], state=np_state)["output"], full[:, 12:], "float64")


def test_float32_close_to_float64(backend, rng):
    cfg = small_config()
    x = rng.standard_normal((2, 30, cfg.hidden_size))
    y32 = MambaModule(cfg, backend=backend, dtype="float32", seed=2)(x)["output"]
    y64 = MambaModule(cfg, backend=backend, dtype="float64", seed=2)(x)["output"]
    assert_close(y32, y64, "float32")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision(backend, dtype, rng):
    cfg = small_config()
    x = rng.standard_normal((2, 20, cfg.hidden_size))
    if backend == "numpy" and dtype == "bfloat16":
        with pytest.raises(ValueError, match="not supported by the numpy backend"):
            MambaModule(cfg, backend=backend, dtype=dtype)
        return
    module = MambaModule(cfg, backend=backend, dtype=dtype, seed=2)
    result = module(x)
    assert str(result["output"].dtype).endswith(dtype)
    assert result["metrics"]["scan_dtype"] == "float32"  # mixed precision: the scan in fp32
    assert str(result["state"].ssm_state.dtype).endswith("float32")
    ref = MambaModule(cfg, backend="numpy", dtype="float64", seed=2)(x)["output"]
    assert rel_error(result["output"], ref) <= {"bfloat16": 4e-2, "float16": 5e-3}[dtype]


def test_inputs_of_the_backend_and_of_numpy(backend, rng):
    cfg = small_config()
    module = MambaModule(cfg, backend=backend, seed=0)
    x = rng.standard_normal((2, 6, cfg.hidden_size)).astype(np.float32)
    a = module(x)["output"]
    b = module(as_backend(backend, x))["output"]
    np.testing.assert_array_equal(to_np(a), to_np(b))


def test_caller_arrays_are_not_modified(backend, rng):
    cfg = small_config()
    module = MambaModule(cfg, backend=backend, seed=0)
    x = rng.standard_normal((2, 7, cfg.hidden_size)).astype(np.float32)
    x_copy = x.copy()
    first = module(x)
    conv, ssm = to_np(first["state"].conv_state).copy(), to_np(first["state"].ssm_state).copy()
    module(x, state=first["state"])
    module.step(x[:, 0], first["state"])
    np.testing.assert_array_equal(x, x_copy)
    np.testing.assert_array_equal(to_np(first["state"].conv_state), conv)
    np.testing.assert_array_equal(to_np(first["state"].ssm_state), ssm)
    native = as_backend(backend, x)
    module(native)
    np.testing.assert_array_equal(to_np(native), x_copy)


@pytest.mark.parametrize("scan", SCANS)
def test_nan_propagates_only_forward_in_its_row(backend, scan, rng):
    cfg = small_config(scan_type=scan, chunk_size=4)
    module = MambaModule(cfg, backend=backend, seed=0)
    x = rng.standard_normal((2, 12, cfg.hidden_size))
    x[0, 5, 3] = np.nan
    out = to_np(module(x)["output"])
    assert np.isfinite(out[0, :5]).all()
    assert np.isnan(out[0, 5:]).all(axis=-1).all()
    assert np.isfinite(out[1]).all()


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda r: r.standard_normal((2, 16)), ValueError, r"3-D array .*inputs\.shape=\(2, 16\)"),
        (
            lambda r: r.standard_normal((2, 5, 7)),
            ValueError,
            r"hidden_size=16 .*inputs\.shape=\(2, 5, 7\)",
        ),
        (lambda r: np.zeros((2, 0, 16)), ValueError, r"no empty axis"),
        (lambda r: np.ones((2, 5, 16), dtype=np.int64), TypeError, r"real floating dtype.*int64"),
        (lambda r: np.ones((2, 5, 16), dtype=bool), TypeError, r"real floating dtype.*bool"),
        (lambda r: np.ones((2, 5, 16), dtype=np.complex64), TypeError, r"real floating.*complex64"),
        (lambda r: [[[0.0] * 16]], TypeError, r"received list"),
    ],
    ids=["2d", "hidden", "empty", "int", "bool", "complex", "list"],
)
def test_bad_inputs_say_what_was_expected(backend, rng, make, error, match):
    module = MambaModule(small_config(), backend=backend)
    with pytest.raises(error, match=match):
        module(make(rng))


def test_bad_states_and_flags(backend, rng):
    cfg = small_config()
    module = MambaModule(cfg, backend=backend)
    x = rng.standard_normal((2, 4, cfg.hidden_size))
    good = module.init_state(2)
    with pytest.raises(
        ValueError,
        match=r"conv_state: expected shape \(2, 32, 4\).*received state.conv_state.shape=\(3, 32, 4\)",
    ):
        module(x, state=module.init_state(3))
    with pytest.raises(
        ValueError,
        match=r"ssm_state: expected shape \(2, 32, 8\).*received state.ssm_state.shape=\(2, 32, 5\)",
    ):
        module(x, state=MambaState(good.conv_state, np.zeros((2, 32, 5))))
    with pytest.raises(TypeError, match="state must be a MambaState"):
        module(x, state="nope")
    with pytest.raises(TypeError, match="real floating"):
        module(x, state=MambaState(np.zeros((2, 32, 4), dtype=np.int32), good.ssm_state))
    with pytest.raises(TypeError, match="training must be a bool"):
        module(x, training="yes")
    with pytest.raises(ValueError, match=r"x_t.*2-D array"):
        module.step(x, good)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        module.init_state(0)
    # a dict with the field names is a valid state
    out = module(x, state={"conv_state": good.conv_state, "ssm_state": good.ssm_state})
    assert out["success"] is True


# ---------------------------------------------------------------- the IModule face
def test_metrics_config_and_registry(backend):
    cfg = small_config(scan_type="linear")
    module = create_module("mamba", cfg.to_dict(), backend=backend, seed=0)
    assert isinstance(module, available_modules["mamba"])
    assert module.get_config() == cfg.to_dict()
    m = module.get_metrics()
    for key in (
        "module_type",
        "hidden_size",
        "d_state",
        "d_inner",
        "d_conv",
        "expand_factor",
        "complexity",
        "scan_type",
        "tpu_optimizations",
        "mixed_precision",
        "jax_available",
        "flax_available",
        "use_flax",
    ):
        assert key in m, key
    assert m["d_inner"] == 32 and m["complexity"] == "O(n)" and m["backend"] == backend
    assert m["num_parameters"] == sum(int(np.prod(v.shape)) for v in module.state_dict().values())
    tpu = module.setup_tpu_optimizations()
    assert tpu["tpu_optimized"] is False and tpu["platform"] == "cpu"
    with pytest.raises(ValueError, match="unknown module 'mambo'"):
        create_module("mambo")
    kw = create_module("mamba", hidden_size=8, d_state=4, backend=backend)
    assert kw.config.hidden_size == 8 and kw.backend_name == backend


def test_auto_scan_on_cpu_is_linear(backend):
    module = MambaModule(small_config(), backend=backend)
    assert module(np.zeros((1, 3, 16)))["metrics"]["scan_used"] == "linear"


@pytest.fixture(scope="module")
def long_case():
    """L=16384 at small dims, with dt*A down to about -100 per step on some channels."""
    cfg = MambaConfig(hidden_size=4, d_state=4, expand_factor=2, dt_rank=2, d_conv=4)
    from mamba_core import init_params

    params = init_params(cfg, seed=0)
    params["A_log"] = np.log(np.tile([1.0, 5.0, 12.0, 25.0], (cfg.d_inner, 1)))
    # softplus(4) ~ 4.02: dt*A ~ -100 on the A = -25 state of the fast channels
    params["dt_proj.bias"] = np.where(np.arange(cfg.d_inner) % 2 == 0, 4.0, -6.0)
    x = np.random.default_rng(0).standard_normal((1, 16384, cfg.hidden_size))
    expected, (_, h_ref) = reference_forward(params, x, cfg)
    return cfg, params, x, expected, h_ref


@pytest.mark.parametrize("scan", SCANS)
def test_long_sequence_with_large_dt(backend, scan, long_case):
    cfg, params, x, expected, h_ref = long_case
    module = MambaModule(cfg.replace(scan_type=scan), backend=backend, state_dict=params)
    result = module(x)
    out = to_np(result["output"])
    assert np.isfinite(out).all()
    assert_close(out, expected, "float32")
    assert_close(result["state"].ssm_state, h_ref, "float32")
    dt_max = np.logaddexp(0, params["dt_proj.bias"]).max()
    assert dt_max * 25 > 99  # the stress is real


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"version": "mamba2", "head_dim": 8},
        {"version": "mamba3", "head_dim": 8, "mimo": True, "mimo_rank": 2},
    ],
    ids=["mamba1", "mamba2", "mamba3"],
)
def test_long_inference_runs_in_pieces_and_equals_one_call(backend, fields, rng):
    """Beyond `long_chunk` tokens an inference call runs the mixer piece by piece along L,
    carrying the state: the same output and state as one call (L = 23 in pieces of 5)."""
    module = MambaModule(
        {"hidden_size": 16, "d_state": 8, **fields}, backend=backend, dtype="float64", seed=0
    )
    x = rng.standard_normal((2, 23, 16))
    module.long_chunk = None
    whole = module(x)
    module.long_chunk = 5
    assert module._pieces(23) == 5
    pieces = module(x)
    assert_close(pieces["output"], whole["output"], "float64")
    for got, want in zip(pieces["state"], whole["state"], strict=True):
        assert np.abs(to_np(got) - to_np(want)).max() < 1e-12
