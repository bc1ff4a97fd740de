"""Mamba-1, -2 and -3 side by side: `python -m bench.versions` (or `make bench-versions`).

One width (hidden 768, expand 2): Mamba-1 (d_state 64, dt_rank 48, the seed layer), Mamba-2
(head_dim 64, d_state 128), Mamba-3 SISO and MIMO rank 4 (head_dim 64, d_state 128).  B=2,
L=2048, float32: forward (every backend, auto scan), training step (forward + backward of
sum(y**2); JAX and PyTorch) and decode (ms per cached step at batch 2); every measurement in a
fresh process (`bench.worker`).  Reports tokens/s and the forward's ratio to this machine's
bound: matmul FLOPs at the measured GEMM rate plus exponentials (and, for Mamba-3, the
rotary cos/sin) at the measured exp rate.  Writes `bench/results/versions.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from tqdm import tqdm

from bench.__main__ import ROOT, run_task
from bench.worker import LAYERS

OURS = ("numpy", "jax", "torch")
BATCH, LENGTH, CHUNK = 2, 2048, 64


def work(layer: str) -> tuple[float, float]:
    """(matmul FLOPs, exponentials) of one forward at B=2, L=2048 (chunk 64 for the SSD
    forms; Mamba-1's scan: one exponential per (channel, state) and token)."""
    from mamba_core import MambaConfig

    cfg = MambaConfig(**LAYERS[layer])
    d, e, n = cfg.hidden_size, cfg.d_inner, cfg.d_state
    tokens = BATCH * LENGTH
    if cfg.version == "mamba1":
        r = cfg.dt_rank
        proj = d * 2 * e + e * (r + 2 * n) + r * e + e * d + e * cfg.d_conv
        return 2.0 * tokens * (proj + 2 * e * n), tokens * e * n
    h, p, g = cfg.num_heads, cfg.head_dim, cfg.n_groups
    if cfg.version == "mamba2":
        proj = d * (2 * e + 2 * g * n + h) + e * d
        ssd = g * CHUNK * n + h * CHUNK * p + 2 * h * p * n
        return 2.0 * tokens * (proj + ssd), tokens * h * CHUNK
    r = cfg.ranks
    proj = d * (2 * e + 2 * r * g * n + 3 * h + cfg.rope_angles) + e * d
    ssd = h * (CHUNK * r * r * (n + p) + 2 * r * p * n + r * r * (n + p))
    return 2.0 * tokens * (proj + ssd), tokens * h * (CHUNK + 2 * cfg.rope_angles)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=list(OURS))
    parser.add_argument("--layers", nargs="+", default=list(LAYERS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    tasks = [{"kind": "machine"}]
    for layer in args.layers:
        for impl in args.backends:
            tasks.append({"kind": "layer", "layer": layer, "impl": impl, "mode": "forward",
                          "length": LENGTH, "repeats": args.repeats})  # fmt: skip
            if impl != "numpy":
                tasks.append({"kind": "layer", "layer": layer, "impl": impl, "mode": "train",
                              "length": LENGTH, "repeats": args.repeats})  # fmt: skip
            tasks.append({"kind": "layer", "layer": layer, "impl": impl, "mode": "decode"})
    results = [run_task(t) for t in tqdm(tasks, desc="versions bench")]
    (args.out / "versions.json").write_text(json.dumps(results, indent=1))
    machine = results[0]
    lines = [
        "# Mamba-1, -2 and -3 layers side by side",
        "",
        f"`python -m bench.versions` on {platform.processor() or platform.machine()}, "
        f"{machine.get('cpus')} CPUs; BLAS: {', '.join(machine.get('blas', []))}; matmul "
        f"{machine.get('matmul_gflops')} GFLOP/s, exp {machine.get('exp_gps')} G/s (best "
        f"library). Hidden 768, expand 2, B={BATCH}, L={LENGTH}, float32. Layers: "
        + "; ".join(f"{k}: {v}" for k, v in LAYERS.items()),
        "",
        "| layer | backend | forward tok/s | forward x bound | train step tok/s | "
        "train / forward | decode ms/token (b2) |",
        "|---|---|---|---|---|---|---|",
    ]

    def get(**match):
        for r in results:
            if all(r.get(k) == v for k, v in match.items()):
                return r
        return {}

    for layer in args.layers:
        flops, exps = work(layer)
        bound = flops / (machine["matmul_gflops"] * 1e9) + exps / (machine["exp_gps"] * 1e9)
        for impl in args.backends:
            fwd = get(layer=layer, impl=impl, mode="forward")
            train = get(layer=layer, impl=impl, mode="train")
            dec = get(layer=layer, impl=impl, mode="decode")
            f_t, t_t = fwd.get("time_s"), train.get("time_s")
            ms = dec.get("ms_per_token")
            dec_cell = f"{ms:.2f}" if ms is not None else dec.get("error", "")
            lines.append(
                f"| {layer} | {impl} | {fwd.get('tokens_per_s', fwd.get('error', ''))} | "
                f"{f'{f_t / bound:.2f}' if f_t else ''} | "
                f"{train.get('tokens_per_s', train.get('error', '—'))} | "
                f"{f'{t_t / f_t:.1f}' if f_t and t_t else ''} | "
                f"{dec_cell} |"
            )
        lines.append(f"| {layer} | lower bound | {BATCH * LENGTH / bound:.0f} | 1 | | | |")
    (args.out / "versions.md").write_text("\n".join(lines) + "\n")
    print((args.out / "versions.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
