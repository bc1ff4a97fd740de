"""JAX specifics: compile once, the functional API under jit/grad/vmap, gradients, precision."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mamba_core import MambaConfig
from tests.conftest import require, small_config
from tests.reference import reference_forward
from tests.tolerances import assert_close, rel_error

require("jax", module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mamba_core import MambaModule, init_params  # noqa: E402
from mamba_core.backends import jax as mj  # noqa: E402

SCANS = ["linear", "associative", "cumulative"]
ROOT = Path(__file__).resolve().parents[1]


def jparams(cfg, seed=0, dtype=jnp.float64):
    return {k: jnp.asarray(v, dtype=dtype) for k, v in init_params(cfg, seed).items()}


def test_second_call_does_not_recompile(rng):
    cfg = small_config(hidden_size=24)  # a shape no other test compiles
    module = MambaModule(cfg, backend="jax")
    x = rng.standard_normal((2, 9, 24))
    before = mj.trace_count("forward")
    first = module(x)["metrics"]
    assert mj.trace_count("forward") == before + 1
    assert first["compiled_now"] is True and first["compile_time_s"] > 0
    second = module(x + 1.0)["metrics"]
    assert mj.trace_count("forward") == before + 1, "the second call recompiled"
    assert second["compiled_now"] is False and second["compile_time_s"] == 0.0
    module(rng.standard_normal((2, 10, 24)))  # a new length is a new program
    assert mj.trace_count("forward") == before + 2
    steps = mj.trace_count("step")
    state = module.init_state(2)
    for t in range(3):
        _, state = module.step(x[:, t], state)
    assert mj.trace_count("step") == steps + 1


def test_asarray_keeps_a_matching_array_and_converts_the_rest(rng):
    # a decode loop hands its own arrays back every step: those pass through untouched;
    # another dtype or a NumPy input is converted onto the device
    backend = mj.get_backend()
    device = jax.devices()[0]
    a = jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)
    assert backend.asarray(a, jnp.float32, device) is a
    assert backend.asarray(a) is a
    b = backend.asarray(a, jnp.bfloat16, device)
    assert b.dtype == jnp.bfloat16 and b.devices() == {device}
    c = backend.asarray(np.ones((2, 3), np.float64), jnp.float32, device)
    assert isinstance(c, jax.Array) and c.dtype == jnp.float32 and c.devices() == {device}


def test_functional_api_under_jit_grad_and_vmap(rng):
    cfg = small_config()
    params = jparams(cfg, 3)
    x = jnp.asarray(rng.standard_normal((2, 11, cfg.hidden_size)))
    y, state = mj.forward(params, x, cfg)
    expected, _ = reference_forward(init_params(cfg, 3), np.asarray(x), cfg)
    assert_close(y, expected, "float64")
    # under the caller's own jit, the config closed over
    y_jit = jax.jit(lambda p, v: mj.forward(p, v, cfg)[0])(params, x)
    assert_close(y_jit, expected, "float64")
    # vmap over an extra leading axis
    xs = jnp.stack([x, 2 * x, -x])
    ys = jax.vmap(lambda v: mj.forward(params, v, cfg)[0])(xs)
    for i, v in enumerate(xs):
        assert_close(ys[i], mj.forward(params, v, cfg)[0], "float64")
    # grad with respect to params and inputs
    g_p, g_x = jax.grad(lambda p, v: jnp.sum(mj.forward(p, v, cfg)[0] ** 2), argnums=(0, 1))(
        params, x
    )
    assert set(g_p) == set(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0 for g in g_p.values())
    assert g_x.shape == x.shape
    # step is a jittable pure function too
    y_t, _ = jax.jit(lambda p, s, v: mj.step(p, s, v, cfg))(params, state, x[:, 0])
    assert y_t.shape == (2, cfg.hidden_size)


@pytest.mark.parametrize("scan", SCANS)
def test_gradients_match_finite_differences(scan, rng):
    cfg = small_config(scan_type=scan, chunk_size=4)
    params = jparams(cfg, 5)
    x = jnp.asarray(rng.standard_normal((2, 9, cfg.hidden_size)))
    weights = jnp.asarray(rng.standard_normal((2, 9, cfg.hidden_size)))

    def loss(p, v):
        return jnp.sum(jnp.tanh(mj.forward(p, v, cfg)[0]) * weights)

    g_p, g_x = jax.grad(loss, argnums=(0, 1))(params, x)
    eps = 1e-6
    for name in ("A_log", "dt_proj.bias", "x_proj.weight", "conv1d.weight", "in_proj.weight"):
        direction = jnp.asarray(rng.standard_normal(params[name].shape))
        plus = {**params, name: params[name] + eps * direction}
        minus = {**params, name: params[name] - eps * direction}
        numeric = (loss(plus, x) - loss(minus, x)) / (2 * eps)
        analytic = jnp.sum(g_p[name] * direction)
        assert abs(float(numeric - analytic)) <= 1e-6 * max(1.0, abs(float(analytic))), name
    direction = jnp.asarray(rng.standard_normal(x.shape))
    numeric = (loss(params, x + eps * direction) - loss(params, x - eps * direction)) / (2 * eps)
    analytic = jnp.sum(g_x * direction)
    assert abs(float(numeric - analytic)) <= 1e-6 * max(1.0, abs(float(analytic)))


@pytest.mark.parametrize("scan", SCANS)
def test_gradients_match_the_reference_gradients(scan, rng):
    """jax.grad through the library equals jax.grad through the plain per-token reference."""
    cfg = small_config(scan_type=scan, chunk_size=4, use_bias=True)
    params = jparams(cfg, 6)
    x = jnp.asarray(rng.standard_normal((2, 10, cfg.hidden_size)))

    def lib_loss(p, v):
        return jnp.sum(jnp.sin(mj.forward(p, v, cfg)[0]))

    def ref_loss(p, v):
        return jnp.sum(jnp.sin(reference_forward(p, v, cfg, lib=jnp)[0]))

    got = jax.grad(lib_loss, argnums=(0, 1))(params, x)
    want = jax.grad(ref_loss, argnums=(0, 1))(params, x)
    for name in params:
        assert_close(got[0][name], want[0][name], "float64", factor=10)
    assert_close(got[1], want[1], "float64", factor=10)


def test_the_adapter_is_differentiable(rng):
    cfg = small_config()
    module = MambaModule(cfg, backend="jax", dtype="float64", seed=2)
    x = jnp.asarray(rng.standard_normal((2, 7, cfg.hidden_size)))
    g = jax.grad(lambda v: module(v)["output"].sum())(x)
    params = jparams(cfg, 2)
    want = jax.grad(lambda v: mj.forward(params, v, cfg)[0].sum())(x)
    assert_close(g, want, "float64")


def test_bfloat16_runs_the_scan_in_float32(rng):
    cfg = small_config()
    x = rng.standard_normal((2, 40, cfg.hidden_size))
    p32 = jparams(cfg, 1, jnp.float32)
    p16 = jparams(cfg, 1, jnp.bfloat16)
    y32, _ = mj.forward(p32, jnp.asarray(x, jnp.float32), cfg)
    y16, s16 = mj.forward(p16, jnp.asarray(x, jnp.bfloat16), cfg)
    assert y16.dtype == jnp.bfloat16 and s16.ssm_state.dtype == jnp.float32
    assert rel_error(y16, y32) <= 4e-2
    pure = cfg.replace(use_mixed_precision=False)
    y_pure, s_pure = mj.forward(p16, jnp.asarray(x, jnp.bfloat16), pure)
    assert s_pure.ssm_state.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(y_pure.astype(jnp.float32))))


def test_metrics_and_auto_rule_per_platform():
    cfg = small_config()
    backend = mj.get_backend()
    assert backend.auto_scan("cpu", cfg) == "linear"
    assert backend.auto_scan("tpu", cfg) == "associative"
    assert backend.auto_scan("tpu", cfg.replace(use_tpu_optimizations=False)) == "linear"
    module = MambaModule(cfg, backend="jax", device="cpu")
    m = module(np.ones((1, 2, 16)))["metrics"]
    assert m["platform"] == "cpu" and m["tpu_optimized"] is False and m["scan_used"] == "linear"
    with pytest.raises(ValueError, match="invalid for the jax backend"):
        MambaModule(cfg, backend="jax", device="tpu")


def test_without_x64_float64_is_a_clear_error():
    code = (
        "import json, numpy as np, jax\n"
        "from mamba_core import MambaModule\n"
        "m = MambaModule({'hidden_size': 8, 'd_state': 4}, backend='jax')\n"
        "out = m(np.random.randn(1, 3, 8))['output']\n"
        "try:\n"
        "    MambaModule({'hidden_size': 8}, backend='jax', dtype='float64'); err = None\n"
        "except ValueError as exc:\n"
        "    err = str(exc)\n"
        "print(json.dumps({'dtype': str(out.dtype), 'err': err}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={k: v for k, v in __import__("os").environ.items() if k != "JAX_ENABLE_X64"},
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["dtype"] == "float32"
    assert "jax_enable_x64" in out["err"]


@pytest.mark.parametrize("scan", SCANS)
def test_core_functions_under_jit(scan, rng):
    """The core's generic functions (not the backend's native scans) also trace under jit."""
    from mamba_core import mixer_forward, mixer_step, selective_scan
    from tests.reference import reference_scan

    B, L, E, N = 2, 21, 5, 3
    inputs = {
        "u": rng.standard_normal((B, L, E)),
        "dt": rng.uniform(0, 2.0, (B, L, E)),
        "A": -np.exp(rng.uniform(-1, 2, (E, N))),
        "Bm": rng.standard_normal((B, L, N)),
        "Cm": rng.standard_normal((B, L, N)),
        "h0": rng.standard_normal((B, E, N)),
    }
    args = [jnp.asarray(inputs[k]) for k in ("u", "dt", "A", "Bm", "Cm", "h0")]
    y, h = jax.jit(lambda *a: selective_scan(*a, algorithm=scan, chunk_size=4))(*args)
    y_ref, h_ref = reference_scan(**inputs)
    assert_close(y, y_ref, "float64")
    assert_close(h, h_ref, "float64")
    cfg = small_config(scan_type=scan, chunk_size=4)
    params = jparams(cfg, 1)
    x = jnp.asarray(rng.standard_normal((2, 9, cfg.hidden_size)))
    out, state = jax.jit(lambda p, v: mixer_forward(p, v, cfg))(params, x)
    assert_close(out, reference_forward(init_params(cfg, 1), np.asarray(x), cfg)[0], "float64")
    y_t, _ = jax.jit(lambda p, s, v: mixer_step(p, s, v, cfg))(params, state, x[:, 0])
    assert y_t.shape == (2, cfg.hidden_size)


def _scan_lengths(jaxpr) -> list[int]:
    """The `length` of every lax.scan in a jaxpr, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            found.append(eqn.params["length"])
        for value in eqn.params.values():
            inner = value if hasattr(value, "eqns") else getattr(value, "jaxpr", None)
            if inner is not None and not hasattr(inner, "eqns"):
                inner = getattr(inner, "jaxpr", None)
            if inner is not None:
                found += _scan_lengths(inner)
    return found


@pytest.mark.parametrize("version", ["mamba1", "mamba2"])
def test_a_ragged_last_chunk_costs_its_own_length(version, monkeypatch):
    """L = 72 at chunk 64: one whole chunk of 64 steps and a tail of 8, never a padded 128
    (XLA's scan: the compiled kernels off, which would run a Mamba-1 forward instead)."""
    import jax
    import jax.numpy as jnp

    from mamba_core.backends import jax as mj
    from mamba_core.backends import kernels

    monkeypatch.setattr(kernels, "_DISABLED", True)

    fields = {"mamba1": dict(dt_rank=2), "mamba2": dict(version="mamba2", head_dim=8)}[version]
    cfg = MambaConfig(hidden_size=8, d_state=4, scan_type="linear", chunk_size=64, **fields)
    params = {k: jnp.asarray(v) for k, v in init_params(cfg, 0).items()}
    x = jnp.zeros((1, 72, 8))
    lengths = _scan_lengths(jax.make_jaxpr(lambda v: mj.forward(params, v, cfg)[0])(x).jaxpr)
    assert sorted(lengths) == [1, 8, 64], lengths


@pytest.mark.parametrize("packed", [False, True])
def test_linear_scan_vjp_equals_autodiff_through_lax_scan(rng, packed):
    # the hand-written backward of the chunked linear scan (chunks of 8, a ragged tail of 5)
    # against JAX's own autodiff of the plain step loop, every input including h0
    import jax
    import jax.numpy as jnp

    from mamba_core.backends import jax as mj

    B, L, E, N = 2, 21, 6, 4
    dt = jnp.asarray(rng.random((B, L, E)))
    u, Bm, Cm = (jnp.asarray(rng.standard_normal(s)) for s in ((B, L, E), (B, L, N), (B, L, N)))
    A = -jnp.exp(jnp.asarray(rng.standard_normal((E, N))))
    h0 = jnp.asarray(rng.standard_normal((B, E, N)))
    keep = jnp.asarray((rng.random((B, L)) > 0.2).astype(np.float64)) if packed else None
    fast = mj.chunked_scan("linear", 8)

    def plain(u, dt, A, Bm, Cm, h0, keep=None):
        t = lambda a: None if a is None else jnp.swapaxes(a, 0, 1)  # noqa: E731
        y, h = mj._chunk_linear(h0, t(dt), t(u), t(Bm), t(Cm), A, t(keep))
        return t(y), h

    def loss(scan):
        def f(*args):
            y, h = scan(*args, keep=keep)
            return jnp.sum(jnp.sin(y) ** 2) + jnp.sum(h**3)

        return jax.jit(jax.grad(f, argnums=tuple(range(6))))

    args = (u, dt, A, Bm, Cm, h0)
    y1, h1 = fast(*args, keep=keep)
    y2, h2 = plain(*args, keep=keep)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(h1), np.asarray(h2), rtol=1e-12, atol=1e-12)
    for got, want in zip(loss(fast)(*args), loss(plain)(*args), strict=True):
        scale = float(jnp.abs(want).max())
        assert float(jnp.abs(got - want).max()) <= 1e-12 * scale
