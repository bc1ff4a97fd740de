"""The PyTorch backend and `MambaTorch`, an `nn.Module` with the official parameter names.

Glossary: B batch, L length, H hidden_size, E d_inner, N d_state, T chunk length.

The math is the core's (`mamba_core.mixer.mixer_forward` through `array_api_compat.torch`);
the scans are native where that pays:
- `linear` without autograd: a step loop whose updates run in place in preallocated chunk
  buffers (`h.mul_(dA_t).add_(dBu_t)`), the decays of T steps computed at once.  With
  autograd: the same recurrence out of place, each chunk under `torch.utils.checkpoint`, so
  a backward pass keeps one state per chunk and recomputes the inside (memory O(L/T * B*E*N)
  instead of O(B*L*E*N)).  Optionally (`compile_scan=True`), the chunk is a
  `torch.compile`-d kernel: one fused loop per chunk, several times faster on CPU after a
  one-off compile of ~15 s.
- `cumulative`: the core's segment-sum chunk (`mamba_core.scan.chunk_cumulative`): only
  exponentials of non-positive numbers, T-step chunks done as batched tensor ops (few kernel
  launches per chunk, the CUDA-friendly form).  Default chunk: 4 on CPU, 16 on CUDA.
- `associative`: the core's Hillis-Steele chunk.

Device and dtype follow the inputs: nothing here names a device; states and temporaries are
created on `x.device`; parameters of another floating dtype are cast to `x.dtype` (16-bit
inputs run the scan in float32 under `use_mixed_precision`).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Mapping
from typing import Any

import array_api_compat.torch as xp_torch
import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from mamba_core.checks import check_input_shape, packed_index
from mamba_core.config import MambaConfig, resolve_config
from mamba_core.io import CheckpointWeights
from mamba_core.lm import GenerationMixin, PretrainedMixin
from mamba_core.mixer import (
    MambaState,
    init_state,
    mixer_forward,
    mixer_step,
    param_shapes,
    scan_dtype,
    state_dtype_field,
    validate_state,
)
from mamba_core.mixers import mixer_for
from mamba_core.models import LMConfig, init_lm_params, lm_param_shapes
from mamba_core.params import check_state_dict, init_params, raise_mismatch, to_numpy
from mamba_core.registry import Backend
from mamba_core.scan import ALGORITHMS, DEFAULT_CHUNK
from mamba_core.ssd import SSD_ALGORITHMS, SSD_DEFAULT_CHUNK
from mamba_core.ssd3 import SSD3_ALGORITHMS, SSD3_DEFAULT_CHUNK

from . import kernels
from .numpy import (
    FUSED_FORWARDS,
    FUSED_STEPS,
    dense,
    fused_inner,
    fused_inner_backward,
    fuses,
    inner_operands,
    product,
)

__all__ = [
    "HFMixerAdapter",
    "MambaBlockTorch",
    "MambaLMTorch",
    "MambaTorch",
    "TorchBackend",
    "build_parameters",
    "context_forward",
    "get_backend",
    "kernel_blas",
    "replace_mixers",
    "torch_forward",
    "torch_step",
]

Array = torch.Tensor
#: chunk length per (device type, mixer version) and algorithm where the config says
#: "auto"; CUDA takes longer Mamba-1 `cumulative` chunks (fewer kernel launches; its (T, T)
#: decay blocks are cheap there).
_CHUNKS = {
    ("cpu", "mamba1"): DEFAULT_CHUNK,
    ("cuda", "mamba1"): {**DEFAULT_CHUNK, "cumulative": 16},
    ("cpu", "mamba2"): SSD_DEFAULT_CHUNK,
    ("cuda", "mamba2"): SSD_DEFAULT_CHUNK,
    ("cpu", "mamba3"): SSD3_DEFAULT_CHUNK,
    ("cuda", "mamba3"): SSD3_DEFAULT_CHUNK,
}
#: the in-place CPU loop precomputes the decays of this many steps at once (cache-sized)
_INPLACE_CHUNK = 8
#: steps per call of the torch.compile-d chunk kernel (it unrolls them)
_COMPILED_CHUNK = 16


def _chunk(algorithm: str, chunk_size, device: torch.device, version: str = "mamba1") -> int:
    if chunk_size != "auto":
        return int(chunk_size)
    return _CHUNKS[("cuda" if device.type == "cuda" else "cpu", version)][algorithm]


# ---------------------------------------------------------------- the linear scan
@torch.no_grad()
def _linear_inplace(u, dt, A, Bm, Cm, h0, size: int):
    batch, length, channels = u.shape
    n = A.shape[1]
    h = h0.clone()
    y = torch.empty((batch, length, channels), dtype=u.dtype, device=u.device)
    size = min(size, length)
    d_a = torch.empty((batch, size, channels, n), dtype=u.dtype, device=u.device)
    du = (dt * u)[..., None]  # (B, L, E, 1)
    b_row = Bm[:, :, None, :]  # (B, L, 1, N)
    c_col = Cm[..., None]  # (B, L, N, 1)
    for start in range(0, length, size):
        stop = min(start + size, length)
        m = stop - start
        torch.mul(dt[:, start:stop, :, None], A, out=d_a[:, :m])
        d_a[:, :m].exp_()  # exp(dt*A): exponent <= 0
        for t in range(start, stop):
            h.mul_(d_a[:, t - start]).addcmul_(du[:, t], b_row[:, t])
            torch.matmul(h, c_col[:, t], out=y[:, t, :, None])
    return y, h


#: steps between the states `_LinearScan` keeps for its backward pass
_BACKWARD_CHUNK = 32


def _cpu_kernels(*tensors) -> bool:
    """Whether the compiled CPU kernels can run on these tensors (CPU, one float32/float64
    dtype, numba installed)."""
    dtype = tensors[0].dtype
    return kernels.supports(dtype) and all(
        t.device.type == "cpu" and t.dtype == dtype for t in tensors
    )


class _LinearScan(torch.autograd.Function):
    """The linear scan with a hand-written backward pass (the official kernel's scheme).

    Forward: the in-place loop, keeping only the state at every `_BACKWARD_CHUNK`-th step.
    Backward, chunk by chunk from the end: recompute the chunk's states from its saved
    start, then run the adjoint recurrence backwards,
        G_t = dy_t (x) C_t + exp(dt_{t+1} A) * G_{t+1}          (G_t = dLoss/dh_t)
    and read every gradient off G and the states.  Memory: O(L/T * B*E*N + B*T*E*N).
    On CPU float32/float64 tensors with numba installed, both passes run as compiled kernels
    (`backends.kernels.scan_with_starts` / `scan_backward`: the same scheme, one loop nest).
    """

    @staticmethod
    def forward(ctx, u, dt, A, Bm, Cm, h0):
        ctx.kernels = _cpu_kernels(u, dt, A, Bm, Cm, h0)
        if ctx.kernels:  # the compiled forward and backward (backends.kernels)
            arrays = [t.detach().numpy() for t in (u, dt, A, Bm, Cm, h0)]
            y, h, starts = kernels.scan_with_starts(*arrays, chunk=_BACKWARD_CHUNK)
            ctx.save_for_backward(u, dt, A, Bm, Cm, torch.from_numpy(starts))
            return torch.from_numpy(y), torch.from_numpy(h)
        length = u.shape[1]
        starts, ys, h = [], [], h0
        for start in range(0, length, _BACKWARD_CHUNK):
            sl = slice(start, min(start + _BACKWARD_CHUNK, length))
            starts.append(h)
            y, h = _linear_inplace(u[:, sl], dt[:, sl], A, Bm[:, sl], Cm[:, sl], h, _INPLACE_CHUNK)
            ys.append(y)
        ctx.save_for_backward(u, dt, A, Bm, Cm, torch.stack(starts))
        return torch.cat(ys, dim=1), h

    @staticmethod
    @once_differentiable  # its gradients are not differentiable again: say so, don't guess
    def backward(ctx, dy, dh):
        u, dt, A, Bm, Cm, starts = ctx.saved_tensors
        length = u.shape[1]
        dy = torch.zeros_like(u) if dy is None else dy
        if ctx.kernels:
            dh = torch.zeros_like(starts[0]) if dh is None else dh
            arrays = [t.detach().numpy() for t in (u, dt, A, Bm, Cm, starts, dy, dh)]
            grads = kernels.scan_backward(*arrays, chunk=_BACKWARD_CHUNK)
            return tuple(torch.from_numpy(np.ascontiguousarray(g)) for g in grads)
        g = torch.zeros_like(starts[0]) if dh is None else dh.clone()  # dLoss/dh after the chunk
        du, d_dt = torch.empty_like(u), torch.empty_like(dt)
        d_b, d_c = torch.empty_like(Bm), torch.empty_like(Cm)
        d_a = torch.zeros_like(A)
        for index in reversed(range(starts.shape[0])):
            start = index * _BACKWARD_CHUNK
            sl = slice(start, min(start + _BACKWARD_CHUNK, length))
            dt_c, u_c, b_c, c_c, dy_c = dt[:, sl], u[:, sl], Bm[:, sl], Cm[:, sl], dy[:, sl]
            steps = dt_c.shape[1]
            a = torch.exp(dt_c[..., None] * A)  # (B,T,E,N)
            dtu = dt_c * u_c
            hs = torch.empty_like(a)
            h = starts[index]
            for t in range(steps):  # recompute the chunk's states
                torch.addcmul(dtu[:, t, :, None] * b_c[:, t, None, :], a[:, t], h, out=hs[:, t])
                h = hs[:, t]
            grads = torch.empty_like(a)
            for t in reversed(range(steps)):  # the adjoint recurrence
                g = g.addcmul_(dy_c[:, t, :, None], c_c[:, t, None, :])
                grads[:, t] = g
                g = a[:, t] * g
            h_prev = torch.cat([starts[index][:, None], hs[:, :-1]], dim=1)
            s = grads * h_prev * a  # dLoss/d(dt*A), elementwise
            g_b = torch.matmul(grads, b_c[..., None])[..., 0]  # sum_n G * B   (B,T,E)
            d_dt[:, sl] = (s * A).sum(-1) + u_c * g_b
            du[:, sl] = dt_c * g_b
            d_b[:, sl] = torch.matmul(grads.transpose(-1, -2), dtu[..., None])[..., 0]
            d_c[:, sl] = torch.matmul(hs.transpose(-1, -2), dy_c[..., None])[..., 0]
            d_a += (s * dt_c[..., None]).sum((0, 1))
        return du, d_dt, d_a, d_b, d_c, g


#: the BLAS that runs the kernel paths' products, per dtype name: (library, NumPy's and
#: torch's measured GFLOP/s), measured once per process (`_blas`)
_BLAS: dict[str, tuple[str, float, float]] = {}
#: NumPy's BLAS replaces torch's only when it measured this much faster: when the two are
#: close, torch's keeps NumPy's OpenBLAS threads from spinning beside the kernels (which
#: measured 5-10% on the forward of an AVX2 machine whose two BLAS ran at the same rate)
NUMPY_BLAS_MARGIN = 1.25
#: `MAMBA_CORE_TORCH_BLAS=numpy` or `=torch` skips the measurement and forces the choice
BLAS_ENV = "MAMBA_CORE_TORCH_BLAS"


def _dtype_name(dtype) -> str:
    """The `_BLAS` key of a torch or NumPy dtype: torch.float32 -> "float32"."""
    return str(dtype).rsplit(".", 1)[-1]


def _blas(dtype) -> str:
    """Which BLAS runs this dtype's products on the CPU kernel paths: "numpy" or "torch".

    Measured, not assumed: torch's CPU wheels link MKL, which on AMD CPUs runs its AVX2
    kernels (an AVX-512 AMD EPYC here: 186-203 GFLOP/s against NumPy's OpenBLAS at 420-480 on
    the seed layer's products), while on Intel CPUs or where both run the same kernels the
    two are close.  The first kernel-path call of a dtype times one 1024x768x1024 product on
    each, best of three alternating rounds (a few ms, once per process)."""
    name = _dtype_name(dtype)
    entry = _BLAS.get(name)
    if entry is None:
        forced = os.environ.get(BLAS_ENV, "").strip().lower()
        if forced in ("numpy", "torch"):
            entry = (forced, float("nan"), float("nan"))
        elif forced:
            raise ValueError(f"{BLAS_ENV} must be 'numpy' or 'torch', got {forced!r}")
        else:
            entry = _measure_blas(np.dtype(name))
        _BLAS[name] = entry
    return entry[0]


def kernel_blas(dtype=torch.float32) -> dict[str, Any]:
    """Whose BLAS the CPU kernel paths run `dtype`'s products on here, and the rates that
    decided it: {"choice": "numpy" | "torch", "numpy_gflops", "torch_gflops"} (NaN rates
    when `MAMBA_CORE_TORCH_BLAS` forced the choice)."""
    _blas(dtype)
    entry = _BLAS[_dtype_name(dtype)]
    return dict(zip(("choice", "numpy_gflops", "torch_gflops"), entry, strict=True))


def _measure_blas(dtype: np.dtype) -> tuple[str, float, float]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1024, 768)).astype(dtype)
    w = rng.standard_normal((1024, 768)).astype(dtype)
    ta, tw = torch.from_numpy(a), torch.from_numpy(w)

    calls = (lambda: np.matmul(a, w.T), lambda: F.linear(ta, tw))  # (the two libraries)
    best = [float("inf")] * 2
    for call in calls:
        call()  # (thread pools start, code paths load)
    for _ in range(3):  # alternating, so that a slow moment of the machine hits both
        for i, call in enumerate(calls):
            start = time.perf_counter()
            call()
            best[i] = min(best[i], time.perf_counter() - start)
    numpy_rate, torch_rate = (2 * 1024 * 768 * 1024 / t / 1e9 for t in best)
    choice = "numpy" if numpy_rate >= NUMPY_BLAS_MARGIN * torch_rate else "torch"
    return choice, round(numpy_rate, 1), round(torch_rate, 1)


def _products(dtype):
    """(linear, matmul) on NumPy arrays for the kernel paths, on the BLAS `_blas` chose."""
    if _blas(dtype) == "numpy":
        return dense, product
    return _torch_linear, _torch_matmul


class _NumpyLinear(torch.autograd.Function):
    """`F.linear` with its products on NumPy's BLAS, forward and backward: in_proj and
    out_proj of a training call on the kernels where `_blas` chose NumPy's (torch's would
    run them on the slower BLAS; the rest of the layer is already on NumPy arrays)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        b = None if bias is None else _view(bias)
        return torch.from_numpy(dense(_view(x), _view(weight), b))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        rows = np.ascontiguousarray(_view(dy)).reshape(-1, dy.shape[-1])
        need_x, need_w, need_b = ctx.needs_input_grad
        dx = dw = db = None
        if need_x:
            dx = torch.from_numpy(product(rows, _view(weight)).reshape(x.shape))
        if need_w:
            dw = torch.from_numpy(product(rows.T, _view(x).reshape(-1, x.shape[-1])))
        if need_b and ctx.has_bias:
            db = torch.from_numpy(rows.sum(axis=0))
        return dx, dw, db


class _MambaInner(torch.autograd.Function):
    """Mamba-1 from the in_proj output to the gated y (before out_proj), on the compiled CPU
    kernels, with a hand-written backward pass: the official `mamba_inner_fn`'s split.

    Forward: `kernels.conv_silu`, the x_proj and dt_proj products, `kernels.fused_scan`
    keeping the state every `kernels.BACKWARD_CHUNK` steps.  Backward:
    `fused_inner_backward` (the adjoint recurrence with the softplus, skip and gate folded
    in, the two products' gradients, `kernels.conv_silu_backward`).  dLoss/dxz is one (B, L,
    2E) buffer whose halves the conv's and the scan's backward write: no autograd graph of
    the conv, the SiLUs, the splits of xz and x_proj's output or the gate; of the
    intermediates only x_dbl and the states every `kernels.BACKWARD_CHUNK` steps are kept
    (u and dt_pre are recomputed)."""

    @staticmethod
    def forward(ctx, xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, conv_state, h0,
                dt_rank):  # fmt: skip
        saved = (xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, conv_state)
        arrays = (t.detach().numpy() for t in (*saved, h0))
        # the products on the BLAS `_blas` chose (see `_kernel_forward`)
        chunk = kernels.BACKWARD_CHUNK
        inner = fused_inner(*arrays, dt_rank, linear=_products(xz.dtype)[0], chunk=chunk)
        ctx.dt_rank = dt_rank
        ctx.save_for_backward(*saved, *(torch.from_numpy(v) for v in (inner.x_dbl, inner.starts)))
        return tuple(torch.from_numpy(v) for v in (inner.y, inner.conv_state, inner.h))

    @staticmethod
    @once_differentiable  # its gradients are not differentiable again: say so, don't guess
    def backward(ctx, dy, d_conv, dh):
        tensors = [t.detach() for t in ctx.saved_tensors]
        xz, cs, starts = tensors[0], tensors[8], tensors[-1]
        dy = xz.new_zeros((*xz.shape[:2], xz.shape[2] // 2)) if dy is None else dy
        d_conv = torch.zeros_like(cs) if d_conv is None else d_conv
        dh = torch.zeros_like(starts[0]) if dh is None else dh
        linear, matmul = _products(xz.dtype)
        grads = fused_inner_backward(
            *(t.numpy() for t in (*tensors, dy, d_conv, dh)), ctx.dt_rank,
            linear=linear, matmul=matmul, chunk=kernels.BACKWARD_CHUNK,
        )  # fmt: skip
        return (*(torch.from_numpy(g) for g in grads), None)


def _torch_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`fused_inner_backward`'s products on torch's BLAS (NumPy views in, a new array out)."""
    return torch.matmul(torch.from_numpy(a), torch.from_numpy(b)).numpy()


def _kernel_train(params, x: Array, config: MambaConfig, state):
    """The Mamba-1 mixer for a call that trains: in_proj and out_proj under autograd (on
    the BLAS `_blas` chose), all between them in `_MambaInner`."""
    dtype = x.dtype
    linear = _NumpyLinear.apply if _blas(dtype) == "numpy" else F.linear

    def p(name):
        return params[name].to(dtype)

    def opt(name, on: bool):
        return p(name) if on else None

    def zeros(shape):
        return x.new_zeros(shape)

    xz = linear(x, p("in_proj.weight"), opt("in_proj.bias", config.use_bias))
    operands = inner_operands(params, config, x, state, cast=p, zeros=zeros, exp=torch.exp)
    y, conv_state, h = _MambaInner.apply(xz, *operands, config.dt_rank)
    out = linear(y, p("out_proj.weight"), opt("out_proj.bias", config.use_bias))
    return out, MambaState(conv_state, h)


#: mixer version -> its training call on the kernels (`_kernel_path`'s "train")
_KERNEL_TRAINING = {"mamba1": _kernel_train}


def _compiled_chunk_fn(h, dt, u, Bm, Cm, A):
    """The chunk written as one expression per step, for torch.compile to fuse."""
    ys = []
    du = dt * u
    for t in range(dt.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + du[:, t, :, None] * Bm[:, t, None, :]
        ys.append((h * Cm[:, t, None, :]).sum(-1))
    return torch.stack(ys, dim=1), h


@functools.cache
def _compiled_chunk():
    return torch.compile(_compiled_chunk_fn, dynamic=False)


def _chunked(chunk_fn, u, dt, A, Bm, Cm, h0, size: int, use_checkpoint: bool, keep=None):
    length = u.shape[1]
    h = h0
    ys = []
    for start in range(0, length, size):
        sl = slice(start, min(start + size, length))
        args = (h, dt[:, sl], u[:, sl], Bm[:, sl], Cm[:, sl], A)
        fn = chunk_fn if keep is None else functools.partial(chunk_fn, keep=keep[:, sl])
        if use_checkpoint:
            y, h = checkpoint(fn, *args, use_reentrant=False)
        else:
            y, h = fn(*args)
        ys.append(y)
    return torch.cat(ys, dim=1), h


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def make_scan(algorithm: str, chunk_size="auto", *, compile_scan: bool = False):
    """A `scan(u, dt, A, Bm, Cm, h0) -> (y, h)` for `algorithm` on torch tensors."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"scan {algorithm!r} is invalid: expected one of {sorted(ALGORITHMS)}")

    @torch.compiler.disable  # inside torch.compile(model), the scan runs as its own region
    def scan(u, dt, A, Bm, Cm, h0, keep=None):
        size = _chunk(algorithm, chunk_size, u.device)
        grad = _needs_grad(u, dt, A, Bm, Cm, h0)
        if keep is not None:  # packed sequences: the core's chunks (autograd, checkpointed)
            chunk_fn = functools.partial(ALGORITHMS[algorithm], xp=xp_torch)
            return _chunked(chunk_fn, u, dt, A, Bm, Cm, h0, size, grad, keep)
        if algorithm == "linear":
            if compile_scan:  # the kernel unrolls its chunk: 16 steps fuse best (measured)
                compiled_size = size if chunk_size != "auto" else _COMPILED_CHUNK
                return _chunked(_compiled_chunk(), u, dt, A, Bm, Cm, h0, compiled_size, grad)
            if not grad:
                return _linear_inplace(u, dt, A, Bm, Cm, h0, min(size, _INPLACE_CHUNK))
            return _LinearScan.apply(u, dt, A, Bm, Cm, h0)
        chunk_fn = functools.partial(ALGORITHMS[algorithm], xp=xp_torch)
        return _chunked(chunk_fn, u, dt, A, Bm, Cm, h0, size, grad)

    return scan


def make_ssd_scan(
    algorithm: str,
    chunk_size="auto",
    *,
    compile_scan: bool = False,
    version: str = "mamba2",
    table=SSD_ALGORITHMS,
):
    """A Mamba-2 `scan(x, dt, A, Bm, Cm, S0) -> (y, S)` (Mamba-3: `scan(v, a, A, k, q, S0)`)
    for `algorithm` on torch tensors: the core's chunk functions, each chunk under
    `torch.utils.checkpoint` when autograd is on (one state per chunk kept for the backward
    pass).  `compile_scan` is Mamba-1 only."""
    if algorithm not in table:
        raise ValueError(f"scan {algorithm!r} is invalid: expected one of {sorted(table)}")
    chunk_fn = functools.partial(table[algorithm], xp=xp_torch)

    @torch.compiler.disable
    def scan(x, dt, A, Bm, Cm, S0, keep=None):
        size = _chunk(algorithm, chunk_size, x.device, version)
        grad = _needs_grad(x, dt, A, Bm, Cm, S0)
        return _chunked(chunk_fn, x, dt, A, Bm, Cm, S0, size, grad, keep)

    return scan


#: mixer version -> the maker of its torch scans
_SCAN_MAKERS = {
    "mamba1": make_scan,
    "mamba2": make_ssd_scan,
    "mamba3": functools.partial(make_ssd_scan, version="mamba3", table=SSD3_ALGORITHMS),
}
_SCANS: dict[tuple[str, str, Any, bool], Any] = {}


def _scan_for(version: str, algorithm: str, chunk_size, compile_scan: bool):
    key = (version, algorithm, chunk_size, compile_scan)
    if key not in _SCANS:
        _SCANS[key] = _SCAN_MAKERS[version](algorithm, chunk_size, compile_scan=compile_scan)
    return _SCANS[key]


def _resolve_scan(config: MambaConfig, scan_type: str | None, device: torch.device) -> str:
    scan_type = scan_type or config.scan_type
    if scan_type == "auto":
        platform = "gpu" if device.type == "cuda" else "cpu"
        return mixer_for(config).auto_scan("torch", platform, config)
    return scan_type


def _kernel_path(params, x: Array, config: MambaConfig, state, attention_mask=None,
                 seq_idx=None, *, step: bool = False) -> str | None:  # fmt: skip
    """Which compiled CPU path (`backends.kernels`) runs this linear-scan call (`step`: this
    decode step): "forward" (the NumPy backend's fused forward or step on the tensors' own
    memory: nothing needs a gradient), "train" (`_KERNEL_TRAINING`: in_proj and out_proj
    under autograd, the rest in `_MambaInner`), or None.  Both need what `fuses` takes
    (SiLU, float32/float64, no mask or packing, a version with kernels), every tensor on the
    CPU, and no torch.compile."""
    if not x.is_cpu or torch.compiler.is_compiling():
        return None
    tensors = [*params.values(), *(() if state is None else state)]
    if not fuses(x, config, state, attention_mask, seq_idx, step=step):
        return None
    if not all(t.is_cpu for t in tensors):  # (`is_cpu`: a decode step asks it of every tensor)
        return None
    if not _needs_grad(x, *tensors):
        return "forward"
    return "train" if config.version in _KERNEL_TRAINING else None


def _torch_linear(x: np.ndarray, weight: np.ndarray, bias=None) -> np.ndarray:
    """`fused_forward`'s projections on torch's BLAS (NumPy views in and out, no copies)."""
    b = None if bias is None else torch.from_numpy(bias)
    return F.linear(torch.from_numpy(x), torch.from_numpy(weight), b).numpy()


def _view(t: Array) -> np.ndarray:
    """A NumPy view of a CPU tensor (`detach` only when it requires grad: half the cost of
    the conversion, which a decode step pays on every weight)."""
    return t.detach().numpy() if t.requires_grad else t.numpy()


def _kernel_forward(params, x: Array, config: MambaConfig, state, *, step: bool = False):
    """`fused_forward` on NumPy views of the tensors (no copies); torch tensors back.  A whole
    sequence runs its projections on the BLAS `_blas` measured faster (torch's where the two
    are close: NumPy's OpenBLAS keeps its threads spinning for up to ~0.1 s after a call,
    which slowed the scan kernel started right after by up to 60%; measured on an AVX2
    machine, the forward 5-10% faster on torch's).  A decode step (x (B, H), one token:
    `FUSED_STEPS`) keeps NumPy's BLAS, whose one-token products measured twice as fast as
    torch's."""
    arrays = {k: _view(v) for k, v in params.items()}
    np_state = None if state is None else type(state)(*map(_view, state))
    if step:
        out, new = FUSED_STEPS[config.version](arrays, _view(x), config, np_state, linear=dense)
    else:
        out, new = FUSED_FORWARDS[config.version](
            arrays, _view(x), config, np_state, linear=_products(x.dtype)[0]
        )  # fmt: skip
    return torch.from_numpy(out), type(state or new)(*map(torch.from_numpy, new))


def torch_forward(
    params: Mapping[str, Array],
    x: Array,
    config: MambaConfig,
    state: MambaState | None = None,
    *,
    scan_type: str | None = None,
    compile_scan: bool = False,
    attention_mask: Array | None = None,
    seq_idx: Array | None = None,
):
    """The mixer on torch tensors: x (B, L, H) -> (y (B, L, H), state).  Differentiable."""
    algorithm = _resolve_scan(config, scan_type, x.device)
    kernel = None
    if algorithm == "linear" and not compile_scan:
        kernel = _kernel_path(params, x, config, state, attention_mask, seq_idx)
    if kernel == "forward":
        return _kernel_forward(params, x, config, state)
    if kernel == "train":
        return _KERNEL_TRAINING[config.version](params, x, config, state)
    scan = _scan_for(config.version, algorithm, config.chunk_size, compile_scan)
    if seq_idx is not None and not isinstance(seq_idx, torch.Tensor):
        seq_idx = torch.as_tensor(np.asarray(seq_idx), device=x.device)
    return mixer_forward(
        params,
        x,
        config,
        state,
        scan=scan,
        xp=xp_torch,
        attention_mask=attention_mask,
        seq_idx=seq_idx,
    )


def torch_step(params: Mapping[str, Array], state: MambaState, x_t: Array, config: MambaConfig):
    """One decode step on torch tensors: x_t (B, H) -> (y_t (B, H), state)."""
    if _kernel_path(params, x_t, config, state, step=True) == "forward":
        return _kernel_forward(params, x_t, config, state, step=True)
    return mixer_step(params, state, x_t, config, xp=xp_torch)


# ---------------------------------------------------------------- context parallelism
class _Tie(torch.autograd.Function):
    """x unchanged, made to depend on `others` (zero gradients for them): every rank's
    output then reaches every collective, so each rank's backward runs the same collectives
    in the same order (rank 0 uses no received value, yet must join their backward)."""

    @staticmethod
    def forward(ctx, x, *others):
        ctx.specs = [(o.shape, o.dtype, o.device) for o in others]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(s, dtype=d, device=v) for s, d, v in ctx.specs))


def _gather(tensor: Array, group) -> tuple[Array, ...]:
    """Every rank's `tensor` (differentiable all-gather; its backward sums the gradients
    of all ranks into each rank's own tensor).  torch.distributed.nn's all-gather: its
    backward runs on gloo (all-to-all) as on NCCL; the suggested functional-collectives
    replacement needs a reduce-scatter, which gloo lacks."""
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprec")
        return tuple(all_gather(tensor.contiguous(), group=group))


def _context_scan(inner, group):
    """Wrap a mixer scan for a sequence split over the ranks of `group`: each rank scans its
    stretch from zero, the (total decay, final state) pairs of all stretches are gathered
    (one all-gather of S * B*E*N values) and combined locally in rank order, and each rank
    rescans its stretch from the state it is owed.  Exact; gradients flow back through the
    all-gather to the ranks that produced each pair."""
    import torch.distributed as dist

    rank = dist.get_rank(group)

    def scan(u, dt, A, Bm, Cm, h_start, keep=None):
        _, h_zero = inner(u, dt, A, Bm, Cm, torch.zeros_like(h_start))
        total = dt.sum(dim=1)  # (B, E) or (B, H)
        if A.ndim == 2:  # Mamba-1: a decay per (channel, state)
            decay = torch.exp(total[..., None] * A)
        else:  # Mamba-2: one per head
            decay = torch.exp(total * A)[..., None, None]
        pairs = _gather(torch.cat([decay.expand_as(h_zero), h_zero], dim=-1), group)
        n = h_zero.shape[-1]
        h, h_in = h_start, None
        for i, pair in enumerate(pairs):
            if i == rank:
                h_in = _Tie.apply(h, *pairs)
            h = pair[..., :n] * h + pair[..., n:]
        y, _ = inner(u, dt, A, Bm, Cm, h_in)
        return y, h

    return scan


def context_forward(
    params: Mapping[str, Array],
    x: Array,
    config: MambaConfig,
    state: Any = None,
    *,
    group,
    scan_type: str | None = None,
    compile_scan: bool = False,
):
    """The mixer with the sequence split over the ranks of the `torch.distributed` process
    group `group` (gloo on CPU, NCCL on GPUs): x (B, L/S, H) is this rank's stretch (rank r
    holds tokens [r*L/S, (r+1)*L/S)); returns this rank's outputs and the state after the
    whole sequence (the same on every rank).  The conv's halo (the previous stretch's last
    d_conv-1 conv inputs) and the scan's (decay, state) pairs are all-gathered, O(S*B*C*K)
    and O(S*B*E*N) values per layer, never O(L).  Autograd works across ranks: the gradient
    of a parameter is the sum over the group of each rank's `.grad` (all-reduce it, as
    DistributedDataParallel does over a data group).  `state` continues a sequence (every
    rank passes the same one)."""
    import torch.distributed as dist

    if config.d_conv is None:
        raise ValueError(
            "Mamba-3 has no conv and its trapezoid looks one token back across stretches: "
            "context parallelism supports version='mamba1' and 'mamba2' (received "
            f"version={config.version!r})"
        )
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    mixer = mixer_for(config)
    k = config.d_conv
    batch, length, _ = x.shape
    if length < k - 1:
        raise ValueError(
            f"each rank's stretch must hold at least d_conv - 1 = {k - 1} tokens; received "
            f"x.shape[1]={length} on rank {rank} of {size}"
        )
    if state is None:
        state = init_state(config, batch, dtype=x.dtype, xp=xp_torch, device=x.device)
    conv0, h0 = state
    if k > 1:
        tail = mixer.conv_inputs(params, x[:, length - (k - 1) :, :], config, xp=xp_torch)
        tails = _gather(tail.transpose(1, 2).to(conv0.dtype), group)  # (B, C, K-1) each
        if rank == 0:
            conv_in = _Tie.apply(conv0, *tails)
        else:
            conv_in = torch.cat([torch.zeros_like(conv0[..., :1]), tails[rank - 1]], dim=-1)
    else:
        conv_in = conv0
    algorithm = _resolve_scan(config, scan_type, x.device)
    inner = _scan_for(config.version, algorithm, config.chunk_size, compile_scan)
    y, st = mixer_forward(
        params, x, config, mixer.State(conv_in, h0), scan=_context_scan(inner, group), xp=xp_torch
    )
    convs = _gather(st.conv_state, group)  # the final conv state is the last stretch's
    return _Tie.apply(y, *convs), mixer.State(convs[size - 1], st[1])


# ---------------------------------------------------------------- the backend
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _compile_default() -> bool:
    return os.environ.get("MAMBA_CORE_TORCH_COMPILE", "").lower() in ("1", "true", "yes")


class TorchBackend(Backend):
    name = "torch"
    xp = xp_torch
    dtypes = _DTYPES

    def is_native(self, value: Any) -> bool:
        return isinstance(value, torch.Tensor)

    def resolve_device(self, device: Any = None):
        if device is None:
            return torch.device("cpu")
        try:
            dev = torch.device(device)
            torch.empty(0, device=dev)
        except (RuntimeError, TypeError, AssertionError) as exc:
            raise ValueError(
                f"device={device!r} is invalid for the torch backend: expected a torch.device "
                f"or a string like 'cpu' or 'cuda:0' ({exc})"
            ) from None
        return dev

    def asarray(self, value: Any, dtype=None, device=None):
        if not isinstance(value, torch.Tensor):
            arr = value if isinstance(value, np.ndarray) else to_numpy(value)
            value = torch.from_numpy(np.ascontiguousarray(arr))
        return value.to(device=device, dtype=dtype)

    def device_of(self, value: Any) -> str:
        return str(value.device)

    def platform(self, device: Any = None) -> str:
        return "gpu" if device is not None and torch.device(device).type == "cuda" else "cpu"

    def chunk_size(self, algorithm: str, config: MambaConfig, platform: str) -> int:
        device = torch.device("cuda" if platform == "gpu" else "cpu")
        return _chunk(algorithm, config.chunk_size, device, config.version)

    def forward(
        self, params, x, config: MambaConfig, state, scan_type: str, attention_mask=None,
        seq_idx=None,
    ):  # fmt: skip
        return torch_forward(
            params, x, config, state, scan_type=scan_type, compile_scan=_compile_default(),
            attention_mask=attention_mask, seq_idx=seq_idx,
        )  # fmt: skip

    def step(self, params, state: MambaState, x_t, config: MambaConfig):
        return torch_step(params, state, x_t, config)

    def call_info(self) -> dict[str, Any]:
        return {
            "compiled_scan": _compile_default(),
            "kernels": kernels.reason(),
            "kernel_compile_s": round(kernels.compile_seconds(), 3),
            "kernel_blas": {name: choice for name, (choice, _, _) in _BLAS.items()},
        }


_BACKEND = TorchBackend()


def get_backend() -> TorchBackend:
    return _BACKEND


def build_parameters(module: nn.Module, shapes: Mapping[str, tuple[int, ...]], device, dtype):
    """One `nn.Parameter` per dotted name, in nested plain submodules: "in_proj.weight" is
    the `weight` of a submodule `in_proj`, "backbone.layers.0.norm.weight" four levels down,
    so `named_parameters()` / `state_dict()` keys are exactly the given (official,
    HuggingFace) names, whatever the model."""
    for name, shape in shapes.items():
        *owners, leaf = name.split(".")
        holder = module
        for part in owners:
            if not hasattr(holder, part):
                holder.add_module(part, nn.Module())
            holder = getattr(holder, part)
        holder.register_parameter(
            leaf, nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        )


def _check_mask(mask, x: Array) -> Array:
    """A (B, L) 0/1 mask (bool, int or float) as x's dtype on x's device."""
    if not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(np.asarray(to_numpy(mask)))
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"mask must be (batch, seq_len) = {tuple(x.shape[:2])} of 0/1 (1 = real token); "
            f"received mask.shape={tuple(mask.shape)}"
        )
    return mask.to(device=x.device, dtype=x.dtype)


# ---------------------------------------------------------------- the nn.Module
class MambaTorch(nn.Module):
    """One Mamba mixer as a `torch.nn.Module`, parameters under the official names.

    `load_state_dict(hf_mixer.state_dict(), strict=True)` works for a HuggingFace
    `MambaMixer` or an official `mamba_ssm` `Mamba` layer of the same shape.

    Args:
        config: a `MambaConfig`, a dict of its fields or None.
        seed: initialisation seed; the same seed gives the same weights as
            `MambaModule(config, seed=seed)` on every backend.  None draws one from torch's
            global generator, so `torch.manual_seed` controls it.
        device, dtype: where and in which dtype to create the parameters.
        compile_scan: run the linear scan's chunks as a `torch.compile`-d kernel.
        state_dict: official-name weights to load instead of initialising (checked first;
            the parameters are then allocated once, never initialised and overwritten).
    """

    def __init__(
        self,
        config: MambaConfig | Mapping[str, Any] | None = None,
        *,
        seed: int | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        compile_scan: bool = False,
        state_dict: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        cfg = resolve_config(config)
        self.config = cfg
        self.compile_scan = compile_scan
        if state_dict is not None and not isinstance(state_dict, CheckpointWeights):
            state_dict = check_state_dict(state_dict, cfg)  # before anything is allocated
        target = torch.device(device) if device is not None else None
        # with weights to load, build on the meta device (no memory) and allocate once
        self._build(param_shapes(cfg), "meta" if state_dict is not None else device, dtype)
        if state_dict is not None:
            self.to_empty(device=target or torch.get_default_device())
            self._copy_in(state_dict)
            return
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        self._copy_in(init_params(cfg, seed))

    def _build(self, shapes: Mapping[str, tuple[int, ...]], device, dtype) -> None:
        build_parameters(self, shapes, device, dtype)

    # -------------------------------------------------------------- weights
    def params_dict(self) -> dict[str, nn.Parameter]:
        """{official name: parameter}: the dict the core's functions take."""
        return dict(self.named_parameters())

    @torch.no_grad()
    def _copy_in(self, arrays: Mapping[str, Any]) -> None:
        for name, param in self.named_parameters():  # one tensor at a time
            param.copy_(torch.as_tensor(np.asarray(arrays[name]), dtype=param.dtype))

    def load_official(self, state_dict: Mapping[str, Any]) -> None:
        """Copy any array-likes (NumPy, JAX, torch) under the official names into the
        parameters, checking every key and shape first (one error lists every problem)."""
        if not isinstance(state_dict, CheckpointWeights):
            state_dict = check_state_dict(state_dict, self.config)
        self._copy_in(state_dict)

    def numpy_state_dict(self) -> dict[str, np.ndarray]:
        """A copy of the weights as NumPy arrays under the official names."""
        return {name: np.array(to_numpy(p), copy=True) for name, p in self.params_dict().items()}

    @classmethod
    def from_pretrained(cls, directory, **kwargs) -> MambaTorch:
        """Load a `save_pretrained` directory (config.json + model.safetensors).

        The checkpoint is checked (config, every tensor's name, shape and dtype, the file's
        completeness) before anything is allocated; then each parameter is allocated once
        and filled from the file, one tensor at a time.
        """
        from mamba_core.module import load_pretrained

        config, _, weights = load_pretrained(directory)
        return cls(config, state_dict=weights, **kwargs)

    # -------------------------------------------------------------- compute
    def _check(self, x: Array, ndim: int, what: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"MambaTorch expected {what} as a torch.Tensor, received {type(x).__name__}"
            )
        check_input_shape(x, ndim, self.config.hidden_size, owner="MambaTorch", what=what)
        if not x.is_floating_point():
            raise TypeError(
                f"MambaTorch expected a floating {what}, received {what}.dtype={x.dtype}"
            )
        dev = self.out_proj.weight.device
        if x.device != dev:
            raise ValueError(
                f"{what} is on {x.device} but the module's parameters are on {dev}; move one "
                f"of them (e.g. module.to({str(x.device)!r}))"
            )

    def _state(self, state: Any, x: Array) -> MambaState:
        """The one state check (`mamba_core.mixer.validate_state`); arrays of another library
        or device become tensors on x's device in the compute / scan dtype."""
        sdtype = scan_dtype(x.dtype, self.config, xp=xp_torch)

        def convert(value, field):
            if not isinstance(value, torch.Tensor):
                value = torch.from_numpy(np.array(to_numpy(value), copy=True))
            dtype = sdtype if state_dtype_field(self.config, field) else x.dtype
            return value.to(device=x.device, dtype=dtype)

        return validate_state(state, self.config, x.shape[0], owner="MambaTorch", convert=convert)

    def forward(
        self,
        x: Array,
        mask: Array | None = None,
        state: Any = None,
        *,
        return_state: bool = False,
        seq_idx: Array | None = None,
        cu_seqlens: Array | None = None,
        context_group: Any = None,
    ):
        """x (B, L, H) -> y (B, L, H) in x's dtype (and the state, with `return_state`).

        `context_group` (a `torch.distributed` process group): context parallelism, x is
        this rank's stretch of the sequence (see `context_forward`); the state returned is
        the whole sequence's.  It does not combine with `mask` or packing.

        `seq_idx` (B, L) / `cu_seqlens` (S+1,): packed sequences, each computed as if alone
        (see `mamba_core.checks.packed_index`); the state returned is the last sequence's.

        `mask` (B, L) of 0/1 (1 = real token; the `block(x, mask)` convention of host
        models): padded positions leave the state unchanged and feed nothing to later
        tokens.  `state` may be a `MambaState`, a (conv_state, ssm_state) tuple or a mapping,
        its arrays of any library; it is checked against the config."""
        self._check(x, 3, "x")
        if state is not None:
            state = self._state(state, x)
        if mask is not None:
            mask = _check_mask(mask, x)
        packed = packed_index(tuple(x.shape[:2]), seq_idx, cu_seqlens, owner="MambaTorch")
        if context_group is not None:
            if mask is not None or packed is not None:
                raise ValueError(
                    "context_group splits one unpadded sequence per row over the ranks; it "
                    "does not combine with mask, seq_idx or cu_seqlens (received "
                    f"mask={'set' if mask is not None else None}, packing="
                    f"{'set' if packed is not None else None})"
                )
            y, new_state = context_forward(
                self.params_dict(),
                x,
                self.config,
                state,
                group=context_group,
                compile_scan=self.compile_scan,
            )
            return (y, new_state) if return_state else y
        y, new_state = torch_forward(
            self.params_dict(),
            x,
            self.config,
            state,
            compile_scan=self.compile_scan,
            attention_mask=mask,
            seq_idx=packed,
        )
        return (y, new_state) if return_state else y

    def step(self, x_t: Array, state: MambaState | None = None):
        """One decode step: x_t (B, H) -> (y_t (B, H), new state)."""
        self._check(x_t, 2, "x_t")
        if state is None:
            state = self.init_state(x_t.shape[0], dtype=x_t.dtype)
        else:
            state = self._state(state, x_t)
        return torch_step(self.params_dict(), state, x_t, self.config)

    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> MambaState:
        """The zero state on the parameters' device (compute dtype: `dtype` or theirs)."""
        return init_state(
            self.config,
            batch_size,
            dtype=dtype or self.out_proj.weight.dtype,
            xp=xp_torch,
            device=self.out_proj.weight.device,
        )

    def extra_repr(self) -> str:
        return f"{self.config.describe()}, scan_type={self.config.scan_type!r}"


# ---------------------------------------------------------------- blocks and language models
class MambaBlockTorch(nn.Module):
    """A pre-norm residual block (RMSNorm -> mixer -> residual add) as an `nn.Module`:
    `block(x, mask)` (the host-model convention), parameters `norm.weight` and
    `mixer.<official names>`."""

    def __init__(
        self,
        config: MambaConfig | Mapping[str, Any] | None = None,
        *,
        norm_epsilon: float = 1e-5,
        residual_in_fp32: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.mixer = MambaTorch(config, **kwargs)
        self.config = self.mixer.config
        self.norm_epsilon, self.residual_in_fp32 = norm_epsilon, residual_in_fp32
        build_parameters(
            self,
            {"norm.weight": (self.config.hidden_size,)},
            None,
            self.mixer.out_proj.weight.dtype,
        )
        with torch.no_grad():
            self.norm.weight.fill_(1.0)
        self.norm.to(self.mixer.out_proj.weight.device)

    def forward(
        self, x: Array, mask: Array | None = None, state: Any = None, *, return_state=False
    ):
        """x (B, L, H) -> x + mixer(rmsnorm(x)) (and the mixer state, with `return_state`)."""
        from mamba_core.models import block_forward

        self.mixer._check(x, 3, "x")
        if state is not None:
            state = self.mixer._state(state, x)
        mixer = self.mixer

        def run(p, v, s, m):
            return mixer(v, m, s, return_state=True)

        y, new_state = block_forward(
            self.norm.weight, None, x, self.config, state, mixer=run, attention_mask=mask,
            norm_epsilon=self.norm_epsilon, residual_in_fp32=self.residual_in_fp32, xp=xp_torch,
        )  # fmt: skip
        return (y, new_state) if return_state else y


class MambaLMTorch(GenerationMixin, PretrainedMixin, nn.Module):
    """A Mamba language model as an `nn.Module` whose `state_dict()` keys are exactly the
    HuggingFace `MambaForCausalLM` / `Mamba2ForCausalLM` ones (strict loading both ways; a
    tied `lm_head.weight` in a loaded dict is accepted and ignored).

        lm = MambaLMTorch(LMConfig(...), seed=0)          # or MambaLMTorch.from_pretrained(dir)
        logits = lm(input_ids)                            # (B, L, V)
        logits, states = lm(input_ids, return_states=True)
        logits, states = lm.step(next_ids, states)
        lm.generate(input_ids, max_new_tokens=32)
        lm.save_pretrained(dir)                           # the HF layout, as MambaLM writes it
    """

    def __init__(
        self,
        config: LMConfig | Mapping[str, Any],
        *,
        seed: int | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        state_dict: Mapping[str, Any] | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.config = config if isinstance(config, LMConfig) else LMConfig.from_dict(config)
        shapes = lm_param_shapes(self.config)
        if state_dict is not None:
            found = {k: (tuple(np.shape(v) if not hasattr(v, "shape") else v.shape), "float32")
                     for k, v in state_dict.items()}  # fmt: skip
            if self.config.tie_embeddings:
                found.pop("lm_head.weight", None)
            raise_mismatch(found, shapes, config=self.config)
        build_parameters(self, shapes, "meta" if state_dict is not None else device, dtype)
        if state_dict is not None:
            self.to_empty(
                device=torch.device(device) if device is not None else torch.get_default_device()
            )
            arrays = state_dict
        else:
            if seed is None:
                seed = int(torch.randint(0, 2**31 - 1, ()).item())
            arrays = init_lm_params(self.config, seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                param.copy_(torch.as_tensor(np.asarray(to_numpy(arrays[name])), dtype=param.dtype))
        if self.config.tie_embeddings:
            self.register_load_state_dict_pre_hook(_drop_tied_head)

    @classmethod
    def from_pretrained(cls, directory, **kwargs) -> MambaLMTorch:
        """A local HuggingFace or official checkpoint (see `mamba_core.lm.MambaLM`)."""
        from mamba_core.checkpoints import read_lm_checkpoint

        config, weights, _ = read_lm_checkpoint(directory)
        return cls(config, state_dict=weights, **kwargs)

    def params_dict(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())

    def _run(self, ids: Array, states, mask, step: bool):
        from mamba_core.models import lm_forward

        cfg = self.config.mixer
        if step:

            def mixer(p, v, s, m):
                y, st = torch_step(p, s, v[:, 0, :], cfg)
                return y[:, None, :], st

        else:

            def mixer(p, v, s, m):
                return torch_forward(p, v, cfg, s, attention_mask=m)

        dtype = self.backbone.embeddings.weight.dtype
        return lm_forward(
            self.params_dict(), ids, self.config, states, dtype=dtype, mixer=mixer,
            attention_mask=mask, xp=xp_torch,
        )  # fmt: skip

    def forward(self, input_ids: Array, attention_mask: Array | None = None, states=None, *,
                return_states: bool = False):  # fmt: skip
        """input_ids (B, L) -> logits (B, L, V) (and the per-layer states)."""
        ids = torch.as_tensor(input_ids, device=self.backbone.embeddings.weight.device)
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask).to(
                ids.device, self.backbone.embeddings.weight.dtype
            )
        logits, new_states = self._run(ids, states, attention_mask, step=False)
        return (logits, new_states) if return_states else logits

    def step(self, token_ids: Array, states: list):
        """One decode step: token_ids (B,) -> (logits (B, V), new per-layer states)."""
        ids = torch.as_tensor(token_ids, device=self.backbone.embeddings.weight.device)
        logits, new_states = self._run(ids[:, None], states, None, step=True)
        return logits[:, 0, :], new_states

    @torch.no_grad()
    def _prefill(self, ids, attention_mask):
        logits, states = self(torch.from_numpy(ids), attention_mask, return_states=True)
        return to_numpy(logits[:, -1, :]), states

    @torch.no_grad()
    def _decode(self, ids, states):
        logits, states = self.step(torch.from_numpy(np.asarray(ids)), states)
        return to_numpy(logits), states


def _drop_tied_head(module, state_dict, prefix, *args, **kwargs):
    state_dict.pop(prefix + "lm_head.weight", None)


# ---------------------------------------------------------------- HuggingFace hosts
class HFMixerAdapter(MambaTorch):
    """A `MambaTorch` that speaks transformers' mixer protocol: `forward(hidden_states,
    cache=None, attention_mask=None)`, reading and writing the layer's conv and recurrent
    states in the host's `Cache` (`get_conv_state` / `get_recurrent_state`,
    `update_conv_state` / `update_recurrent_state`), so the host's forward, training and
    `generate()` work unchanged."""

    def __init__(self, config, layer_idx: int, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.layer_idx = layer_idx

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        length = hidden_states.shape[1]
        state = None
        if cache is not None:
            conv = cache.get_conv_state(self.layer_idx, state_idx=0)
            rec = cache.get_recurrent_state(self.layer_idx, state_idx=0)
            if conv is not None and rec is not None and conv.shape[-1] == self.config.d_conv:
                state = MambaState(conv, rec)
        mask = None
        if attention_mask is not None and attention_mask.dim() == 2 and length > 1:
            mask = attention_mask[:, -length:]
        y, new_state = super().forward(hidden_states, mask, state, return_state=True)
        if cache is not None:
            cache.update_conv_state(
                new_state.conv_state, self.layer_idx, conv_kernel_size=self.config.d_conv
            )
            cache.update_recurrent_state(new_state.ssm_state, self.layer_idx)
        return y


def _hf_mixer_config(mixer) -> MambaConfig:
    """Our config of a transformers MambaMixer (it keeps its config) or Mamba2Mixer (read
    from its attributes)."""
    from mamba_core.checkpoints import config_from_hf

    if hasattr(mixer, "config"):
        hf = mixer.config.to_dict()
    else:
        hf = {
            "model_type": "mamba2",
            "hidden_size": mixer.hidden_size,
            "state_size": mixer.ssm_state_size,
            "conv_kernel": mixer.conv_kernel_size,
            "expand": mixer.intermediate_size // mixer.hidden_size,
            "num_heads": mixer.num_heads,
            "head_dim": mixer.head_dim,
            "n_groups": mixer.n_groups,
            "use_bias": mixer.use_bias,
            "use_conv_bias": mixer.use_conv_bias,
            "hidden_act": mixer.activation,
            "layer_norm_epsilon": mixer.layer_norm_epsilon,
            "time_step_limit": tuple(mixer.time_step_limit),
            "vocab_size": 1,
        }
    return config_from_hf({**hf, "num_hidden_layers": 1}).mixer


def replace_mixers(model: nn.Module) -> int:
    """Swap every transformers `MambaMixer` / `Mamba2Mixer` inside `model` for an
    `HFMixerAdapter` (a `MambaTorch`) with the same weights (strict) on the same device and
    dtype.  The host's own forward, training and `generate()` (with its cache) keep working.
    Returns how many mixers were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__ not in ("MambaMixer", "Mamba2Mixer"):
                continue
            weight = child.in_proj.weight
            adapter = HFMixerAdapter(
                _hf_mixer_config(child), child.layer_idx, state_dict=child.state_dict(),
                device=weight.device, dtype=weight.dtype,
            )  # fmt: skip
            adapter.load_state_dict(child.state_dict(), strict=True)
            adapter.train(child.training)
            setattr(parent, child_name, adapter)
            replaced += 1
    return replaced
