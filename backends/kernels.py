"""Compiled CPU kernels for the Mamba-1 scan, forward, decode step and training backward,
and the Mamba-2 and Mamba-3 decode steps (numba; the optional `mamba-core[fast]` extra).

    conv_silu            the causal depthwise conv + SiLU (conv_silu_backward: its backward)
    scan                 the plain selective scan (packed restarts)
    fused_scan           softplus + scan + D skip + SiLU gate (`selective_scan_fn`), optionally
                         keeping the state every `chunk` steps for a backward pass
    scan_with_starts / scan_backward          the plain scan's training pair (`_LinearScan`)
    fused_scan_backward  the fused scan's backward (PyTorch `_MambaInner`, JAX's VJP)
    fused_step           a decode step between in_proj and out_proj (conv, x_proj, dt_proj,
                         softplus, state update, skip, gate) in one kernel
    fused_step2          the same for Mamba-2 (conv, softplus and clamp, the heads' state
                         updates, skip, gate, grouped RMSNorm)
    fused_step3          the same for Mamba-3 (B/C norms, dt, A, trapezoid, rotary angles,
                         the heads' two-term state updates, skip, norm, gate, MIMO ranks)

What they replace, and why: the NumPy scan (`backends.numpy.scan_linear`) spends seven
library calls per step and NumPy's own `exp`, which runs at well under one exponential per
nanosecond on AVX2-only CPUs (measured: 0.66 G/s here against XLA's 3.2 G/s); the decode
step is some thirty small array operations, each a few microseconds.  The kernels fuse each
into one loop nest: for a block of (batch row, channels), for every step, for every channel,

    h[n] = exp(dt*A[n]) * keep * h[n] + (dt*u) * B[n];   y = sum_n h[n] * C[n]

with the inner loop over the state (N) vectorised by LLVM (AVX2 / AVX-512, whatever the CPU
has: numba compiles for the host).  LLVM can only vectorise `exp` through a vector math
library, which current llvmlite builds do not ship, so the kernels carry their own
exponential for non-positive arguments (every decay here is exp(dt*A) with dt >= 0, A < 0):
Cody-Waite range reduction x = k ln2 + r, a Taylor polynomial in r (degree 7 in float32,
12 in float64: truncation below half an ulp), and 2^k written straight into the exponent
bits.  Measured against float64 `numpy.exp`: 3e-7 (float32) and 4e-16 (float64) relative;
arguments below the smallest normal number's logarithm give 0.

Compiled once per machine: numba's on-disk cache (`cache=True`) keeps the machine code
between processes; the first call in a fresh environment compiles (about a second per
dtype), and `compile_seconds()` says how long this process spent doing so.

`available()` is False when numba is not installed or `MAMBA_CORE_KERNELS=numpy` is set;
the NumPy, PyTorch and JAX backends then run their pure-library paths (the reference), which
the tests hold these kernels to.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from .threads import plan_blocks, plan_rows, run_all, run_blocks

__all__ = [
    "available",
    "compile_seconds",
    "conv_silu",
    "conv_silu_backward",
    "exp",
    "fused_scan",
    "fused_scan_backward",
    "fused_step",
    "fused_step2",
    "fused_step3",
    "gated_rmsnorm",
    "reason",
    "scan",
    "scan_backward",
    "scan_with_starts",
    "ssd_scan",
    "supports",
]

try:  # the optional extra
    import numba
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic, overload
except ImportError:  # pragma: no cover - exercised by the fallback test's subprocess
    numba = None

_DISABLED = os.environ.get("MAMBA_CORE_KERNELS", "").strip().lower() == "numpy"


def available() -> bool:
    """Whether the compiled kernels run (numba importable, not switched off)."""
    return numba is not None and not _DISABLED


def reason() -> str:
    """Which scan path runs, in words (for metrics and bench headers)."""
    if numba is None:
        return "numpy (numba not installed: pip install 'mamba-core[fast]')"
    if _DISABLED:
        return "numpy (MAMBA_CORE_KERNELS=numpy)"
    return f"numba {numba.__version__}"


_COMPILE_SECONDS = 0.0
_SEEN: set[tuple[str, str]] = set()


def compile_seconds() -> float:
    """Seconds this process spent compiling (or loading from the disk cache) kernels."""
    return _COMPILE_SECONDS


def _timed(name: str, kernel, *args) -> None:
    """Call `kernel`; the first call per (kernel, argument types) counts as compile time."""
    global _COMPILE_SECONDS
    key = (name, args[0].dtype.str)  # each kernel takes one dtype and fixed ranks
    if key in _SEEN:
        kernel(*args)
        return
    start = time.perf_counter()
    kernel(*args)
    _COMPILE_SECONDS += time.perf_counter() - start
    _SEEN.add(key)


def _warm(name: str, kernel, *args) -> None:
    """`_timed` on an empty block (b0 = b1 = 0), once per (kernel, dtype): the compile (or
    the load from the disk cache) happens here, timed, rather than in the thread pool."""
    if (name, args[0].dtype.str) not in _SEEN:
        _timed(name, kernel, *args, 0, 0, 0, 0)


if numba is not None:
    # every fast-math flag but "no NaNs / no infinities": a NaN input still gives NaN
    _FLAGS = {"contract", "arcp", "nsz", "reassoc", "afn"}
    _jit = numba.njit(fastmath=_FLAGS, error_model="numpy", nogil=True, cache=True)
    _inline = numba.njit(fastmath=_FLAGS, error_model="numpy", inline="always", cache=True)

    @intrinsic
    def _f32_from_bits(typingctx, bits):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.int32), codegen

    @intrinsic
    def _f64_from_bits(typingctx, bits):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.DoubleType())

        return types.float64(types.int64), codegen

    @_inline
    def _exp32(x):
        """exp(x) for x <= 0 in float32 (arguments below -87.3 give exp(-87.3))."""
        xc = max(x, np.float32(-87.3))
        # the nearest integer to x/ln2 for x <= 0: a truncation toward zero of x/ln2 - 1/2
        k = np.float32(np.int32(xc * np.float32(1.4426950408889634) - np.float32(0.5)))
        r = (xc - k * np.float32(0.693359375)) - k * np.float32(-2.12194440e-4)
        p = np.float32(1.0 / 5040.0)
        p = p * r + np.float32(1.0 / 720.0)
        p = p * r + np.float32(1.0 / 120.0)
        p = p * r + np.float32(1.0 / 24.0)
        p = p * r + np.float32(1.0 / 6.0)
        p = p * r + np.float32(0.5)
        p = p * r + np.float32(1.0)
        p = p * r + np.float32(1.0)
        return p * _f32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))

    @_inline
    def _exp64(x):
        """exp(x) for x <= 0 in float64 (arguments below -708 give exp(-708))."""
        xc = max(x, -708.0)
        k = np.float64(np.int64(xc * 1.4426950408889634 - 0.5))
        r = (xc - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10
        p = 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
        p = p * r + 1.0 / 5040.0
        p = p * r + 1.0 / 720.0
        p = p * r + 1.0 / 120.0
        p = p * r + 1.0 / 24.0
        p = p * r + 1.0 / 6.0
        p = p * r + 0.5
        p = p * r + 1.0
        p = p * r + 1.0
        return p * _f64_from_bits((np.int64(k) + np.int64(1023)) << np.int64(52))

    @_inline
    def _log1p32(w):
        """log(1 + w) for 0 <= w <= 1 in float32: 2 atanh(s), s = w / (2 + w) <= 1/3."""
        s = w / (np.float32(2.0) + w)
        q = s * s
        p = np.float32(1.0 / 13.0)
        p = p * q + np.float32(1.0 / 11.0)
        p = p * q + np.float32(1.0 / 9.0)
        p = p * q + np.float32(1.0 / 7.0)
        p = p * q + np.float32(1.0 / 5.0)
        p = p * q + np.float32(1.0 / 3.0)
        p = p * q + np.float32(1.0)
        return np.float32(2.0) * s * p

    @_inline
    def _log1p64(w):
        """log(1 + w) for 0 <= w <= 1 in float64 (the series to s^33: below 1e-17)."""
        s = w / (2.0 + w)
        q = s * s
        p = 1.0 / 33.0
        # 1/31, 1/29, ..., 1/1 (written out: a loop here trips numba's SSA checks when
        # inlined)
        p = p * q + 1.0 / 31.0
        p = p * q + 1.0 / 29.0
        p = p * q + 1.0 / 27.0
        p = p * q + 1.0 / 25.0
        p = p * q + 1.0 / 23.0
        p = p * q + 1.0 / 21.0
        p = p * q + 1.0 / 19.0
        p = p * q + 1.0 / 17.0
        p = p * q + 1.0 / 15.0
        p = p * q + 1.0 / 13.0
        p = p * q + 1.0 / 11.0
        p = p * q + 1.0 / 9.0
        p = p * q + 1.0 / 7.0
        p = p * q + 1.0 / 5.0
        p = p * q + 1.0 / 3.0
        p = p * q + 1.0 / 1.0
        return 2.0 * s * p

    # Type-generic helpers: one top-level kernel per operation (cacheable on disk, as closures
    # are not) picks the float32 or float64 versions at compile time.
    def _exp(x):  # pragma: no cover - replaced by the overload inside kernels
        raise NotImplementedError

    def _log1p(x):  # pragma: no cover
        raise NotImplementedError

    def _zero(a):  # pragma: no cover
        raise NotImplementedError

    def _one(a):  # pragma: no cover
        raise NotImplementedError

    @overload(_exp, inline="always", fastmath=_FLAGS)
    def _exp_impl(x):
        if x == types.float32:
            return lambda x: _exp32(x)
        if x == types.float64:
            return lambda x: _exp64(x)
        return None

    @overload(_log1p, inline="always", fastmath=_FLAGS)
    def _log1p_impl(x):
        if x == types.float32:
            return lambda x: _log1p32(x)
        if x == types.float64:
            return lambda x: _log1p64(x)
        return None

    # 0 and 1 in the dtype of an array or a scalar (a float32 plus an int literal is float64
    # in numba: the float32 kernels would silently compute in float64)
    @overload(_zero, inline="always")
    def _zero_impl(a):
        if getattr(a, "dtype", a) == types.float32:
            return lambda a: np.float32(0.0)
        return lambda a: 0.0

    @overload(_one, inline="always")
    def _one_impl(a):
        if getattr(a, "dtype", a) == types.float32:
            return lambda a: np.float32(1.0)
        return lambda a: 1.0

    @_inline
    def _sigmoid(a):
        one = _one(a)
        e = _exp(-abs(a))  # from exp(-|a|) only: never overflows
        return one / (one + e) if a >= 0 else e / (one + e)

    @_inline
    def _silu(a):
        return a * _sigmoid(a)

    @_inline
    def _softplus(v):
        return max(v, _zero(v)) + _log1p(_exp(-abs(v)))

    @_inline
    def _conv_step(xz, w, bias, state, b, t, out):
        # out (E,) = bias + sum_j w[j] x[b, t-K+1+j] (the conv before its SiLU), x = xz[...,
        # :E], w (K,E); positions before 0 come from state (B,E,K: the last K inputs)
        width = w.shape[0]
        out[:] = bias
        for j in range(width):
            p = t - width + 1 + j
            w_row = w[j]
            if p >= 0:
                x_row = xz[b, p]
                for e in range(out.shape[0]):
                    out[e] += w_row[e] * x_row[e]
            else:  # the first steps reach into the state
                for e in range(out.shape[0]):
                    out[e] += w_row[e] * state[b, e, width + p]

    @_jit
    def _conv_silu(xz, w, bias, state, u, new_state):
        # u[b,t] = silu(`_conv_step`); new_state (B,E,K): the last K inputs, oldest first
        batch, length, channels = u.shape
        width = w.shape[0]
        for b in range(batch):
            for t in range(length):
                u_row = u[b, t]
                _conv_step(xz, w, bias, state, b, t, u_row)
                for e in range(channels):
                    u_row[e] = _silu(u_row[e])
            for j in range(width):
                p = length - width + j
                for e in range(channels):
                    new_state[b, e, j] = xz[b, p, e] if p >= 0 else state[b, e, width + p]

    @_jit
    def _conv_silu_adjoint(xz, w, bias, state, d_u, d_new, d_xz, d_w, d_bias, d_state, pre):
        # the backward pass of `_conv_silu`: d_u (B,L,E) = dLoss/du, d_new (B,E,K) = dLoss/d
        # new_state -> d_xz[..., :E] (dLoss/dx, written: the caller's buffer, whose other
        # columns it fills itself), d_w (K,E), d_bias (E,), d_state (B,E,K) (accumulated: zero
        # them first).  pre (E,) scratch: the conv's output before the SiLU, recomputed.
        batch, length, channels = d_u.shape
        width = w.shape[0]
        one = _one(xz)
        for b in range(batch):
            for t in range(length):
                d_xz[b, t, :channels] = 0
            for j in range(width):  # the new state: the last K inputs (some from the state)
                p = length - width + j
                if p >= 0:
                    dx_row = d_xz[b, p]
                    for e in range(channels):
                        dx_row[e] += d_new[b, e, j]
                else:
                    for e in range(channels):
                        d_state[b, e, length + j] += d_new[b, e, j]
            for t in range(length):
                _conv_step(xz, w, bias, state, b, t, pre)
                du_row = d_u[b, t]
                for e in range(channels):  # d silu(v)/dv = s (1 + v (1 - s)), s = sigmoid(v)
                    v = pre[e]
                    sv = _sigmoid(v)
                    g = du_row[e] * sv * (one + v * (one - sv))
                    pre[e] = g
                    d_bias[e] += g
                for j in range(width):
                    p = t - width + 1 + j
                    w_row = w[j]
                    dw_row = d_w[j]
                    if p >= 0:
                        x_row = xz[b, p]
                        dx_row = d_xz[b, p]
                        for e in range(channels):
                            dx_row[e] += w_row[e] * pre[e]
                            dw_row[e] += pre[e] * x_row[e]
                    else:
                        for e in range(channels):
                            d_state[b, e, width + p] += w_row[e] * pre[e]
                            dw_row[e] += pre[e] * state[b, e, width + p]

    @_jit
    def _scan(u, dt, A, Bm, Cm, keep, h, y, starts, chunk, b0, b1, e0, e1):
        # the plain scan: h (B,E,N) updated in place; y (B,L,E) = h.C; keep (B,L) 0/1;
        # chunk > 0: the state before every chunk-th step into starts (L/chunk, B, E, N),
        # what the backward pass recomputes from
        length = u.shape[1]
        n_state = A.shape[1]
        zero = _zero(u)
        for b in range(b0, b1):
            for t in range(length):
                b_row = Bm[b, t]
                c_row = Cm[b, t]
                if keep[b, t] == 0:  # a packed sequence starts: from a zero state
                    h[b, e0:e1] = zero
                if chunk > 0 and t % chunk == 0:
                    starts[t // chunk, b, e0:e1] = h[b, e0:e1]
                for e in range(e0, e1):  # (no branch in here: it measured 1.2-1.4x slower)
                    d = dt[b, t, e]
                    du = d * u[b, t, e]
                    h_row = h[b, e]
                    a_row = A[e]
                    acc = zero
                    for n in range(n_state):
                        v = _exp(d * a_row[n]) * h_row[n] + du * b_row[n]
                        h_row[n] = v
                        acc += v * c_row[n]
                    y[b, t, e] = acc

    @_inline
    def _conv_silu_token(x, w, bias, s_in, s_out, u):
        # one token of the causal depthwise conv + SiLU, channel by channel: u[c] =
        # silu(bias[c] + sum_j w[c, j] s_in[c, j+1] + w[c, K-1] x[c]); s_out (C,K) = the
        # state's last K-1 inputs (s_in (C,K), oldest first, only read) and x
        width = w.shape[1]
        for c in range(u.shape[0]):
            s_row, w_row = s_in[c], w[c]
            acc = bias[c] + w_row[width - 1] * x[c]
            for j in range(width - 1):
                acc += w_row[j] * s_row[j + 1]
                s_out[c, j] = s_row[j + 1]
            s_out[c, width - 1] = x[c]
            u[c] = acc
        for c in range(u.shape[0]):
            u[c] = _silu(u[c])

    @_inline
    def _state_row(h_row, a_row, b_row, c_row, d, du):
        # one channel's step, in place: h = exp(d A) h + du B; returns h.C
        acc = _zero(h_row)
        for n in range(h_row.shape[0]):
            v = _exp(d * a_row[n]) * h_row[n] + du * b_row[n]
            h_row[n] = v
            acc += v * c_row[n]
        return acc

    @_inline
    def _state_row_to(h_src, h_dst, a_row, b_row, c_row, d, du):
        # `_state_row` from h_src into a distinct h_dst, in one pass: a decode step reads the
        # old state and writes the new one (copying the row then updating it in place
        # measured 2.6x slower: that pair did not vectorise; `_state_row` given the same row
        # twice would not either, so the in-place scan keeps its own)
        acc = _zero(h_dst)
        for n in range(h_dst.shape[0]):
            v = _exp(d * a_row[n]) * h_src[n] + du * b_row[n]
            h_dst[n] = v
            acc += v * c_row[n]
        return acc

    @_jit
    def _fused_scan(u, dt_pre, dt_bias, A, bs, ob, cs, oc, D, z, oz, h_in, h, y, starts,
                    chunk, dts, b0, b1, e0, e1):  # fmt: skip
        # the official fused selective scan: dt = softplus(dt_pre + dt_bias);
        # h = exp(dt A) h + dt u B;  y = (h.C + D u) * silu(z), with B = bs[..., ob:ob+N],
        # C = cs[..., oc:oc+N], z = z[..., oz:oz+E] (column blocks of the projections'
        # outputs, or whole arrays at offset 0).  The state starts from h_in (only read) and
        # ends in h; chunk > 0: the state before every chunk-th step into starts (L/chunk, B,
        # E, N), for the backward pass.  dts: (E,) scratch
        # The channel loops index views of the block from 0 (j = e - e0): with a start of 0
        # LLVM drops numba's negative-index wraparound and vectorises them (from e0 it
        # gathered and scattered lane by lane).
        length = u.shape[1]
        n_state = A.shape[1]
        width = e1 - e0
        a_blk, bias, skip = A[e0:e1], dt_bias[e0:e1], D[e0:e1]
        for b in range(b0, b1):
            # the block's state rows start as h_in's (a copy in the loop: reading h_in in the
            # first step instead would leave LLVM unsure whether it overlaps h, unvectorised)
            h_blk = h[b, e0:e1]
            h_blk[:] = h_in[b, e0:e1]
            for t in range(length):
                if chunk > 0 and t % chunk == 0:
                    starts[t // chunk, b, e0:e1] = h_blk
                u_t = u[b, t, e0:e1]
                dp_t = dt_pre[b, t, e0:e1]
                for j in range(width):  # softplus, vectorised over channels
                    dts[j] = _softplus(dp_t[j] + bias[j])
                b_row = bs[b, t, ob : ob + n_state]
                c_row = cs[b, t, oc : oc + n_state]
                for j in range(width):
                    d = dts[j]
                    dts[j] = _state_row(h_blk[j], a_blk[j], b_row, c_row, d, d * u_t[j])
                z_t = z[b, t, oz + e0 : oz + e1]
                y_t = y[b, t, e0:e1]
                for j in range(width):  # skip and gate, vectorised over channels
                    y_t[j] = (dts[j] + skip[j] * u_t[j]) * _silu(z_t[j])

    @_jit
    def _fused_step(xz, w, bias, conv_in, x_proj_w, dt_proj_w, dt_bias, A, D, h_in, conv_out,
                    h, y, u, x_dbl, rows, b0, b1):  # fmt: skip
        # one decode step of the Mamba-1 mixer after in_proj, for batch rows b0..b1: xz (B,2E)
        # the in_proj output; the conv (w (E,K), bias, state conv_in (B,E,K), oldest first)
        # and SiLU into u; x_dbl = x_proj_w u; dt = softplus(dt_proj_w x_dbl[:R] + dt_bias);
        # h = exp(dt A) h_in + dt u B; y (B,E) = (h.C + D u) silu(z).  The new states go to
        # conv_out and h (h_in, conv_in only read).  u (E,), x_dbl (R+2N,), rows (E,) scratch.
        channels, n_state = A.shape
        rank = dt_proj_w.shape[1]
        zero = _zero(u)
        for b in range(b0, b1):
            x_row = xz[b]
            _conv_silu_token(x_row[:channels], w, bias, conv_in[b], conv_out[b], u)
            for k in range(x_dbl.shape[0]):  # x_proj: one dot product per output
                p_row = x_proj_w[k]
                acc = zero
                for e in range(channels):
                    acc += p_row[e] * u[e]
                x_dbl[k] = acc
            for e in range(channels):  # dt_proj
                d_row = dt_proj_w[e]
                acc = dt_bias[e]
                for r in range(rank):
                    acc += d_row[r] * x_dbl[r]
                rows[e] = acc
            for e in range(channels):  # softplus, vectorised over channels
                rows[e] = _softplus(rows[e])
            b_row = x_dbl[rank : rank + n_state]
            c_row = x_dbl[rank + n_state :]
            for e in range(channels):
                d = rows[e]
                rows[e] = _state_row_to(h_in[b, e], h[b, e], A[e], b_row, c_row, d, d * u[e])
            y_row = y[b]
            for e in range(channels):  # skip and gate, vectorised over channels
                y_row[e] = (rows[e] + D[e] * u[e]) * _silu(x_row[channels + e])

    @_inline
    def _head_row_to(h_src, h_dst, decay, b_row, c_row, dx):
        # one channel of a Mamba-2 head from h_src into a distinct h_dst: h = decay h_src +
        # dx B (the decay is the head's scalar); returns h.C
        acc = _zero(h_dst)
        for n in range(h_dst.shape[0]):
            v = decay * h_src[n] + dx * b_row[n]
            h_dst[n] = v
            acc += v * c_row[n]
        return acc

    @_jit
    def _fused_step2(proj, w, bias, conv_in, dt_bias, A, D, norm_w, h_in, conv_out, h, y,
                     groups, lo, hi, clamp_lo, clamp_hi, eps, inv_size, xbc, dts, b0,
                     b1):  # fmt: skip
        # one decode step of the Mamba-2 mixer after in_proj, for batch rows b0..b1: proj
        # (B, 2E+2GN+H) = [z | xBC | dt pre-activations]; the conv (w (C,K), bias, state
        # conv_in (B,C,K), oldest first) and SiLU into xbc (C,) = [x | B (G,N) | C (G,N)];
        # dt = softplus(dt + dt_bias) clamped to [lo, hi] where asked; per head h: decay =
        # exp(dt A_h), S = decay S_in + dt x B_g(h), y = S.C_g(h) + D_h x; then y * silu(z)
        # RMS-normalised over each of the G groups of channels (inv_size = G/E), times
        # norm_w.  The new states go to conv_out and h (conv_in, h_in only read).  xbc (C,),
        # dts (H,) scratch.  lo, hi, eps, inv_size: scalars of the arrays' dtype.
        heads, head_dim, n_state = h_in.shape[1], h_in.shape[2], h_in.shape[3]
        channels = w.shape[0]
        inner = heads * head_dim
        per_group = heads // groups
        group_size = inner // groups
        for b in range(b0, b1):
            row = proj[b]
            _conv_silu_token(row[inner : inner + channels], w, bias, conv_in[b], conv_out[b], xbc)
            for k in range(heads):
                d = _softplus(row[inner + channels + k] + dt_bias[k])
                if clamp_lo and d < lo:  # (comparisons: a NaN dt stays NaN)
                    d = lo
                if clamp_hi and d > hi:
                    d = hi
                dts[k] = d
            y_row = y[b]
            for k in range(heads):
                d = dts[k]
                decay = _exp(d * A[k])
                g0 = inner + (k // per_group) * n_state
                b_row = xbc[g0 : g0 + n_state]
                c_row = xbc[g0 + groups * n_state : g0 + groups * n_state + n_state]
                for p in range(head_dim):
                    i = k * head_dim + p
                    xv = xbc[i]
                    y_row[i] = _head_row_to(
                        h_in[b, k, p], h[b, k, p], decay, b_row, c_row, d * xv
                    ) + D[k] * xv  # fmt: skip
            for g in range(groups):  # the gated RMSNorm, group by group
                ss = _zero(eps)
                for i in range(g * group_size, (g + 1) * group_size):
                    v = y_row[i] * _silu(row[i])
                    y_row[i] = v
                    ss += v * v
                scale = _one(eps) / np.sqrt(ss * inv_size + eps)
                for i in range(g * group_size, (g + 1) * group_size):
                    y_row[i] = y_row[i] * scale * norm_w[i]

    @_jit
    def _exp_into(v, out, r0, r1):
        # out = exp(v) elementwise for v <= 0 (the kernels' own exponential), items r0..r1
        # (views indexed from 0: see `_fused_scan`)
        src, dst = v[r0:r1], out[r0:r1]
        for i in range(dst.shape[0]):
            dst[i] = _exp(src[i])

    @_inline
    def _head_row(h_row, decay, b_row, c_row, dx):
        # one channel of a Mamba-2 head, in place: h = decay h + dx B; returns h.C
        acc = _zero(h_row)
        for n in range(h_row.shape[0]):
            v = decay * h_row[n] + dx * b_row[n]
            h_row[n] = v
            acc += v * c_row[n]
        return acc

    @_jit
    def _ssd_scan(xs, ox, bs, ob, cs, oc, dts, odt, dt_bias, A, D, keep, s_in, s, y, heads,
                  groups, pre, lo, hi, clamp_lo, clamp_hi, q0, q1):  # fmt: skip
        # the Mamba-2 recurrence for the (batch row, head) pairs q0..q1 (q = b * H + h), one
        # head's (P, N) state in cache for the whole sequence: per step, dt = dts[..., odt +
        # h] (`pre`: softplus(dt + dt_bias), clamped to [lo, hi] where asked), decay =
        # exp(dt A_h) (* keep[b, t]: packed restarts; keep of shape (0, 0): none), and per
        # channel p: S[p] = decay S[p] + dt x[p] B_g, y[p] = S[p].C_g + D_h x[p], with x =
        # xs[..., ox : ox + H*P], B = bs[..., ob : ob + G*N], C = cs[..., oc : oc + G*N]
        # (column blocks of larger arrays, group g(h) = h // (H/G)).  The state starts from
        # s_in (only read) and ends in s.
        length = y.shape[1]
        head_dim, n_state = s.shape[2], s.shape[3]
        per_group = heads // groups
        packed = keep.shape[0] > 0
        for q in range(q0, q1):
            b, k = q // heads, q % heads
            g0 = (k // per_group) * n_state
            state = s[b, k]
            state[:] = s_in[b, k]
            skip, a_k = D[k], A[k]
            for t in range(length):
                d = dts[b, t, odt + k]
                if pre:
                    d = _softplus(d + dt_bias[k])
                    if clamp_lo and d < lo:  # (comparisons: a NaN dt stays NaN)
                        d = lo
                    if clamp_hi and d > hi:
                        d = hi
                decay = _exp(d * a_k)
                if packed:
                    decay *= keep[b, t]
                x_row = xs[b, t, ox + k * head_dim : ox + (k + 1) * head_dim]
                b_row = bs[b, t, ob + g0 : ob + g0 + n_state]
                c_row = cs[b, t, oc + g0 : oc + g0 + n_state]
                y_row = y[b, t, k * head_dim : (k + 1) * head_dim]
                for p in range(head_dim):
                    xv = x_row[p]
                    y_row[p] = _head_row(state[p], decay, b_row, c_row, d * xv) + skip * xv

    @_jit
    def _gated_norm(y, z, oz, weight, groups, eps, r0, r1):
        # Mamba-2's gated RMSNorm in place, rows r0..r1 of y (R, E): y = RMS over each of the
        # G channel groups of (y silu(z)), times weight; z = z[:, oz : oz + E]
        width = y.shape[1]
        size = width // groups
        inv = _one(eps) / size
        for r in range(r0, r1):
            y_row = y[r]
            z_row = z[r, oz : oz + width]
            for i in range(width):
                y_row[i] = y_row[i] * _silu(z_row[i])
            for g in range(groups):
                part = y_row[g * size : (g + 1) * size]
                ss = _zero(eps)
                for i in range(size):
                    ss += part[i] * part[i]
                scale = _one(eps) / np.sqrt(ss * inv + eps)
                w_part = weight[g * size : (g + 1) * size]
                for i in range(size):
                    part[i] = part[i] * scale * w_part[i]

    @_inline
    def _rotate_pairs(m, cos, sin, halved):
        # rotate the S angle pairs of the N-vector m in place: (a, b) -> (a cos - b sin,
        # a sin + b cos); pairs (2j, 2j+1) (SISO) or (j, j + N/2) (MIMO, `halved`)
        half = m.shape[0] // 2
        for j in range(cos.shape[0]):
            i0, i1 = (j, j + half) if halved else (2 * j, 2 * j + 1)
            a, b = m[i0], m[i1]
            m[i0] = a * cos[j] - b * sin[j]
            m[i1] = a * sin[j] + b * cos[j]

    @_inline
    def _rms_rows(src, weight, dst, eps, inv_n):
        # dst[i] = src[i] / sqrt(mean(src[i]^2) + eps) * weight, row by row (src read in place)
        for i in range(dst.shape[0]):
            ss = _zero(eps)
            for n in range(dst.shape[1]):
                ss += src[i, n] * src[i, n]
            scale = _one(eps) / np.sqrt(ss * inv_n + eps)
            for n in range(dst.shape[1]):
                dst[i, n] = src[i, n] * scale * weight[n]

    @_jit
    def _fused_step3(proj, dt_bias, b_bias, c_bias, b_norm, c_norm, D, mimo_x, mimo_z, mimo_o,
                     norm_w, angle_in, h_in, k_in, v_in, angle_out, h, k_out, v_out, y, groups,
                     halved, outproj_norm, a_floor, eps, pi, bn, cn, qt, vr, vp, yr, tang, cs,
                     sn, b0, b1):  # fmt: skip
        # one decode step of the Mamba-3 mixer after in_proj, for batch rows b0..b1: proj
        # (B, 2E+2RGN+3H+S) = [z | x | Bp (R,G,N) | Cp | dd_dt | dd_A | trap | ang]; B and C
        # RMS-normalised (bn, cn (R*G, N) scratch); per head: dt = softplus(dd_dt + dt_bias),
        # A = -max(f(dd_A), a_floor), alpha = exp(dt A), lam = sigmoid(trap), beta = (1-lam) dt
        # alpha, gam = lam dt; the angles phi = angle_in + pi tanh(ang) dt (mod 2 pi) rotate
        # k_r = bn + B_bias (into k_out, the new key state) and q_r = cn + C_bias (qt);
        # v_r = x mimo_x_r; h = alpha h_in + beta sum_r v_prev,r k_in_r^T + gam sum_r v_r
        # k_r^T; y_r = h q_r + D v_r, [RMS over the head's P channels * norm_w], * silu(z
        # mimo_z_r), summed over r with mimo_o.  SISO passes mimo_* of ones (R = 1: exact).
        # The new states go to angle_out, h, k_out, v_out (the *_in only read).  vr, vp, yr
        # (R, P), tang, cs, sn (S,) scratch; a_floor, eps, pi: scalars of the arrays' dtype.
        ranks, heads, n_state = k_in.shape[1], k_in.shape[2], k_in.shape[3]
        head_dim = h_in.shape[2]
        inner = heads * head_dim
        per_group = heads // groups
        width = ranks * groups * n_state
        o_dt = 2 * inner + 2 * width
        o_ang = o_dt + 3 * heads
        two_pi = pi + pi
        inv_two_pi = _one(pi) / two_pi
        one = _one(pi)
        for b in range(b0, b1):
            row = proj[b]
            _rms_rows(row[2 * inner : 2 * inner + width].reshape((ranks * groups, n_state)),
                      b_norm, bn, eps, one / n_state)  # fmt: skip
            _rms_rows(row[2 * inner + width : o_dt].reshape((ranks * groups, n_state)),
                      c_norm, cn, eps, one / n_state)  # fmt: skip
            for j in range(tang.shape[0]):
                tang[j] = pi * np.tanh(row[o_ang + j])
            y_row = y[b]
            for k in range(heads):
                g0 = k // per_group
                d = _softplus(row[o_dt + k] + dt_bias[k])
                dd_a = row[o_dt + heads + k]
                f = one + dd_a if dd_a >= 0 else one / (one - dd_a)
                alpha = _exp(-max(f, a_floor) * d)
                lam = _sigmoid(row[o_dt + 2 * heads + k])
                beta = (one - lam) * d * alpha
                gam = lam * d
                for j in range(tang.shape[0]):
                    inc = tang[j] * d
                    inc -= two_pi * np.floor(inc * inv_two_pi)
                    phi = angle_in[b, k, j] + inc
                    phi -= two_pi * np.floor(phi * inv_two_pi)
                    angle_out[b, k, j] = phi
                    cs[j] = np.cos(phi)
                    sn[j] = np.sin(phi)
                x_now = row[inner + k * head_dim : inner + (k + 1) * head_dim]
                x_old = v_in[b, k]
                v_out[b, k] = x_now
                for r in range(ranks):
                    key, query = k_out[b, r, k], qt[r]
                    src_b, src_c = bn[r * groups + g0], cn[r * groups + g0]
                    bias_b, bias_c = b_bias[k, r], c_bias[k, r]
                    for n in range(n_state):
                        key[n] = src_b[n] + bias_b[n]
                        query[n] = src_c[n] + bias_c[n]
                    _rotate_pairs(key, cs, sn, halved)
                    _rotate_pairs(query, cs, sn, halved)
                    mx = mimo_x[k, r]
                    for p in range(head_dim):
                        vr[r, p] = x_now[p] * mx[p]
                        vp[r, p] = x_old[p] * mx[p]
                skip = D[k]
                for p in range(head_dim):
                    src, dst = h_in[b, k, p], h[b, k, p]
                    c_old, c_new = beta * vp[0, p], gam * vr[0, p]
                    k_old, k_new = k_in[b, 0, k], k_out[b, 0, k]
                    for n in range(n_state):
                        dst[n] = alpha * src[n] + c_old * k_old[n] + c_new * k_new[n]
                    for r in range(1, ranks):
                        c_old, c_new = beta * vp[r, p], gam * vr[r, p]
                        k_old, k_new = k_in[b, r, k], k_out[b, r, k]
                        for n in range(n_state):
                            dst[n] += c_old * k_old[n] + c_new * k_new[n]
                    for r in range(ranks):
                        query = qt[r]
                        acc = _zero(pi)
                        for n in range(n_state):
                            acc += dst[n] * query[n]
                        yr[r, p] = acc + skip * vr[r, p]
                out = y_row[k * head_dim : (k + 1) * head_dim]
                z = row[k * head_dim : (k + 1) * head_dim]
                out[:] = 0
                for r in range(ranks):
                    y_r = yr[r]
                    if outproj_norm:
                        ss = _zero(pi)
                        for p in range(head_dim):
                            ss += y_r[p] * y_r[p]
                        scale = one / np.sqrt(ss / head_dim + eps)
                        for p in range(head_dim):
                            y_r[p] = y_r[p] * scale * norm_w[k * head_dim + p]
                    mz, mo = mimo_z[k, r], mimo_o[k, r]
                    for p in range(head_dim):
                        out[p] += mo[p] * (y_r[p] * _silu(z[p] * mz[p]))

    @_jit
    def _fused_adjoint(u, dt_pre, dt_bias, A, bs, ob, cs, oc, D, z, oz, starts, chunk, dout, g,
                       hs, aa, rows, d_u, d_dtp, d_z, odz, d_b, d_c, d_a, d_d, d_bias, tile,
                       b0, b1, e0, e1):  # fmt: skip
        # the backward pass of `_fused_scan` (see `fused_scan_backward`), `tile` channels at a
        # time (their scratch stays in cache): per chunk from the end, recompute its states
        # from starts into hs (chunk + 1, tile, N: hs[0] the chunk's start) and its decays into
        # aa (chunk, tile, N), then walk it backwards with G (g: (B,E,N), dLoss/dh) and every
        # gradient.  rows (4, E) scratch: dt, sigmoid(dt_pre + bias), dLoss/d(h.C + D u) and
        # sigmoid(z) of the current step; d_b, d_c (B,L,N), d_a (E,N), d_d, d_bias (E,) are
        # this block's own partial sums; dLoss/dz goes to d_z[..., odz : odz + E]
        length = u.shape[1]
        n_state = A.shape[1]
        zero = _zero(u)
        one = _one(u)
        for b in range(b0, b1):
            for f0 in range(e0, e1, tile):
                f1 = min(f0 + tile, e1)
                width = f1 - f0  # the tile's views are indexed from 0 (see `_fused_scan`)
                a_blk, bias, skip = A[f0:f1], dt_bias[f0:f1], D[f0:f1]
                g_blk, da_blk = g[b, f0:f1], d_a[f0:f1]
                dd_blk, dbias_blk = d_d[f0:f1], d_bias[f0:f1]
                for c0 in range((length - 1) // chunk * chunk, -1, -chunk):
                    c1 = min(c0 + chunk, length)
                    hs[0, :width] = starts[c0 // chunk, b, f0:f1]
                    for t in range(c0, c1):  # recompute the chunk's states and decays
                        k = t - c0
                        u_t = u[b, t, f0:f1]
                        dp_t = dt_pre[b, t, f0:f1]
                        for j in range(width):
                            rows[0, j] = _softplus(dp_t[j] + bias[j])
                        b_row = bs[b, t, ob : ob + n_state]
                        for j in range(width):
                            d = rows[0, j]
                            du = d * u_t[j]
                            a_row = a_blk[j]
                            prev = hs[k, j]
                            out = hs[k + 1, j]
                            dec = aa[k, j]
                            for n in range(n_state):
                                a = _exp(d * a_row[n])
                                dec[n] = a
                                out[n] = a * prev[n] + du * b_row[n]
                    for t in range(c1 - 1, c0 - 1, -1):
                        k = t - c0
                        u_t = u[b, t, f0:f1]
                        dp_t = dt_pre[b, t, f0:f1]
                        z_t = z[b, t, oz + f0 : oz + f1]
                        dout_t = dout[b, t, f0:f1]
                        for j in range(width):
                            v = dp_t[j] + bias[j]
                            rows[0, j] = _softplus(v)
                            rows[1, j] = _sigmoid(v)
                            zz = z_t[j]
                            sz = _sigmoid(zz)
                            rows[2, j] = dout_t[j] * zz * sz  # dLoss/d(h.C + D u)
                            rows[3, j] = sz
                        b_row = bs[b, t, ob : ob + n_state]
                        c_row = cs[b, t, oc : oc + n_state]
                        db_row = d_b[b, t]
                        dc_row = d_c[b, t]
                        dz_t = d_z[b, t, odz + f0 : odz + f1]
                        ddtp_t = d_dtp[b, t, f0:f1]
                        du_t = d_u[b, t, f0:f1]
                        for j in range(width):
                            d = rows[0, j]
                            uu = u_t[j]
                            du = d * uu
                            dyt = rows[2, j]
                            a_row = a_blk[j]
                            da_row = da_blk[j]
                            g_row = g_blk[j]
                            prev = hs[k, j]
                            cur = hs[k + 1, j]
                            dec = aa[k, j]
                            sa = zero
                            gb = zero
                            ys = zero
                            for n in range(n_state):
                                a = dec[n]
                                gn = g_row[n] + dyt * c_row[n]
                                s = gn * prev[n] * a
                                sa += s * a_row[n]
                                gb += gn * b_row[n]
                                ys += cur[n] * c_row[n]
                                da_row[n] += s * d
                                db_row[n] += gn * du
                                dc_row[n] += cur[n] * dyt
                                g_row[n] = a * gn
                            sz = rows[3, j]
                            zz = z_t[j]
                            full = ys + skip[j] * uu
                            dz_t[j] = dout_t[j] * full * sz * (one + zz * (one - sz))
                            grad_v = (sa + uu * gb) * rows[1, j]
                            ddtp_t[j] = grad_v
                            du_t[j] = d * gb + dyt * skip[j]
                            dd_blk[j] += dyt * uu
                            dbias_blk[j] += grad_v

    @_jit
    def _scan_adjoint(u, dt, A, Bm, Cm, starts, chunk, dy, g, hs, d_u, d_dt, d_b, d_c, d_a,
                      b0, b1, e0, e1):  # fmt: skip
        # the adjoint recurrence, chunk by chunk from the end (see `scan_backward`); g (B,E,N)
        # holds dLoss/dh (in: after the last step; out: before the first); hs (chunk, E, N)
        # scratch; d_b, d_c (B,L,N) and d_a (E,N) are this block's own partial sums
        length = u.shape[1]
        n_state = A.shape[1]
        zero = _zero(u)
        for b in range(b0, b1):
            for c0 in range((length - 1) // chunk * chunk, -1, -chunk):
                c1 = min(c0 + chunk, length)
                for t in range(c0, c1):  # recompute the chunk's states
                    b_row = Bm[b, t]
                    for e in range(e0, e1):
                        d = dt[b, t, e]
                        du = d * u[b, t, e]
                        a_row = A[e]
                        prev = starts[c0 // chunk, b, e] if t == c0 else hs[t - c0 - 1, e - e0]
                        out = hs[t - c0, e - e0]
                        for n in range(n_state):
                            out[n] = _exp(d * a_row[n]) * prev[n] + du * b_row[n]
                for t in range(c1 - 1, c0 - 1, -1):  # and walk it backwards
                    b_row = Bm[b, t]
                    c_row = Cm[b, t]
                    db_row = d_b[b, t]
                    dc_row = d_c[b, t]
                    for e in range(e0, e1):
                        d = dt[b, t, e]
                        uu = u[b, t, e]
                        du = d * uu
                        dyt = dy[b, t, e]
                        a_row = A[e]
                        da_row = d_a[e]
                        g_row = g[b, e]
                        prev = starts[c0 // chunk, b, e] if t == c0 else hs[t - c0 - 1, e - e0]
                        cur = hs[t - c0, e - e0]
                        sa = zero
                        gb = zero
                        for n in range(n_state):
                            a = _exp(d * a_row[n])
                            gn = g_row[n] + dyt * c_row[n]
                            s = gn * prev[n] * a
                            sa += s * a_row[n]
                            gb += gn * b_row[n]
                            da_row[n] += s * d
                            db_row[n] += gn * du
                            dc_row[n] += cur[n] * dyt
                            g_row[n] = a * gn
                        d_dt[b, t, e] = sa + uu * gb
                        d_u[b, t, e] = d * gb

    _KERNELS = {
        np.dtype(dtype): (
            _conv_silu,
            _scan,
            _fused_scan,
            _scan_adjoint,
            _fused_adjoint,
            _conv_silu_adjoint,
            _fused_step,
            _fused_step2,
            _fused_step3,
            _ssd_scan,
            _gated_norm,
            _exp_into,
        )
        for dtype in (np.float32, np.float64)
    }
else:  # pragma: no cover
    _KERNELS = {}


_DTYPE_OK: dict[Any, bool] = {}


def supports(dtype: Any) -> bool:
    """Whether the kernels run this dtype (float32, float64; a NumPy or torch dtype)."""
    ok = _DTYPE_OK.get(dtype)
    if ok is None:  # by name, once per dtype: torch.float32 -> float32
        ok = _DTYPE_OK[dtype] = str(dtype).rsplit(".", 1)[-1] in ("float32", "float64")
    return ok and available()


def _c(a: np.ndarray, dtype) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=dtype)


def _run(name: str, kernel, args: tuple, batch: int, channels: int, work: int, threads):
    """`kernel(*args, b0, b1, e0, e1)` over (batch, channel) blocks on the scan pool."""
    _warm(name, kernel, *args)

    def run(b0: int, b1: int, e0: int, e1: int) -> None:
        kernel(*args, b0, b1, e0, e1)

    run_blocks(run, batch, channels, work, threads)


def scan(u, dt, A, Bm, Cm, h0, *, keep=None, threads: int | None = None):
    """The Mamba-1 selective scan (`mamba_core.scan`'s `linear`), compiled.

    u, dt (B,L,E); A (E,N); Bm, Cm (B,L,N); h0 (B,E,N); keep (B,L) or None (0 where a packed
    sequence starts) -> y (B,L,E), h_L (B,E,N).  Float32 or float64 NumPy arrays (all one
    dtype); (batch row, channel block) slices run on the scan thread pool.
    """
    dtype = np.dtype(u.dtype)
    batch, length, channels = u.shape
    u, dt, A, Bm, Cm = (_c(a, dtype) for a in (u, dt, A, Bm, Cm))
    h = np.array(h0, dtype=dtype, copy=True, order="C")
    keep = np.ones((batch, length), dtype) if keep is None else _c(keep, dtype)
    y = np.empty((batch, length, channels), dtype=dtype)
    args = (u, dt, A, Bm, Cm, keep, h, y, np.empty((0, *h.shape), dtype), 0)
    work = batch * length * channels * A.shape[1]
    _run("scan", _KERNELS[dtype][1], args, batch, channels, work, threads)
    return y, h


def conv_silu(xz, weight, bias, state):
    """The causal depthwise conv of Mamba-1 and its SiLU, compiled: u = silu(conv(x) + bias)
    for x = xz[..., :E], continuing from `state` (B,E,K: the last K inputs, oldest first).
    xz (B,L,2E) contiguous; weight (E,K); bias (E,).  Returns u (B,L,E) and the new state."""
    dtype = np.dtype(xz.dtype)
    batch, length, channels = xz.shape[0], xz.shape[1], weight.shape[0]
    u = np.empty((batch, length, channels), dtype=dtype)
    new_state = np.empty_like(state)
    args = (xz, _c(weight.T, dtype), _c(bias, dtype), _c(state, dtype), u, new_state)
    _timed("conv_silu", _KERNELS[dtype][0], *args)
    return u, new_state


def conv_silu_backward(xz, weight, bias, state, d_u, d_new_state, d_xz=None):
    """The backward pass of `conv_silu`: the gradients of x = xz[..., :E], weight (E,K), bias
    (E,) and state (B,E,K) from d_u (B,L,E) = dLoss/du and d_new_state (B,E,K).  dLoss/dx is
    written to the first E columns of `d_xz` (a C-contiguous (B, L, >= E) buffer, allocated
    as (B, L, E) when None): returns (d_xz, d_weight, d_bias, d_state)."""
    dtype = np.dtype(xz.dtype)
    batch, length, channels = d_u.shape
    if d_xz is None:
        d_xz = np.empty((batch, length, channels), dtype)
    if d_xz.dtype != dtype or not d_xz.flags.c_contiguous or d_xz.shape[:2] != (batch, length):
        raise ValueError(f"d_xz must be a C-contiguous {dtype} (B, L, >= E) buffer")
    d_w = np.zeros((weight.shape[1], channels), dtype)
    d_bias = np.zeros(channels, dtype)
    d_state = np.zeros(state.shape, dtype)
    args = (
        _c(xz, dtype), _c(weight.T, dtype), _c(bias, dtype), _c(state, dtype), _c(d_u, dtype),
        _c(d_new_state, dtype), d_xz, d_w, d_bias, d_state, np.empty(channels, dtype),
    )  # fmt: skip
    _timed("conv_silu_adjoint", _KERNELS[dtype][5], *args)
    return d_xz, d_w.T, d_bias, d_state


def _columns(a: np.ndarray, dtype) -> tuple[np.ndarray, int]:
    """(source, offset) with a == source[..., offset : offset + a.shape[-1]] and source
    C-contiguous: a column block of a contiguous array (B and C of x_proj's output, z of
    in_proj's) is read in place, anything else copied."""
    base = getattr(a, "base", None)
    if (
        isinstance(base, np.ndarray)
        and a.dtype == dtype == base.dtype
        and base.flags.c_contiguous
        and base.shape[:-1] == a.shape[:-1]
        and a.strides == base.strides
    ):
        offset, rest = divmod(a.ctypes.data - base.ctypes.data, a.itemsize)
        if rest == 0 and 0 <= offset <= base.shape[-1] - a.shape[-1]:
            return base, offset
    return _c(a, dtype), 0


def fused_scan(u, dt_pre, dt_bias, A, Bm, Cm, D, z, h0, *, chunk: int = 0, threads=None):
    """The selective scan with its softplus, skip and gate (the official `selective_scan_fn`
    with delta_bias, delta_softplus, D and z), compiled.

    u, dt_pre, z (B,L,E); dt_bias, D (E,); A (E,N); Bm, Cm (B,L,N); h0 (B,E,N).  Bm, Cm and
    z may be column blocks of larger arrays (read in place).  Returns the gated y (B,L,E)
    and h_L; with chunk > 0 also the state before every chunk-th step (ceil(L/chunk), B, E,
    N), what `fused_scan_backward` recomputes from."""
    dtype = np.dtype(u.dtype)
    batch, length, channels = u.shape
    u, dt_pre, h0 = _c(u, dtype), _c(dt_pre, dtype), _c(h0, dtype)
    h = np.empty_like(h0)  # the kernel copies h0's rows in, block by block
    y = np.empty((batch, length, channels), dtype=dtype)
    starts = np.empty((-(-length // chunk) if chunk else 0, *h0.shape), dtype=dtype)
    kernel = _KERNELS[dtype][2]
    work = batch * length * channels * A.shape[1]
    fixed = (
        u, dt_pre, _c(dt_bias, dtype), _c(A, dtype), *_columns(Bm, dtype),
        *_columns(Cm, dtype), _c(D, dtype), *_columns(z, dtype), h0, h, y, starts, chunk,
    )  # fmt: skip
    _warm("fused_scan", kernel, *fixed, np.empty(channels, dtype))

    def run(b0: int, b1: int, e0: int, e1: int) -> None:  # each block its own scratch row
        kernel(*fixed, np.empty(channels, dtype), b0, b1, e0, e1)

    run_blocks(run, batch, channels, work, threads)
    return (y, h, starts) if chunk else (y, h)


def fused_step(xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, conv_state, h0, *,
               threads=None):  # fmt: skip
    """One decode step of the Mamba-1 mixer from its in_proj output, compiled in one kernel:
    the conv step and SiLU, the x_proj and dt_proj products, the softplus, the state update,
    the skip and the gate (what `fused_scan` and `conv_silu` do over a sequence, for L = 1,
    without their per-call work around one step).

    xz (B,2E); conv_w (E,K); conv_b, dt_bias, D (E,); x_proj_w (R+2N,E); dt_proj_w (E,R);
    A (E,N); conv_state (B,E,K); h0 (B,E,N) -> y (B,E) before out_proj, the new
    conv state and h.  Neither state is modified.  Batch rows run on the pool when the step's
    state updates are worth the threads."""
    dtype = np.dtype(xz.dtype)
    batch = xz.shape[0]
    channels, n_state = A.shape
    conv_state, h0 = _c(conv_state, dtype), _c(h0, dtype)
    fixed = (
        _c(xz, dtype), _c(conv_w, dtype), _c(conv_b, dtype), conv_state, _c(x_proj_w, dtype),
        _c(dt_proj_w, dtype), _c(dt_bias, dtype), _c(A, dtype), _c(D, dtype), h0,
        np.empty_like(conv_state), np.empty_like(h0), np.empty((batch, channels), dtype),
    )  # fmt: skip
    kernel = _KERNELS[dtype][6]

    def scratch() -> tuple:  # each block its own u, x_dbl and per-channel row
        return (
            np.empty(channels, dtype), np.empty(x_proj_w.shape[0], dtype),
            np.empty(channels, dtype),
        )  # fmt: skip

    if ("fused_step", dtype.str) not in _SEEN:  # compile / load on an empty block
        _timed("fused_step", kernel, *fixed, *scratch(), 0, 0)
    rows_of = plan_rows(batch, batch * channels * n_state, threads)
    run_all(lambda i: kernel(*fixed, *scratch(), *rows_of[i]), len(rows_of))
    y, new_conv, h = fixed[-1], fixed[-3], fixed[-2]
    return y, new_conv, h


def fused_step2(proj, conv_w, conv_b, conv_state, dt_bias, A, D, norm_w, h0, *, groups: int,
                time_step_limit=(0.0, float("inf")), eps: float, threads=None):  # fmt: skip
    """One decode step of the Mamba-2 mixer from its in_proj output, compiled in one kernel:
    the conv step and SiLU over x, B and C, dt's softplus and clamp, each head's state
    update and read-out, the D skip, the SiLU gate and the grouped RMSNorm (what the core's
    mixer does for L = 1, without its temporaries).

    proj (B, 2E+2GN+H) = [z | xBC | dt]; conv_w (C,K); conv_b (C,); conv_state (B,C,K);
    dt_bias, A, D (H,); norm_w (E,); h0 (B,H,P,N) -> y (B,E) before out_proj, the new conv
    state and state.  Neither state is modified.  Batch rows run on the pool when the
    step's state updates are worth the threads."""
    dtype = np.dtype(proj.dtype)
    batch = proj.shape[0]
    conv_state, h0 = _c(conv_state, dtype), _c(h0, dtype)
    heads, head_dim, n_state = h0.shape[1:]
    lo, hi = time_step_limit
    fixed = (
        _c(proj, dtype), _c(conv_w, dtype), _c(conv_b, dtype), conv_state, _c(dt_bias, dtype),
        _c(A, dtype), _c(D, dtype), _c(norm_w, dtype), h0, np.empty_like(conv_state),
        np.empty_like(h0), np.empty((batch, heads * head_dim), dtype), groups, dtype.type(lo),
        dtype.type(min(hi, np.finfo(dtype).max)), lo > 0, hi < float("inf"), dtype.type(eps),
        dtype.type(groups / (heads * head_dim)),
    )  # fmt: skip
    kernel = _KERNELS[dtype][7]

    def scratch() -> tuple:  # each block its own xBC and dt rows
        return np.empty(conv_w.shape[0], dtype), np.empty(heads, dtype)

    if ("fused_step2", dtype.str) not in _SEEN:  # compile / load on an empty block
        _timed("fused_step2", kernel, *fixed, *scratch(), 0, 0)
    rows_of = plan_rows(batch, batch * heads * head_dim * n_state, threads)
    run_all(lambda i: kernel(*fixed, *scratch(), *rows_of[i]), len(rows_of))
    return fixed[11], fixed[9], fixed[10]


def ssd_scan(x, dt, A, Bm, Cm, S0, *, keep=None, dt_bias=None, D=None,
             time_step_limit=(0.0, float("inf")), threads=None):  # fmt: skip
    """The Mamba-2 scan (`mamba_core.ssd`'s recurrence), compiled: each (batch row, head)
    runs the whole sequence with its (P, N) state in cache, the pairs spread over the pool.

    x (B,L,H,P) or (B,L,E) (a column block of a larger array is read in place); dt (B,L,H);
    A (H,); Bm, Cm (B,L,G,N) or (B,L,G*N); S0 (B,H,P,N); keep (B,L) or None -> y (B,L,H,P)
    and S_L.  With `dt_bias` (H,), dt holds the pre-activations: dt = softplus(dt + dt_bias)
    clamped to `time_step_limit`; with `D` (H,), y includes the skip D x."""
    dtype = np.dtype(S0.dtype)
    batch, length = dt.shape[0], dt.shape[1]
    heads, head_dim, n_state = S0.shape[1:]
    groups = Bm.shape[-1] // n_state if Bm.ndim == 3 else Bm.shape[2]

    def cols(a, width):  # (B, L, width) (source, offset)
        return _columns(a if a.ndim == 3 else a.reshape(batch, length, width), dtype)

    pre = dt_bias is not None
    lo, hi = time_step_limit
    s0 = _c(S0, dtype)
    s = np.empty_like(s0)
    y = np.empty((batch, length, heads * head_dim), dtype)
    fixed = (
        *cols(x, heads * head_dim), *cols(Bm, groups * n_state), *cols(Cm, groups * n_state),
        *cols(dt, heads), _c(dt_bias if pre else np.zeros(heads), dtype), _c(A, dtype),
        _c(np.zeros(heads) if D is None else D, dtype),
        np.empty((0, 0), dtype) if keep is None else _c(keep, dtype), s0, s, y, heads, groups,
        pre, dtype.type(lo), dtype.type(min(hi, np.finfo(dtype).max)), lo > 0,
        hi < float("inf"),
    )  # fmt: skip
    kernel = _KERNELS[dtype][9]
    if ("ssd_scan", dtype.str) not in _SEEN:  # compile / load on an empty range
        _timed("ssd_scan", kernel, *fixed, 0, 0)
    pairs = plan_rows(batch * heads, batch * length * heads * head_dim * n_state, threads)
    run_all(lambda i: kernel(*fixed, *pairs[i]), len(pairs))
    return y.reshape(batch, length, heads, head_dim), s


def gated_rmsnorm(y, z, weight, groups: int, eps: float, *, threads=None):
    """Mamba-2's gated RMSNorm (`mamba_core.ops.gated_rmsnorm`), compiled, in place on y
    (B,L,E) (C-contiguous, its own buffer); z (B,L,E) may be a column block of a larger
    array.  Returns y."""
    dtype = np.dtype(y.dtype)
    rows = y.reshape(-1, y.shape[-1])
    z_src, oz = _columns(z, dtype)
    fixed = (rows, z_src.reshape(-1, z_src.shape[-1]), oz, _c(weight, dtype), groups,
             dtype.type(eps))  # fmt: skip
    kernel = _KERNELS[dtype][10]
    if ("gated_norm", dtype.str) not in _SEEN:
        _timed("gated_norm", kernel, *fixed, 0, 0)
    parts = plan_rows(rows.shape[0], rows.size * 8, threads)
    run_all(lambda i: kernel(*fixed, *parts[i]), len(parts))
    return y


def exp(x, *, threads=None) -> np.ndarray:
    """exp(x) for non-positive x (a float32 or float64 array), with the kernels' own
    exponential (the one their scans run: see the module doc), spread over the pool for
    large arrays.  What the bench times as the kernels' exp rate."""
    dtype = np.dtype(x.dtype)
    flat = _c(x, dtype).reshape(-1)
    out = np.empty_like(flat)
    kernel = _KERNELS[dtype][11]
    if ("exp", dtype.str) not in _SEEN:
        _timed("exp", kernel, flat, out, 0, 0)
    parts = plan_rows(flat.size, flat.size, threads)  # (element ranges)
    run_all(lambda i: kernel(flat, out, *parts[i]), len(parts))
    return out.reshape(np.shape(x))


_ONES: dict[tuple, np.ndarray] = {}


def _ones(shape: tuple, dtype) -> np.ndarray:
    """A cached array of ones (SISO's mimo_x, mimo_z, mimo_o; kernels only read it)."""
    key = (shape, np.dtype(dtype).str)
    if key not in _ONES:
        _ONES[key] = np.ones(shape, dtype)
    return _ONES[key]


def fused_step3(proj, dt_bias, B_bias, C_bias, B_norm, C_norm, D, angle, h0, k0, v0, *,
                groups: int, halved: bool, A_floor: float, eps: float, mimo_x=None,
                mimo_z=None, mimo_o=None, norm_w=None, threads=None):  # fmt: skip
    """One decode step of the Mamba-3 mixer from its in_proj output, compiled in one kernel:
    B and C's RMSNorms and biases, dt's softplus, A and its floor, the trapezoid's weights,
    the rotary angles and the rotation of k and q, each head's state update (the previous
    and the current token's outer products) and read-out, the D skip, the optional per-head
    RMSNorm, the SiLU gate and the MIMO sum over ranks (what the core's mixer does for
    L = 1, without its temporaries).

    proj (B, 2E+2RGN+3H+S) = [z | x | Bp | Cp | dd_dt | dd_A | trap | ang]; dt_bias, D (H,);
    B_bias, C_bias (H,R,N); B_norm, C_norm (N,); the state angle (B,H,S), h0 (B,H,P,N), k0
    (B,R,H,N), v0 (B,H,P); MIMO: mimo_x, mimo_z, mimo_o (H,R,P) (None: SISO); norm_w (E,) or
    None (no output norm) -> y (B,E) before out_proj and the new (angle, h, k, v), the angles
    reduced mod 2 pi.  The state is not modified.  Batch rows run on the pool when the
    step's state updates are worth the threads."""
    dtype = np.dtype(proj.dtype)
    batch = proj.shape[0]
    angle, h0, k0, v0 = (_c(a, dtype) for a in (angle, h0, k0, v0))
    ranks, heads, n_state = k0.shape[1:]
    head_dim, angles = h0.shape[2], angle.shape[2]
    siso = _ones((heads, 1, head_dim), dtype)
    mimo = [siso if m is None else _c(m, dtype) for m in (mimo_x, mimo_z, mimo_o)]
    fixed = (
        _c(proj, dtype), _c(dt_bias, dtype), _c(B_bias, dtype), _c(C_bias, dtype),
        _c(B_norm, dtype), _c(C_norm, dtype), _c(D, dtype), *mimo,
        _ones((heads * head_dim,), dtype) if norm_w is None else _c(norm_w, dtype), angle, h0,
        k0, v0,
        np.empty_like(angle), np.empty_like(h0), np.empty_like(k0), np.empty_like(v0),
        np.empty((batch, heads * head_dim), dtype), groups, halved, norm_w is not None,
        dtype.type(A_floor), dtype.type(eps), dtype.type(np.pi),
    )  # fmt: skip
    kernel = _KERNELS[dtype][8]

    def scratch() -> tuple:  # each block its own rows
        rank_rows = np.empty((ranks * groups, n_state), dtype)
        return (
            rank_rows, np.empty_like(rank_rows), np.empty((ranks, n_state), dtype),
            *(np.empty((ranks, head_dim), dtype) for _ in range(3)),
            *(np.empty(angles, dtype) for _ in range(3)),
        )  # fmt: skip

    if ("fused_step3", dtype.str) not in _SEEN:  # compile / load on an empty block
        _timed("fused_step3", kernel, *fixed, *scratch(), 0, 0)
    rows_of = plan_rows(batch, batch * heads * head_dim * n_state * (2 * ranks + 1), threads)
    run_all(lambda i: kernel(*fixed, *scratch(), *rows_of[i]), len(rows_of))
    return fixed[19], (fixed[15], fixed[16], fixed[17], fixed[18])


def fused_scan_backward(
    u, dt_pre, dt_bias, A, Bm, Cm, D, z, starts, dout, dh, *, chunk: int, threads=None,
    d_z_into: tuple[np.ndarray, int] | None = None,
):  # fmt: skip
    """The backward pass of `fused_scan` (its states every `chunk` steps in `starts`): the
    adjoint recurrence of `scan_backward` with the softplus, skip and gate folded in.
    Returns the gradients of (u, dt_pre, dt_bias, A, Bm, Cm, D, z, h0).  `d_z_into` =
    (buffer, offset): the gradient of z is written to buffer[..., offset : offset + E] (a
    C-contiguous (B, L, W) array: the gradient of the in_proj output z came from) and
    returned as that view."""
    dtype = np.dtype(u.dtype)
    batch, length, channels = u.shape
    n_state = A.shape[1]
    u, dt_pre, starts, dout = (_c(a, dtype) for a in (u, dt_pre, starts, dout))
    g = np.array(dh, dtype=dtype, copy=True, order="C")
    d_u, d_dtp = np.empty_like(u), np.empty_like(u)
    d_z, odz = (np.empty_like(u), 0) if d_z_into is None else d_z_into
    if d_z.dtype != dtype or not d_z.flags.c_contiguous or d_z.shape[:2] != (batch, length):
        raise ValueError(f"d_z_into must be a C-contiguous {dtype} (B, L, W) buffer")
    kernel = _KERNELS[dtype][4]
    slices = plan_blocks(batch, channels, batch * length * channels * n_state, threads)
    tile = min(_ADJOINT_TILE, channels)
    # per block: its own scratch and partial sums of the reductions over channels / steps
    parts = [
        (
            np.empty((chunk + 1, tile, n_state), dtype),
            np.empty((chunk, tile, n_state), dtype),
            np.empty((4, channels), dtype),
            np.zeros((batch, length, n_state), dtype),
            np.zeros((batch, length, n_state), dtype),
            np.zeros(A.shape, dtype),
            np.zeros(channels, dtype),
            np.zeros(channels, dtype),
        )
        for _ in slices
    ]
    fixed = (
        u, dt_pre, _c(dt_bias, dtype), _c(A, dtype), *_columns(Bm, dtype),
        *_columns(Cm, dtype), _c(D, dtype), *_columns(z, dtype), starts, chunk, dout, g,
    )  # fmt: skip

    def args(index: int) -> tuple:
        hs, aa, rows, d_b, d_c, d_a, d_d, d_bias = parts[index]
        return (*fixed, hs, aa, rows, d_u, d_dtp, d_z, odz, d_b, d_c, d_a, d_d, d_bias, tile)

    _warm("fused_adjoint", kernel, *args(0))
    run_all(lambda index: kernel(*args(index), *slices[index]), len(slices))
    d_b, d_c, d_a, d_d, d_bias = (sum(p[k] for p in parts) for k in range(3, 8))
    return d_u, d_dtp, d_bias, d_a, d_b, d_c, d_d, d_z[..., odz : odz + channels], g


#: channels the fused backward kernel works through at a time (measured: 128 ran the seed
#: layer's backward 15-20% faster than whole channel blocks; 16 slower)
_ADJOINT_TILE = 128

#: steps between the states a training forward keeps (`fused_scan(..., chunk=)`, the default
#: of `scan_with_starts`): measured as fast as 32 in the backward, with half the memory
BACKWARD_CHUNK = 64


def scan_with_starts(u, dt, A, Bm, Cm, h0, *, chunk: int = BACKWARD_CHUNK, threads=None):
    """The compiled scan for a training forward: y (B,L,E), h_L and the state before every
    `chunk`-th step (ceil(L/chunk), B, E, N), from which `scan_backward` recomputes."""
    dtype = np.dtype(u.dtype)
    batch, length, channels = u.shape
    u, dt, A, Bm, Cm = (_c(a, dtype) for a in (u, dt, A, Bm, Cm))
    h = np.array(h0, dtype=dtype, copy=True, order="C")
    y = np.empty((batch, length, channels), dtype=dtype)
    starts = np.empty((-(-length // chunk), *h.shape), dtype=dtype)
    args = (u, dt, A, Bm, Cm, np.ones((batch, length), dtype), h, y, starts, chunk)
    work = batch * length * channels * A.shape[1]
    _run("scan", _KERNELS[dtype][1], args, batch, channels, work, threads)
    return y, h, starts


def scan_backward(u, dt, A, Bm, Cm, starts, dy, dh, *, chunk: int = BACKWARD_CHUNK, threads=None):
    """The scan's backward pass, compiled: the adjoint recurrence
        G_t = dy_t (x) C_t + exp(dt_{t+1} A) G_{t+1}     (G_t = dLoss/dh_t, G_L = dh)
    walked chunk by chunk from the end, each chunk's states recomputed from `starts`
    (`scan_with_starts`), every gradient read off G and the states in the same loop.
    Returns (d u, d dt, d A, d Bm, d Cm, d h0)."""
    dtype = np.dtype(u.dtype)
    batch, length, channels = u.shape
    n_state = A.shape[1]
    u, dt, A, Bm, Cm, starts, dy = (_c(a, dtype) for a in (u, dt, A, Bm, Cm, starts, dy))
    g = np.array(dh, dtype=dtype, copy=True, order="C")
    d_u, d_dt = np.empty_like(u), np.empty_like(dt)
    kernel = _KERNELS[dtype][3]
    work = batch * length * channels * n_state
    slices = plan_blocks(batch, channels, work, threads)
    # per block: its own scratch states and partial sums of the reductions over channels
    parts = [
        (
            np.empty((chunk, e1 - e0, n_state), dtype),
            np.zeros((batch, length, n_state), dtype),
            np.zeros((batch, length, n_state), dtype),
            np.zeros(A.shape, dtype),
        )
        for (_, _, e0, e1) in slices
    ]
    fixed = (u, dt, A, Bm, Cm, starts, chunk, dy, g)

    def run(index: int) -> None:
        hs, d_b, d_c, d_a = parts[index]
        kernel(*fixed, hs, d_u, d_dt, d_b, d_c, d_a, *slices[index])

    first = parts[0]
    _warm("scan_adjoint", kernel, *fixed, first[0], d_u, d_dt, *first[1:])
    run_all(run, len(slices))
    d_b = sum(p[1] for p in parts)
    d_c = sum(p[2] for p in parts)
    d_a = sum(p[3] for p in parts)
    return d_u, d_dt, d_a, d_b, d_c, g
