"""The benchmark runner: `python -m bench` (or `make bench`).

Measures this machine's matmul and exp rates, then every backend and scan type and, when
`transformers` is installed, HuggingFace's `MambaMixer` (its pure-PyTorch path), each
measurement in a fresh subprocess.  Writes `results.json`, `results.md` and `results.png`
into the output folder (default `bench/results/`).

Times are the minimum over repeats of one forward (the first call, which compiles on JAX, is
excluded and reported separately).  Peak memory is measured in a separate process started
with glibc's mmap threshold lowered (MALLOC_MMAP_THRESHOLD_), so that freed memory leaves
the process at once and the peak resident set growth of one warm call is what that call
really holds; that setting slows allocation-heavy code, so no time is taken from it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from bench.worker import SEED

ROOT = Path(__file__).resolve().parents[1]
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
# Some machine images set these to work around old OpenBLAS builds; they pin NumPy's current
# OpenBLAS to its AVX2 kernels.  Benchmarks measure the library, not the workaround.
DROPPED_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
OURS = ("numpy", "jax", "torch")
LABEL = {
    "numpy": "mamba-core numpy",
    "jax": "mamba-core jax",
    "torch": "mamba-core torch",
    "torch-compiled": "mamba-core torch (compiled scan)",
    "hf": "HF transformers MambaMixer",
}


def flops(batch: int, length: int) -> float:
    h, e, n, r = (
        SEED["hidden_size"],
        SEED["hidden_size"] * SEED["expand_factor"],
        SEED["d_state"],
        SEED["dt_rank"],
    )
    per_token = h * 2 * e + e * (r + 2 * n) + r * e + e * h
    return 2.0 * batch * length * per_token


def lower_bound(machine: dict, batch: int, length: int) -> float:
    e, n = SEED["hidden_size"] * SEED["expand_factor"], SEED["d_state"]
    return flops(batch, length) / (machine["matmul_gflops"] * 1e9) + batch * length * e * n / (
        machine["exp_gps"] * 1e9
    )


def step_bound(machine: dict, batch: int) -> float:
    """A decode step's lower bound (s): the layer's weight bytes at the measured read rate
    (a GEMV over that many bytes), plus its B*E*N exponentials at the exp rate, plus its
    FLOPs at the matmul rate."""
    e, n = SEED["hidden_size"] * SEED["expand_factor"], SEED["d_state"]
    return (
        machine["layer_weight_bytes"] / (machine["gemv_gbps_layer"] * 1e9)
        + batch * e * n / (machine["exp_gps"] * 1e9)
        + flops(batch, 1) / (machine["matmul_gflops"] * 1e9)
    )


def run_task(task: dict, memory: bool = False, timeout: int = 1800) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    env.update(MEMORY_ENV if memory else {})
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.worker", json.dumps(task)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {**task, "error": " | ".join(tail) or f"exit code {proc.returncode}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - start, 2)
    return result


def plan(args) -> list[tuple[dict, bool]]:
    """(task, memory?) pairs."""
    tasks: list[tuple[dict, bool]] = [({"kind": "machine"}, False)]
    impls = [i for i in OURS if i in args.backends]
    peer = args.peer
    for length in args.lengths:
        for impl in impls:
            for memory in (False, True):
                tasks.append(
                    (
                        {
                            "kind": "forward",
                            "impl": impl,
                            "scan": "auto",
                            "batch": 2,
                            "length": length,
                            "repeats": args.repeats,
                        },
                        memory,
                    )
                )
        if "torch" in impls:
            tasks.append(
                (
                    {
                        "kind": "forward",
                        "impl": "torch-compiled",
                        "scan": "linear",
                        "batch": 2,
                        "length": length,
                        "repeats": args.repeats,
                    },
                    False,
                )
            )
        if peer and length <= args.peer_max_length:
            for memory in (False, True):
                tasks.append(
                    (
                        {
                            "kind": "forward",
                            "impl": "hf",
                            "batch": 2,
                            "length": length,
                            "repeats": args.repeats,
                        },
                        memory,
                    )
                )
    for impl in impls:  # every scan type at the seed length
        for scan in ("linear", "associative", "cumulative"):
            tasks.append(
                (
                    {
                        "kind": "forward",
                        "impl": impl,
                        "scan": scan,
                        "batch": 2,
                        "length": args.seed_length,
                        "repeats": 2,
                    },
                    False,
                )
            )
    for impl in impls:  # one long sequence, batch 1
        for memory in (False, True):
            tasks.append(
                (
                    {
                        "kind": "forward",
                        "impl": impl,
                        "scan": "auto",
                        "batch": 1,
                        "length": args.long_length,
                        "repeats": 1,
                    },
                    memory,
                )
            )
    for batch in (1, 8):
        for impl in impls:
            for context in (10, args.decode_context):
                tasks.append(
                    (
                        {
                            "kind": "decode",
                            "impl": impl,
                            "batch": batch,
                            "context": context,
                            "steps": args.decode_steps,
                        },
                        False,
                    )
                )
        if peer:
            tasks.append(
                (
                    {
                        "kind": "decode",
                        "impl": "hf",
                        "batch": batch,
                        "context": 10,
                        "steps": args.decode_steps,
                    },
                    False,
                )
            )
    for impl in [i for i in ("jax", "torch") if i in impls]:
        tasks.append(
            (
                {
                    "kind": "train",
                    "impl": impl,
                    "batch": 2,
                    "length": args.seed_length,
                    "repeats": 2,
                },
                False,
            )
        )
    # a second round of the headline comparison, the training steps (divided by the headline
    # forward) and the machine rates, minutes later: this machine's speed drifts by tens of
    # percent, so each side keeps its best round
    for task, memory in list(tasks):
        headline = (
            task["kind"] == "forward"
            and task.get("length") == args.seed_length
            and task.get("scan", "auto") in ("auto", "linear")
            and task.get("batch") == 2
            and task.get("repeats") != 2
            and not memory
        )
        if task["kind"] in ("machine", "train") or headline:
            tasks.append(({**task, "round": 2}, memory))
    return tasks


def worker_task(task: dict) -> dict:
    """torch-compiled is the torch worker with the compiled scan kernel."""
    if task.get("impl") == "torch-compiled":
        return {**task, "impl": "torch", "compile_scan": True}
    return task


# ---------------------------------------------------------------- reporting
def _find(results, **match):
    """The matching result; of several rounds, the fastest (the machine: the best rates)."""
    found = [
        r for r in results if all(r.get(k) == v for k, v in match.items()) and "error" not in r
    ]
    if not found:
        return None
    if match.get("kind") == "machine":
        best = dict(found[0])
        for r in found[1:]:
            for rate in ("matmul", "exp"):
                per_lib = f"{rate}_by_library"
                best[per_lib] = {k: max(v, r[per_lib][k]) for k, v in best[per_lib].items()}
            for rate in ("matmul_gflops", "exp_gps", "gemv_gbps_layer", "gemv_gbps_large"):
                best[rate] = max(best[rate], r[rate])
        return best
    timed = [r for r in found if "time_s" in r]
    return min(timed, key=lambda r: r["time_s"]) if timed else found[0]


def collapse(results: list[dict]) -> list[dict]:
    """One result per measurement: repeated rounds merged by `_find` (best round)."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        key = json.dumps({k: r.get(k) for k in _KEY_FIELDS}, sort_keys=True)
        groups.setdefault(key, []).append(r)
    out = []
    for rows in groups.values():
        match = {k: rows[0][k] for k in _KEY_FIELDS if k in rows[0]}
        out.append(_find(rows, **match) or rows[0])
    return out


_KEY_FIELDS = ("kind", "impl", "scan", "batch", "length", "repeats", "memory", "context")


def summarize(results: list[dict], args) -> dict:
    machine = _find(results, kind="machine")
    fwd = [r for r in results if r["kind"] == "forward" and "error" not in r]
    time_rows = [r for r in fwd if not r.get("memory")]
    mem_rows = [r for r in fwd if r.get("memory")]
    length = args.seed_length
    hf_t = _find(time_rows, impl="hf", length=length)
    hf_m = _find(mem_rows, impl="hf", length=length)
    bound = lower_bound(machine, 2, length)
    summary = {
        "machine": machine,
        "lower_bound_s": round(bound, 4),
        "seed_length": length,
        "hf_time_s": hf_t and hf_t["time_s"],
        "hf_peak_mib": hf_m and hf_m["peak_mem_mib"],
        "backends": {},
    }
    hf_dec = {b: _find(results, kind="decode", impl="hf", batch=b) for b in (1, 8)}
    for impl in [*OURS, "torch-compiled"]:
        t = _find(time_rows, impl=impl, length=length, batch=2)
        if t is None:
            continue
        m = _find(mem_rows, impl=impl, length=length, batch=2)
        row = {"time_s": t["time_s"], "x_bound": t["time_s"] / bound}
        if hf_t:
            row["x_hf_time"] = t["time_s"] / hf_t["time_s"]
        if m:
            row["peak_mib"] = m["peak_mem_mib"]
            if hf_m and hf_m["peak_mem_mib"] > 0:
                row["x_hf_mem"] = m["peak_mem_mib"] / hf_m["peak_mem_mib"]
        for b in (1, 8):
            d = _find(results, kind="decode", impl=impl, batch=b, context=10)
            d_long = _find(results, kind="decode", impl=impl, batch=b, context=args.decode_context)
            if d:
                row[f"decode_b{b}_ms"] = d["ms_per_token"]
                row[f"decode_b{b}_bound_ms"] = 1e3 * step_bound(machine, b)
                row[f"decode_b{b}_x_bound"] = d["ms_per_token"] / row[f"decode_b{b}_bound_ms"]
                if d.get("overhead_ms") is not None:
                    row[f"decode_b{b}_overhead_ms"] = d["overhead_ms"]
                if d_long:
                    row[f"decode_b{b}_long_ms"] = d_long["ms_per_token"]
                if hf_dec[b]:
                    row[f"x_hf_decode_b{b}"] = d["ms_per_token"] / hf_dec[b]["ms_per_token"]
        long_t = _find(time_rows, impl=impl, length=max(args.lengths), batch=2)
        if long_t is not None and max(args.lengths) != length:
            row["long_length"] = max(args.lengths)
            row["long_x_bound"] = long_t["time_s"] / lower_bound(machine, 2, max(args.lengths))
        train = _find(results, kind="train", impl=impl)
        if train:
            row["train_s"] = train["time_s"]
            row["train_x_forward"] = train["time_s"] / t["time_s"]
        summary["backends"][impl] = row
    return summary


def targets(summary: dict) -> list[tuple[str, str, bool | None]]:
    out = []
    for impl, row in summary["backends"].items():
        out.append(
            (
                impl,
                "forward <= 0.25x HF time",
                None if "x_hf_time" not in row else row["x_hf_time"] <= 0.25,
            )
        )
        out.append((impl, "forward <= 1.5x lower bound", row["x_bound"] <= 1.5))
        if "long_x_bound" in row:
            out.append(
                (
                    impl,
                    f"forward at L={row['long_length']} <= 1.5x lower bound",
                    row["long_x_bound"] <= 1.5,
                )
            )
        if impl == "torch-compiled":
            continue
        if "train_x_forward" in row:
            out.append((impl, "training step <= 3x forward", row["train_x_forward"] <= 3.0))
        out.append(
            (
                impl,
                "peak memory <= 0.1x HF",
                None if "x_hf_mem" not in row else row["x_hf_mem"] <= 0.1,
            )
        )
        for b in (1, 8):
            if f"decode_b{b}_x_bound" in row:
                ok = row[f"decode_b{b}_x_bound"] <= 2.0
                out.append((impl, f"decode batch {b} <= 2x its bound", ok))
            key = f"x_hf_decode_b{b}"
            out.append(
                (
                    impl,
                    f"decode batch {b} <= 0.25x HF",
                    None if key not in row else row[key] <= 0.25,
                )
            )
            if f"decode_b{b}_long_ms" in row:
                flat = row[f"decode_b{b}_long_ms"] <= 1.25 * row[f"decode_b{b}_ms"]
                out.append((impl, f"decode batch {b} flat in context (<= 1.25x)", flat))
    return out


def dispatch_lines(machine: dict) -> list[str]:
    """What each library's kernels run on this CPU (bench/worker.py `dispatch_report`)."""
    d = machine.get("dispatch", {})
    pools = "; ".join(
        f"{p['internal_api']} {p['version']} ({p['architecture']}, {p['num_threads']} threads)"
        for p in d.get("threadpools", [])
    )
    blas = d.get("torch_kernel_blas", {})
    return [
        "Dispatch on this CPU:",
        f"- CPU: {d.get('cpu', '?')}; vector extensions: "
        f"{', '.join(d.get('cpu_vector_flags', [])) or '?'}",
        f"- NumPy SIMD: baseline {', '.join(d.get('numpy_simd_baseline', []))}; dispatched "
        f"and found {', '.join(d.get('numpy_simd_found', [])) or 'none'}; not found "
        f"{', '.join(d.get('numpy_simd_not_found', [])) or 'none'}",
        f"- BLAS / thread pools (threadpoolctl): {pools or '?'}",
        f"- PyTorch CPU capability: {d.get('torch_cpu_capability', '?')} "
        f"({d.get('torch_threads', '?')} threads); its CPU kernel paths' products on "
        f"{blas.get('choice', '?')}'s BLAS (float32 measured {blas.get('numpy_gflops', '?')} "
        f"GFLOP/s on NumPy's, {blas.get('torch_gflops', '?')} on torch's)",
        f"- Compiled kernels: {d.get('kernels', '?')}"
        + (f", compiled for {d['numba_target_cpu']}" if "numba_target_cpu" in d else ""),
        f"- Read rate of a decode step's weights (best GEMV): "
        f"{machine.get('gemv_gbps_layer', '?')} GB/s over one layer "
        f"({machine.get('layer_weight_bytes', 0) / 2**20:.1f} MiB), "
        f"{machine.get('gemv_gbps_large', '?')} GB/s over 384 MiB",
    ]


def write_markdown(results: list[dict], summary: dict, args, path: Path) -> None:
    m = summary["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {m['cpus']} CPUs, "
        f"BLAS {m['blas']}. Best float32 matmul {m['matmul_gflops']} GFLOP/s "
        f"(by library: {m['matmul_by_library']}), best exp {m['exp_gps']} G/s "
        f"(by library: {m['exp_by_library']}). Seed config {SEED}, float32, one mixer "
        "layer. Times: minimum over repeats of a warm call (JAX compiles on the first).",
        "",
        *dispatch_lines(m),
        "",
        f"## Forward, B=2, L={summary['seed_length']}, scan_type=auto",
        "",
        f"Lower bound (matmul FLOPs at the measured rate + B*L*E*N exponentials at the "
        f"measured rate): **{summary['lower_bound_s']:.3f} s**. "
        + (
            f"HF MambaMixer: **{summary['hf_time_s']:.3f} s**, peak "
            f"+{summary['hf_peak_mib']:.0f} MiB."
            if summary["hf_time_s"]
            else "HF: not run."
        ),
        "",
        "| implementation | time (s) | x lower bound | x HF time | peak mem (MiB) | x HF mem |",
        "|---|---|---|---|---|---|",
    ]
    for impl, row in summary["backends"].items():
        lines.append(
            f"| {LABEL[impl]} | {row['time_s']:.3f} | {row['x_bound']:.2f} | "
            f"{row.get('x_hf_time', float('nan')):.3f} | {row.get('peak_mib', float('nan')):.0f} | "
            f"{row.get('x_hf_mem', float('nan')):.3f} |"
        )
    lines += [
        "",
        f"## Every scan type, B=2, L={args.seed_length}",
        "",
        "| backend | linear (s) | associative (s) | cumulative (s) |",
        "|---|---|---|---|",
    ]
    for impl in OURS:
        cells = []
        for scan in ("linear", "associative", "cumulative"):
            r = _find(
                results, kind="forward", impl=impl, scan=scan, length=args.seed_length, repeats=2
            )
            cells.append(f"{r['time_s']:.3f}" if r else "n/a")
        lines.append(f"| {impl} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Scaling in L (B=2; the last row B=1)",
        "",
        "| implementation | L | time (s) | lower bound (s) | peak mem (MiB) |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(
        (
            r
            for r in results
            if r["kind"] == "forward"
            and not r.get("memory")
            and r.get("scan", "auto") in ("auto", "linear")
            and r.get("repeats") != 2
            and "error" not in r
        ),
        key=lambda r: (r["impl"], r["length"]),
    ):
        mem = _find(
            results,
            kind="forward",
            impl=r["impl"],
            length=r["length"],
            batch=r["batch"],
            memory=True,
        )
        lines.append(
            f"| {LABEL[r['impl']]} | {r['length']} (B={r['batch']}) | {r['time_s']:.3f} | "
            f"{lower_bound(m, r['batch'], r['length']):.3f} | "
            f"{mem['peak_mem_mib'] if mem else 'n/a'} |"
        )
    lines += [
        "",
        f"## Decode: ms per token (one cached step), after a context of 10 and "
        f"{args.decode_context} tokens",
        "",
        "Step bound (`step_bound`: the layer's weight bytes at the measured GEMV read rate +"
        " B*E*N exponentials at the exp rate + the step's FLOPs at the matmul rate): "
        + ", ".join(f"batch {b} **{1e3 * step_bound(m, b):.3f} ms**" for b in (1, 8))
        + ".",
        "",
        "The fixed cost of a step whatever the layer's size (Python, dispatch, kernel calls):"
        " the same loop over a layer of hidden size 8, in the last column.",
        "",
        "| implementation | batch | after 10 | after long context | x HF | x step bound |"
        " overhead (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in (1, 8):
        hf = _find(results, kind="decode", impl="hf", batch=b)
        for impl in [*OURS, "hf"]:
            short = _find(results, kind="decode", impl=impl, batch=b, context=10)
            if not short:
                continue
            long_ = _find(results, kind="decode", impl=impl, batch=b, context=args.decode_context)
            lines.append(
                f"| {LABEL[impl]} | {b} | {short['ms_per_token']:.3f} | "
                f"{long_['ms_per_token']:.3f} |"
                if long_
                else f"| {LABEL[impl]} | {b} | {short['ms_per_token']:.3f} | n/a |"
            )
            lines[-1] += f" {short['ms_per_token'] / hf['ms_per_token']:.2f} |" if hf else " n/a |"
            lines[-1] += f" {short['ms_per_token'] / (1e3 * step_bound(m, b)):.2f} |"
            overhead = short.get("overhead_ms")
            lines[-1] += f" {overhead:.3f} |" if overhead is not None else " n/a |"
    lines += [
        "",
        f"## Training step (forward + backward), B=2, L={args.seed_length}",
        "",
        "| implementation | time (s) | forward (s) | x forward | peak mem (MiB) | compile (s) |",
        "|---|---|---|---|---|---|",
    ]
    for impl in ("jax", "torch"):
        r = _find(results, kind="train", impl=impl)
        f = summary["backends"].get(impl)
        if r:
            fwd = f"{f['time_s']:.3f} | {r['time_s'] / f['time_s']:.1f}" if f else "n/a | n/a"
            lines.append(
                f"| {LABEL[impl]} | {r['time_s']:.3f} | {fwd} | "
                f"{r['peak_mem_mib']} | {r.get('compile_time_s', '-')} |"
            )
    lines += ["", "## Targets", "", "| implementation | target | met |", "|---|---|---|"]
    for impl, what, ok in targets(summary):
        lines.append(
            f"| {LABEL[impl]} | {what} | {'n/a' if ok is None else ('yes' if ok else 'no')} |"
        )
    errors = [r for r in results if "error" in r]
    if errors:
        lines += ["", "## Failed measurements", ""]
        lines += [
            f"- {json.dumps({k: v for k, v in r.items() if k != 'error'})}: {r['error']}"
            for r in errors
        ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_plot(results: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    machine = summary["machine"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {impl: f"C{i}" for i, impl in enumerate([*OURS, "torch-compiled", "hf"])}
    for impl in [*OURS, "torch-compiled", "hf"]:
        rows = sorted(
            (
                r
                for r in results
                if r["kind"] == "forward"
                and r["impl"] == impl
                and r["batch"] == 2
                and r.get("scan", "auto") in ("auto", "linear")
                and r.get("repeats") != 2
                and "error" not in r
            ),
            key=lambda r: r["length"],
        )
        times = [(r["length"], r["time_s"]) for r in rows if not r.get("memory")]
        mems = [(r["length"], r["peak_mem_mib"]) for r in rows if r.get("memory")]
        style = {"marker": "o", "color": colors[impl], "label": LABEL[impl]}
        if times:
            ax_t.plot(*zip(*times, strict=True), **style)
        if mems:
            ax_m.plot(*zip(*mems, strict=True), **style)
    lengths = sorted({r["length"] for r in results if r["kind"] == "forward" and r["batch"] == 2})
    ax_t.plot(lengths, [lower_bound(machine, 2, n) for n in lengths], "k--", label="lower bound")
    for ax, title, unit in ((ax_t, "forward time", "seconds"), (ax_m, "peak memory growth", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L (batch 2)")
        ax.set_ylabel(unit)
        ax.set_title(f"{title}, seed config, float32")
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    ax_m.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--seed-length", type=int, default=2048)
    parser.add_argument("--long-length", type=int, default=65536)
    parser.add_argument("--decode-context", type=int, default=10000)
    parser.add_argument("--decode-steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default=",".join(OURS))
    parser.add_argument(
        "--peer-max-length",
        type=int,
        default=2048,
        help="HF materialises (B,E,L,N) tensors: L=8192 needs > 16 GiB",
    )
    parser.add_argument("--no-peer", dest="peer", action="store_false")
    parser.add_argument("--quick", action="store_true", help="small lengths, for a smoke run")
    args = parser.parse_args(argv)
    args.lengths = [int(v) for v in args.lengths.split(",")]
    args.backends = args.backends.split(",")
    if args.quick:
        args.lengths, args.seed_length, args.long_length = [256, 512], 512, 4096
        args.decode_context, args.decode_steps, args.repeats = 200, 20, 2
    if args.peer and importlib.util.find_spec("transformers") is None:
        print("transformers is not installed: the HF peer is skipped")
        print("(pip install 'mamba-core[bench]' installs it)")
        args.peer = False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    tasks = plan(args)
    for task, memory in tqdm(tasks, desc="benchmarks", unit="run"):
        tqdm.write(f"{task}{' (memory)' if memory else ''}")
        result = run_task(worker_task(task), memory=memory)
        result["impl"] = task.get("impl", result.get("impl"))
        if memory:
            result["memory"] = True
        results.append(result)
    raw, results = results, collapse(results)
    summary = summarize(results, args)
    payload = {
        "args": {k: v for k, v in vars(args).items()},
        "summary": summary,
        "targets": [list(t) for t in targets(summary)],
        "results": raw,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    (out / "results.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    write_markdown(results, summary, args, out / "results.md")
    write_plot(results, summary, out / "results.png")
    print((out / "results.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
