"""The JAX backend: the core's math under `jax.jit`, with native scans.

Glossary: B batch, L length, H hidden_size, E d_inner, N d_state, T chunk length.

Scans (all chunked along L: `lax.scan` over chunks carries the state, each chunk's body is
`jax.checkpoint`-ed so that a backward pass keeps one state per chunk and recomputes the
inside, never O(B*L*E*N)):
- `linear`: an inner `lax.scan` over the T steps of a chunk; XLA fuses the body (exp, the
  update and the C readout) into one loop.  The fastest on CPU (see README "Scans").  Its
  backward pass is written out (`_linear_vjp_scan`: the adjoint recurrence, one fused loop
  per step) rather than derived by autodiff through `lax.scan`.
- `associative`: `lax.associative_scan` over each chunk with the operator
  (a1, b1) * (a2, b2) = (a1*a2, a2*b1 + b2): O(log T) depth, the TPU path.
- `cumulative`: the core's segment-sum chunk (`mamba_core.scan.chunk_cumulative`).

Pure functional API, for JAX users (params: a dict keyed by the official names):
    y, state = forward(params, x, config, state=None)        # jit-compiled, config static
    y_t, state = step(params, state, x_t, config)
Both work under `jax.jit`, `jax.grad`, `jax.vmap`, and in float64 with `jax_enable_x64`.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mamba_core.checks import packed_index
from mamba_core.config import MambaConfig
from mamba_core.mixer import (
    MambaState,
    mixer_forward,
    mixer_step,
    scan_dtype,
    state_dtype_field,
    validate_state,
)
from mamba_core.mixers import mixer_for
from mamba_core.params import to_numpy
from mamba_core.registry import Backend
from mamba_core.scan import DEFAULT_CHUNK, chunk_cumulative
from mamba_core.ssd import SSD_DEFAULT_CHUNK, ssd_chunk_associative, ssd_chunk_cumulative
from mamba_core.ssd3 import SSD3_ALGORITHMS, SSD3_DEFAULT_CHUNK

from . import kernels
from .numpy import dense, fused_inner, fused_inner_backward, fuses, inner_operands, product

__all__ = [
    "SCANS",
    "JaxBackend",
    "context_forward",
    "forward",
    "get_backend",
    "shard_inputs",
    "shard_params",
    "step",
    "trace_count",
]

Array = Any

# ---------------------------------------------------------------- the chunk bodies
# Each takes the state h (B,E,N) and one time-major chunk: dt, u (T,B,E), Bm, Cm (T,B,N),
# plus A (E,N) and keep (T,B) or None (0 where a packed sequence starts); returns y (T,B,E)
# and the state after the chunk.


def _chunk_linear(h, dt, u, Bm, Cm, A, keep=None):
    def one_step(h, xs):
        d, du, b, c, *k = xs
        decay = jnp.exp(d[..., None] * A)
        if k:
            decay = decay * k[0][:, None, None]
        h = decay * h + du[..., None] * b[:, None, :]
        return h, jnp.einsum("ben,bn->be", h, c)

    xs = (dt, dt * u, Bm, Cm) + (() if keep is None else (keep,))
    h, y = lax.scan(one_step, h, xs)
    return y, h


def _combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def _chunk_associative(h, dt, u, Bm, Cm, A, keep=None):
    a = jnp.exp(dt[..., None] * A)  # (T,B,E,N), in (0, 1]
    if keep is not None:
        a = a * keep[..., None, None]
    b = (dt * u)[..., None] * Bm[:, :, None, :]
    a_cum, b_cum = lax.associative_scan(_combine, (a, b), axis=0)
    hs = a_cum * h + b_cum
    return jnp.einsum("tben,tbn->tbe", hs, Cm), hs[-1]


def _chunk_cumulative(h, dt, u, Bm, Cm, A, keep=None):
    t = functools.partial(jnp.swapaxes, axis1=0, axis2=1)
    k = None if keep is None else t(keep)
    y, h = chunk_cumulative(h, t(dt), t(u), t(Bm), t(Cm), A, xp=jnp, keep=k)
    return t(y), h


_CHUNK_BODIES = {
    "linear": _chunk_linear,
    "associative": _chunk_associative,
    "cumulative": _chunk_cumulative,
}


#: chunk length per algorithm when the config says "auto": XLA fuses a whole chunk, and
#: `lax.associative_scan` wants long chunks to have parallel work (the TPU path)
JAX_CHUNK = {**DEFAULT_CHUNK, "associative": 64}
#: the same per mixer version (Mamba-2: the core's SSD defaults)
_JAX_CHUNKS = {"mamba1": JAX_CHUNK, "mamba2": SSD_DEFAULT_CHUNK, "mamba3": SSD3_DEFAULT_CHUNK}


def chunk_length(algorithm: str, chunk_size: int | str = "auto", version: str = "mamba1") -> int:
    return _JAX_CHUNKS[version][algorithm] if chunk_size == "auto" else int(chunk_size)


def chunked_scan(algorithm: str, chunk_size: int | str = "auto"):
    """A `scan(u, dt, A, Bm, Cm, h0) -> (y, h)` running `algorithm` chunk by chunk: the
    whole chunks under one `lax.scan` (each `jax.checkpoint`-ed), a ragged tail as one more
    chunk of its own length (never padded: L = 72 at chunk 64 runs 72 steps, not 128)."""
    body_fn = _CHUNK_BODIES[algorithm]

    def scan(u, dt, A, Bm, Cm, h0, keep=None):
        batch, length, channels = u.shape
        size = min(chunk_length(algorithm, chunk_size), length)
        if algorithm == "linear":  # the same chunks, with the hand-written backward pass
            t = functools.partial(jnp.swapaxes, axis1=0, axis2=1)
            k = None if keep is None else t(keep)
            y, h = _linear_vjp_scan(size, keep is not None)(t(dt), t(u), t(Bm), t(Cm), A, h0, k)
            return t(y), h
        chunks, tail = divmod(length, size)
        whole = chunks * size

        @jax.checkpoint
        def body(h, xs):
            y, h = body_fn(h, *xs[:4], A, *xs[4:])
            return h, y

        # time-major: (B, L, ...) -> (L, B, ...)
        xs = tuple(jnp.swapaxes(a, 0, 1) for a in (dt, u, Bm, Cm))
        if keep is not None:
            xs = (*xs, jnp.swapaxes(keep, 0, 1))
        split = tuple(a[:whole].reshape((chunks, size, *a.shape[1:])) for a in xs)
        h, ys = lax.scan(body, h0, split)
        y = ys.reshape((whole, batch, channels))
        if tail:
            h, y_tail = body(h, tuple(a[whole:] for a in xs))
            y = jnp.concatenate([y, y_tail], axis=0)
        return jnp.swapaxes(y, 0, 1), h

    return scan


# ---------------------------------------------------------------- the linear scan's VJP
# Autodiff through `lax.scan` keeps every step's residuals and runs them back through the
# generic transpose rules; the backward pass below is the adjoint recurrence written out (the
# official kernel's and `backends.torch._LinearScan`'s scheme), one fused loop per step:
#     G_t = dy_t (x) C_t + exp(dt_{t+1} A) G_{t+1}                (G_t = dLoss/dh_t)
#     s_t = G_t * h_{t-1} * exp(dt_t A)                           (dLoss/d(dt_t A))
#     d dt_t = sum_n s_t A + u_t sum_n G_t B_t,  d u_t = dt_t sum_n G_t B_t,
#     d B_t = sum_e G_t dt_t u_t,  d C_t = sum_e h_t dy_t,  d A = sum_t s_t dt_t,
#     d h0 = exp(dt_0 A) G_0.
# The forward keeps the state at every chunk start; the backward recomputes one chunk's
# states from its start, then walks the chunk backwards.  Time-major arrays throughout.


def _decay(d, A, k):
    a = jnp.exp(d[..., None] * A)
    return a if k is None else a * k[:, None, None]


def _steps(h, dt, u, Bm, Cm, A, keep, keep_states: bool):
    """The chunk's recurrence: (h_end, y (T,B,E)[, states (T,B,E,N)])."""

    def one(h, xs):
        d, v, b, c, *k = xs
        h = _decay(d, A, k[0] if k else None) * h + v[..., None] * b[:, None, :]
        y = jnp.einsum("ben,bn->be", h, c)
        return h, ((y, h) if keep_states else y)

    xs = (dt, dt * u, Bm, Cm) + (() if keep is None else (keep,))
    h, out = lax.scan(one, h, xs)
    return (h, *out) if keep_states else (h, out)


def _chunk_adjoint(g, start, dt, u, Bm, Cm, A, keep, dy):
    """One chunk backwards from g = dLoss/dh at its end: (g at its start, dA, per-step
    gradients (d dt, d u, d B, d C))."""
    _, _, hs = _steps(start, dt, u, Bm, Cm, A, keep, True)
    h_prev = jnp.concatenate([start[None], hs[:-1]], axis=0)

    def one(carry, xs):
        g, d_a = carry
        d, uu, b, c, dyt, hp, hc, *k = xs
        a = _decay(d, A, k[0] if k else None)
        g = g + dyt[..., None] * c[:, None, :]
        s = g * hp * a
        gb = jnp.einsum("ben,bn->be", g, b)
        grads = (
            jnp.einsum("ben,en->be", s, A) + uu * gb,
            d * gb,
            jnp.einsum("ben,be->bn", g, d * uu),
            jnp.einsum("ben,be->bn", hc, dyt),
        )
        return (a * g, d_a + jnp.einsum("ben,be->en", s, d)), grads

    xs = (dt, u, Bm, Cm, dy, h_prev, hs) + (() if keep is None else (keep,))
    (g, d_a), grads = lax.scan(one, (g, jnp.zeros_like(A)), xs, reverse=True)
    return g, d_a, grads


@functools.cache
def _linear_vjp_scan(size: int, packed: bool):
    """scan(dt, u, Bm, Cm, A, h0, keep) -> (y, h) on time-major arrays, chunk `size`, with
    the hand-written backward pass above (`packed`: keep is an array, else None)."""

    def split(a, chunks):
        return a[: chunks * size].reshape((chunks, size, *a.shape[1:]))

    def fwd(dt, u, Bm, Cm, A, h0, keep):
        chunks, tail = divmod(dt.shape[0], size)

        def body(h, xs):
            h_end, y = _steps(h, *xs[:4], A, xs[4] if packed else None, False)
            return h_end, (y, h)

        xs = tuple(split(a, chunks) for a in (dt, u, Bm, Cm) + ((keep,) if packed else ()))
        h, (ys, starts) = lax.scan(body, h0, xs)
        y = ys.reshape((chunks * size, *ys.shape[2:]))
        tail_start = h
        if tail:
            cut = slice(chunks * size, None)
            args = (dt[cut], u[cut], Bm[cut], Cm[cut], A, keep[cut] if packed else None)
            h, y_tail = _steps(h, *args, False)
            y = jnp.concatenate([y, y_tail], axis=0)
        return (y, h), (dt, u, Bm, Cm, A, keep, starts, tail_start)

    def bwd(res, cts):
        dt, u, Bm, Cm, A, keep, starts, tail_start = res
        dy, g = cts
        chunks, tail = divmod(dt.shape[0], size)
        d_a = jnp.zeros_like(A)
        tail_grads = None
        if tail:
            cut = slice(chunks * size, None)
            k = keep[cut] if packed else None
            g, d_a, tail_grads = _chunk_adjoint(
                g, tail_start, dt[cut], u[cut], Bm[cut], Cm[cut], A, k, dy[cut]
            )

        def body(carry, xs):
            g, d_a = carry
            start, d, uu, b, c, dyc, *k = xs
            g, d_a_chunk, grads = _chunk_adjoint(g, start, d, uu, b, c, A, k[0] if k else None, dyc)
            return (g, d_a + d_a_chunk), grads

        parts = (dt, u, Bm, Cm, dy) + ((keep,) if packed else ())
        xs = (starts, *(split(a, chunks) for a in parts))
        (g, d_a), grads = lax.scan(body, (g, d_a), xs, reverse=True)
        grads = [a.reshape((chunks * size, *a.shape[2:])) for a in grads]
        if tail:
            grads = [
                jnp.concatenate([a, t], axis=0) for a, t in zip(grads, tail_grads, strict=True)
            ]
        d_dt, d_u, d_b, d_c = grads
        return d_dt, d_u, d_b, d_c, d_a, g, (jnp.zeros_like(keep) if packed else None)

    @jax.custom_vjp
    def scan(dt, u, Bm, Cm, A, h0, keep):
        return fwd(dt, u, Bm, Cm, A, h0, keep)[0]

    scan.defvjp(fwd, bwd)
    return scan


# ---------------------------------------------------------------- the compiled CPU kernels
# On the CPU, XLA runs the linear scan's backward pass as separate small dots per step, the
# elementwise parts around the scan as their own passes, and its products at 110-130
# GFLOP/s where NumPy's BLAS does 155-175 on the same core (measured, AVX2: XLA's YNNPACK
# and Eigen dots alike).  With the compiled kernels of `backends.kernels` (numba, the
# optional `mamba-core[fast]` extra), a Mamba-1 layer (linear scan, SiLU, float32/float64,
# no mask or packing) runs as one `jax.pure_callback` (XLA's CPU buffers handed over as
# NumPy arrays) of the NumPy backend's fused forward: the four products on NumPy's BLAS,
# the conv and the fused scan kernels.  It is a `jax.custom_vjp` whose backward pass is one
# more callback: the products' gradients, `fused_inner_backward` (the adjoint scan and the
# conv's backward kernels), from the (B, L, .) intermediates the forward under a VJP returns
# (PyTorch's `_MambaInner` split, with in_proj and out_proj inside).  Where a program is
# partitioned by XLA (a `mesh`: the "model" axis shards channels) a callback would run on
# gathered arrays, so those traces keep XLA's layer, as do context-parallel stretches.
# Whether the kernels are on (`kernels.available()`) is a static argument of the jitted
# entry points, so no trace outlives a switch.


#: the mixer versions whose whole layer has a host callback pair here (`_host_mamba1`); the
#: others (Mamba-2's fused forward has no backward pass yet) keep XLA's layer
_HOST_VERSIONS = ("mamba1",)


def _host_layer(on: bool, config: MambaConfig, x, scan_type: str, mask, seq_idx=None) -> bool:
    """Whether this trace runs the layer on the kernels (`on`: they are available; JAX on
    the CPU; the linear scan; a version in `_HOST_VERSIONS`; what the NumPy backend's fused
    forward takes)."""
    if config.version not in _HOST_VERSIONS:
        return False
    return bool(on and scan_type == "linear" and jax.default_backend() == "cpu") and fuses(
        x, config, None, mask, seq_idx
    )


def _callback(fn, shapes, *args, **kwargs):
    """fn(*args, **kwargs) on the host, its arguments as NumPy arrays (views of XLA's CPU
    buffers: the callback hands over `jax.Array`s)."""

    def host(*arrays):
        return fn(*(np.asarray(a) for a in arrays), **kwargs)

    out = [jax.ShapeDtypeStruct(shape, args[0].dtype) for shape in shapes]
    return jax.pure_callback(host, out, *args, vmap_method="sequential")


def _host_forward(x, w_in, b_in, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, a_mat, d_skip,
                  w_out, b_out, conv_state, h0, *, dt_rank: int, use_bias: bool,
                  chunk: int = 0):  # fmt: skip
    """The layer on NumPy arrays -> (out, conv_state, h); with chunk > 0 also what its
    backward pass needs: xz, the gated y, x_dbl and the state every `chunk` steps (every
    array a callback returns is copied into a buffer XLA allocates: the fewer, the better;
    `fused_inner_backward` recomputes u and dt_pre)."""
    xz = dense(x, w_in, b_in if use_bias else None)
    inner = fused_inner(xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, a_mat, d_skip,
                        conv_state, h0, dt_rank, chunk=chunk)  # fmt: skip
    out = dense(inner.y, w_out, b_out if use_bias else None)
    if not chunk:
        return out, inner.conv_state, inner.h
    return out, inner.conv_state, inner.h, xz, inner.y, inner.x_dbl, inner.starts


def _host_backward(x, w_in, b_in, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, a_mat, d_skip,
                   w_out, b_out, conv_state, xz, y, x_dbl, starts, d_out, d_conv, d_h, *,
                   dt_rank: int, use_bias: bool, chunk: int):  # fmt: skip
    """`_host_forward`'s backward pass: the gradients of its 14 inputs."""

    def rows(a):
        return a.reshape(-1, a.shape[-1])

    d_y = product(rows(d_out), w_out).reshape(y.shape)
    d_w_out = product(rows(d_out).T, rows(y))
    d_xz, *inner = fused_inner_backward(
        xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, a_mat, d_skip, conv_state, x_dbl,
        starts, d_y, d_conv, d_h, dt_rank, chunk=chunk,
    )  # fmt: skip
    d_x = product(rows(d_xz), w_in).reshape(x.shape)
    d_w_in = product(rows(d_xz).T, rows(x))
    if use_bias:
        d_b_in, d_b_out = rows(d_xz).sum(0), rows(d_out).sum(0)
    else:  # the zeros the layer was given in their place
        d_b_in, d_b_out = np.zeros_like(b_in), np.zeros_like(b_out)
    *d_inner, d_cs, d_h0 = inner
    return d_x, d_w_in, d_b_in, *d_inner, d_w_out, d_b_out, d_cs, d_h0


@functools.cache
def _host_mamba1(dt_rank: int, use_bias: bool):
    """layer(x, w_in, b_in, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, w_out, b_out,
    conv_state, h0) -> (out, conv_state, h): `_host_forward` through a callback, its VJP
    `_host_backward` (the forward under a VJP keeps the state every
    `kernels.BACKWARD_CHUNK` steps)."""
    chunk, static = kernels.BACKWARD_CHUNK, {"dt_rank": dt_rank, "use_bias": use_bias}

    def primal(*args):
        shapes = (args[0].shape, args[-2].shape, args[-1].shape)
        return tuple(_callback(_host_forward, shapes, *args, **static))

    def fwd(*args):
        x, w_in, x_proj_w, h0 = args[0], args[1], args[5], args[-1]
        (batch, length, _), e = x.shape, x_proj_w.shape[1]
        shapes = (
            x.shape, args[-2].shape, h0.shape, (batch, length, w_in.shape[0]), (batch, length, e),
            (batch, length, x_proj_w.shape[0]), (-(-length // chunk), *h0.shape),
        )  # fmt: skip
        out, conv_state, h, *kept = _callback(_host_forward, shapes, *args, chunk=chunk, **static)
        return (out, conv_state, h), (*args[:-1], *kept)

    def bwd(res, cts):
        shapes = [a.shape for a in res[:13]] + [res[-1].shape[1:]]
        return tuple(_callback(_host_backward, shapes, *res, *cts, chunk=chunk, **static))

    layer = jax.custom_vjp(primal)
    layer.defvjp(fwd, bwd)
    return layer


def _host_mixer(params, x, config: MambaConfig, state):
    """The Mamba-1 mixer as `_host_mamba1`'s one callback (params cast to x's dtype; zeros
    stand in for the biases a config leaves out)."""
    dtype = x.dtype

    def p(name):
        return params[name].astype(dtype)

    def zeros(shape):
        return jnp.zeros(shape, dtype)

    def bias(name, size: int):
        return p(name) if config.use_bias else zeros((size,))

    if state is not None:
        state = MambaState(*(a.astype(dtype) for a in state))
    operands = inner_operands(params, config, x, state, cast=p, zeros=zeros, exp=jnp.exp)
    conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, a_mat, d_skip, conv_state, h0 = operands
    out, conv_state, h = _host_mamba1(config.dt_rank, config.use_bias)(
        x, p("in_proj.weight"), bias("in_proj.bias", 2 * config.d_inner), conv_w, conv_b,
        x_proj_w, dt_proj_w, dt_bias, a_mat, d_skip, p("out_proj.weight"),
        bias("out_proj.bias", x.shape[-1]), conv_state, h0,
    )  # fmt: skip
    return out, MambaState(conv_state, h)


SCANS = tuple(_CHUNK_BODIES)


# ---------------------------------------------------------------- the Mamba-2 (SSD) scans
# Each takes the state S (B,H,P,N) and one batch-major chunk: dt (B,T,H), x (B,T,H,P),
# Bm, Cm (B,T,G,N), plus A (H,); returns y (B,T,H,P) and the state after the chunk.


def _ssd_linear(S, dt, x, Bm, Cm, A, keep=None):
    heads = A.shape[0]
    rep = heads // Bm.shape[2]
    bh, ch = jnp.repeat(Bm, rep, axis=2), jnp.repeat(Cm, rep, axis=2)
    decay = jnp.exp(dt * A)  # (B,T,H)
    if keep is not None:
        decay = decay * keep[..., None]

    def one_step(S, xs):
        a, dx, b, c = xs
        S = a[..., None, None] * S + dx[..., None] * b[:, :, None, :]
        return S, jnp.einsum("bhpn,bhn->bhp", S, c)

    t = functools.partial(jnp.swapaxes, axis1=0, axis2=1)
    S, y = lax.scan(one_step, S, (t(decay), t(dt[..., None] * x), t(bh), t(ch)))
    return t(y), S


def _ssd_associative(S, dt, x, Bm, Cm, A, keep=None):
    heads = A.shape[0]
    rep = heads // Bm.shape[2]
    bh, ch = jnp.repeat(Bm, rep, axis=2), jnp.repeat(Cm, rep, axis=2)
    decay = jnp.exp(dt * A) if keep is None else jnp.exp(dt * A) * keep[..., None]
    a = jnp.broadcast_to(decay[..., None, None], (*x.shape, 1))
    b = (dt[..., None] * x)[..., None] * bh[:, :, :, None, :]
    a_cum, b_cum = lax.associative_scan(_combine, (a, b), axis=1)
    hs = a_cum * S[:, None] + b_cum
    return jnp.einsum("bthpn,bthn->bthp", hs, ch), hs[:, -1]


_SSD_BODIES = {
    "linear": _ssd_linear,
    "associative": _ssd_associative,
    "cumulative": lambda S, dt, x, Bm, Cm, A, keep=None: ssd_chunk_cumulative(
        S, dt, x, Bm, Cm, A, xp=jnp, keep=keep
    ),
}
del ssd_chunk_associative  # the core's version is the reference; JAX uses lax's scan


def ssd_chunked_scan(
    algorithm: str, chunk_size: int | str = "auto", version: str = "mamba2", bodies=None
):
    """A Mamba-2 `scan(x, dt, A, Bm, Cm, S0) -> (y, S)` (Mamba-3: `scan(v, a, A, k, q, S0)`)
    running `algorithm` chunk by chunk: `lax.scan` over the whole chunks, each
    `jax.checkpoint`-ed (one state per chunk kept for the backward pass), and a ragged tail
    as one more chunk of its own length (never padded)."""
    body_fn = (_SSD_BODIES if bodies is None else bodies)[algorithm]

    def scan(x, dt, A, Bm, Cm, S0, keep=None):
        batch, length = dt.shape[:2]
        size = min(chunk_length(algorithm, chunk_size, version), length)
        chunks, tail = divmod(length, size)
        whole = chunks * size

        def split(a):  # (B, whole, ...) -> (chunks, B, T, ...)
            return jnp.moveaxis(a[:, :whole].reshape((batch, chunks, size, *a.shape[2:])), 1, 0)

        @jax.checkpoint
        def body(S, xs):
            y, S = body_fn(S, *xs[:4], A, *xs[4:])
            return S, y

        xs = (dt, x, Bm, Cm) + (() if keep is None else (keep,))
        S, ys = lax.scan(body, S0, tuple(map(split, xs)))
        y = jnp.moveaxis(ys, 0, 1).reshape((batch, whole, *ys.shape[3:]))
        if tail:
            S, y_tail = body(S, tuple(a[:, whole:] for a in xs))
            y = jnp.concatenate([y, y_tail], axis=1)
        return y, S

    return scan


#: mixer version -> the builder of its chunked JAX scans
#: the Mamba-3 chunk bodies: the core's, traced with jax.numpy (the linear one by lax.scan)
def _ssd3_linear(S, a, v, k, q, A=None, keep=None):
    decay = jnp.exp(a) if keep is None else jnp.exp(a) * keep[..., None]

    def one_step(S, xs):
        d, vt, kt, qt = xs
        S = d[..., None, None] * S + jnp.einsum("bhrp,bhrn->bhpn", vt, kt)
        return S, jnp.einsum("bhrn,bhpn->bhrp", qt, S)

    t = functools.partial(jnp.swapaxes, axis1=0, axis2=1)
    S, y = lax.scan(one_step, S, (t(decay), t(v), t(k), t(q)))
    return t(y), S


def _core3(name: str):
    fn = SSD3_ALGORITHMS[name]
    return lambda S, a, v, k, q, A=None, keep=None: fn(S, a, v, k, q, A, xp=jnp, keep=keep)


_SSD3_BODIES = {"linear": _ssd3_linear, "associative": _core3("associative"),
                "cumulative": _core3("cumulative")}  # fmt: skip

_SCAN_BUILDERS = {
    "mamba1": chunked_scan,
    "mamba2": ssd_chunked_scan,
    "mamba3": functools.partial(ssd_chunked_scan, version="mamba3", bodies=_SSD3_BODIES),
}

# ---------------------------------------------------------------- jitted entry points
_TRACES = {"forward": 0, "step": 0}
_TRACE_LOCK = threading.Lock()
# traces made by the current thread: jit traces in the calling thread, so a call compiled
# iff its own thread's count moved (another thread compiling meanwhile does not count)
_THREAD_TRACES = threading.local()


def trace_count(kind: str = "forward") -> int:
    """How many times the jitted `forward` (or `step`) has been traced (= compiled) so far."""
    return _TRACES[kind]


def _count_trace(kind: str) -> None:
    with _TRACE_LOCK:
        _TRACES[kind] += 1
    setattr(_THREAD_TRACES, kind, getattr(_THREAD_TRACES, kind, 0) + 1)


def _checked_state(state, x, config: MambaConfig, owner: str) -> MambaState | None:
    """The one state check (`mamba_core.mixer.validate_state`) on static shapes; arrays of
    another library (NumPy, torch) become JAX arrays of the compute / scan dtype."""
    if state is None:
        return None
    sdtype = scan_dtype(x.dtype, config, xp=jnp)

    def convert(value, field):
        dtype = sdtype if state_dtype_field(config, field) else x.dtype
        if isinstance(value, jax.Array):  # tracers too; as it is when its dtype is already
            return value if value.dtype == dtype else value.astype(dtype)
        return jnp.asarray(to_numpy(value), dtype=dtype)

    return validate_state(state, config, x.shape[0], owner=owner, convert=convert)


def _constrain(x, mesh: Mesh | None, spec):
    return x if mesh is None else lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _forward_impl(
    params, x, state, mask, seq_idx, config, scan_type, mesh, data_axis, model_axis, kernels_on
):
    _count_trace("forward")
    if scan_type is None or scan_type == "auto":
        scan_type = mixer_for(config).auto_scan("jax", jax.default_backend(), config)
    scan = _SCAN_BUILDERS[config.version](scan_type, config.chunk_size)
    if mesh is not None:
        x = _constrain(x, mesh, P(data_axis, None, None))
        inner = scan

        def seq(a):  # (B, L, channels-or-heads, ...): shard axis 2
            return P(data_axis, None, model_axis, *([None] * (a.ndim - 3)))

        def st(a):  # (B, channels-or-heads, ...): shard axis 1
            return P(data_axis, model_axis, *([None] * (a.ndim - 2)))

        def scan(u, dt, A, Bm, Cm, h0, **kw):  # channels (Mamba-1) / heads (Mamba-2) apart
            u, dt = _constrain(u, mesh, seq(u)), _constrain(dt, mesh, seq(dt))
            h0 = _constrain(h0, mesh, st(h0))
            y, h = inner(u, dt, A, Bm, Cm, h0, **kw)
            return _constrain(y, mesh, seq(y)), _constrain(h, mesh, st(h))

    if _host_layer(kernels_on and mesh is None, config, x, scan_type, mask, seq_idx):
        return _host_mixer(params, x, config, state)
    y, new_state = mixer_forward(
        params, x, config, state, scan=scan, xp=jnp, attention_mask=mask, seq_idx=seq_idx
    )
    return _constrain(y, mesh, P(data_axis, None, None)), new_state


_forward_jit = jax.jit(
    _forward_impl,
    static_argnames=("config", "scan_type", "mesh", "data_axis", "model_axis", "kernels_on"),
)


def forward(
    params,
    x,
    config: MambaConfig,
    state: MambaState | None = None,
    *,
    scan_type: str | None = None,
    mesh: Mesh | None = None,
    data_axis: str | None = "data",
    model_axis: str | None = "model",
    attention_mask=None,
    seq_idx=None,
    cu_seqlens=None,
):
    """The mixer over x (B, L, H) -> (y (B, L, H), state after the last token).

    Jit-compiled with `config` static (a second call with the same shapes does not
    recompile).  `scan_type` overrides `config.scan_type` ("auto" = "linear" here; the
    adapter resolves "auto" per device).  With a `mesh`, activations are constrained to
    batch-over-`data_axis`, channels-over-`model_axis` shardings (see `shard_params`).
    `state` may be a `MambaState`, a (conv_state, ssm_state) tuple or a mapping, its arrays
    of any library; it is checked against the config (shapes, at trace time under jit).
    """
    return _forward_jit(
        params,
        x,
        _checked_state(state, x, config, "mamba_core.backends.jax.forward"),
        attention_mask,
        packed_index(x.shape[:2], seq_idx, cu_seqlens, owner="mamba_core.backends.jax.forward"),
        config=config,
        scan_type=scan_type if scan_type is not None else config.scan_type,
        mesh=mesh,
        data_axis=data_axis,
        model_axis=model_axis,
        kernels_on=kernels.available(),
    )


def _step_impl(params, state, x_t, config):
    _count_trace("step")
    return mixer_step(params, state, x_t, config, xp=jnp)


_step_jit = jax.jit(_step_impl, static_argnames=("config",))


def step(params, state: MambaState, x_t, config: MambaConfig):
    """One decode step: x_t (B, H) -> (y_t (B, H), new state); jit-compiled.  `state` is
    checked as in `forward`."""
    state = _checked_state(state, x_t, config, "mamba_core.backends.jax.step")
    return _step_jit(params, state, x_t, config=config)


# ---------------------------------------------------------------- context parallelism
def _combine_over(axis: str, size: int, index, a, b):
    """Inclusive Hillis-Steele scan over the devices of mesh axis `axis` of the (decay,
    state) pairs, (a1, b1) * (a2, b2) = (a1*a2, a2*b1 + b2): log2(size) rounds of one
    `ppermute` each, O(B*E*N) bytes per device per round."""
    shift = 1
    while shift < size:
        perm = [(i, i + shift) for i in range(size - shift)]
        a_prev, b_prev = lax.ppermute(a, axis, perm), lax.ppermute(b, axis, perm)
        has = index >= shift
        a, b = jnp.where(has, a * a_prev, a), jnp.where(has, a * b_prev + b, b)
        shift *= 2
    return a, b


def context_forward(
    params,
    x,
    config: MambaConfig,
    state=None,
    *,
    mesh: Mesh,
    context_axis: str = "context",
    data_axis: str | None = None,
    scan_type: str | None = None,
):
    """The mixer with the sequence split over the devices of mesh axis `context_axis`.

    Each device holds one stretch of L/S tokens (S = the axis size).  It receives the last
    d_conv-1 conv inputs of the previous stretch (a halo, one `ppermute`), scans its stretch
    from a zero state, and the (total decay, final state) pairs of the stretches are
    combined across devices by an exclusive scan (`ppermute` rounds, log2 S of them); each
    device then rescans its stretch from the state it received, so outputs, final state and
    gradients equal the single-device run.  Communication per device and layer:
    O(B*C*K) for the halo plus O(B*E*N * log2 S) for the states (Mamba-2: B*H*P*N), never
    O(L).  The final state (and conv state) is the last stretch's, on every device.

    x (B, L, H) with L divisible by S and L/S >= d_conv - 1; `state` continues a sequence
    (the first stretch starts from it); `data_axis` also splits the batch.
    """
    if config.d_conv is None:
        raise ValueError(
            "Mamba-3 has no conv and its trapezoid looks one token back across stretches: "
            "context parallelism supports version='mamba1' and 'mamba2' (received "
            f"version={config.version!r})"
        )
    size = mesh.shape[context_axis]
    batch, length, _ = x.shape
    k = config.d_conv
    if length % size:
        raise ValueError(
            f"context parallelism splits the sequence into {size} equal stretches (mesh axis "
            f"{context_axis!r}): seq_len must be divisible by {size}; received seq_len={length}"
        )
    if length // size < k - 1:
        raise ValueError(
            f"each stretch must hold at least d_conv - 1 = {k - 1} tokens; received "
            f"seq_len={length} over {size} devices"
        )
    mixer = mixer_for(config)
    if scan_type is None or scan_type == "auto":
        scan_type = mixer.auto_scan("jax", jax.default_backend(), config)
    inner = _SCAN_BUILDERS[config.version](scan_type, config.chunk_size)
    dtype = x.dtype
    if state is None:
        from mamba_core.mixer import init_state

        state = init_state(config, batch, dtype=dtype, xp=jnp)
    state = _checked_state(state, x, config, "mamba_core.backends.jax.context_forward")
    ring = [(i, i + 1) for i in range(size - 1)]

    def local(params, x, conv0, h0):
        index = lax.axis_index(context_axis)
        if k > 1:  # the previous stretch's last K-1 conv inputs
            tail = mixer.conv_inputs(params, x[:, -(k - 1) :, :], config, xp=jnp)
            halo = jnp.swapaxes(lax.ppermute(tail, context_axis, ring), 1, 2)
            halo = jnp.concatenate([jnp.zeros_like(halo[..., :1]), halo], axis=-1)
            conv_in = jnp.where(index == 0, conv0, halo.astype(conv0.dtype))
        else:
            conv_in = conv0

        def scan(u, dt, A, Bm, Cm, h_start, keep=None):
            packed = {} if keep is None else {"keep": keep}
            zeros = jnp.zeros_like(h_start)
            _, h_zero = inner(u, dt, A, Bm, Cm, zeros, **packed)
            total = jnp.sum(dt, axis=1)  # (B, E) or (B, H)
            if A.ndim == 2:  # Mamba-1: a decay per (channel, state)
                decay = jnp.exp(total[..., None] * A)
            else:  # Mamba-2: one per head
                decay = jnp.exp(total * A)[..., None, None]
            if keep is not None:  # a sequence start inside the stretch cuts the chain
                decay = decay * jnp.prod(keep, axis=1).reshape(
                    keep.shape[0], *[1] * (decay.ndim - 1)
                )
            b = jnp.where(index == 0, decay * h_start + h_zero, h_zero)
            _, b = _combine_over(context_axis, size, index, decay, b)
            h_in = jnp.where(index == 0, h_start, lax.ppermute(b, context_axis, ring))
            y, _ = inner(u, dt, A, Bm, Cm, h_in, **packed)
            return y, lax.psum(jnp.where(index == size - 1, b, zeros), context_axis)

        y, st = mixer_forward(params, x, config, mixer.State(conv_in, h0), scan=scan, xp=jnp)
        conv_last = jnp.where(index == size - 1, st.conv_state, jnp.zeros_like(st.conv_state))
        return y, mixer.State(lax.psum(conv_last, context_axis), st.ssm_state)

    spec_x = P(data_axis, context_axis, None)
    spec_state = mixer.State(P(data_axis), P(data_axis))
    axes = {context_axis} | ({data_axis} if data_axis is not None else set())
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), spec_x, P(data_axis), P(data_axis)),
        out_specs=(spec_x, spec_state),
        axis_names=axes,
        check_vma=False,
    )
    return fn(params, x, state.conv_state, state.ssm_state)


# ---------------------------------------------------------------- language models
def _lm_impl(params, ids, states, mask, config, dtype, kernels_on):
    from mamba_core.models import lm_forward

    mixer_cfg = config.mixer
    scan_type = mixer_cfg.scan_type
    if scan_type == "auto":
        scan_type = mixer_for(mixer_cfg).auto_scan("jax", jax.default_backend(), mixer_cfg)
    scan = _SCAN_BUILDERS[mixer_cfg.version](scan_type, mixer_cfg.chunk_size)

    def mixer(p, v, s, m):
        if _host_layer(kernels_on, mixer_cfg, v, scan_type, m):
            return _host_mixer(p, v, mixer_cfg, s)
        return mixer_forward(p, v, mixer_cfg, s, scan=scan, xp=jnp, attention_mask=m)

    return lm_forward(
        params, ids, config, states, dtype=dtype, mixer=mixer, attention_mask=mask, xp=jnp
    )


def _lm_step_impl(params, states, ids, config, dtype):
    from mamba_core.models import lm_forward

    def mixer(p, v, s, m):
        y, st = mixer_step(p, s, v[:, 0, :], config.mixer, xp=jnp)
        return y[:, None, :], st

    logits, new_states = lm_forward(
        params, ids[:, None], config, states, dtype=dtype, mixer=mixer, xp=jnp
    )
    return logits[:, 0, :], new_states


#: the whole language model under one jit (config, dtype and whether the kernels are on static)
_lm_jit = jax.jit(_lm_impl, static_argnames=("config", "dtype", "kernels_on"))
_lm_step_jit = jax.jit(_lm_step_impl, static_argnames=("config", "dtype"))


def lm_call(params, ids, states, mask, *, config, dtype):
    """The jitted language model: ids (B, L) -> (logits, per-layer states)."""
    return _lm_jit(
        params, ids, states, mask, config=config, dtype=jnp.dtype(dtype),
        kernels_on=kernels.available(),
    )  # fmt: skip


# ---------------------------------------------------------------- sharding helpers
def _param_spec(name: str, ndim: int, config: MambaConfig, model_axis: str | None) -> P:
    """The mixer's `SHARDED_AXIS[name]` over `model_axis`, the other axes replicated."""
    axis = mixer_for(config).SHARDED_AXIS.get(name)
    return P(*[model_axis if i == axis else None for i in range(ndim)])


def shard_params(params, mesh: Mesh, config: MambaConfig | None = None, *, model_axis="model"):
    """Place params on `mesh` with the channel (Mamba-1) or head (Mamba-2) axis of every
    parameter that has one split over `model_axis` (tensor parallel).

    The conv and the scan are independent per channel / head; projections that contract
    over E (`x_proj`, `out_proj`) need reductions that XLA adds.  Mamba-1's `in_proj` rows
    hold x_in and z back to back, so its output is re-split once per call; Mamba-2's
    `in_proj` and conv (z | x | B | C | dt rows) are replicated.  `config` defaults to
    Mamba-1.
    """
    config = config if config is not None else MambaConfig()
    return {
        name: jax.device_put(
            value, NamedSharding(mesh, _param_spec(name, value.ndim, config, model_axis))
        )
        for name, value in params.items()
    }


def shard_inputs(x, mesh: Mesh, *, data_axis: str | None = "data"):
    """Place x (B, L, H) on `mesh` with the batch split over `data_axis` (data parallel)."""
    return jax.device_put(x, NamedSharding(mesh, P(data_axis, None, None)))


# ---------------------------------------------------------------- compile-time accounting
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_compile_clock = threading.local()


def _on_duration(event: str, duration: float, **_: Any) -> None:
    if event in _COMPILE_EVENTS and getattr(_compile_clock, "active", False):
        _compile_clock.total += duration


jax.monitoring.register_event_duration_secs_listener(_on_duration)


# ---------------------------------------------------------------- the backend
class JaxBackend(Backend):
    name = "jax"
    xp = jnp

    def __init__(self) -> None:
        self._local = threading.local()  # per-thread metrics of the last call

    @property
    def dtypes(self):  # float64 exists only with jax_enable_x64
        return {
            "float32": jnp.float32,
            "float64": jnp.float64,
            "bfloat16": jnp.bfloat16,
            "float16": jnp.float16,
        }

    def dtype(self, name: str):
        if name == "float64" and not jax.config.jax_enable_x64:
            raise ValueError(
                "dtype='float64' on the jax backend needs 64-bit JAX: call "
                "jax.config.update('jax_enable_x64', True) first (or set JAX_ENABLE_X64=1)"
            )
        return super().dtype(name)

    def is_native(self, value: Any) -> bool:
        return isinstance(value, jax.Array)

    def resolve_device(self, device: Any = None):
        if device is None:
            return jax.devices()[0]
        if isinstance(device, jax.Device):
            return device
        if isinstance(device, str):
            platform, _, index = device.partition(":")
            platform = {"cuda": "gpu"}.get(platform, platform)
            try:
                return jax.devices(platform)[int(index or 0)]
            except (RuntimeError, IndexError, ValueError):
                pass
        raise ValueError(
            f"device={device!r} is invalid for the jax backend: expected a jax.Device or a "
            f"string like 'cpu', 'gpu:0', 'tpu:1'; available: {jax.devices()}"
        )

    def asarray(self, value: Any, dtype=None, device=None):
        if isinstance(value, jax.core.Tracer):
            return value if dtype is None or value.dtype == dtype else value.astype(dtype)
        if isinstance(value, jax.Array) and (dtype is None or value.dtype == dtype):
            devices = value.devices()
            if device is None or len(devices) > 1 or devices == {device}:
                return value  # already as asked (a decode loop's every step: no conversion)
        if not isinstance(value, (jax.Array, np.ndarray)):
            value = to_numpy(value)
        arr = jnp.asarray(value, dtype=dtype)
        if device is not None and not _is_sharded(arr):
            arr = jax.device_put(arr, device)
        return arr

    def device_of(self, value: Any) -> str:
        try:
            devices = value.devices()
        except Exception:  # a tracer: report the default device
            devices = {jax.devices()[0]}
        if len(devices) > 1:
            return f"{next(iter(devices)).platform}:mesh({len(devices)})"
        d = next(iter(devices))
        return f"{d.platform}:{d.id}"

    def platform(self, device: Any = None) -> str:
        return (device or jax.devices()[0]).platform

    def chunk_size(self, algorithm: str, config: MambaConfig, platform: str) -> int:
        return chunk_length(algorithm, config.chunk_size, config.version)

    def _timed(self, kind: str, fn, *args, **kwargs):
        before = getattr(_THREAD_TRACES, kind, 0)
        _compile_clock.active, _compile_clock.total = True, 0.0
        try:
            out = fn(*args, **kwargs)
        finally:
            _compile_clock.active = False
        compiled = getattr(_THREAD_TRACES, kind, 0) > before
        self._local.info = {
            "jit": True,
            "compiled_now": compiled,
            "compile_time_s": round(_compile_clock.total, 4) if compiled else 0.0,
            "jit_traces": _TRACES[kind],
        }
        return out

    def forward(
        self, params, x, config: MambaConfig, state, scan_type: str, attention_mask=None,
        seq_idx=None,
    ):  # fmt: skip
        return self._timed(
            "forward", forward, params, x, config, state, scan_type=scan_type,
            attention_mask=attention_mask, seq_idx=seq_idx,
        )  # fmt: skip

    def lm_forward(self, params, ids, config, states, attention_mask, dtype):
        states = None if states is None else list(states)
        return lm_call(params, ids, states, attention_mask, config=config, dtype=dtype)

    def lm_step(self, params, states, ids, config, dtype):
        return _lm_step_jit(params, list(states), ids, config=config, dtype=jnp.dtype(dtype))

    def step(self, params, state: MambaState, x_t, config: MambaConfig):
        # `MambaModule.step` has checked and converted the state: the jitted step directly
        # (the public `step` would check it a second time, on every token)
        return self._timed("step", _step_jit, params, state, x_t, config=config)

    def call_info(self) -> dict[str, Any]:
        return dict(getattr(self._local, "info", {}))


def _is_sharded(arr) -> bool:
    try:
        return len(arr.devices()) > 1
    except Exception:
        return False


_BACKEND = JaxBackend()


def get_backend() -> JaxBackend:
    return _BACKEND
