"""The NumPy backend: the core's math on NumPy arrays, with a native threaded linear scan.

Glossary: B batch, L length, E d_inner, N d_state.

The core's generic scans run as they are (`associative`, `cumulative`).  `linear` (and
`auto`) of Mamba-1 run the compiled kernel of `backends.kernels` when numba is installed
(the `fast` extra) and the dtype is float32 or float64, else `scan_linear` below: the same
recurrence, step by step, with every elementwise operation writing into preallocated
(E_block, N) buffers that stay in the CPU cache.  Both spread the independent (batch,
channel-block) slices over a thread pool (NumPy and the kernels release the GIL inside their
loops); their working memory is O(B*E*N) whatever L is.  With the kernels, a Mamba-1 call
without mask or packing (forward and decode step) runs `fused_forward`: BLAS for the four
projections, one kernel for the conv and one for the scan with its softplus, skip and gate
(a decode step: BLAS for in_proj and out_proj, one kernel for everything between; the same
for a Mamba-2 and a Mamba-3 step, `FUSED_STEPS`).
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import array_api_compat.numpy as xp_numpy
import numpy as np

from mamba_core.config import MambaConfig
from mamba_core.mixer import core_scan, init_state, mixer_forward, mixer_step
from mamba_core.mixers.mamba1 import MambaState
from mamba_core.params import to_numpy
from mamba_core.registry import Backend

from . import kernels
from .threads import num_threads, run_blocks, split_product

__all__ = [
    "FUSED_FORWARDS",
    "FUSED_STEPS",
    "NumpyBackend",
    "fused_forward",
    "fused_forward_mamba2",
    "fused_inner",
    "fused_inner_backward",
    "fused_step_mamba1",
    "fused_step_mamba2",
    "fused_step_mamba3",
    "get_backend",
    "inner_operands",
    "num_threads",
    "product",
    "scan_linear",
    "scan_native",
    "ssd_native",
]


def scan_linear(u, dt, A, Bm, Cm, h0, *, threads: int | None = None, keep=None):
    """The sequential selective scan (see `mamba_core.scan`) on NumPy arrays.

    u, dt (B,L,E); A (E,N); Bm, Cm (B,L,N); h0 (B,E,N) -> y (B,L,E), h_L (B,E,N).
    keep (B,L) or None: 0 where a packed sequence starts (the state restarts).
    The inputs are only read; the state is updated in this function's own buffer.
    """
    batch, length, channels = u.shape
    dtype = u.dtype
    du = (dt * u)[..., None]  # (B, L, E, 1)
    dt_col = dt[..., None]  # (B, L, E, 1)
    b_row = Bm[:, :, None, :]  # (B, L, 1, N)
    c_col = Cm[..., None]  # (B, L, N, 1)
    y = np.empty((batch, length, channels, 1), dtype=dtype)
    h = np.array(h0, dtype=dtype, copy=True, order="C")
    a_mat = np.ascontiguousarray(A, dtype=dtype)

    def run(b0: int, b1: int, e0: int, e1: int) -> None:
        hb = h[b0:b1, e0:e1]
        ab = a_mat[e0:e1]
        buf = np.empty_like(hb)
        dtb, dub, bb, cb = dt_col[b0:b1, :, e0:e1], du[b0:b1, :, e0:e1], b_row[b0:b1], c_col[b0:b1]
        yb = y[b0:b1, :, e0:e1]
        kb = None if keep is None else keep[b0:b1, :, None, None]
        for t in range(length):
            np.multiply(dtb[:, t], ab, out=buf)
            np.exp(buf, out=buf)  # exp(dt*A): exponent <= 0
            if kb is not None:
                np.multiply(buf, kb[:, t], out=buf)
            np.multiply(hb, buf, out=hb)
            np.multiply(dub[:, t], bb[:, t], out=buf)
            np.add(hb, buf, out=hb)
            np.matmul(hb, cb[:, t], out=yb[:, t])

    run_blocks(run, batch, channels, batch * length * channels * A.shape[1], threads)
    return y[..., 0], h


def scan_native(u, dt, A, Bm, Cm, h0, *, threads: int | None = None, keep=None):
    """The compiled kernel (`backends.kernels.scan`) where it runs, else `scan_linear`."""
    if kernels.supports(u.dtype) and all(a.dtype == u.dtype for a in (dt, A, Bm, Cm, h0)):
        return kernels.scan(u, dt, A, Bm, Cm, h0, keep=keep, threads=threads)
    return scan_linear(u, dt, A, Bm, Cm, h0, threads=threads, keep=keep)


def ssd_native(x, dt, A, Bm, Cm, S0, *, keep=None, threads: int | None = None):
    """Mamba-2's linear scan: the compiled kernel (`backends.kernels.ssd_scan`) where it
    runs, else the core's chunked `cumulative` form (the same recurrence; the core's
    step-by-step `linear` would be a Python loop over L)."""
    if kernels.supports(S0.dtype) and all(a.dtype == S0.dtype for a in (x, dt, A, Bm, Cm)):
        return kernels.ssd_scan(x, dt, A, Bm, Cm, S0, keep=keep, threads=threads)
    from mamba_core.ssd import ssd_scan

    return ssd_scan(x, dt, A, Bm, Cm, S0, algorithm="cumulative", keep=keep)


#: (mixer version, scan_type) -> native NumPy scan; the rest run the core's generic scans
NATIVE_SCANS = {("mamba1", "linear"): scan_native, ("mamba2", "linear"): ssd_native}


#: up to this many rows (a decode step's batch), `dense` computes weight @ x.T: OpenBLAS's
#: GEMM with 2-8 rows in x ran 1.1-1.8x slower than the transposed product here (it packs
#: the whole weight for a handful of rows), the two equal at 1 and 16 rows
_SKINNY_ROWS = 8


def dense(x: np.ndarray, weight: np.ndarray, bias=None) -> np.ndarray:
    """`ops.linear` straight on NumPy (one 2-D product; no namespace dispatch: a decode step
    calls four of these, and the generic wrapper's overhead measured ~20 us each).  The
    result owns its memory in x's leading shape, so the kernels read its column blocks (B, C,
    z) in place (`kernels._columns`) rather than copying them."""
    y = np.empty((*x.shape[:-1], weight.shape[0]), np.result_type(x, weight))
    rows, out = x.reshape(-1, x.shape[-1]), y.reshape(-1, weight.shape[0])
    if 1 < rows.shape[0] <= _SKINNY_ROWS:
        out[...] = np.matmul(weight, rows.T).T
    elif not split_product(rows, weight.T, out):  # (many rows: slices on the pool)
        np.matmul(rows, weight.T, out=out)
    if bias is not None:
        y += bias
    return y


def product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b for the kernels' gradient products (b 2-D): NumPy's matmul, its rows of a spread
    over the pool when there are many (`threads.split_product`)."""
    if b.ndim != 2 or not (a.ndim == 2 or a.flags.c_contiguous):
        return np.matmul(a, b)
    out = np.empty((*a.shape[:-1], b.shape[1]), np.result_type(a, b))
    rows = a.reshape(-1, a.shape[-1])
    if not split_product(rows, b, out.reshape(-1, b.shape[1])):
        np.matmul(rows, b, out=out.reshape(-1, b.shape[1]))
    return out


def fused_forward(params, x, config: MambaConfig, state=None, *, linear=dense):
    """The Mamba-1 mixer with its elementwise work compiled: the four projections on BLAS,
    then one kernel for the causal conv + SiLU and one for the selective scan with its
    softplus, skip and gate (`backends.kernels`).  The same arithmetic as the core's
    `mixer_forward` (which the tests hold it to), without its (B, L, E) temporaries.
    x (B, L, H) -> out (B, L, H), MambaState; `state` is not modified.  `linear(x, weight,
    bias=None)` runs the projections on NumPy arrays (`dense`: NumPy's BLAS)."""
    dtype = x.dtype

    def p(name):
        return np.asarray(params[name], dtype=dtype)

    def opt(name, on: bool):
        return p(name) if on else None

    def zeros(shape):
        return np.zeros(shape, dtype)

    xz = linear(x, p("in_proj.weight"), opt("in_proj.bias", config.use_bias))
    operands = inner_operands(params, config, x, state, cast=p, zeros=zeros, exp=np.exp)
    inner = fused_inner(xz, *operands, config.dt_rank, linear=linear)
    out = linear(inner.y, p("out_proj.weight"), opt("out_proj.bias", config.use_bias))
    return out, MambaState(inner.conv_state, inner.h)


def inner_operands(params, config: MambaConfig, x, state, *, cast, zeros, exp) -> tuple:
    """`fused_inner`'s operands after xz, for any array library: (conv_w, conv_b, x_proj_w,
    dt_proj_w, dt_bias, A, D, conv_state, h0) from the official-name params (`cast(name)`:
    one in x's dtype) and the state (None: `zeros(shape)`); no conv bias is a zero one, and
    A is -exp(A_log) unless `prepare` stored it."""
    e, batch = config.d_inner, x.shape[0]
    conv_b = cast("conv1d.bias") if config.use_conv_bias else zeros((e,))
    a_mat = cast("A") if "A" in params else -exp(cast("A_log"))
    if state is None:
        conv_state = zeros((batch, e, config.d_conv))
        h0 = zeros((batch, e, config.d_state))
    else:
        conv_state, h0 = state.conv_state, state.ssm_state
    conv_w, x_proj_w, dt_proj_w, dt_bias, d_skip = (
        cast(k) for k in ("conv1d.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "D")
    )
    return conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, a_mat, d_skip, conv_state, h0


class Inner(NamedTuple):
    """What `fused_inner` computes: the gated y, both new states, and what its backward pass
    (`fused_inner_backward`, which recomputes u and dt_pre) needs besides xz: x_dbl (empty
    for a decode step) and starts (the state every `chunk` steps, or an empty array)."""

    y: np.ndarray
    conv_state: np.ndarray
    h: np.ndarray
    x_dbl: np.ndarray
    starts: np.ndarray


def fused_inner(xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, conv_state, h0,
                dt_rank: int, *, linear=dense, chunk: int = 0) -> Inner:  # fmt: skip
    """Mamba-1 from the in_proj output xz (B, L, 2E) to the gated y (B, L, E), before
    out_proj: the conv + SiLU kernel, the x_proj and dt_proj products (`linear`), the fused
    scan kernel (with chunk > 0 keeping its state every `chunk` steps for a backward pass).
    B, C and z are read in place as column blocks of x_dbl and xz.  A single step with no
    backward pass to keep for (L = 1, chunk = 0: a decode step) runs as one kernel instead
    (`kernels.fused_step`); x_dbl is then not returned (empty)."""
    r, n, e = dt_rank, A.shape[1], conv_w.shape[0]
    if xz.shape[1] == 1 and not chunk:
        y, new_conv, h = kernels.fused_step(
            xz[:, 0], conv_w[:, 0, :], conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, conv_state, h0
        )  # fmt: skip
        empty = np.empty((0,), y.dtype)
        return Inner(y[:, None, :], new_conv, h, empty, empty)
    u, new_conv = kernels.conv_silu(np.ascontiguousarray(xz), conv_w[:, 0, :], conv_b, conv_state)
    x_dbl = linear(u, x_proj_w)
    dt_pre = linear(x_dbl[..., :r], dt_proj_w)
    b_mat, c_mat, z = x_dbl[..., r : r + n], x_dbl[..., r + n :], xz[..., e:]
    out = kernels.fused_scan(u, dt_pre, dt_bias, A, b_mat, c_mat, D, z, h0, chunk=chunk)
    starts = out[2] if chunk else np.empty((0,), u.dtype)
    return Inner(out[0], new_conv, out[1], x_dbl, starts)


def fused_inner_backward(xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, conv_state,
                         x_dbl, starts, dy, d_conv, dh, dt_rank: int, *, linear=dense,
                         matmul=product, chunk: int) -> tuple:  # fmt: skip
    """`fused_inner`'s backward pass: the gradients of (y, conv_state, h) given dy, d_conv,
    dh, with respect to (xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, conv_state,
    h0), in that order, from the forward's xz, x_dbl and starts (`fused_inner(...,
    chunk=chunk)`).  u and dt_pre are recomputed (the conv kernel and `linear`, as the
    forward ran them: two (B, L, E) arrays a training step need not keep), then
    `fused_scan_backward` (the adjoint recurrence with the softplus, skip and gate folded in),
    the two products' gradients (`matmul(a, b)` on NumPy arrays: NumPy's or another BLAS),
    `conv_silu_backward`.  dLoss/dxz is one (B, L, 2E) buffer whose halves the scan's and
    the conv's backward write."""
    u, _ = kernels.conv_silu(np.ascontiguousarray(xz), conv_w[:, 0, :], conv_b, conv_state)
    dt_pre = linear(x_dbl[..., :dt_rank], dt_proj_w)
    r, n, e = dt_rank, A.shape[1], conv_w.shape[0]
    d_xz = np.empty(xz.shape, xz.dtype)  # [dLoss/dx | dLoss/dz]
    d_u, d_dtp, d_bias, d_a, d_b, d_c, d_d, _, d_h0 = kernels.fused_scan_backward(
        u, dt_pre, dt_bias, A, x_dbl[..., r : r + n], x_dbl[..., r + n :], D, xz[..., e:],
        starts, dy, dh, chunk=chunk, d_z_into=(d_xz, e),
    )  # fmt: skip
    d_xdbl = np.empty(x_dbl.shape, x_dbl.dtype)  # [dLoss/d dt_low | dLoss/dB | dLoss/dC]
    d_xdbl[..., :r] = matmul(d_dtp, dt_proj_w)
    d_xdbl[..., r : r + n] = d_b
    d_xdbl[..., r + n :] = d_c
    d_wdt = matmul(d_dtp.reshape(-1, e).T, x_dbl[..., :r].reshape(-1, r))
    d_wx = matmul(d_xdbl.reshape(-1, r + 2 * n).T, u.reshape(-1, e))
    d_u += matmul(d_xdbl, x_proj_w)
    _, d_cw, d_cb, d_cs = kernels.conv_silu_backward(
        xz, conv_w[:, 0, :], conv_b, conv_state, d_u, d_conv, d_xz
    )  # fmt: skip
    d_cw = np.ascontiguousarray(d_cw)[:, None, :]
    return d_xz, d_cw, d_cb, d_wx, d_wdt, d_bias, d_a, d_d, d_cs, d_h0


def fused_forward_mamba2(params, x, config: MambaConfig, state=None, *, linear=dense):
    """The Mamba-2 mixer with its elementwise work compiled: in_proj as three products (z,
    xBC and dt: each output contiguous, no copies of column blocks), the conv + SiLU kernel
    over xBC, the scan kernel with dt's softplus and clamp and the D skip (`kernels.ssd_scan`:
    each head's state in cache for the whole sequence), the gated RMSNorm kernel, out_proj.
    The same arithmetic as the core's mixer (which the tests hold it to) without its (B, L,
    ...) temporaries or the chunked form's T x T matrices.  x (B, L, H) -> (out, Mamba2State);
    `state` is not modified."""
    from mamba_core.mixers.mamba2 import Mamba2State, conv_dim

    dtype = x.dtype
    batch = x.shape[0]
    e, channels, heads = config.d_inner, conv_dim(config), config.num_heads

    def p(name):
        return np.asarray(params[name], dtype=dtype)

    w_in = p("in_proj.weight")
    b_in = p("in_proj.bias") if config.use_bias else None

    def part(lo, hi):  # in_proj's rows lo..hi
        return linear(x, w_in[lo:hi], None if b_in is None else b_in[lo:hi])

    z, xbc, dt_pre = part(0, e), part(e, e + channels), part(e + channels, e + channels + heads)
    conv_state, s0 = state or init_state(config, batch, dtype=dtype, xp=xp_numpy)
    conv_b = p("conv1d.bias") if config.use_conv_bias else np.zeros(channels, dtype)
    u, new_conv = kernels.conv_silu(xbc, p("conv1d.weight")[:, 0, :], conv_b, conv_state)
    gn = config.n_groups * config.d_state
    a_vec = p("A") if "A" in params else -np.exp(p("A_log"))
    y, s = kernels.ssd_scan(
        u[..., :e], dt_pre, a_vec, u[..., e : e + gn], u[..., e + gn :], s0,
        dt_bias=p("dt_bias"), D=p("D"), time_step_limit=config.time_step_limit,
    )  # fmt: skip
    y = kernels.gated_rmsnorm(
        y.reshape(*x.shape[:2], e), z, p("norm.weight"), config.n_groups,
        config.layer_norm_epsilon,
    )  # fmt: skip
    out = linear(y, p("out_proj.weight"), p("out_proj.bias") if config.use_bias else None)
    return out, Mamba2State(new_conv, s)


def fused_step_mamba1(params, x_t, config: MambaConfig, state=None, *, linear=dense):
    """A Mamba-1 decode step: x_t (B, H) -> (out (B, H), MambaState), `fused_forward` on one
    token (everything between in_proj and out_proj in `kernels.fused_step`)."""
    out, new = fused_forward(params, x_t[:, None, :], config, state, linear=linear)
    return out[:, 0, :], new


def fused_step_mamba2(params, x_t, config: MambaConfig, state=None, *, linear=dense):
    """A Mamba-2 decode step: x_t (B, H) -> (out (B, H), Mamba2State): in_proj and out_proj
    on BLAS (`linear`), everything between in one kernel (`kernels.fused_step2`).  The same
    arithmetic as the core's `mixer_step` (which the tests hold it to) without its
    temporaries: a step of the core's mixer is some forty small array operations."""
    from mamba_core.mixers.mamba2 import Mamba2State, conv_dim

    dtype = x_t.dtype
    batch = x_t.shape[0]

    def p(name):
        return np.asarray(params[name], dtype=dtype)

    proj = linear(x_t, p("in_proj.weight"), p("in_proj.bias") if config.use_bias else None)
    channels = conv_dim(config)
    conv_state, h0 = state or init_state(config, batch, dtype=dtype, xp=xp_numpy)
    conv_b = p("conv1d.bias") if config.use_conv_bias else np.zeros(channels, dtype)
    a_vec = p("A") if "A" in params else -np.exp(p("A_log"))
    y, new_conv, h = kernels.fused_step2(
        proj, p("conv1d.weight")[:, 0, :], conv_b, conv_state, p("dt_bias"), a_vec, p("D"),
        p("norm.weight"), h0, groups=config.n_groups, time_step_limit=config.time_step_limit,
        eps=config.layer_norm_epsilon,
    )  # fmt: skip
    out = linear(y, p("out_proj.weight"), p("out_proj.bias") if config.use_bias else None)
    return out, Mamba2State(new_conv, h)


def fused_step_mamba3(params, x_t, config: MambaConfig, state=None, *, linear=dense):
    """A Mamba-3 decode step: x_t (B, H) -> (out (B, H), Mamba3State): in_proj and out_proj
    on BLAS (`linear`), everything between in one kernel (`kernels.fused_step3`), the same
    arithmetic as the core's `mixer_step` (which the tests hold it to)."""
    from mamba_core.mixers.mamba3 import EPS, Mamba3State

    dtype = x_t.dtype
    groups, batch = config.n_groups, x_t.shape[0]

    def p(name):
        return np.asarray(params[name], dtype=dtype)

    def opt(name):
        return p(name) if name in params else None

    proj = linear(x_t, p("in_proj.weight"))
    state = state or init_state(config, batch, dtype=dtype, xp=xp_numpy)
    y, new = kernels.fused_step3(
        proj, p("dt_bias"), p("B_bias"), p("C_bias"), p("B_norm.weight"), p("C_norm.weight"),
        p("D"), *state, groups=groups, halved=config.mimo, A_floor=config.A_floor,
        eps=EPS, mimo_x=opt("mimo_x"), mimo_z=opt("mimo_z"), mimo_o=opt("mimo_o"),
        norm_w=opt("norm.weight"),
    )  # fmt: skip
    return linear(y, p("out_proj.weight")), Mamba3State(*new)


#: mixer version -> its forward with compiled elementwise work (`backends.kernels`); the
#: other versions run the core's mixer
FUSED_FORWARDS = {"mamba1": fused_forward, "mamba2": fused_forward_mamba2}
#: mixer version -> its compiled one-token decode step (params, x_t, config, state, *,
#: linear) -> (out, state)
FUSED_STEPS = {
    "mamba1": fused_step_mamba1,
    "mamba2": fused_step_mamba2,
    "mamba3": fused_step_mamba3,
}


def fuses(x, config: MambaConfig, state, attention_mask=None, seq_idx=None, *,
          step: bool = False) -> bool:  # fmt: skip
    """Whether this call runs its version's compiled forward (`FUSED_FORWARDS`), or with
    `step`, its compiled decode step (`FUSED_STEPS`): SiLU, float32/float64 throughout, no
    mask or packing (those take the core's mixer, Mamba-1 still on the compiled scan)."""
    table = FUSED_STEPS if step else FUSED_FORWARDS
    if table.get(config.version) is None or config.activation not in ("swish", "silu"):
        return False
    if attention_mask is not None or seq_idx is not None or not kernels.supports(x.dtype):
        return False
    return state is None or all(field.dtype == x.dtype for field in state)


class NumpyBackend(Backend):
    name = "numpy"
    xp = xp_numpy
    dtypes: ClassVar[dict[str, Any]] = {
        "float32": np.float32,
        "float64": np.float64,
        "float16": np.float16,
    }

    def is_native(self, value: Any) -> bool:
        return isinstance(value, np.ndarray)

    def asarray(self, value: Any, dtype=None, device=None):
        arr = value if isinstance(value, np.ndarray) else to_numpy(value)
        return arr if dtype is None or arr.dtype == dtype else arr.astype(dtype)

    def device_of(self, value: Any) -> str:
        return "cpu"

    def auto_scan(self, platform: str, config: MambaConfig) -> str:
        """`linear` for the versions with a compiled linear scan here (Mamba-1; Mamba-2 with
        the kernels: its fused forward, measured faster than the chunked SSD form on CPU),
        else the mixer's own rule."""
        if (config.version, "linear") in NATIVE_SCANS and kernels.available():
            return "linear"
        return super().auto_scan(platform, config)

    def scan_fn(self, scan_type: str, config: MambaConfig):
        """The native scan where there is one (NATIVE_SCANS), else the core's."""
        native = NATIVE_SCANS.get((config.version, scan_type))
        return native if native is not None else core_scan(config, scan_type)

    def forward(
        self, params, x, config: MambaConfig, state: Any, scan_type: str, attention_mask=None,
        seq_idx=None,
    ):  # fmt: skip
        if scan_type == "linear" and fuses(x, config, state, attention_mask, seq_idx):
            return FUSED_FORWARDS[config.version](params, x, config, state)
        scan = self.scan_fn(scan_type, config)
        return mixer_forward(
            params, x, config, state, scan=scan, xp=self.xp, attention_mask=attention_mask,
            seq_idx=seq_idx,
        )  # fmt: skip

    def step(self, prepared, state: Any, x_t, config: MambaConfig):
        if fuses(x_t, config, state, step=True):
            return FUSED_STEPS[config.version](prepared, x_t, config, state)
        scan = NATIVE_SCANS.get((config.version, "linear"))
        return mixer_step(prepared, state, x_t, config, scan=scan, xp=self.xp)

    def call_info(self) -> dict[str, Any]:
        return {
            "kernels": kernels.reason(),
            "kernel_compile_s": round(kernels.compile_seconds(), 3),
        }


_BACKEND = NumpyBackend()


def get_backend() -> NumpyBackend:
    return _BACKEND
