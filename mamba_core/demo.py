"""The main job: the upstream seed usage on the default backend, then every installed
backend against NumPy.  Run with `python -m mamba_core.demo` (or `make demo`)."""

from __future__ import annotations

import argparse
import time

import numpy as np

from . import MambaModule, installed_backends
from .params import to_numpy

SEED_CONFIG = {"hidden_size": 768, "d_state": 64, "scan_type": "associative"}
#: a Mamba-2 layer of the same width (24 heads of 64, d_state 128)
MAMBA2_CONFIG = {"version": "mamba2", "hidden_size": 768, "d_state": 128, "head_dim": 64}
#: a Mamba-3 MIMO layer of the same width (rank 4)
MAMBA3_CONFIG = {"version": "mamba3", "hidden_size": 768, "d_state": 128, "mimo": True}


def _run(module: MambaModule, x: np.ndarray):
    start = time.perf_counter()
    result = module(x, training=False)
    output = to_numpy(result["output"])  # waits for asynchronous backends
    return result, output, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)

    print(f"installed backends (auto preference order): {installed_backends()}")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.seq_len, SEED_CONFIG["hidden_size"]))

    mamba = MambaModule(SEED_CONFIG)  # backend="auto"
    first, _, first_s = _run(mamba, x)  # the first call compiles on JAX
    result, _, elapsed = _run(mamba, x)
    print(f"\nMambaModule({SEED_CONFIG}) on the default backend")
    print(f"  input  shape {x.shape} ({x.dtype})")
    print(f"  output shape {tuple(result['output'].shape)} ({result['metrics']['dtype']})")
    compile_s = first["metrics"].get("compile_time_s")
    print(
        f"  first call {first_s:.3f} s"
        + (f" (of which compiling {compile_s:.3f} s)" if compile_s else "")
        + f", second call {elapsed:.3f} s"
    )
    print("  metrics:")
    for key, value in result["metrics"].items():
        print(f"    {key}: {value}")

    for config in (SEED_CONFIG, MAMBA2_CONFIG, MAMBA3_CONFIG):
        reference = MambaModule(config, backend="numpy")
        ref_out = _run(reference, x)[1]
        scale = float(np.max(np.abs(ref_out)))
        print(f"\n{config}: every installed backend against NumPy (same seed, same weights):")
        for name in installed_backends():
            module = MambaModule(config, backend=name)
            _run(module, x)  # compile / warm up
            _, out, seconds = _run(module, x)
            diff = float(np.max(np.abs(out - ref_out)))
            print(
                f"  {name:6s} max|diff| = {diff:.3e} (relative {diff / scale:.1e}), "
                f"{seconds:.3f} s, scan_used={module.get_metrics()['scan_used']}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
