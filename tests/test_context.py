"""Context parallelism on JAX: the sequence split over a mesh axis on 8 forced host devices
(a subprocess) equals the single-device run, and its collectives move states, never
sequence-sized activations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[1]

CODE = r"""
import json, re
import numpy as np, jax, jax.numpy as jnp
jax.config.update("jax_enable_x64", True)
from jax.sharding import Mesh
from mamba_core import MambaConfig, init_params
from mamba_core.backends import jax as mj

out = {"cases": [], "hlo": {}, "errors": []}
versions = {
    "mamba1": dict(hidden_size=16, d_state=4, dt_rank=2),
    "mamba2": dict(version="mamba2", hidden_size=16, d_state=4, head_dim=8),
}
rng = np.random.default_rng(0)
for name, fields in versions.items():
    for scan in {"mamba1": ("linear",), "mamba2": ("cumulative",)}[name]:
        cfg = MambaConfig(**fields, chunk_size=4, scan_type=scan)
        p = {k: jnp.asarray(v) for k, v in init_params(cfg, 0).items()}
        x = jnp.asarray(rng.standard_normal((2, 24, 16)))
        start = mj.forward(p, jnp.asarray(rng.standard_normal((2, 5, 16))), cfg)[1]
        y1, s1 = mj.forward(p, x, cfg, start)
        loss1 = lambda q: (mj.forward(q, x, cfg, start)[0] ** 2).sum()
        g1 = jax.grad(loss1)(p)
        for size in (1, 2, 4, 8):
            mesh = Mesh(np.array(jax.devices()[:size]), ("context",))
            y, st = mj.context_forward(p, x, cfg, start, mesh=mesh)
            g = g1 if size != 4 else jax.grad(
                lambda q: (mj.context_forward(q, x, cfg, start, mesh=mesh)[0] ** 2).sum()
            )(p)
            # decode after the context-parallel prefill, from the gathered final state
            t = jnp.asarray(rng.standard_normal((2, 16)))
            d1, _ = mj.step(p, s1, t, cfg)
            d, _ = mj.step(p, st, t, cfg)
            out["cases"].append([name, scan, size, float(jnp.abs(y - y1).max() / jnp.abs(y1).max()),
                float(jnp.abs(st.ssm_state - s1.ssm_state).max()),
                float(jnp.abs(st.conv_state - s1.conv_state).max()),
                max(float(jnp.abs(g[k] - g1[k]).max() / (jnp.abs(g1[k]).max() + 1e-30)) for k in g),
                float(jnp.abs(d - d1).max())])
    # the collectives of the compiled program, at two lengths
    cfg = MambaConfig(**fields, chunk_size=4)
    p = {k: jnp.asarray(v) for k, v in init_params(cfg, 0).items()}
    mesh = Mesh(np.array(jax.devices()), ("context",))
    for length in (32, 96):
        x = jnp.zeros((2, length, 16))
        text = jax.jit(lambda q, v: mj.context_forward(q, v, cfg, mesh=mesh)).lower(p, x).compile().as_text()
        ops = sorted(set(re.findall(r"= (\w+\[[\d,]*\])[^=]*? (all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)\(", text)))
        out["hlo"][f"{name}-{length}"] = ops
# composition with a data axis: mesh 2x4 (batch over "data", sequence over "context")
cfg = MambaConfig(**versions["mamba2"], chunk_size=4)
p = {k: jnp.asarray(v) for k, v in init_params(cfg, 1).items()}
x = jnp.asarray(rng.standard_normal((4, 16, 16)))
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "context"))
y1, s1 = mj.forward(p, x, cfg)
y, st = mj.context_forward(p, x, cfg, mesh=mesh, data_axis="data")
g1 = jax.grad(lambda q: (mj.forward(q, x, cfg)[0] ** 2).sum())(p)
g = jax.grad(lambda q: (mj.context_forward(q, x, cfg, mesh=mesh, data_axis="data")[0] ** 2).sum())(p)
out["mesh3"] = [float(jnp.abs(y - y1).max()), float(jnp.abs(st.ssm_state - s1.ssm_state).max()),
                max(float(jnp.abs(g[k] - g1[k]).max() / (jnp.abs(g1[k]).max() + 1e-30)) for k in g)]
# composition with data and model axes: mesh 2x2x2, parameters sharded over "model"
out["mesh222"] = []
for name, fields in versions.items():
    cfg = MambaConfig(**fields, chunk_size=4)
    p = {k: jnp.asarray(v) for k, v in init_params(cfg, 2).items()}
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "model", "context"))
    ps = mj.shard_params(p, mesh, cfg)
    y1, s1 = mj.forward(p, x, cfg)
    cp = jax.jit(lambda q, v: mj.context_forward(q, v, cfg, mesh=mesh, data_axis="data"))
    y, st = cp(ps, x)
    g1 = jax.grad(lambda q: (mj.forward(q, x, cfg)[0] ** 2).sum())(p)
    g = jax.jit(jax.grad(lambda q: (cp(q, x)[0] ** 2).sum()))(ps)
    out["mesh222"].append([name, float(jnp.abs(y - y1).max()), float(jnp.abs(st.ssm_state - s1.ssm_state).max()),
        max(float(jnp.abs(g[k] - g1[k]).max() / (jnp.abs(g1[k]).max() + 1e-30)) for k in g),
        str(st.ssm_state.sharding.spec)])
for length in (25, 16):
    try:
        mj.context_forward(p, jnp.zeros((1, length, 16)), cfg, mesh=Mesh(np.array(jax.devices()), ("context",)))
    except ValueError as exc:
        out["errors"].append(str(exc))
print(json.dumps(out))
"""


def test_context_parallel_equals_one_device_and_moves_only_states():
    require("jax")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, scan, size, dy, ds, dc, dg, dd in out["cases"]:
        assert max(dy, dg) < 1e-12 and max(ds, dc, dd) < 1e-12, (
            name,
            scan,
            size,
            dy,
            ds,
            dc,
            dg,
            dd,
        )
    assert len(out["cases"]) == 2 * 4
    for version in ("mamba1", "mamba2"):
        short, long = out["hlo"][f"{version}-32"], out["hlo"][f"{version}-96"]
        kinds = {kind for _, kind in short}
        assert "all-gather" not in kinds and "collective-permute" in kinds, short
        assert short == long, (short, long)  # the same collectives whatever L: never O(L)
    dy, ds, dg = out["mesh3"]
    assert max(dy, ds, dg) < 1e-12, out["mesh3"]
    for name, dy, ds, dg, spec in out["mesh222"]:
        assert max(dy, ds, dg) < 1e-12, (name, dy, ds, dg)
        assert spec.endswith("('data', 'model')"), (name, spec)  # the scan ran sharded
    assert "seq_len must be divisible by 8" in out["errors"][0]
    assert "at least d_conv - 1 = 3 tokens" in out["errors"][1]
