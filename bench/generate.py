"""The generation benchmark: `python -m bench.generate` (or `make bench-generate`).

Language models of the real `mamba-130m` and `mamba2-130m` shapes (24 layers, d_model 768,
vocab 50280; random weights, nothing is downloaded), float32: prefill a 512-token prompt
and decode 128 tokens greedily, at batch 1 and 8, on every backend and with HuggingFace's
`MambaForCausalLM` / `Mamba2ForCausalLM.generate` (pure PyTorch) in the same run, each in a
fresh process.  Prints and writes `bench/results/generate.{json,md}` with tokens/s, the
ratios to HF, peak memory and the machine bound of a decode step (its weight bytes at the
measured memory bandwidth plus its FLOPs at the measured GEMM rate).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.__main__ import ROOT, run_task
from bench.worker import LM_LAYERS, LM_SHAPES, LM_VOCAB

IMPLS = ("numpy", "jax", "torch", "hf")


def bandwidth_gbps() -> float:
    """Best of 5 copies of a 512 MiB float32 array: read + write bytes per second."""
    a = np.ones(128 << 20, dtype=np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - start)
    return 2 * a.nbytes / best / 1e9


def step_weights(kind: str) -> int:
    """Parameters a decode step reads (every layer's weights plus the tied head)."""
    from mamba_core import MambaConfig
    from mamba_core.models import LMConfig, lm_param_shapes

    cfg = LMConfig(mixer=MambaConfig(**LM_SHAPES[kind]), n_layer=LM_LAYERS, vocab_size=LM_VOCAB)
    return int(sum(np.prod(s) for s in lm_param_shapes(cfg).values()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS))
    parser.add_argument("--kinds", nargs="+", default=["mamba", "mamba2"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = run_task({"kind": "machine"})
    bw = bandwidth_gbps()
    tasks = [
        {"kind": "generate", "impl": impl, "kind_lm": kind, "batch": batch}
        for kind in args.kinds
        for batch in args.batches
        for impl in args.impls
    ]
    results = [run_task(t) for t in tqdm(tasks, desc="generate bench")]
    (args.out / "generate.json").write_text(
        json.dumps({"machine": machine, "bandwidth_gbps": bw, "results": results}, indent=1)
    )
    lines = [
        "# Generation benchmark",
        "",
        f"24 layers, d_model 768, vocab {LM_VOCAB}, float32, prompt 512, 128 new tokens (greedy).",
        f"Machine: memory bandwidth {bw:.1f} GB/s (copy), GEMM {machine.get('matmul_gflops')} "
        f"GFLOP/s; BLAS {', '.join(machine.get('blas', []))}.",
        "",
        "| model | batch | impl | prefill s | x HF | decode tok/s | x HF | ms/step | step bound ms "
        "| x bound | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in args.kinds:
        n = step_weights(kind)
        for batch in args.batches:
            bound_ms = 1e3 * (4 * n / (bw * 1e9) + 2 * n * batch / (machine["matmul_gflops"] * 1e9))
            hf = next(
                (r for r in results if r["impl"] == "hf" and r["kind_lm"] == kind
                 and r["batch"] == batch and "error" not in r), None,
            )  # fmt: skip
            for r in results:
                if r["kind_lm"] != kind or r["batch"] != batch:
                    continue
                if "error" in r:
                    lines.append(f"| {kind} | {batch} | {r['impl']} | error: {r['error'][:80]} |")
                    continue
                pre = f"{r['prefill_s'] / hf['prefill_s']:.2f}" if hf else ""
                dec = f"{r['decode_tokens_per_s'] / hf['decode_tokens_per_s']:.2f}" if hf else ""
                lines.append(
                    f"| {kind} | {batch} | {r['impl']} | {r['prefill_s']:.3f} | {pre} | "
                    f"{r['decode_tokens_per_s']:.1f} | {dec} | {r['ms_per_step']:.2f} | "
                    f"{bound_ms:.2f} | {r['ms_per_step'] / bound_ms:.2f} | {r['peak_mem_mib']} |"
                )
    (args.out / "generate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
