"""`MambaFlax` (Flax NNX): official names, same numbers as the adapter, trains with optax."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import require, small_config
from tests.tolerances import assert_close

require("flax", module_level=True)
require("optax", module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from mamba_core import MambaModule, param_shapes  # noqa: E402
from mamba_core.backends.flax import MambaFlax  # noqa: E402


def test_parameters_carry_the_official_names():
    cfg = small_config(use_bias=True)
    model = MambaFlax(cfg, rngs=nnx.Rngs(0))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    names = {".".join(map(str, path)) for path, _ in flat}
    assert names == set(param_shapes(cfg))
    for name, shape in param_shapes(cfg).items():
        assert model.params_dict()[name].shape == shape


def test_same_numbers_as_the_adapter(rng):
    cfg = small_config()
    x = rng.standard_normal((2, 12, cfg.hidden_size)).astype(np.float32)
    adapter = MambaModule(cfg, backend="jax", seed=4)
    expected = adapter(x)["output"]
    assert_close(MambaFlax(cfg, seed=4)(x), expected, "float32")
    loaded = MambaFlax.from_state_dict(cfg, adapter.state_dict())
    assert_close(loaded(x), expected, "float32")
    _, state = loaded(x[:, :7], return_state=True)
    y_t, _ = loaded.step(x[:, 7], state)
    assert_close(y_t, np.asarray(expected)[:, 7], "float32")


def test_from_pretrained(tmp_path, rng):
    require("safetensors")
    cfg = small_config(activation="gelu")
    adapter = MambaModule(cfg, backend="numpy", seed=8)
    adapter.save_pretrained(tmp_path)
    model = MambaFlax.from_pretrained(tmp_path)
    x = rng.standard_normal((1, 5, cfg.hidden_size))
    assert_close(model(x), adapter(x)["output"], "float32")


def test_rngs_drive_the_initialisation():
    cfg = small_config()
    a = MambaFlax(cfg, rngs=nnx.Rngs(0)).state_dict()
    b = MambaFlax(cfg, rngs=nnx.Rngs(0)).state_dict()
    c = MambaFlax(cfg, rngs=nnx.Rngs(1)).state_dict()
    np.testing.assert_array_equal(a["in_proj.weight"], b["in_proj.weight"])
    assert not np.array_equal(a["in_proj.weight"], c["in_proj.weight"])
    with pytest.raises(TypeError, match="needs rngs"):
        MambaFlax(cfg)


def test_one_optax_step_lowers_a_toy_loss(rng):
    cfg = small_config()
    model = MambaFlax(cfg, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((2, 16, cfg.hidden_size)), jnp.float32)
    target = jnp.asarray(rng.standard_normal((2, 16, cfg.hidden_size)), jnp.float32)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    def loss_fn(m):
        return jnp.mean((m(x) - target) ** 2)

    @nnx.jit
    def train_step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    before = float(loss_fn(model))
    losses = [float(train_step(model, optimizer)) for _ in range(3)]
    after = float(loss_fn(model))
    assert losses[0] == pytest.approx(before, rel=1e-5)
    assert after < before


def test_linen_bridge(rng):
    cfg = small_config()
    x = rng.standard_normal((2, 6, cfg.hidden_size)).astype(np.float32)
    linen_model = nnx.bridge.to_linen(MambaFlax, cfg, seed=4)
    variables = linen_model.init(jax.random.key(0), x)
    assert set(variables["params"]) >= {"in_proj", "conv1d", "A_log", "D"}
    y = linen_model.apply(variables, x)
    assert_close(y, MambaModule(cfg, backend="jax", seed=4)(x)["output"], "float32")
