"""The JAX forward on an 8-device mesh (data x model parallel) equals the single-device run.

Runs in a subprocess: XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before
JAX starts, and gives 8 CPU devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json
import numpy as np
import jax, jax.numpy as jnp
jax.config.update("jax_enable_x64", True)
from jax.sharding import Mesh, PartitionSpec as P
from mamba_core import MambaConfig, init_params
from mamba_core.backends import jax as mj

cfg = MambaConfig(hidden_size=32, d_state=8, dt_rank=4, expand_factor=2, chunk_size=8)
params = {k: jnp.asarray(v) for k, v in init_params(cfg, 0).items()}
x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 21, 32)))
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
sharded_params = mj.shard_params(params, mesh)
sharded_x = mj.shard_inputs(x, mesh)
report = {"devices": len(jax.devices()), "scans": {}}
spec = lambda a: list(a.sharding.spec) + [None] * (a.ndim - len(a.sharding.spec))
for scan in ("linear", "associative", "cumulative"):
    ref, ref_state = mj.forward(params, x, cfg, scan_type=scan)
    y, state = mj.forward(sharded_params, sharded_x, cfg, scan_type=scan, mesh=mesh)
    scale = float(jnp.abs(ref).max())
    loss = lambda p, v: jnp.sum(mj.forward(p, v, cfg, scan_type=scan, mesh=mesh)[0] ** 2)
    g = jax.grad(loss)(sharded_params, sharded_x)
    g_ref = jax.grad(lambda p, v: jnp.sum(mj.forward(p, v, cfg, scan_type=scan)[0] ** 2))(params, x)
    report["scans"][scan] = {
        "err": float(jnp.abs(y - ref).max()) / scale,
        "state_err": float(jnp.abs(state.ssm_state - ref_state.ssm_state).max()),
        "grad_err": max(
            float(jnp.abs(g[k] - g_ref[k]).max() / jnp.abs(g_ref[k]).max()) for k in params
        ),
        "y_devices": len(y.sharding.device_set),
        "y_spec": spec(y),
        "h_spec": spec(state.ssm_state),
    }
hlo = jax.jit(lambda p, v: mj.forward(p, v, cfg, mesh=mesh)[0]).lower(
    sharded_params, sharded_x).compile().as_text()
report["all_reduce"] = hlo.count("all-reduce")
report["in_proj_spec"] = spec(sharded_params["in_proj.weight"])
print(json.dumps(report))
"""


def test_mesh_forward_equals_single_device():
    require("jax")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    assert report["in_proj_spec"] == ["model", None]
    assert report["all_reduce"] > 0  # x_proj and out_proj contract over the sharded E
    for scan, r in report["scans"].items():
        assert r["err"] < 1e-12, scan
        assert r["state_err"] < 1e-12, scan
        assert r["grad_err"] < 1e-10, scan
        assert r["y_devices"] == 8, scan
        assert r["y_spec"] == ["data", None, None], scan
        assert r["h_spec"] == ["data", "model", None], scan
