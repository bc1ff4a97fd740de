"""The Mamba-3 scan: SSD with per-token decays and rank-R updates, three ways, in pure Array
API (the trapezoidal recurrence of `mamba_core.mixers.mamba3` in its augmented-state form).

Recurrence, per batch b and head h:

    S_t = exp(a_t) * S_{t-1} + sum_r v_{t,r} (outer) k_{t,r}        S: (B, H, P, N)
    y_{t,r} = S_t @ q_{t,r}                                         y: (B, H, R, P)

Shapes (B batch, T chunk length, H heads, R ranks (1 = SISO), P head_dim, N d_state):
    a   (B, T, H)        a <= 0 (dt * A)
    v   (B, T, H, R, P)
    k   (B, T, H, R, N)  the keys, already scaled by the trapezoid's weights
    q   (B, T, H, R, N)
    S0  (B, H, P, N)
    keep (B, T) or None  0 where a packed sequence starts (drops S_{t-1})

Every chunk function has the Mamba-2 chunk signature `fn(S, a, v, k, q, A, *, xp, keep)`
(`A` unused: the decay log is per token), so `mamba_core.scan.run_chunks`, PyTorch's and
JAX's chunk drivers walk it unchanged.  Only exponentials of non-positive numbers are taken.

- `linear`: the recurrence step by step; the reference.
- `associative`: the (decay, input) prefix scan of `mamba_core.scan` inside each chunk.
- `cumulative`: the SSD form: masked segment-sum decays (T, T), expanded to the (T*R, T*R)
  time-rank blocks, and batched matrix products.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as _dev

from .scan import prefix_scan, same_segment
from .ssd import scan_chunks

__all__ = ["SSD3_ALGORITHMS", "SSD3_DEFAULT_CHUNK", "ssd3_chunk_linear", "ssd3_scan"]

Array = Any

#: Default chunk length per algorithm for `chunk_size="auto"`.
SSD3_DEFAULT_CHUNK = {"linear": 64, "associative": 8, "cumulative": 64}


def ssd3_chunk_linear(S, a, v, k, q, A=None, *, xp=None, keep=None):
    """One chunk of the sequential recurrence."""
    xp = xp if xp is not None else array_namespace(S, a)
    decay = xp.exp(a)  # (B,T,H), in (0, 1]
    if keep is not None:
        decay = decay * keep[..., None]
    ys = []
    for t in range(a.shape[1]):
        S = decay[:, t, :, None, None] * S + xp.matmul(
            xp.matrix_transpose(v[:, t, ...]), k[:, t, ...]
        )
        ys.append(xp.matmul(q[:, t, ...], xp.matrix_transpose(S)))  # (B,H,R,P)
    return xp.stack(ys, axis=1), S


def ssd3_chunk_associative(S, a, v, k, q, A=None, *, xp=None, keep=None):
    """One chunk by the (decay, input) prefix scan of `mamba_core.scan.prefix_scan`."""
    xp = xp if xp is not None else array_namespace(S, a)
    decay = xp.exp(a)[..., None, None]  # (B,T,H,1,1)
    if keep is not None:
        decay = decay * keep[..., None, None, None]
    b = xp.matmul(xp.matrix_transpose(v), k)  # (B,T,H,P,N)
    decay, b = prefix_scan(decay, b, xp=xp)
    hs = decay * S[:, None, ...] + b
    return xp.matmul(q, xp.matrix_transpose(hs)), hs[:, -1, ...]


def ssd3_chunk_cumulative(S, a, v, k, q, A=None, *, xp=None, keep=None):
    """One chunk in the SSD form over (time, rank) pairs."""
    xp = xp if xp is not None else array_namespace(S, a)
    batch, length, heads, ranks, p = v.shape
    n = k.shape[-1]
    la = xp.permute_dims(a, (0, 2, 1))  # (B,H,T), <= 0
    idx = xp.arange(length, device=_dev(a))
    later = idx[:, None] > idx[None, :]
    causal = idx[:, None] >= idx[None, :]
    zero = xp.zeros_like(la[..., None])
    seg = xp.cumulative_sum(xp.where(later, la[..., None], zero), axis=2)  # (B,H,T,T)
    from_start = None
    if keep is not None:
        same, from_start = same_segment(keep, xp=xp)
        causal = causal & same[:, None, ...]
        from_start = from_start[:, None, :]  # (B,1,T)
    decay = xp.where(causal, xp.exp(seg), zero)  # (B,H,T_t,T_s)
    tr = length * ranks

    def flat(m, last):  # (B,T,H,R,X) -> (B,H,T*R,X)
        return xp.reshape(xp.permute_dims(m, (0, 2, 1, 3, 4)), (batch, heads, tr, last))

    vv, kk, qq = flat(v, p), flat(k, n), flat(q, n)
    blocks = xp.reshape(
        xp.broadcast_to(
            decay[:, :, :, None, :, None], (batch, heads, length, ranks, length, ranks)
        ),
        (batch, heads, tr, tr),
    )
    y = xp.matmul(xp.matmul(qq, xp.matrix_transpose(kk)) * blocks, vv)  # (B,H,TR,P)
    cs = xp.cumulative_sum(la, axis=2)  # (B,H,T)
    from_prev = xp.exp(cs)
    if from_start is not None:
        from_prev = xp.where(from_start, from_prev, xp.zeros_like(from_prev))

    def per_rank(m):  # (B,H,T) -> (B,H,T*R,1)
        return xp.reshape(
            xp.broadcast_to(m[..., None], (batch, heads, length, ranks)), (batch, heads, tr, 1)
        )

    y = y + per_rank(from_prev) * xp.matmul(qq, xp.matrix_transpose(S))
    to_end = per_rank(decay[:, :, length - 1, :])
    S = from_prev[:, :, length - 1][..., None, None] * S + xp.matmul(
        xp.matrix_transpose(vv * to_end), kk
    )
    y = xp.permute_dims(xp.reshape(y, (batch, heads, length, ranks, p)), (0, 2, 1, 3, 4))
    return y, S


#: Algorithm name -> chunk function (S, a, v, k, q, A, *, xp, keep) -> (y_chunk, S).
SSD3_ALGORITHMS: dict[str, Callable[..., tuple[Array, Array]]] = {
    "linear": ssd3_chunk_linear,
    "associative": ssd3_chunk_associative,
    "cumulative": ssd3_chunk_cumulative,
}


def ssd3_scan(
    v: Array,
    a: Array,
    A: Array | None,
    k: Array,
    q: Array,
    S0: Array,
    *,
    algorithm: str = "cumulative",
    chunk_size: int | str | None = None,
    xp=None,
    keep: Array | None = None,
) -> tuple[Array, Array]:
    """Run the Mamba-3 scan over the whole sequence, chunk by chunk (see module doc);
    argument order as the Mamba-2 scan's `(x, dt, A, Bm, Cm, S0)`.  Returns y (B, L, H, R,
    P) and the final state (B, H, P, N)."""
    xp = xp if xp is not None else array_namespace(v, a, k, q, S0)
    return scan_chunks(
        SSD3_ALGORITHMS, SSD3_DEFAULT_CHUNK, algorithm, chunk_size, S0, a, v, k, q, A, xp, keep
    )
