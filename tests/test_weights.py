"""Initialisation, state dicts and save/load."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mamba_core import PARAM_NAMES, MambaConfig, MambaModule, init_params, param_shapes
from tests.conftest import require, small_config
from tests.tolerances import to_np


def test_official_init_scheme():
    cfg = MambaConfig(hidden_size=64, d_state=16, dt_rank="auto", d_conv=4)
    p = init_params(cfg, seed=0)
    e, n = cfg.d_inner, cfg.d_state
    np.testing.assert_allclose(p["A_log"], np.log(np.tile(np.arange(1, n + 1), (e, 1))))
    np.testing.assert_array_equal(p["D"], np.ones(e))
    dt = np.logaddexp(0.0, p["dt_proj.bias"])  # softplus(bias) is the initial dt
    assert dt.min() >= cfg.dt_min * (1 - 1e-9) and dt.max() <= cfg.dt_max * (1 + 1e-9)
    # log-uniform: the log of dt is spread over [log dt_min, log dt_max]
    assert np.log(dt).std() > 0.25 * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) / math.sqrt(12)
    bound = cfg.dt_rank**-0.5 * cfg.dt_scale
    assert np.abs(p["dt_proj.weight"]).max() <= bound
    assert np.abs(p["dt_proj.weight"]).max() > 0.9 * bound
    for name, fan_in in (("in_proj.weight", 64), ("x_proj.weight", e), ("out_proj.weight", e)):
        assert np.abs(p[name]).max() <= 1 / math.sqrt(fan_in)
    assert np.abs(p["conv1d.weight"]).max() <= 1 / math.sqrt(cfg.d_conv)
    floor = init_params(cfg.replace(dt_min=1e-6, dt_max=2e-6, dt_init_floor=1e-3), seed=0)
    np.testing.assert_allclose(np.logaddexp(0.0, floor["dt_proj.bias"]), 1e-3, rtol=1e-9)


def test_seed_determines_the_weights():
    cfg = small_config()
    a, b, c = init_params(cfg, 1), init_params(cfg, 1), init_params(cfg, 2)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["in_proj.weight"], c["in_proj.weight"])
    with pytest.raises(TypeError, match="seed must be an int"):
        init_params(cfg, seed=1.5)


def test_same_seed_same_weights_on_every_backend(backend):
    cfg = small_config(use_bias=True)
    ref = MambaModule(cfg, backend="numpy", seed=11).state_dict()
    got = MambaModule(cfg, backend=backend, seed=11).state_dict()
    assert list(got) == list(ref)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])


@pytest.mark.parametrize("use_bias,use_conv_bias", [(False, True), (True, False)])
def test_state_dict_has_the_official_keys(backend, use_bias, use_conv_bias):
    cfg = small_config(use_bias=use_bias, use_conv_bias=use_conv_bias)
    sd = MambaModule(cfg, backend=backend).state_dict()
    expected = [n for n in PARAM_NAMES if n in param_shapes(cfg)]
    assert list(sd) == expected
    assert ("in_proj.bias" in sd) is use_bias and ("conv1d.bias" in sd) is use_conv_bias
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    assert sd["conv1d.weight"].shape == (32, 1, 4)


def test_load_state_dict_reports_every_problem_at_once(backend):
    cfg = small_config()
    module = MambaModule(cfg, backend=backend)
    sd = module.state_dict()
    del sd["D"]
    sd["A_log"] = np.zeros((32, 9))
    sd["x_proj.weight"] = np.zeros((20, 32), dtype=np.int32)
    sd["lm_head.weight"] = np.zeros(3)
    with pytest.raises(ValueError) as info:
        module.load_state_dict(sd)
    msg = str(info.value)
    assert "missing keys: ['D']" in msg
    assert "unexpected keys: ['lm_head.weight']" in msg
    assert "A_log: expected shape (32, 8), received (32, 9)" in msg
    assert "x_proj.weight: expected a floating dtype, received int32" in msg


def test_load_state_dict_takes_any_array_likes(backend, rng):
    cfg = small_config()
    src = MambaModule(cfg, backend="numpy", seed=5)
    sd = {k: v.tolist() for k, v in src.state_dict().items()}  # nested lists
    dst = MambaModule(cfg, backend=backend, seed=0)
    dst.load_state_dict(sd)
    x = rng.standard_normal((1, 4, cfg.hidden_size))
    np.testing.assert_allclose(
        to_np(dst(x)["output"]), to_np(src(x)["output"]), rtol=1e-5, atol=1e-6
    )


def test_weights_move_between_backends(rng):
    """A state dict of one framework's arrays loads into every other backend."""
    require("jax")
    require("torch")
    import jax.numpy as jnp
    import torch

    cfg = small_config()
    src = MambaModule(cfg, backend="numpy", seed=9, dtype="float64")
    sd = src.state_dict()
    x = rng.standard_normal((2, 5, cfg.hidden_size))
    expected = to_np(src(x)["output"])
    for _source, arrays in (
        ("jax", {k: jnp.asarray(v) for k, v in sd.items()}),
        ("torch", {k: torch.tensor(v, requires_grad=True) for k, v in sd.items()}),
    ):
        for target in ("numpy", "jax", "torch"):
            m = MambaModule(cfg, backend=target, dtype="float64", state_dict=arrays)
            np.testing.assert_allclose(to_np(m(x)["output"]), expected, rtol=1e-12, atol=1e-14)


def test_save_pretrained_round_trip(backend, tmp_path, rng):
    require("safetensors")
    from safetensors.numpy import load_file

    cfg = small_config(use_bias=True, activation="gelu")
    src = MambaModule(cfg, backend="numpy", seed=21)
    src.save_pretrained(tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["config"]["activation"] == "gelu" and meta["dtype"] == "float32"
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")  # a real safetensors file
    assert set(tensors) == set(src.state_dict())
    loaded = MambaModule.from_pretrained(tmp_path / "ckpt", backend=backend)
    assert loaded.config == cfg and loaded.backend_name == backend
    for k, v in src.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[k], v)
    x = rng.standard_normal((2, 6, cfg.hidden_size))
    np.testing.assert_allclose(
        to_np(loaded(x)["output"]), to_np(src(x)["output"]), rtol=1e-5, atol=1e-6
    )


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        MambaModule.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a mamba-core config"):
        MambaModule.from_pretrained(tmp_path)
