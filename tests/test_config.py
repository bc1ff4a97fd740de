"""`MambaConfig`: upstream fields and defaults, validation, dict and TOML loading."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mamba_core import MambaConfig

UPSTREAM_DEFAULTS = {
    "hidden_size": 768,
    "d_state": 64,
    "d_conv": 4,
    "expand_factor": 2,
    "dt_rank": 32,
    "use_conv_bias": True,
    "activation": "swish",
    "layer_norm_epsilon": 1e-5,
    "use_tpu_optimizations": True,
    "use_mixed_precision": True,
}


def test_upstream_fields_and_defaults():
    cfg = MambaConfig()
    for key, value in UPSTREAM_DEFAULTS.items():
        assert getattr(cfg, key) == value, key
    assert cfg.use_bias is False  # the official / HF default
    assert cfg.scan_type == "auto"
    assert (cfg.dt_min, cfg.dt_max, cfg.dt_init_floor, cfg.dt_scale) == (0.001, 0.1, 1e-4, 1.0)
    assert cfg.d_inner == 1536
    assert "scan_type" in cfg.to_dict() and "chunk_size" in cfg.to_dict()


def test_frozen_and_replace():
    cfg = MambaConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 3
    assert cfg.replace(hidden_size=32).hidden_size == 32
    assert hash(cfg) == hash(MambaConfig())  # usable as a static jit argument


def test_dt_rank_auto():
    assert MambaConfig(hidden_size=768, dt_rank="auto").dt_rank == 48
    assert MambaConfig(hidden_size=17, dt_rank="auto").dt_rank == 2


@pytest.mark.parametrize(
    "field,value,allowed",
    [
        ("hidden_size", 0, "a positive int"),
        ("hidden_size", 7.0, "a positive int"),
        ("d_state", -1, "a positive int"),
        ("d_conv", True, "a positive int"),
        ("expand_factor", "2", "a positive int"),
        ("dt_rank", "big", "'auto'"),
        ("activation", "tanh", "'swish', 'silu', 'gelu', 'relu'"),
        ("scan_type", "parallel", "'auto', 'linear', 'associative', 'cumulative'"),
        ("chunk_size", 0, "a positive int or 'auto'"),
        ("use_bias", 1, "a bool"),
        ("layer_norm_epsilon", 0.0, "a finite number > 0"),
        ("dt_min", float("nan"), "a finite number > 0"),
        ("dt_init_floor", -1.0, ">= 0"),
    ],
)
def test_bad_values_name_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ValueError) as info:
        MambaConfig(**{field: value})
    message = str(info.value)
    assert f"{field}={value!r}" in message and allowed in message


def test_dt_max_below_dt_min():
    with pytest.raises(ValueError, match=r"dt_max=0\.01 .*dt_min=0\.1"):
        MambaConfig(dt_min=0.1, dt_max=0.01)


def test_several_errors_reported_together():
    with pytest.raises(ValueError) as info:
        MambaConfig(d_state=0, activation="x")
    assert "d_state=0" in str(info.value) and "activation='x'" in str(info.value)


def test_unknown_key_suggests_the_nearest_field():
    with pytest.raises(ValueError) as info:
        MambaConfig.from_dict({"d_sate": 16})
    assert "'d_sate' is not a MambaConfig field; did you mean 'd_state'?" in str(info.value)
    with pytest.raises(ValueError, match="'zzz' is not a MambaConfig field"):
        MambaConfig.from_dict({"zzz": 1})
    with pytest.raises(TypeError, match="expected a mapping"):
        MambaConfig.from_dict([("d_state", 3)])


def test_from_dict_ignores_enabled():
    cfg = MambaConfig.from_dict({"enabled": True, "hidden_size": 64})
    assert cfg.hidden_size == 64


def test_from_toml(tmp_path):
    path = tmp_path / "mamba_hybrid.toml"
    path.write_text(
        """
[modules]
active = ["mamba", "embedding_module"]

[modules.mamba]
enabled = true
hidden_size = 768
d_state = 64
d_conv = 4
expand_factor = 2
scan_type = "associative"
""",
        encoding="utf-8",
    )
    cfg = MambaConfig.from_toml(path)
    assert (cfg.hidden_size, cfg.d_state, cfg.scan_type) == (768, 64, "associative")
    with pytest.raises(ValueError, match=r"no table \[modules\.mambo\]"):
        MambaConfig.from_toml(path, table="modules.mambo")
    with pytest.raises(ValueError, match="is a list, expected a table"):
        MambaConfig.from_toml(path, table="modules.active")
    bad = tmp_path / "bad.toml"
    bad.write_text("[modules.mamba]\nd_sate = 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match="did you mean 'd_state'"):
        MambaConfig.from_toml(bad)


@given(value=st.one_of(st.integers(max_value=0), st.floats(), st.text(), st.booleans()))
def test_non_positive_ints_are_always_rejected(value):
    with pytest.raises(ValueError, match="d_state="):
        MambaConfig(d_state=value)
