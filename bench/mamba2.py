"""The Mamba-2 benchmark: `python -m bench.mamba2` (or `make bench-mamba2`).

A Mamba-2 layer as wide as the seed config (hidden 768, expand 2, head_dim 64 -> 24 heads,
d_state 128, n_groups 1), float32, against HuggingFace's `Mamba2Mixer` (its pure-PyTorch
path) measured in the same run; every measurement in a fresh process (`bench.worker`), peak
memory in a separate process with a low mmap threshold (see `bench/__main__.py`).

Measures: forward at B=2, L=2048 and 8192 (auto scan) with time and peak memory; every scan
type and the SSD chunk length at L=2048 (the data behind the `auto` rule); decode per token
at batch 1 and 8 after 10 and after 2048 tokens of context.  Writes
`bench/results/mamba2.json` and `mamba2.md`.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from tqdm import tqdm

from bench.__main__ import ROOT, run_task
from bench.worker import HF2_CHUNK, SEED2

OURS = ("numpy", "jax", "torch")
#: (scan_type, chunk_size) runs behind the `auto` rule
SCAN_RUNS = (
    ("linear", "auto"),
    ("associative", "auto"),
    ("cumulative", 32),
    ("cumulative", 64),
    ("cumulative", 128),
    ("cumulative", 256),
)


def flops2(batch: int, length: int, chunk: int = 64) -> float:
    """Matmul FLOPs of one Mamba-2 forward: the projections plus the SSD chunk products."""
    d, e, n, p = SEED2["hidden_size"], 2 * SEED2["hidden_size"], SEED2["d_state"], SEED2["head_dim"]
    h, g = e // p, SEED2["n_groups"]
    proj = d * (2 * e + 2 * g * n + h) + e * d
    ssd = g * chunk * n + h * chunk * p + 2 * h * p * n  # C B^T, (CB*L) x, C S, x^T B
    return 2.0 * batch * length * (proj + ssd)


def bound(machine: dict, batch: int, length: int) -> float:
    """Matmul FLOPs at the best measured GEMM rate + the segment-sum exponentials (H*T per
    token at T = 64) at the best measured exp rate."""
    h = 2 * SEED2["hidden_size"] // SEED2["head_dim"]
    return flops2(batch, length) / (machine["matmul_gflops"] * 1e9) + batch * length * h * 64 / (
        machine["exp_gps"] * 1e9
    )


def plan(args) -> list[tuple[dict, bool]]:
    tasks: list[tuple[dict, bool]] = [({"kind": "machine"}, False)]
    impls = [*[i for i in OURS if i in args.backends], *(["hf"] if args.peer else [])]
    for length in args.lengths:
        for impl in impls:
            for memory in (False, True):
                task = {"kind": "forward2", "impl": impl, "batch": 2, "length": length}
                tasks.append(({**task, "repeats": 1 if memory else args.repeats}, memory))
    for impl in (i for i in OURS if i in args.backends):
        for scan, chunk in SCAN_RUNS:
            task = {"kind": "forward2", "impl": impl, "scan": scan, "chunk": chunk}
            tasks.append(({**task, "batch": 2, "length": 2048, "repeats": 2}, False))
    for impl in impls:
        for batch in (1, 8):
            for context in (10, 2048):
                task = {"kind": "decode2", "impl": impl, "batch": batch, "context": context}
                tasks.append(({**task, "steps": 100}, False))
    return tasks


def _get(results, **match):
    for r in results:
        if all(r.get(k) == v for k, v in match.items()) and "error" not in r:
            return r
    return None


def write_markdown(results: list[dict], args, path: Path) -> None:
    machine = _get(results, kind="machine") or {}
    lines = [
        "# Mamba-2 layer benchmark",
        "",
        f"`python -m bench.mamba2` on {platform.processor() or platform.machine()}, "
        f"{machine.get('cpus')} CPUs; BLAS: {', '.join(machine.get('blas', []))}.",
        f"Layer: {SEED2}; float32; peer: HF `Mamba2Mixer` (pure PyTorch, chunk {HF2_CHUNK}).",
        f"Machine rates: matmul {machine.get('matmul_gflops')} GFLOP/s, exp "
        f"{machine.get('exp_gps')} G/s (best library).",
        "",
        "## Forward, B=2 (auto scan)",
        "",
        "| L | implementation | scan, chunk | time (s) | x bound | x HF time | peak MiB "
        "| x HF mem |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for length in args.lengths:
        hf = _get(results, kind="forward2", impl="hf", length=length, memory=False)
        hf_mem = _get(results, kind="forward2", impl="hf", length=length, memory=True)
        low = bound(machine, 2, length) if machine else None
        for impl in [*OURS, "hf"]:
            r = _get(results, kind="forward2", impl=impl, length=length, memory=False, scan=None)
            m = _get(results, kind="forward2", impl=impl, length=length, memory=True, scan=None)
            if r is None:
                continue
            t, mem = r["time_s"], m["peak_mem_mib"] if m else None

            def ratio(a, b):
                return f"{a / b:.2f}" if a is not None and b else ""

            lines.append(
                f"| {length} | {impl} | {r.get('scan_used', 'SSD')}, "
                f"{r.get('chunk_size', HF2_CHUNK)} | {t:.3f} | {ratio(t, low)} | "
                f"{ratio(t, hf and hf['time_s'])} | {mem} | "
                f"{ratio(mem, hf_mem and hf_mem['peak_mem_mib'])} |"
            )
        if low:
            lines.append(f"| {length} | lower bound | | {low:.3f} | 1 | | | |")
    lines += ["", "## Every scan at L=2048, B=2 (the `auto` rule)", ""]
    lines += ["| backend | " + " | ".join(
        ["linear", "associative", "SSD T=32", "SSD T=64", "SSD T=128", "SSD T=256"]
    ) + " |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for impl in OURS:
        cells = []
        for scan, chunk in SCAN_RUNS:
            r = _get(results, kind="forward2", impl=impl, scan=scan, chunk=chunk)
            cells.append(f"{r['time_s']:.3f}" if r else "")
        lines.append(f"| {impl} | " + " | ".join(cells) + " |")
    lines += ["", "## Decode, ms per token", ""]
    lines += ["| implementation | b1, ctx 10 | b1, ctx 2048 | b8, ctx 10 | b8, ctx 2048 |"]
    lines += ["|---|---|---|---|---|"]
    for impl in [*OURS, "hf"]:
        cells = []
        for batch in (1, 8):
            for context in (10, 2048):
                r = _get(results, kind="decode2", impl=impl, batch=batch, context=context)
                cells.append(f"{r['ms_per_token']:.3f}" if r else "")
        lines.append(f"| {impl} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=list(OURS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-peer", dest="peer", action="store_false")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for task, memory in tqdm(plan(args), desc="mamba2 bench"):
        result = run_task(task, memory=memory)
        result["memory"] = memory
        result.setdefault("scan", task.get("scan"))
        results.append(result)
    (args.out / "mamba2.json").write_text(json.dumps(results, indent=1))
    write_markdown(results, args, args.out / "mamba2.md")
    print((args.out / "mamba2.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
