"""The float64 gradient check shared by the version tests: JAX's gradients against central
finite differences along random directions, and PyTorch autograd against JAX."""

from __future__ import annotations

import numpy as np

from tests.tolerances import assert_close


def check_gradients(cfg, params: dict, x: np.ndarray, rng, names=None) -> None:
    """Every parameter in `names` (default: all) and the input, for sum(y * weights)."""
    import jax
    import jax.numpy as jnp
    import torch

    from mamba_core.backends import jax as mj
    from mamba_core.backends.torch import torch_forward

    weights = rng.standard_normal(x.shape)
    jp = {k: jnp.asarray(v) for k, v in params.items()}

    def loss(p, v):
        return jnp.sum(mj.forward(p, v, cfg)[0] * weights)

    g_params, g_x = jax.grad(loss, argnums=(0, 1))(jp, jnp.asarray(x))
    eps = 1e-6
    for name in names or params:
        direction = rng.standard_normal(params[name].shape)
        plus = {**jp, name: jp[name] + eps * direction}
        minus = {**jp, name: jp[name] - eps * direction}
        fd = (loss(plus, jnp.asarray(x)) - loss(minus, jnp.asarray(x))) / (2 * eps)
        analytic = float(jnp.sum(g_params[name] * direction))
        assert abs(fd - analytic) <= 1e-6 * max(1.0, abs(analytic)), name
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    tx = torch.tensor(x, requires_grad=True)
    (torch_forward(tp, tx, cfg)[0] * torch.from_numpy(weights)).sum().backward()
    for name in params:
        assert_close(tp[name].grad, g_params[name], "float64", factor=100)
    assert_close(tx.grad, g_x, "float64", factor=100)
