"""One measurement, in a fresh process: `python -m bench.worker '<json task>'`.

Prints one JSON line with the result.  A fresh process per measurement keeps peak-memory
numbers honest: the peak resident set (VmHWM) is reset through /proc/self/clear_refs just
before the measured call, after the inputs exist and after warm-up/compilation, so it
measures what the forward itself allocates.

Task kinds:
- machine: this CPU's float32 matmul rate and exp rate (best of NumPy and PyTorch).
- forward: one mixer forward, seed config; impl in numpy | jax | torch | hf.
- decode: per-token latency of the cached one-token step after a context of C tokens.
- train: forward + backward (jax | torch | hf).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

SEED = dict(hidden_size=768, d_state=64, expand_factor=2, d_conv=4, dt_rank=48)


# ---------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak), in KiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _trim_heap() -> None:
    """Hand the C heap's free memory back to the system (glibc's `malloc_trim`), so that the
    resident set holds live memory only: memory a warm-up call freed but malloc kept would
    otherwise be counted in the baseline and its reuse would never show in the peak (NumPy
    and PyTorch buffers both come from malloc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS (live memory only) and return that RSS (KiB)."""
    gc.collect()
    _trim_heap()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_kib("VmRSS")


def measured(fn, repeats: int) -> dict[str, Any]:
    """Time `fn` `repeats` times; the peak memory growth of the first measured call."""
    base = _reset_peak()
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    peak = _status_kib("VmHWM") - base
    times = [first]
    for _ in range(repeats - 1):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {
        "time_s": min(times),
        "median_s": statistics.median(times),
        "times_s": [round(t, 5) for t in times],
        "peak_mem_mib": round(peak / 1024, 1),
    }


# ---------------------------------------------------------------- implementations
def _config(scan: str, **extra):
    from mamba_core import MambaConfig

    return MambaConfig(**SEED, scan_type=scan, **extra)


def _hf_mixer():
    import torch
    from transformers import MambaConfig as HFConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    cfg = HFConfig(
        hidden_size=SEED["hidden_size"],
        state_size=SEED["d_state"],
        conv_kernel=SEED["d_conv"],
        expand=SEED["expand_factor"],
        time_step_rank=SEED["dt_rank"],
        use_bias=False,
        use_conv_bias=True,
        hidden_act="silu",
        num_hidden_layers=1,
    )
    torch.manual_seed(0)
    return MambaMixer(cfg, layer_idx=0).eval(), cfg


def _forward_fn(impl: str, scan: str, batch: int, length: int, compile_scan: bool = False):
    """(warm-up-done callable, extra info) for one forward of the seed config."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, length, SEED["hidden_size"]), dtype=np.float32)
    info: dict[str, Any] = {}
    if impl == "hf":
        import torch

        mixer, _ = _hf_mixer()
        xt = torch.from_numpy(x)

        def fn():
            with torch.no_grad():
                mixer(xt)

        fn()
        return fn, info
    if impl == "torch":
        import torch

        from mamba_core.backends.torch import MambaTorch

        model = MambaTorch(_config(scan), seed=0, compile_scan=compile_scan)
        xt = torch.from_numpy(x)

        def fn():
            with torch.no_grad():
                model(xt)

        start = time.perf_counter()
        fn()
        info["first_call_s"] = round(time.perf_counter() - start, 3)
        return fn, info
    from mamba_core import MambaModule

    module = MambaModule(_config(scan), backend=impl, seed=0)
    native = module.backend.asarray(x)

    def fn():
        out = module(native)["output"]
        if impl == "jax":
            out.block_until_ready()

    start = time.perf_counter()
    fn()
    info["first_call_s"] = round(time.perf_counter() - start, 3)
    if impl == "jax":
        info["compile_time_s"] = module.backend.call_info().get("compile_time_s")
    else:
        info.update(module.backend.call_info())
    return fn, info


def task_forward(task: dict) -> dict:
    fn, info = _forward_fn(
        task["impl"],
        task.get("scan", "auto"),
        task["batch"],
        task["length"],
        task.get("compile_scan", False),
    )
    return {**measured(fn, task.get("repeats", 3)), **info}


def task_decode(task: dict) -> dict:
    """Per-token latency of one cached step, after a context of `context` tokens."""
    impl, batch, context, steps = task["impl"], task["batch"], task["context"], task["steps"]
    rng = np.random.default_rng(0)
    h = SEED["hidden_size"]
    ctx = rng.standard_normal((batch, context, h), dtype=np.float32)
    tokens = rng.standard_normal((steps, batch, h), dtype=np.float32)
    if impl == "hf":
        import torch
        from transformers import DynamicCache

        mixer, cfg = _hf_mixer()
        cache = DynamicCache(config=cfg)
        with torch.no_grad():
            mixer(torch.from_numpy(ctx), cache=cache)  # prefill
            toks = [torch.from_numpy(t[:, None, :]) for t in tokens]

            def one(i):
                mixer(toks[i], cache=cache)

            for i in range(min(5, steps)):
                one(i)

            def run():
                for i in range(steps):
                    one(i)

            return _decode_rounds(run, steps, task.get("rounds", 3))
    from mamba_core import MambaConfig

    out = _decode_module(impl, _config("auto"), ctx, tokens, task.get("rounds", 3))
    # the fixed cost of a step whatever its size (Python, dispatch, kernel calls): the same
    # loop over a layer too small for its arithmetic to count
    tiny = MambaConfig(hidden_size=8, d_state=4, expand_factor=2, d_conv=4, dt_rank=2)
    small = _decode_module(impl, tiny, ctx[..., :8], tokens[..., :8], task.get("rounds", 3))
    out["overhead_ms"] = small["ms_per_token"]
    return out


def _decode_module(impl: str, config, ctx: np.ndarray, tokens: np.ndarray, rounds: int) -> dict:
    """`MambaModule.step` over `tokens` after a prefill of `ctx`, best of `rounds` rounds."""
    from mamba_core import MambaModule

    module = MambaModule(config, backend=impl, seed=0)
    carried = {"state": module(module.backend.asarray(ctx))["state"]}
    toks = [module.backend.asarray(t) for t in tokens]
    step, steps = module.step, len(toks)
    for i in range(min(5, steps)):
        step(toks[i], carried["state"])

    def run():
        state = carried["state"]
        for i in range(steps):
            y, state = step(toks[i], state)
        if impl == "jax":
            y.block_until_ready()
        carried["state"] = state

    return _decode_rounds(run, steps, rounds)


def _decode_rounds(run, steps: int, rounds: int) -> dict[str, Any]:
    """ms per token of `run` (`steps` decode steps, the state carried on), best of `rounds`
    rounds as the forward is best of its repeats (this machine's speed drifts between
    rounds); every round's figure is kept."""
    per_round = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        per_round.append(1e3 * (time.perf_counter() - start) / steps)
    return {
        "ms_per_token": min(per_round),
        "median_ms_per_token": statistics.median(per_round),
        "rounds_ms_per_token": [round(t, 4) for t in per_round],
    }


def _jax_train_fn(cfg, x: np.ndarray, info: dict):
    """A jitted forward + backward of sum(y**2) (compile time into `info`)."""
    import jax
    import jax.numpy as jnp

    from mamba_core import init_params
    from mamba_core.backends import jax as mj

    params = {k: jnp.asarray(v, jnp.float32) for k, v in init_params(cfg, 0).items()}
    xj = jnp.asarray(x)
    grad = jax.jit(jax.grad(lambda p, v: jnp.sum(mj.forward(p, v, cfg)[0] ** 2), argnums=(0, 1)))
    start = time.perf_counter()
    compiled = grad.lower(params, xj).compile()
    info["compile_time_s"] = round(time.perf_counter() - start, 3)

    def fn():
        jax.block_until_ready(compiled(params, xj))

    return fn


def _torch_train_fn(model, x: np.ndarray):
    """Forward + backward of sum(y**2) w.r.t. the module's parameters and the input."""
    import torch

    xt = torch.from_numpy(x).requires_grad_(True)

    def fn():
        model.zero_grad(set_to_none=True)
        xt.grad = None
        (model(xt) ** 2).sum().backward()

    return fn


def task_train(task: dict) -> dict:
    """Forward + backward of sum(y**2) w.r.t. every parameter and the input."""
    impl, batch, length = task["impl"], task["batch"], task["length"]
    x = np.random.default_rng(0).standard_normal(
        (batch, length, SEED["hidden_size"]), dtype=np.float32
    )
    info: dict[str, Any] = {}
    if impl == "jax":
        fn = _jax_train_fn(_config(task.get("scan", "linear")), x, info)
    elif impl == "hf":
        model, _ = _hf_mixer()
        model.train()  # still its pure-PyTorch path (no CUDA kernels here)
        fn = _torch_train_fn(model, x)
    else:
        from mamba_core.backends.torch import MambaTorch

        fn = _torch_train_fn(MambaTorch(_config(task.get("scan", "linear")), seed=0), x)
    fn()
    return {**measured(fn, task.get("repeats", 2)), **info}


def task_machine(task: dict) -> dict:
    """This machine's best float32 matmul (GFLOP/s) and exp (G/s) rates over NumPy, PyTorch
    and JAX: the rates a lower bound must use.  exp is timed on cache-resident data (NumPy,
    PyTorch: a 64 Ki-element array, many times; JAX: fused in a jitted loop), so memory
    bandwidth does not hide the arithmetic rate."""
    import jax
    import jax.numpy as jnp
    import torch
    from threadpoolctl import threadpool_info

    from mamba_core.backends.torch import kernel_blas

    kernel_blas(torch.float32)  # measured as a fresh worker does (before XLA's threads run)

    rng = np.random.default_rng(0)
    m, k, n = 4096, 768, 3072  # the in_proj shape of the seed config at B*L = 4096
    a = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    ta, tw = torch.from_numpy(a), torch.from_numpy(w)
    ja, jw = jnp.asarray(a), jnp.asarray(w)
    jmm = jax.jit(lambda p, q: p @ q.T)

    def best(fn, repeats=7, inner=1):
        fn()
        out = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            out.append((time.perf_counter() - start) / inner)
        return min(out)

    flops = 2 * m * k * n
    matmul = {
        "numpy": flops / best(lambda: a @ w.T) / 1e9,
        "torch": flops / best(lambda: ta @ tw.T) / 1e9,
        "jax": flops / best(lambda: jmm(ja, jw).block_until_ready()) / 1e9,
    }
    size = 1 << 16
    v = (rng.standard_normal(size, dtype=np.float32) * 0.1 - 1.0).astype(np.float32)
    out, tv = np.empty_like(v), torch.from_numpy(v.copy())
    tout = torch.empty_like(tv)
    loops = 2000
    jexp = jax.jit(
        lambda x: jax.lax.fori_loop(
            0, loops, lambda i, c: c + jnp.exp(x * (1e-4 * i)), jnp.zeros_like(x)
        )
    )
    jv = jnp.asarray(v)
    exp_rate = {
        "numpy": size / best(lambda: np.exp(v, out=out), inner=500) / 1e9,
        "torch": size / best(lambda: torch.exp(tv, out=tout), inner=500) / 1e9,
        "jax": loops * size / best(lambda: jexp(jv).block_until_ready(), repeats=3) / 1e9,
    }
    from mamba_core.backends import kernels

    if kernels.available():  # the kernels' own exponential (non-positive arguments), threaded
        big = np.tile(np.minimum(v, 0), 16)  # 1M items (4 MiB): the threads' start amortised
        exp_rate["kernels"] = big.size / best(lambda: kernels.exp(big), inner=20) / 1e9
    return {
        **bandwidth(rng),
        "layer_weight_bytes": layer_weight_bytes(),
        "dispatch": dispatch_report(),
        "matmul_gflops": round(max(matmul.values()), 1),
        "exp_gps": round(max(exp_rate.values()), 2),
        "matmul_by_library": {k: round(v, 1) for k, v in matmul.items()},
        "exp_by_library": {k: round(v, 2) for k, v in exp_rate.items()},
        "blas": [
            f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}"
            for i in threadpool_info()
        ],
        "cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
    }


def bandwidth(rng) -> dict[str, float]:
    """Memory read rates (GB/s) as a decode step sees them: the best float32 GEMV (NumPy)
    over one seed layer's weight bytes (about 15 MiB: they stay in a large last-level cache
    between steps) and over 384 MiB (main memory: many layers' weights)."""
    h = SEED["hidden_size"]
    out = {}
    for name, rows in (
        ("layer", layer_weight_bytes() // (4 * h)),
        ("large", (384 << 20) // (4 * h)),
    ):
        w = rng.standard_normal((rows, h), dtype=np.float32)
        v = rng.standard_normal(h, dtype=np.float32)
        w @ v
        times = []
        for _ in range(20):
            start = time.perf_counter()
            w @ v
            times.append(time.perf_counter() - start)
        out[f"gemv_gbps_{name}"] = round(w.nbytes / min(times) / 1e9, 1)
    return out


def layer_weight_bytes(dtype_bytes: int = 4) -> int:
    """The seed layer's weights read by one decode step (every matrix once)."""
    from mamba_core import init_params

    return dtype_bytes * sum(v.size for v in init_params(_config("auto"), 0).values())


def dispatch_report() -> dict[str, Any]:
    """What the kernels of each library actually run on this CPU: the CPU's vector
    extensions, NumPy's SIMD baseline and dispatched targets (as `numpy.show_runtime()`
    reports them), the BLAS and its kernel architecture and threads (threadpoolctl),
    PyTorch's CPU capability, and the CPU that numba/LLVM compiles the kernels for."""
    report: dict[str, Any] = {}
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read()
        model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                      if ln.startswith("model name")), "?")  # fmt: skip
        flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines()
                      if ln.startswith("flags")), [])  # fmt: skip
        report["cpu"] = model
        report["cpu_vector_flags"] = sorted(f for f in flags if f.startswith(("avx", "fma")))
    except OSError:  # pragma: no cover - not Linux
        pass
    try:
        from numpy._core._multiarray_umath import (
            __cpu_baseline__,
            __cpu_dispatch__,
            __cpu_features__,
        )

        report["numpy_simd_baseline"] = list(__cpu_baseline__)
        report["numpy_simd_found"] = [f for f in __cpu_dispatch__ if __cpu_features__.get(f)]
        report["numpy_simd_not_found"] = [
            f for f in __cpu_dispatch__ if not __cpu_features__.get(f)
        ]
    except ImportError:  # pragma: no cover - other NumPy layouts
        pass
    from threadpoolctl import threadpool_info

    report["threadpools"] = [
        {k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
        for i in threadpool_info()
    ]
    try:
        import torch

        report["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        report["torch_threads"] = torch.get_num_threads()
        from mamba_core.backends.torch import kernel_blas

        report["torch_kernel_blas"] = kernel_blas(torch.float32)
    except ImportError:  # pragma: no cover
        pass
    from mamba_core.backends import kernels

    report["kernels"] = kernels.reason()
    if kernels.available():
        from llvmlite import binding

        report["numba_target_cpu"] = binding.get_host_cpu_name()
    return report


# ---------------------------------------------------------------- Mamba-2
#: a Mamba-2 layer as wide as the seed config (official mamba2-130m-like per-layer shape)
SEED2 = dict(
    version="mamba2", hidden_size=768, expand_factor=2, head_dim=64, d_state=128, n_groups=1,
    d_conv=4,
)  # fmt: skip
HF2_CHUNK = 256  # HF Mamba2Config's default chunk_size


def _hf_mamba2_mixer():
    import torch
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    cfg = Mamba2Config(
        hidden_size=SEED2["hidden_size"],
        num_heads=SEED2["hidden_size"] * SEED2["expand_factor"] // SEED2["head_dim"],
        head_dim=SEED2["head_dim"],
        state_size=SEED2["d_state"],
        expand=SEED2["expand_factor"],
        n_groups=SEED2["n_groups"],
        conv_kernel=SEED2["d_conv"],
        chunk_size=HF2_CHUNK,
        num_hidden_layers=1,
        use_bias=False,
        use_conv_bias=True,
    )
    torch.manual_seed(0)
    return Mamba2Mixer(cfg, layer_idx=0).eval(), cfg


def _config2(scan: str = "auto", chunk="auto"):
    from mamba_core import MambaConfig

    return MambaConfig(**SEED2, scan_type=scan, chunk_size=chunk)


def task_forward2(task: dict) -> dict:
    """One Mamba-2 layer forward (B, L, 768), float32, no grad."""
    impl, batch, length = task["impl"], task["batch"], task["length"]
    x = np.random.default_rng(0).standard_normal((batch, length, 768), dtype=np.float32)
    info: dict[str, Any] = {}
    if impl == "hf":
        import torch

        mixer, _ = _hf_mamba2_mixer()
        xt = torch.from_numpy(x)

        def fn():
            with torch.no_grad():
                mixer(xt)
    else:
        from mamba_core import MambaModule

        module = MambaModule(
            _config2(task.get("scan", "auto"), task.get("chunk", "auto")), backend=impl, seed=0
        )
        native = module.backend.asarray(x)

        def fn():
            out = module(native)["output"]
            if impl == "jax":
                out.block_until_ready()

        info["scan_used"] = module.get_metrics()["scan_used"]
        info["chunk_size"] = module.get_metrics()["chunk_size"]
    start = time.perf_counter()
    fn()
    info["first_call_s"] = round(time.perf_counter() - start, 3)
    return {**measured(fn, task.get("repeats", 3)), **info}


def task_decode2(task: dict) -> dict:
    """Per-token latency of one cached Mamba-2 step after a context of `context` tokens."""
    impl, batch, context, steps = task["impl"], task["batch"], task["context"], task["steps"]
    rng = np.random.default_rng(0)
    ctx = rng.standard_normal((batch, context, 768), dtype=np.float32)
    tokens = rng.standard_normal((steps, batch, 768), dtype=np.float32)
    if impl == "hf":
        import torch
        from transformers import DynamicCache

        mixer, cfg = _hf_mamba2_mixer()
        cache = DynamicCache(config=cfg)
        with torch.no_grad():
            mixer(torch.from_numpy(ctx), cache=cache)  # prefill
            toks = [torch.from_numpy(t[:, None, :]) for t in tokens]
            for i in range(min(5, steps)):
                mixer(toks[i], cache=cache)
            start = time.perf_counter()
            for i in range(steps):
                mixer(toks[i], cache=cache)
            elapsed = time.perf_counter() - start
        return {"ms_per_token": 1e3 * elapsed / steps}
    from mamba_core import MambaModule

    module = MambaModule(_config2(), backend=impl, seed=0)
    state = module(module.backend.asarray(ctx))["state"]
    toks = [module.backend.asarray(t) for t in tokens]
    for i in range(min(5, steps)):
        module.step(toks[i], state)
    start = time.perf_counter()
    for i in range(steps):
        y, state = module.step(toks[i], state)
    if impl == "jax":
        y.block_until_ready()
    return {"ms_per_token": 1e3 * (time.perf_counter() - start) / steps}


# ---------------------------------------------------------------- language models
#: the real mamba-130m / mamba2-130m shapes (random weights: nothing is downloaded)
LM_SHAPES = {
    "mamba": dict(hidden_size=768, d_state=16, d_conv=4, expand_factor=2, dt_rank=48),
    "mamba2": dict(version="mamba2", hidden_size=768, d_state=128, d_conv=4, expand_factor=2,
                   head_dim=64, n_groups=1),
}  # fmt: skip
LM_LAYERS, LM_VOCAB = 24, 50280


def _hf_lm(kind: str):
    import torch
    import transformers

    torch.manual_seed(0)
    if kind == "mamba":
        cfg = transformers.MambaConfig(
            vocab_size=LM_VOCAB, hidden_size=768, state_size=16, num_hidden_layers=LM_LAYERS,
            expand=2, conv_kernel=4, time_step_rank=48,
        )  # fmt: skip
        model = transformers.MambaForCausalLM(cfg)
    else:
        cfg = transformers.Mamba2Config(
            vocab_size=LM_VOCAB, hidden_size=768, state_size=128, num_hidden_layers=LM_LAYERS,
            expand=2, conv_kernel=4, num_heads=24, head_dim=64, n_groups=1,
        )  # fmt: skip
        model = transformers.Mamba2ForCausalLM(cfg)
    model.generation_config.eos_token_id = None
    return model.eval()


def task_generate(task: dict) -> dict:
    """Prefill a prompt and decode `new` tokens greedily with a 24-layer model of the real
    130m shape: prefill seconds, decode tokens/s, peak memory growth of the whole call."""
    impl, kind, batch = task["impl"], task["kind_lm"], task["batch"]
    prompt, new = task.get("prompt", 512), task.get("new", 128)
    ids = np.random.default_rng(0).integers(0, LM_VOCAB, (batch, prompt))
    if impl == "hf":
        import torch

        model = _hf_lm(kind)
        tids = torch.from_numpy(ids)

        def run(n):
            with torch.no_grad():
                model.generate(tids, attention_mask=torch.ones_like(tids), max_new_tokens=n,
                               min_new_tokens=n, do_sample=False, pad_token_id=0)  # fmt: skip
    else:
        from mamba_core import MambaConfig
        from mamba_core.lm import MambaLM
        from mamba_core.models import LMConfig

        cfg = LMConfig(mixer=MambaConfig(**LM_SHAPES[kind]), n_layer=LM_LAYERS, vocab_size=LM_VOCAB)
        model = MambaLM(cfg, backend=impl)

        def run(n):
            model.generate(ids, n)

    run(2)  # warm-up (compiles on JAX)
    base = _reset_peak()
    start = time.perf_counter()
    run(1)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    run(new)
    total = time.perf_counter() - start
    peak = _status_kib("VmHWM") - base
    decode_s = max(total - prefill, 1e-9)
    return {
        "prefill_s": round(prefill, 4),
        "decode_tokens_per_s": round(batch * (new - 1) / decode_s, 2),
        "ms_per_step": round(1e3 * decode_s / (new - 1), 3),
        "peak_mem_mib": round(peak / 1024, 1),
    }


def packed_lengths(total: int = 8192, lo: int = 16, hi: int = 2048, seed: int = 0) -> list[int]:
    """Sequence lengths drawn log-uniform in [lo, hi] until they fill `total` tokens (the
    last one cut to fit): one packed row."""
    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(int(np.exp(rng.uniform(np.log(lo), np.log(hi)))))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def task_packing(task: dict) -> dict:
    """The same sequences as one packed row (`seq_idx`: outputs, the row's last state), as
    `cu_seqlens` (outputs and one state per sequence) or as a right-padded batch
    (`attention_mask`), forward, float32, no grad."""
    from mamba_core import MambaModule

    impl, mode = task["impl"], task["mode"]
    cfg = _config2() if task["version"] == "mamba2" else _config("auto")
    lengths = packed_lengths()
    total = sum(lengths)
    rng = np.random.default_rng(0)
    module = MambaModule(cfg, backend=impl, seed=0)
    if mode in ("packed", "cu_seqlens"):
        x = module.backend.asarray(rng.standard_normal((1, total, 768), dtype=np.float32))
        if mode == "packed":
            kwargs = {"seq_idx": np.repeat(np.arange(len(lengths)), lengths)[None, :]}
        else:
            kwargs = {"cu_seqlens": np.concatenate([[0], np.cumsum(lengths)])}
    else:
        longest = max(lengths)
        x = module.backend.asarray(
            rng.standard_normal((len(lengths), longest, 768), dtype=np.float32)
        )
        mask = (np.arange(longest)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
        kwargs = {"attention_mask": mask}

    def fn():
        out = module(x, **kwargs)["output"]
        if impl == "jax":
            out.block_until_ready()

    fn()
    result = measured(fn, task.get("repeats", 3))
    return {
        **result,
        "sequences": len(lengths),
        "tokens": total,
        "computed_tokens": int(np.prod(x.shape[:2])),
        "tokens_per_s": round(total / result["time_s"], 1),
    }


# ---------------------------------------------------------------- three versions side by side
#: the layers of `bench.versions`: one width (hidden 768, expand 2), each version's own shape
LAYERS = {
    "mamba1": dict(SEED),
    "mamba2": dict(version="mamba2", hidden_size=768, d_state=128, head_dim=64),
    "mamba3-siso": dict(version="mamba3", hidden_size=768, d_state=128, head_dim=64),
    "mamba3-mimo4": dict(version="mamba3", hidden_size=768, d_state=128, head_dim=64,
                         mimo=True, mimo_rank=4),
}  # fmt: skip


def task_layer(task: dict) -> dict:
    """One layer of `LAYERS[task["layer"]]`, float32: mode "forward" (no grad), "train"
    (forward + backward of sum(y**2), jax | torch) or "decode" (ms per cached step after
    `context` tokens)."""
    from mamba_core import MambaConfig, MambaModule

    impl, mode = task["impl"], task["mode"]
    cfg = MambaConfig(**LAYERS[task["layer"]])
    rng = np.random.default_rng(0)
    batch = task.get("batch", 2)
    if mode == "decode":
        module = MambaModule(cfg, backend=impl, seed=0)
        ctx = module.backend.asarray(
            rng.standard_normal((batch, task.get("context", 64), 768), dtype=np.float32)
        )
        state = module(ctx)["state"]
        toks = [
            module.backend.asarray(rng.standard_normal((batch, 768), dtype=np.float32))
            for _ in range(task.get("steps", 50))
        ]
        for t in toks[:5]:
            module.step(t, state)
        start = time.perf_counter()
        for t in toks:
            y, state = module.step(t, state)
        if impl == "jax":
            y.block_until_ready()
        return {"ms_per_token": 1e3 * (time.perf_counter() - start) / len(toks)}
    x = rng.standard_normal((batch, task["length"], 768), dtype=np.float32)
    info: dict[str, Any] = {}
    if mode == "forward":
        module = MambaModule(cfg, backend=impl, seed=0)
        native = module.backend.asarray(x)

        def fn():
            out = module(native)["output"]
            if impl == "jax":
                out.block_until_ready()

        info["scan_used"] = module.get_metrics().get("scan_used")
    elif impl == "jax":
        fn = _jax_train_fn(cfg, x, info)
    else:
        from mamba_core.backends.torch import MambaTorch

        fn = _torch_train_fn(MambaTorch(cfg, seed=0), x)

    fn()
    result = measured(fn, task.get("repeats", 2))
    return {**result, **info, "tokens_per_s": round(batch * task["length"] / result["time_s"], 1)}


TASKS = {
    "generate": task_generate,
    "forward2": task_forward2,
    "decode2": task_decode2,
    "forward": task_forward,
    "decode": task_decode,
    "train": task_train,
    "machine": task_machine,
    "packing": task_packing,
    "layer": task_layer,
}


def main() -> None:
    task = json.loads(sys.argv[1])
    result = TASKS[task["kind"]](task)
    print(json.dumps({**task, **result}))


if __name__ == "__main__":
    main()
