"""Mamba-3: config, the rank-R SSD scans on every namespace, every backend and scan against
the independent per-token float64 reference (`tests/reference3.py`, written from MAMBA3.md's
equations), decode, packing and masks, the long large-dt stress, gradients, the functional
JAX API and the PyTorch / Flax modules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mamba_core import MambaConfig, MambaModule, init_params
from mamba_core.mixer import param_shapes
from mamba_core.mixers.mamba3 import Mamba3State
from mamba_core.ssd3 import ssd3_scan
from tests.conftest import require, to_xp
from tests.gradients import check_gradients
from tests.reference3 import mamba3_reference
from tests.tolerances import assert_close, to_np

SCANS = ["linear", "associative", "cumulative"]


def cfg3(**overrides) -> MambaConfig:
    base = dict(version="mamba3", hidden_size=16, d_state=8, head_dim=8, chunk_size=4)
    return MambaConfig(**{**base, **overrides})


def params3(cfg: MambaConfig, seed: int) -> dict[str, np.ndarray]:
    """The official init with every parameter perturbed (biases, norms, D and the MIMO
    projections start at constants: a bug there would hide behind ones)."""
    rng = np.random.default_rng(seed)
    return {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in init_params(cfg, seed).items()}


def assert_angles_close(actual, expected, tol=1e-9):
    diff = np.remainder(to_np(actual) - to_np(expected) + math.pi, 2 * math.pi) - math.pi
    assert np.abs(diff).max() <= tol, np.abs(diff).max()


def assert_state_close(state, ref, dtype="float64", factor=1.0):
    angle, h, k, v = ref
    assert_angles_close(state.angle, angle, 1e-9 if dtype == "float64" else 1e-4)
    for got, want in ((state.ssm_state, h), (state.k, k), (state.v, v)):
        assert_close(got, want, dtype, factor)


# ------------------------------------------------------------------ config
def test_config_defaults_and_derived_sizes():
    cfg = cfg3()
    assert (cfg.d_conv, cfg.use_conv_bias, cfg.dt_rank) == (None, None, None)
    assert (cfg.num_heads, cfg.ranks, cfg.rope_angles) == (4, 1, 2)
    assert cfg3(mimo=True, mimo_rank=3).ranks == 3
    assert cfg3(rope_fraction=1.0).rope_angles == 4
    assert MambaConfig.from_dict(cfg.to_dict()) == cfg  # config.json round trip
    shapes = param_shapes(cfg3(mimo=True, mimo_rank=2, outproj_norm=True))
    # d_proj = 2E + 2RGN + 3H + S = 64 + 32 + 12 + 2
    assert shapes["in_proj.weight"] == (110, 16) and shapes["mimo_x"] == (4, 2, 8)
    assert shapes["B_bias"] == (4, 2, 8) and shapes["norm.weight"] == (32,)
    assert set(param_shapes(cfg)) == {
        "in_proj.weight", "dt_bias", "B_bias", "C_bias", "B_norm.weight", "C_norm.weight",
        "D", "out_proj.weight",
    }  # fmt: skip


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(d_conv=4), "d_conv=4 is invalid for version='mamba3'"),
        (dict(use_conv_bias=True), "use_conv_bias=True is invalid for version='mamba3'"),
        (dict(dt_rank=8), "dt_rank=8 is invalid for version='mamba3'"),
        (dict(rope_fraction=0.25), "rope_fraction=0.25 is invalid"),
        (dict(mimo="yes"), "mimo='yes' is invalid"),
        (dict(mimo_rank=0), "mimo_rank=0 is invalid"),
        (dict(A_floor=0.0), "A_floor=0.0 is invalid"),
        (dict(use_bias=True), "use_bias=True is invalid for version='mamba3'"),
        (dict(d_state=1, rope_fraction=1.0), "gives no rotary angle"),
        (dict(d_state=7, mimo=True, rope_fraction=1.0), "d_state must be even"),
        (dict(n_groups=3), "n_groups=3 does not divide num_heads=4"),
        (dict(head_dim=5), "head_dim=5 does not divide d_inner"),
    ],
)
def test_bad_configs_name_fields_and_values(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg3(**overrides)


@pytest.mark.parametrize("field, value", [("mimo", True), ("rope_fraction", 1.0), ("A_floor", 0.1)])
def test_mamba3_fields_on_other_versions_are_errors(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r} applies to version='mamba3' only"):
        MambaConfig(**{field: value})


def test_toml_config(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(
        '[modules.mamba]\nversion = "mamba3"\nhidden_size = 16\nd_state = 8\nhead_dim = 8\n'
        "mimo = true\nmimo_rank = 2\nrope_fraction = 1.0\n"
    )
    cfg = MambaConfig.from_toml(path)
    assert cfg.version == "mamba3" and cfg.ranks == 2 and cfg.rope_angles == 4


# ------------------------------------------------------------------ the core scans
def _naive(a, v, k, q, s0, keep):
    length = v.shape[1]
    s = s0.copy()
    y = np.zeros_like(v)
    for t in range(length):
        decay = np.exp(a[:, t]) * keep[:, t, None]
        s = decay[..., None, None] * s + np.einsum("bhrp,bhrn->bhpn", v[:, t], k[:, t])
        y[:, t] = np.einsum("bhpn,bhrn->bhrp", s, q[:, t])
    return y, s


@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("ranks, chunk", [(1, 1), (1, 4), (3, 3), (3, 8)])
def test_core_scans_match_the_recurrence_on_every_namespace(xp, scan, ranks, chunk, rng):
    b, length, h, p, n = 2, 11, 3, 4, 5
    a = -np.exp(rng.standard_normal((b, length, h)))
    v = rng.standard_normal((b, length, h, ranks, p))
    k = rng.standard_normal((b, length, h, ranks, n))
    q = rng.standard_normal((b, length, h, ranks, n))
    s0 = rng.standard_normal((b, h, p, n))
    keep = np.ones((b, length))
    keep[0, [3, 8]] = 0  # packed sequences start there
    y_ref, s_ref = _naive(a, v, k, q, s0, keep)
    args = [to_xp(xp, m) for m in (v, a)] + [None] + [to_xp(xp, m) for m in (k, q, s0)]
    y, s = ssd3_scan(*args, algorithm=scan, chunk_size=chunk, keep=to_xp(xp, keep))
    assert_close(y, y_ref, "float64")
    assert_close(s, s_ref, "float64")


# ------------------------------------------------------------------ every backend
CASES = {
    "siso": (cfg3(), 2, 13),
    "siso-rope1-groups-norm": (cfg3(rope_fraction=1.0, n_groups=2, outproj_norm=True), 2, 9),
    "mimo2": (cfg3(mimo=True, mimo_rank=2), 2, 10),
    "mimo4-groups-norm": (cfg3(mimo=True, mimo_rank=4, n_groups=2, outproj_norm=True), 1, 11),
    "mimo4-rope1": (cfg3(mimo=True, mimo_rank=4, rope_fraction=1.0), 2, 7),
    "L=1": (cfg3(mimo=True, mimo_rank=2), 3, 1),
    "chunk-multiple": (cfg3(), 1, 16),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_matches_reference(backend, case, dtype, rng):
    cfg, batch, length = CASES[case]
    params = params3(cfg, 3)
    x = rng.standard_normal((batch, length, cfg.hidden_size))
    expected, ref_state = mamba3_reference(params, x, cfg)
    module = MambaModule(cfg, backend=backend, dtype=dtype, state_dict=params)
    result = module(x)
    assert_close(result["output"], expected, dtype)
    assert isinstance(result["state"], Mamba3State)
    assert_state_close(result["state"], ref_state, dtype)
    assert result["metrics"]["version"] == "mamba3"
    assert result["processing_info"]["architecture"].startswith("Mamba-3")


@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("mimo", [False, True])
def test_every_scan_continues_a_state(backend, scan, mimo, rng):
    cfg = cfg3(mimo=mimo, mimo_rank=2, n_groups=2, scan_type=scan)
    params = params3(cfg, 5)
    prefix = rng.standard_normal((2, 6, 16))
    x = rng.standard_normal((2, 11, 16))
    expected, ref_state = mamba3_reference(params, np.concatenate([prefix, x], 1), cfg)
    _, start = mamba3_reference(params, prefix, cfg)
    module = MambaModule(cfg, backend=backend, dtype="float64", state_dict=params)
    result = module(x, state=start)
    assert result["metrics"]["scan_used"] == scan
    assert_close(result["output"], expected[:, 6:], "float64")
    assert_state_close(result["state"], ref_state)


@pytest.mark.parametrize("scan", SCANS)
def test_mixer_uses_only_the_array_api_standard(scan, rng):
    require("array_api_strict")
    import array_api_strict as xp

    from mamba_core.mixer import mixer_forward

    cfg = cfg3(mimo=True, mimo_rank=2, outproj_norm=True, scan_type=scan)
    params = params3(cfg, 8)
    x = rng.standard_normal((2, 6, 16))
    seq_idx = np.array([[0, 0, 1, 1, 1, 2]] * 2)
    mask = np.ones((2, 6))
    expected, _ = mixer_forward(params, x, cfg, seq_idx=seq_idx, attention_mask=mask)
    y, state = mixer_forward(
        {k: to_xp(xp, v) for k, v in params.items()},
        to_xp(xp, x),
        cfg,
        seq_idx=xp.asarray(seq_idx),
        attention_mask=to_xp(xp, mask),
    )
    assert_close(np.asarray(y), expected, "float64")
    assert state.k.shape == (2, 2, 4, 8)


def test_auto_runs_the_chunked_form(backend):
    metrics = MambaModule(cfg3(), backend=backend)(np.zeros((1, 3, 16)))["metrics"]
    assert metrics["scan_used"] == "cumulative" and metrics["version"] == "mamba3"


@pytest.mark.parametrize("mimo", [False, True])
def test_decode_and_prefill_equal_one_call(backend, mimo, rng):
    cfg = cfg3(mimo=mimo, mimo_rank=2, n_groups=2, outproj_norm=True)
    module = MambaModule(cfg, backend=backend, dtype="float64", state_dict=params3(cfg, 1))
    x = rng.standard_normal((2, 12, 16))
    full = module(x)
    state, ys = module.init_state(2), []
    for t in range(12):
        y, state = module.step(x[:, t], state)
        ys.append(to_np(y))
    assert_close(np.stack(ys, axis=1), full["output"], "float64")
    assert_close(state.ssm_state, full["state"].ssm_state, "float64")
    assert_angles_close(state.angle, full["state"].angle)
    prefill = module(x[:, :7])
    y_t, _ = module.step(x[:, 7], prefill["state"])
    assert_close(y_t, to_np(full["output"])[:, 7], "float64")


def test_same_seed_same_weights_and_numbers_everywhere(rng):
    cfg = cfg3(mimo=True, mimo_rank=2)
    x = rng.standard_normal((1, 5, 16))
    outs = []
    for backend in ("numpy", "jax", "torch"):
        require(backend)
        outs.append(to_np(MambaModule(cfg, backend=backend, dtype="float64", seed=9)(x)["output"]))
    for out in outs[1:]:
        assert_close(out, outs[0], "float64")


def test_save_and_load_round_trip(backend, tmp_path, rng):
    cfg = cfg3(mimo=True, mimo_rank=2, outproj_norm=True)
    module = MambaModule(cfg, backend=backend, dtype="float64", state_dict=params3(cfg, 2))
    module.save_pretrained(tmp_path)
    loaded = MambaModule.from_pretrained(tmp_path, backend=backend)
    assert loaded.config == cfg
    x = rng.standard_normal((1, 6, 16))
    assert_close(loaded(x)["output"], module(x)["output"], "float64", factor=0)


def test_bad_states_get_clear_errors(backend, rng):
    module = MambaModule(cfg3(), backend=backend, dtype="float64")
    x = rng.standard_normal((2, 3, 16))
    good = module(x)["state"]
    with pytest.raises(TypeError, match=r"\(angle, ssm_state, k, v\) tuple"):
        module(x, state=(good.angle, good.ssm_state))
    bad = good._replace(k=np.zeros((2, 1, 4, 9)))
    with pytest.raises(ValueError, match="k"):
        module(x, state=bad)
    with pytest.raises(ValueError, match="angle"):
        module.step(x[:, 0], good._replace(angle=np.zeros((2, 4, 3))))


# ------------------------------------------------------------------ packing and masks
LENGTHS = [3, 1, 4, 2, 6, 1, 5]


def test_packed_rows_and_masks_equal_separate_runs(backend, rng):
    cfg = cfg3(mimo=True, mimo_rank=2)
    module = MambaModule(cfg, backend=backend, dtype="float64", state_dict=params3(cfg, 4))
    x = rng.standard_normal((1, sum(LENGTHS), 16))
    seq_idx = np.repeat(np.arange(len(LENGTHS)), LENGTHS)[None, :]
    packed = module(x, seq_idx=seq_idx)
    cu = np.concatenate([[0], np.cumsum(LENGTHS)])
    varlen = module(x, cu_seqlens=cu)
    assert_close(varlen["output"], packed["output"], "float64")
    start = 0
    for i, length in enumerate(LENGTHS):
        alone = module(x[:, start : start + length])
        assert_close(to_np(packed["output"])[:, start : start + length], alone["output"], "float64")
        mine = Mamba3State(*(to_np(f)[i : i + 1] for f in varlen["state"]))
        assert_state_close(mine, alone["state"])
        start += length
    assert_state_close(packed["state"], alone["state"])  # the last sequence's
    # per-sequence initial states in, per-sequence states out
    initial = module(rng.standard_normal((len(LENGTHS), 3, 16)))["state"]
    result = module(x, cu_seqlens=cu, state=initial)
    start = 0
    for i, length in enumerate(LENGTHS):
        own = Mamba3State(*(to_np(f)[i : i + 1] for f in initial))
        alone = module(x[:, start : start + length], state=own)
        assert_close(to_np(result["output"])[:, start : start + length], alone["output"], "float64")
        assert_state_close(
            Mamba3State(*(to_np(f)[i : i + 1] for f in result["state"])), alone["state"]
        )
        start += length
    # left and right padding equal the unpadded run, and the state after it
    x2 = rng.standard_normal((2, 9, 16))
    mask = np.ones((2, 9))
    mask[0, :3] = 0  # left
    mask[1, 6:] = 0  # right
    padded = module(x2, attention_mask=mask)
    left, right = module(x2[:1, 3:]), module(x2[1:, :6])
    assert_close(to_np(padded["output"])[:1, 3:], left["output"], "float64")
    assert_close(to_np(padded["output"])[1:, :6], right["output"], "float64")
    both = Mamba3State(*(to_np(f) for f in padded["state"]))
    assert_state_close(Mamba3State(*(f[:1] for f in both)), left["state"])
    assert_state_close(Mamba3State(*(f[1:] for f in both)), right["state"])


# ------------------------------------------------------------------ long, large dt
@pytest.fixture(scope="module")
def long_case3():
    """L = 16384, dt of about 60 on one head: dt*A down to about -240 per step, angles
    growing by up to ~190 rad per step (unreduced, ~1e6 rad by the end)."""
    cfg = MambaConfig(version="mamba3", hidden_size=4, d_state=4, head_dim=4, expand_factor=2)
    params = init_params(cfg, seed=0)
    params["dt_bias"] = np.array([-2.0, 60.0])
    x = np.random.default_rng(0).standard_normal((1, 16384, cfg.hidden_size))
    expected, ref_state = mamba3_reference(params, x, cfg)
    return cfg, params, x, expected, ref_state


@pytest.mark.slow
@pytest.mark.parametrize("scan", ["linear", "cumulative"])
def test_long_sequence_with_large_dt(backend, scan, long_case3):
    cfg, params, x, expected, ref_state = long_case3
    a_min = -60 * 4  # dt ~ 60, |A| up to ~4 for these inputs
    assert a_min <= -200
    module = MambaModule(cfg.replace(scan_type=scan), backend=backend, dtype="float64",
                         state_dict=params)  # fmt: skip
    result = module(x)
    out = to_np(result["output"])
    assert np.isfinite(out).all()
    # factor 100: the reference sums its angles unreduced, up to ~1e6 rad, so its own
    # rotations carry ~1e-11 relative error by the end (this library reduces every step)
    assert_close(out, expected, "float64", factor=100)
    assert_state_close(result["state"], ref_state, factor=100)
    f32 = MambaModule(cfg, backend=backend, dtype="float32", state_dict=params)(x)
    assert np.isfinite(to_np(f32["output"])).all()
    # angles of ~1e6 rad: float32 keeps them to ~1e-3 rad only because they are reduced
    assert_close(f32["output"], expected, "float32", factor=100)


# ------------------------------------------------------------------ gradients
@pytest.mark.slow
@pytest.mark.parametrize("scan", SCANS)
def test_jax_gradients_match_finite_differences_and_torch(scan, rng):
    require("jax")
    require("torch")
    cfg = cfg3(mimo=True, mimo_rank=2, n_groups=2, outproj_norm=True, scan_type=scan)
    params = params3(cfg, 4)
    x = rng.standard_normal((2, 9, 16))
    check_gradients(cfg, params, x, rng)


def test_jax_functional_api_under_jit_grad_and_vmap(rng):
    require("jax")
    import jax
    import jax.numpy as jnp

    from mamba_core.backends import jax as mj

    cfg = cfg3(mimo=True, mimo_rank=2)
    params = {k: jnp.asarray(v, jnp.float32) for k, v in init_params(cfg, 0).items()}
    xs = jnp.asarray(rng.standard_normal((3, 2, 5, 16)), jnp.float32)
    ys = jax.vmap(lambda v: mj.forward(params, v, cfg)[0])(xs)
    for i in range(3):
        assert_close(ys[i], mj.forward(params, xs[i], cfg)[0], "float32")
    _, state = jax.jit(lambda p, v: mj.forward(p, v, cfg))(params, xs[0])
    assert state.ssm_state.shape == (2, 4, 8, 8) and state.k.shape == (2, 2, 4, 8)
    y_t, _ = mj.step(params, state, xs[0][:, 0], cfg)
    assert y_t.shape == (2, 16)
    g = jax.grad(lambda p: mj.forward(p, xs[0], cfg)[0].sum())(params)
    assert set(g) == set(params) and all(bool(jnp.isfinite(v).all()) for v in g.values())


def test_half_precision_keeps_angles_and_state_in_float32(rng):
    require("torch")
    cfg = cfg3(mimo=True, mimo_rank=2)
    module = MambaModule(cfg, backend="torch", dtype="bfloat16", seed=0)
    ref = MambaModule(cfg, backend="numpy", dtype="float64", seed=0)
    x = rng.standard_normal((2, 10, 16))
    result = module(x)
    state = result["state"]
    assert str(state.ssm_state.dtype) == str(state.angle.dtype) == "torch.float32"
    assert str(state.k.dtype) == str(state.v.dtype) == "torch.bfloat16"
    assert str(result["output"].dtype) == "torch.bfloat16"
    assert_close(result["output"], ref(x)["output"], "bfloat16")


# ------------------------------------------------------------------ modules
def test_torch_module_loads_official_names_strictly_and_trains(rng):
    require("torch")
    import torch

    from mamba_core.backends.torch import MambaTorch

    cfg = cfg3(mimo=True, mimo_rank=2, outproj_norm=True)
    params = params3(cfg, 6)
    module = MambaTorch(cfg, seed=0, dtype=torch.float64)
    official = {k: torch.from_numpy(v) for k, v in params.items()}
    module.load_state_dict(official, strict=True)
    with pytest.raises(RuntimeError, match="mimo_o"):
        module.load_state_dict({k: v for k, v in official.items() if k != "mimo_o"}, strict=True)
    x = rng.standard_normal((2, 7, 16))
    expected, _ = mamba3_reference(params, x, cfg)
    y, state = module(torch.from_numpy(x), return_state=True)
    assert_close(y.detach(), expected, "float64")
    assert isinstance(state, Mamba3State)
    y.sum().backward()
    assert all(p.grad is not None for p in module.parameters())
    y_t, _ = module.step(torch.from_numpy(x[:, 0]))
    assert y_t.shape == (2, 16)


def test_flax_module_builds_mamba3(rng):
    require("flax")
    import jax.numpy as jnp

    from mamba_core.backends.flax import MambaFlax

    cfg = cfg3(mimo=True, mimo_rank=2)
    module = MambaFlax(cfg, seed=6)
    assert set(module.params_dict()) == set(param_shapes(cfg))
    x = rng.standard_normal((2, 7, 16)).astype(np.float32)
    expected = to_np(MambaModule(cfg, backend="numpy", seed=6)(x)["output"])
    assert_close(module(jnp.asarray(x)), expected, "float32", factor=5)


def test_context_parallelism_refuses_mamba3():
    require("jax")
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh

    from mamba_core.backends import jax as mj

    cfg = cfg3()
    params = {k: jnp.asarray(v) for k, v in init_params(cfg, 0).items()}
    mesh = Mesh(np.array(jax.devices()[:1]), ("context",))
    with pytest.raises(ValueError, match="Mamba-3 has no conv"):
        mj.context_forward(params, jnp.zeros((1, 4, 16)), cfg, mesh=mesh)
