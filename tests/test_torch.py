"""PyTorch specifics: MambaTorch (official names, strict loading), autograd, devices, dtypes,
the cumulative scan under stress, and torch.compile."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tests.conftest import require, small_config
from tests.reference import reference_forward
from tests.tolerances import assert_close, rel_error

require("torch", module_level=True)

import torch  # noqa: E402

from mamba_core import MambaConfig, MambaModule, init_params, param_shapes  # noqa: E402
from mamba_core.backends.torch import MambaTorch, torch_forward  # noqa: E402

SCANS = ["linear", "associative", "cumulative"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def official_state_dict(cfg, seed=0):
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in init_params(cfg, seed).items()}


def test_parameters_carry_the_official_names():
    cfg = small_config(use_bias=True)
    model = MambaTorch(cfg, seed=0)
    assert dict(model.named_parameters()).keys() == param_shapes(cfg).keys()
    for name, shape in param_shapes(cfg).items():
        assert tuple(model.state_dict()[name].shape) == shape


def test_strict_load_of_an_official_state_dict(device, rng):
    cfg = small_config()
    model = MambaTorch(cfg, seed=1).to(device)
    result = model.load_state_dict(official_state_dict(cfg, seed=7), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = rng.standard_normal((2, 9, cfg.hidden_size))
    y = model(torch.tensor(x, dtype=torch.float32, device=device))
    expected, _ = reference_forward(init_params(cfg, 7), x, cfg)
    assert_close(y, expected, "float32")
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({"A_log": torch.zeros(32, 8)}, strict=True)


def test_huggingface_mixer_weights_and_outputs(rng):
    """Extra oracle: transformers' MambaMixer (its pure-PyTorch path: causal_conv1d_fn and
    selective_scan_fn reference fallbacks), when transformers is installed."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (an optional oracle)")
    from transformers import MambaConfig as HFConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    hf_cfg = HFConfig(
        hidden_size=16,
        state_size=8,
        conv_kernel=4,
        expand=2,
        time_step_rank=4,
        use_bias=False,
        use_conv_bias=True,
        hidden_act="silu",
        num_hidden_layers=1,
    )
    hf = MambaMixer(hf_cfg, layer_idx=0).eval()
    ours = MambaTorch(small_config(), seed=0)
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.tensor(rng.standard_normal((2, 20, 16)), dtype=torch.float32)
    with torch.no_grad():
        assert_close(ours(x), hf(x), "float32")


def test_same_numbers_as_the_other_backends(rng):
    cfg = small_config()
    x = rng.standard_normal((2, 14, cfg.hidden_size))
    model = MambaTorch(cfg, seed=3, dtype=torch.float64)
    y = model(torch.tensor(x))
    for backend in ("numpy", "jax"):
        require(backend)
        other = MambaModule(cfg, backend=backend, seed=3, dtype="float64")(x)["output"]
        assert_close(y, other, "float64")
    adapter = MambaModule(cfg, backend="torch", seed=3, dtype="float64")(x)["output"]
    with torch.no_grad():  # the adapter's weights need no grad: the same (in-place) scan
        assert torch.equal(adapter, model(torch.tensor(x)))  # one code path: bit-identical


@pytest.mark.parametrize("scan", SCANS)
def test_gradcheck_every_parameter_and_the_input(scan):
    cfg = MambaConfig(
        hidden_size=4,
        d_state=3,
        d_conv=3,
        expand_factor=2,
        dt_rank=2,
        scan_type=scan,
        chunk_size=3,
        use_bias=True,
    )
    model = MambaTorch(cfg, seed=0).double()
    names = list(model.params_dict())
    x = torch.randn(2, 7, 4, dtype=torch.float64, requires_grad=True)

    def f(x, *params):  # the output and the final state, so both adjoints are checked
        y, state = torch_forward(dict(zip(names, params, strict=True)), x, cfg)
        return y, state.ssm_state

    params = [p.detach().clone().requires_grad_(True) for p in model.params_dict().values()]
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradients_reach_every_parameter_and_match_jax(rng):
    require("jax")
    import jax
    import jax.numpy as jnp

    from mamba_core.backends import jax as mj

    cfg = small_config(use_bias=True)
    model = MambaTorch(cfg, seed=4, dtype=torch.float64)
    x_np = rng.standard_normal((2, 10, cfg.hidden_size))
    x = torch.tensor(x_np, requires_grad=True)
    torch.sin(model(x)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and float(p.grad.abs().max()) > 0, name
    params = {k: jnp.asarray(v) for k, v in init_params(cfg, 4).items()}
    g_p, g_x = jax.grad(lambda p, v: jnp.sum(jnp.sin(mj.forward(p, v, cfg)[0])), argnums=(0, 1))(
        params, jnp.asarray(x_np)
    )
    for name, p in model.named_parameters():
        assert_close(p.grad, g_p[name], "float64", factor=10)
    assert_close(x.grad, g_x, "float64", factor=10)


def test_decode_equals_forward(device, rng):
    cfg = small_config()
    model = MambaTorch(cfg, seed=2).to(device=device, dtype=torch.float64)
    x = torch.tensor(rng.standard_normal((2, 8, cfg.hidden_size)), device=device)
    full, full_state = model(x, return_state=True)
    y, state = model(x[:, :3], return_state=True)
    outs = [y]
    for t in range(3, 8):
        y_t, state = model.step(x[:, t], state)
        outs.append(y_t[:, None])
    assert_close(torch.cat(outs, 1).cpu(), full.cpu(), "float64")
    assert_close(state.ssm_state.cpu(), full_state.ssm_state.cpu(), "float64")
    assert state.ssm_state.device.type == device.type


@pytest.mark.parametrize("scan", SCANS)
def test_stress_huge_decays_over_long_chunks(scan, device):
    """dt*A down to -143 per step, 64-step chunks, float32: finite and equal to the reference."""
    cfg = MambaConfig(hidden_size=8, d_state=50, dt_rank=2, scan_type=scan, chunk_size=64)
    params = init_params(cfg, seed=0)
    rng = np.random.default_rng(0)
    # dt = softplus(bias + small): about 2.86 on half the channels, tiny on the others
    params["dt_proj.bias"] = np.where(np.arange(cfg.d_inner) % 2 == 0, 2.8, -9.0)
    params["dt_proj.weight"] *= 0.01
    x = rng.standard_normal((2, 300, cfg.hidden_size))
    model = MambaTorch(cfg, seed=0).to(device)
    model.load_official(params)
    with torch.no_grad():
        y, state = model(torch.tensor(x, dtype=torch.float32, device=device), return_state=True)
    assert torch.isfinite(y).all() and torch.isfinite(state.ssm_state).all()
    expected, (_, h_ref) = reference_forward(params, x, cfg)
    assert_close(y.cpu(), expected, "float32")
    assert_close(state.ssm_state.cpu(), h_ref, "float32")
    dt = np.logaddexp(0, params["dt_proj.bias"]).max()
    assert dt * 50 > 140  # the stress really reaches dt*A < -140


def test_dtype_follows_the_inputs(device, rng):
    cfg = small_config()
    x = rng.standard_normal((2, 16, cfg.hidden_size))
    model = MambaTorch(cfg, seed=1).to(device)
    ref, _ = reference_forward(model.numpy_state_dict(), x, cfg)  # the float32 weights
    y64 = model.to(torch.float64)(torch.tensor(x, device=device))
    assert y64.dtype == torch.float64
    assert_close(y64.cpu(), ref, "float64")
    model = model.to(torch.float32)
    for dtype, tol in ((torch.bfloat16, 4e-2), (torch.float16, 5e-3)):
        y, state = model(torch.tensor(x, dtype=dtype, device=device), return_state=True)
        assert y.dtype == dtype and state.ssm_state.dtype == torch.float32
        assert rel_error(y.float().cpu(), ref) <= tol


def test_errors_say_what_was_expected(rng):
    model = MambaTorch(small_config(), seed=0)
    with pytest.raises(ValueError, match=r"x\.shape=\(2, 3\)"):
        model(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="floating"):
        model(torch.zeros(2, 3, 16, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        model(np.zeros((2, 3, 16)))
    with pytest.raises(ValueError, match=r"D: expected shape \(32,\), received \(3,\)"):
        model.load_official({**official_state_dict(small_config()), "D": torch.zeros(3)})
    if DEVICES == ["cpu"]:
        with pytest.raises(ValueError, match="invalid for the torch backend"):
            MambaModule(small_config(), backend="torch", device="cuda:0")


def test_seed_none_follows_torch_manual_seed():
    cfg = small_config()
    torch.manual_seed(0)
    a = MambaTorch(cfg).numpy_state_dict()
    torch.manual_seed(0)
    b = MambaTorch(cfg).numpy_state_dict()
    np.testing.assert_array_equal(a["in_proj.weight"], b["in_proj.weight"])
    same = MambaModule(cfg, backend="numpy", seed=5).state_dict()
    np.testing.assert_array_equal(
        MambaTorch(cfg, seed=5).numpy_state_dict()["x_proj.weight"], same["x_proj.weight"]
    )


def test_torch_compile_matches_eager(rng):
    if not hasattr(torch, "compile"):
        pytest.skip("this torch has no torch.compile")
    cfg = small_config()
    model = MambaTorch(cfg, seed=0)
    x = torch.tensor(rng.standard_normal((2, 12, cfg.hidden_size)), dtype=torch.float32)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
        kernel = MambaTorch(cfg, seed=0, compile_scan=True)(x)  # the compiled scan kernel
    assert_close(compiled, eager, "float32")
    assert_close(kernel, eager, "float32")
