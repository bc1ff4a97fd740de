"""Packed against padded: `python -m bench.packing` (or `make bench-packing`).

Sequence lengths drawn log-uniform in [16, 2048] (seed 0) fill one row of 8192 tokens.  The
same sequences run as that packed row (`seq_idx`), as `cu_seqlens` (which also returns one
state per sequence: `MambaModule` runs each sequence as its own call on NumPy and PyTorch, a
masked padded batch on JAX) and as a batch padded to the longest (`attention_mask`);
forward, float32, no grad, the seed-width layers (hidden 768) of Mamba-1 and Mamba-2 on
every backend; every measurement in a fresh process (`bench.worker`).  Reports real tokens
per second (padding does not count).  Writes `bench/results/packing.json` and `packing.md`.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from tqdm import tqdm

from bench.__main__ import ROOT, run_task
from bench.worker import packed_lengths

OURS = ("numpy", "jax", "torch")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=list(OURS))
    parser.add_argument("--versions", nargs="+", default=["mamba1", "mamba2"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--from-json", action="store_true", help="only rewrite packing.md")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    tasks = [
        {"kind": "packing", "version": v, "impl": i, "mode": m, "repeats": args.repeats}
        for v in args.versions
        for i in args.backends
        for m in ("packed", "cu_seqlens", "padded")
    ]
    if args.from_json:  # rewrite the table from a previous run's JSON
        results = json.loads((args.out / "packing.json").read_text())
    else:
        results = [run_task(t) for t in tqdm(tasks, desc="packing bench")]
        (args.out / "packing.json").write_text(json.dumps(results, indent=1))
    lengths = packed_lengths()
    lines = [
        "# Packed vs padded",
        "",
        f"`python -m bench.packing` on {platform.processor() or platform.machine()}; "
        f"{len(lengths)} sequences, log-uniform lengths in [16, 2048] (seed 0), "
        f"{sum(lengths)} tokens, longest {max(lengths)}: packed = one row of {sum(lengths)} "
        f"tokens with `seq_idx`; cu_seqlens = the same row with `cu_seqlens` (one state per "
        f"sequence in and out: one call per sequence on NumPy and PyTorch, the masked padded "
        f"batch on JAX); padded = {len(lengths)} rows "
        f"of {max(lengths)} "
        f"({len(lengths) * max(lengths)} positions).  Hidden 768, float32, forward.",
        "",
        "| version | backend | packed tok/s | cu_seqlens tok/s | padded tok/s | packed / padded |",
        "|---|---|---|---|---|---|",
    ]
    for v in args.versions:
        for i in args.backends:
            got = {r["mode"]: r for r in results if r["version"] == v and r["impl"] == i}
            modes = ("packed", "cu_seqlens", "padded")
            cells = [got[m].get("tokens_per_s", got[m].get("error")) for m in modes]
            ratio = f"{cells[0] / cells[2]:.2f}" if all(isinstance(c, float) for c in cells) else ""
            lines.append(f"| {v} | {i} | {cells[0]} | {cells[1]} | {cells[2]} | {ratio} |")
    (args.out / "packing.md").write_text("\n".join(lines) + "\n")
    print((args.out / "packing.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
