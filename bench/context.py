"""Context parallelism on 8 forced host devices: `python -m bench.context` (or `make
bench-context`).

For S = 1, 2, 4, 8 stretches (a mesh axis "context" over S of 8 forced host CPU devices):
the time of one jitted `context_forward` of the seed-width Mamba-1 and Mamba-2 layers at
B=1, L=8192, float32, and every collective of the compiled program with the bytes it moves
per device (from the HLO).  The 8 "devices" share this machine's cores, so the times show
the overhead of the algorithm (each stretch is scanned twice), not a parallel speed-up.
Writes `bench/results/context.json` and `context.md`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.__main__ import ROOT

CODE = r"""
import json, re, time
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import Mesh
from mamba_core import MambaConfig, init_params
from mamba_core.backends import jax as mj
from bench.worker import SEED, SEED2

BYTES = {"f32": 4, "f64": 8, "bf16": 2, "s32": 4, "pred": 1}
rows = []
for version, fields in (("mamba1", SEED), ("mamba2", SEED2)):
    cfg = MambaConfig(**fields)
    p = {k: jnp.asarray(v, jnp.float32) for k, v in init_params(cfg, 0).items()}
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 8192, 768), np.float32))
    for size in (1, 2, 4, 8):
        mesh = Mesh(np.array(jax.devices()[:size]), ("context",))
        fn = jax.jit(lambda q, v: mj.context_forward(q, v, cfg, mesh=mesh))
        text = fn.lower(p, x).compile().as_text()
        ops = []
        kinds = "all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter"
        for dtype, dims, kind in re.findall(r"= (\w+)\[([\d,]*)\][^=]*? (" + kinds + r")\(", text):
            n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            ops.append([kind, f"{dtype}[{dims}]", n * BYTES.get(dtype, 4)])
        jax.block_until_ready(fn(p, x))
        times = []
        for _ in range(3):
            start = time.perf_counter()
            jax.block_until_ready(fn(p, x))
            times.append(time.perf_counter() - start)
        rows.append({"version": version, "stretches": size, "tokens_per_stretch": 8192 // size,
                     "time_s": min(times), "collectives": ops,
                     "bytes_per_device": sum(o[2] for o in ops)})
print(json.dumps(rows))
"""


def main() -> int:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, cwd=ROOT, env=env
    )
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        return 1
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    out = ROOT / "bench" / "results"
    (out / "context.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "# Context parallelism (JAX, 8 forced host devices on one CPU)",
        "",
        "Seed-width layers (hidden 768), B=1, L=8192, float32, one jitted `context_forward`. "
        "The devices share the machine's cores: times show the algorithm's overhead, not a "
        "speed-up. Collectives from the compiled HLO, bytes per device per call.",
        "",
        "| version | stretches S | tokens per stretch | time (s) | collectives (kind, shape, "
        "count) | bytes moved per device |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        counts: dict[tuple[str, str], int] = {}
        for kind, shape, _ in r["collectives"]:
            counts[(kind, shape)] = counts.get((kind, shape), 0) + 1
        ops = "; ".join(f"{k} {s} x{c}" for (k, s), c in sorted(counts.items())) or "none"
        lines.append(
            f"| {r['version']} | {r['stretches']} | {r['tokens_per_stretch']} | "
            f"{r['time_s']:.3f} | {ops} | {r['bytes_per_device']:,} |"
        )
    (out / "context.md").write_text("\n".join(lines) + "\n")
    print((out / "context.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
