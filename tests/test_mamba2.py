"""Mamba-2 (SSD): config, every backend and scan against the independent float64 reference,
decode, gradients, HuggingFace `Mamba2Mixer` weights and numbers, the long large-dt stress,
modules, sharding and errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mamba_core import MambaConfig, MambaModule, init_params, param_shapes
from mamba_core.mixer import Mamba2State
from mamba_core.ssd import ssd_scan
from tests.conftest import require, to_xp
from tests.gradients import check_gradients
from tests.reference import reference_forward_mamba2
from tests.tolerances import assert_close, to_np

SCANS = ["linear", "associative", "cumulative"]
ROOT = Path(__file__).resolve().parents[1]


def cfg2(**overrides) -> MambaConfig:
    """A small Mamba-2 layer: D=16, E=32, H=4 heads of P=8, N=8, K=4, chunk 8."""
    base = dict(
        version="mamba2", hidden_size=16, d_state=8, d_conv=4, expand_factor=2, head_dim=8,
        chunk_size=8,
    )  # fmt: skip
    base.update(overrides)
    return MambaConfig(**base)


# ------------------------------------------------------------------ config
def test_config_fields_defaults_and_derivation():
    cfg = MambaConfig(version="mamba2")
    assert (cfg.num_heads, cfg.head_dim, cfg.n_groups) == (24, 64, 1)
    assert cfg.time_step_limit == (0.0, math.inf) and cfg.A_init_range == (1.0, 16.0)
    assert cfg.d_state == 64 and MambaConfig().version == "mamba1"
    assert MambaConfig(version="mamba2", num_heads=12).head_dim == 128
    assert MambaConfig(version="mamba2", head_dim=32).num_heads == 48
    assert hash(cfg) == hash(MambaConfig(version="mamba2"))  # a static jit argument
    again = MambaConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))  # lists from JSON
    assert again == cfg


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(num_heads=10, head_dim=100), "num_heads * head_dim = 10 * 100 = 1000 != d_inner"),
        (dict(num_heads=7), "num_heads=7 does not divide d_inner"),
        (dict(head_dim=100), "head_dim=100 does not divide d_inner"),
        (dict(n_groups=5), "n_groups=5 does not divide num_heads=24"),
        (dict(n_groups=0), "n_groups=0 is invalid"),
        (dict(time_step_limit=(1.0, 0.5)), "time_step_limit=(1.0, 0.5) is invalid"),
        (dict(time_step_limit=(-1.0, 1.0)), "expected min >= 0"),
        (dict(A_init_range=(0.0, 16.0)), "A_init_range=(0.0, 16.0) is invalid"),
        (dict(head_dim="big"), "head_dim='big' is invalid"),
        (dict(version="mamba9"), "version='mamba9' is invalid"),
    ],
)
def test_bad_configs_name_fields_and_values(overrides, message):
    with pytest.raises(
        ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")
    ):
        MambaConfig(version=overrides.pop("version", "mamba2"), **overrides)


def test_toml_config(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text(
        '[modules.mamba]\nversion = "mamba2"\nhidden_size = 64\nhead_dim = 16\nn_groups = 2\n'
        "time_step_limit = [0.001, 10.0]\nenabled = true\n"
    )
    cfg = MambaConfig.from_toml(path)
    assert (cfg.num_heads, cfg.n_groups, cfg.time_step_limit) == (8, 2, (0.001, 10.0))


def test_official_init_and_names():
    cfg = cfg2(use_bias=True, A_init_range=(2.0, 3.0))
    p = init_params(cfg, seed=0)
    assert list(p) == [
        "in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log",
        "D", "norm.weight", "out_proj.weight", "out_proj.bias",
    ]  # fmt: skip
    conv_dim = 32 + 2 * 1 * 8
    assert p["in_proj.weight"].shape == (32 + conv_dim + 4, 16)
    assert p["conv1d.weight"].shape == (conv_dim, 1, 4)
    a = np.exp(p["A_log"])
    assert a.min() >= 2.0 and a.max() <= 3.0
    dt = np.logaddexp(0, p["dt_bias"])
    assert dt.min() >= cfg.dt_min * (1 - 1e-9) and dt.max() <= cfg.dt_max * (1 + 1e-9)
    np.testing.assert_array_equal(p["D"], 1.0)
    np.testing.assert_array_equal(p["norm.weight"], 1.0)


# ------------------------------------------------------------------ the scans in the core
def _naive_ssd(x, dt, A, Bm, Cm, S0):
    """The recurrence, one head at a time (float64)."""
    heads, groups = A.shape[0], Bm.shape[2]
    S = S0.copy()
    ys = []
    for t in range(x.shape[1]):
        y_t = []
        for h in range(heads):
            g = h // (heads // groups)
            S[:, h] = (
                np.exp(dt[:, t, h] * A[h])[:, None, None] * S[:, h]
                + (dt[:, t, h, None] * x[:, t, h])[:, :, None] * Bm[:, t, g, None, :]
            )
            y_t.append(np.einsum("bpn,bn->bp", S[:, h], Cm[:, t, g]))
        ys.append(np.stack(y_t, axis=1))
    return np.stack(ys, axis=1), S


@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_core_scans_match_the_recurrence_on_every_namespace(xp, scan, chunk, rng):
    b, length, h, p, g, n = 2, 11, 4, 3, 2, 5
    x = rng.standard_normal((b, length, h, p))
    dt = np.exp(rng.standard_normal((b, length, h)))
    A = -np.exp(rng.standard_normal(h))
    Bm, Cm = rng.standard_normal((b, length, g, n)), rng.standard_normal((b, length, g, n))
    S0 = rng.standard_normal((b, h, p, n))
    y_ref, s_ref = _naive_ssd(x, dt, A, Bm, Cm, S0)
    args = [to_xp(xp, a) for a in (x, dt, A, Bm, Cm, S0)]
    y, s = ssd_scan(*args, algorithm=scan, chunk_size=chunk)
    assert_close(y, y_ref, "float64")
    assert_close(s, s_ref, "float64")


# ------------------------------------------------------------------ every backend
CASES = {
    "base": (cfg2(), 2, 13),
    "groups": (cfg2(n_groups=2), 2, 9),
    "biases": (cfg2(use_bias=True, use_conv_bias=False, activation="gelu"), 1, 10),
    "L<K": (cfg2(), 2, 2),
    "L=1": (cfg2(), 3, 1),
    "chunk-multiple": (cfg2(), 1, 16),
    "dt-limit": (cfg2(time_step_limit=(0.01, 0.05)), 2, 7),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_matches_reference(backend, case, dtype, rng):
    cfg, batch, length = CASES[case]
    params = init_params(cfg, seed=3)
    x = rng.standard_normal((batch, length, cfg.hidden_size))
    expected, (conv_ref, s_ref) = reference_forward_mamba2(params, x, cfg)
    module = MambaModule(cfg, backend=backend, dtype=dtype, state_dict=params)
    result = module(x)
    assert_close(result["output"], expected, dtype)
    assert isinstance(result["state"], Mamba2State)
    assert_close(result["state"].ssm_state, s_ref, dtype)
    assert_close(result["state"].conv_state, conv_ref, dtype)
    assert result["metrics"]["version"] == "mamba2"
    assert result["processing_info"]["architecture"].startswith("Structured State Space Duality")


@pytest.mark.parametrize("scan", SCANS)
def test_every_scan_matches_reference(backend, scan, rng):
    cfg = cfg2(n_groups=2, scan_type=scan, chunk_size=4)
    params = init_params(cfg, seed=5)
    x = rng.standard_normal((2, 11, cfg.hidden_size))
    state = (rng.standard_normal((2, 64, 4)), rng.standard_normal((2, 4, 8, 8)))
    expected, (_, s_ref) = reference_forward_mamba2(params, x, cfg, state=state)
    result = MambaModule(cfg, backend=backend, dtype="float64", state_dict=params)(x, state=state)
    assert result["metrics"]["scan_used"] == scan
    assert_close(result["output"], expected, "float64")
    assert_close(result["state"].ssm_state, s_ref, "float64")


def test_auto_runs_the_ssd_form_or_the_numpy_kernels(backend):
    # the chunked SSD form everywhere, except NumPy with the compiled kernels: its linear
    # scan is the fused forward (`backends.numpy.fused_forward_mamba2`), measured faster
    from mamba_core.backends import kernels

    module = MambaModule(cfg2(), backend=backend)
    metrics = module(np.zeros((1, 3, 16)))["metrics"]
    fused = backend == "numpy" and kernels.available()
    assert metrics["scan_used"] == ("linear" if fused else "cumulative")
    assert metrics["version"] == "mamba2"


def test_decode_and_continuation_equal_one_call(backend, rng):
    cfg = cfg2(n_groups=2)
    module = MambaModule(cfg, backend=backend, dtype="float64", seed=1)
    x = rng.standard_normal((2, 12, cfg.hidden_size))
    full = module(x)
    state, ys = module.init_state(2), []
    for t in range(12):
        y, state = module.step(x[:, t], state)
        ys.append(to_np(y))
    assert_close(np.stack(ys, axis=1), full["output"], "float64")
    assert_close(state.ssm_state, full["state"].ssm_state, "float64")
    prefill = module(x[:, :7])
    rest = module(x[:, 7:], state=prefill["state"])
    assert_close(rest["output"], to_np(full["output"])[:, 7:], "float64")
    y_t, _ = module.step(x[:, 7], prefill["state"])
    assert_close(y_t, to_np(full["output"])[:, 7], "float64")


def test_same_seed_same_weights_and_numbers_everywhere(rng):
    cfg = cfg2()
    ref = MambaModule(cfg, backend="numpy", seed=8)
    x = rng.standard_normal((2, 9, 16))
    for name in ("jax", "torch"):
        require(name)
        other = MambaModule(cfg, backend=name, seed=8)
        for k, v in ref.state_dict().items():
            np.testing.assert_array_equal(other.state_dict()[k], v)
        assert_close(other(x)["output"], ref(x)["output"], "float32", factor=5)


def test_save_and_load_round_trip(backend, tmp_path, rng):
    cfg = cfg2(n_groups=2, use_bias=True)
    src = MambaModule(cfg, backend="numpy", seed=2)
    src.save_pretrained(tmp_path / "m2")
    loaded = MambaModule.from_pretrained(tmp_path / "m2", backend=backend)
    assert loaded.config == cfg
    x = rng.standard_normal((1, 6, 16))
    assert_close(loaded(x)["output"], src(x)["output"], "float32", factor=5)


def test_bad_states_get_clear_errors(backend, rng):
    module = MambaModule(cfg2(), backend=backend)
    x = rng.standard_normal((2, 4, 16))
    good = module.init_state(2)
    with pytest.raises(
        ValueError,
        match=r"ssm_state: expected shape \(2, 4, 8, 8\) \(batch, num_heads, head_dim, d_state\)",
    ):
        module(x, state=(good.conv_state, np.zeros((2, 32, 8))))
    with pytest.raises(ValueError, match=r"conv_state: expected shape \(2, 48, 4\)"):
        module(x, state=(np.zeros((2, 32, 4)), good.ssm_state))
    with pytest.raises(TypeError, match="state must be a Mamba2State"):
        module(x, state=[1, 2, 3])


def test_half_precision_keeps_the_state_in_float32(rng):
    require("torch")
    module = MambaModule(cfg2(), backend="torch", dtype="bfloat16", seed=0)
    ref = MambaModule(cfg2(), backend="numpy", dtype="float64", seed=0)
    x = rng.standard_normal((2, 10, 16))
    result = module(x)
    assert str(result["state"].ssm_state.dtype) == "torch.float32"
    assert str(result["output"].dtype) == "torch.bfloat16"
    assert_close(result["output"], ref(x)["output"], "bfloat16")


# ------------------------------------------------------------------ long, large dt
@pytest.fixture(scope="module")
def long_case2():
    """L = 16384 with dt*A of about -100 per step on half the heads."""
    cfg = MambaConfig(
        version="mamba2", hidden_size=4, d_state=4, expand_factor=2, head_dim=2, d_conv=4
    )
    params = init_params(cfg, seed=0)
    params["A_log"] = np.log(np.array([1.0, 25.0, 0.5, 25.0]))
    params["dt_bias"] = np.array([-3.0, 4.0, -5.0, 4.0])  # softplus(4) ~ 4.02: dt*A ~ -100
    x = np.random.default_rng(0).standard_normal((1, 16384, cfg.hidden_size))
    expected, (_, s_ref) = reference_forward_mamba2(params, x, cfg)
    return cfg, params, x, expected, s_ref


@pytest.mark.slow
@pytest.mark.parametrize("scan", SCANS)
def test_long_sequence_with_large_dt(backend, scan, long_case2):
    cfg, params, x, expected, s_ref = long_case2
    chunk = {"linear": 256, "associative": 16, "cumulative": 64}[scan]
    module = MambaModule(
        cfg.replace(scan_type=scan, chunk_size=chunk), backend=backend, state_dict=params
    )
    result = module(x)
    out = to_np(result["output"])
    assert np.isfinite(out).all()
    assert_close(out, expected, "float32")
    assert_close(result["state"].ssm_state, s_ref, "float32")
    assert np.logaddexp(0, 4.0) * 25 > 99  # the stress is real


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("scan", SCANS)
def test_jax_gradients_match_finite_differences_and_torch(scan, rng):
    require("jax")
    require("torch")
    cfg = cfg2(n_groups=2, scan_type=scan, chunk_size=4)
    params = init_params(cfg, seed=4)
    x = rng.standard_normal((2, 9, 16))
    check_gradients(
        cfg,
        params,
        x,
        rng,
        ("in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight"),
    )


def test_jax_functional_api_under_jit_grad_and_vmap(rng):
    require("jax")
    import jax
    import jax.numpy as jnp

    from mamba_core.backends import jax as mj

    cfg = cfg2()
    params = {k: jnp.asarray(v, jnp.float32) for k, v in init_params(cfg, 0).items()}
    xs = jnp.asarray(rng.standard_normal((3, 2, 5, 16)), jnp.float32)
    ys = jax.vmap(lambda v: mj.forward(params, v, cfg)[0])(xs)
    for i in range(3):
        assert_close(ys[i], mj.forward(params, xs[i], cfg)[0], "float32")
    _, state = jax.jit(lambda p, v: mj.forward(p, v, cfg))(params, xs[0])
    assert state.ssm_state.shape == (2, 4, 8, 8)
    y_t, _ = mj.step(params, state, xs[0][:, 0], cfg)
    assert y_t.shape == (2, 16)
    g = jax.grad(lambda p: mj.forward(p, xs[0], cfg)[0].sum())(params)
    assert set(g) == set(params) and all(bool(jnp.isfinite(v).all()) for v in g.values())


# ------------------------------------------------------------------ modules
def test_torch_and_flax_modules_build_mamba2(rng):
    require("torch")
    require("flax")
    import jax.numpy as jnp
    import torch

    from mamba_core.backends.flax import MambaFlax
    from mamba_core.backends.torch import MambaTorch

    cfg = cfg2(n_groups=2)
    tmod = MambaTorch(cfg, seed=6)
    fmod = MambaFlax(cfg, seed=6)
    assert set(dict(tmod.named_parameters())) == set(param_shapes(cfg))
    assert set(fmod.params_dict()) == set(param_shapes(cfg))
    ref = MambaModule(cfg, backend="numpy", seed=6)
    x = rng.standard_normal((2, 7, 16)).astype(np.float32)
    expected = to_np(ref(x)["output"])
    with torch.no_grad():
        assert_close(tmod(torch.from_numpy(x)), expected, "float32", factor=5)
    assert_close(fmod(jnp.asarray(x)), expected, "float32", factor=5)
    y, state = tmod(torch.from_numpy(x), return_state=True)
    assert isinstance(state, Mamba2State)
    y.sum().backward()
    assert all(p.grad is not None for p in tmod.parameters())


def test_huggingface_mamba2_mixer_weights_and_numbers(rng):
    """Strict load of a real transformers `Mamba2Mixer` (the optional oracle); HF's pure
    PyTorch path computes in float32, ours is checked against the float64 reference."""
    require("torch")
    transformers = pytest.importorskip("transformers")
    import torch
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    from mamba_core.backends.torch import MambaTorch

    hf_cfg = transformers.Mamba2Config(
        hidden_size=32, num_heads=8, head_dim=8, state_size=16, expand=2, n_groups=2,
        conv_kernel=4, chunk_size=16, num_hidden_layers=1, use_conv_bias=True,
    )  # fmt: skip
    torch.manual_seed(0)
    mixer = Mamba2Mixer(hf_cfg, layer_idx=0).eval()
    cfg = MambaConfig(
        version="mamba2", hidden_size=32, num_heads=8, head_dim=8, d_state=16, n_groups=2,
        chunk_size=16, layer_norm_epsilon=hf_cfg.layer_norm_epsilon,
    )  # fmt: skip
    ours = MambaTorch(cfg, seed=0)
    ours.load_state_dict(mixer.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(mixer.state_dict())
    x = torch.from_numpy(rng.standard_normal((2, 37, 32)).astype(np.float32))
    with torch.no_grad():
        hf_out = mixer(x)
        our_out = ours(x)
    assert_close(our_out, hf_out, "float32", factor=3)
    params = {k: v.detach().double().numpy() for k, v in mixer.state_dict().items()}
    expected, _ = reference_forward_mamba2(params, x.double().numpy(), cfg)
    ours64 = MambaTorch(cfg, seed=0).double()
    ours64.load_state_dict(mixer.state_dict(), strict=True)
    with torch.no_grad():
        assert_close(ours64(x.double()), expected, "float64")
    assert_close(hf_out, expected, "float32", factor=3)  # HF itself is float32-exact


def test_sharded_mamba2_equals_one_device():
    """Heads over "model", batch over "data", on 8 forced host devices (a subprocess)."""
    require("jax")
    code = """
import json, os
import numpy as np
import jax, jax.numpy as jnp
from jax.sharding import Mesh
jax.config.update("jax_enable_x64", True)
from mamba_core import MambaConfig, init_params
from mamba_core.backends import jax as mj
cfg = MambaConfig(version="mamba2", hidden_size=32, d_state=8, head_dim=8, n_groups=2, chunk_size=4)
params = {k: jnp.asarray(v) for k, v in init_params(cfg, 1).items()}
x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 10, 32)))
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
out = {}
for scan in ("linear", "associative", "cumulative"):
    c = cfg.replace(scan_type=scan)
    y1, s1 = mj.forward(params, x, c)
    sp = mj.shard_params(params, mesh, c)
    y8, s8 = mj.forward(sp, mj.shard_inputs(x, mesh), c, mesh=mesh)
    g1 = jax.grad(lambda p: mj.forward(p, x, c)[0].sum())(params)
    g8 = jax.grad(lambda p: mj.forward(p, mj.shard_inputs(x, mesh), c, mesh=mesh)[0].sum())(sp)
    out[scan] = [float(jnp.abs(y1 - y8).max()), float(jnp.abs(s1.ssm_state - s8.ssm_state).max()),
                 max(float(jnp.abs(g1[k] - g8[k]).max()) for k in g1), len(sp["A_log"].devices())]
print(json.dumps(out))
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for scan, (dy, ds, dg, devices) in out.items():
        assert devices == 8, scan
        assert max(dy, ds, dg) < 1e-12, (scan, dy, ds, dg)
