"""The Mamba-2 scan (state space duality, "Transformers are SSMs", Dao & Gu 2024, Section 6),
three ways, in pure Array API.

Recurrence, per batch b and head h (scalar decay per head; group g = h // (H/G)):

    S_t = exp(dt_t * A_h) * S_{t-1} + (dt_t * x_t) (outer) B_{t,g}       S: (B, H, P, N)
    y_t = S_t @ C_{t,g}                                                  y: (B, H, P)

Shapes (glossary: B batch, L length, H num_heads, P head_dim, N d_state, G n_groups,
T chunk length):
    x       (B, L, H, P)
    dt      (B, L, H)      dt > 0 (through softplus and the time_step_limit clamp)
    A       (H,)           A < 0 (= -exp(A_log))
    Bm, Cm  (B, L, G, N)
    S0      (B, H, P, N)
    returns y (B, L, H, P) (without the D*x skip term) and S_L (B, H, P, N).

The three `scan_type`s map onto it exactly as for Mamba-1 (`mamba_core.scan`): every
algorithm walks the sequence chunk by chunk with the state carried between chunks (working
memory bounded by the chunk, never O(B*L*H*P*N)), and only takes exponentials of
non-positive numbers.

- `linear`: the recurrence above, step by step; the reference.
- `associative`: the (decay, input) prefix scan of `mamba_core.scan` inside each chunk.
- `cumulative`: the SSD form.  Inside a chunk, a "segment sum" seg[t, s] = sum_{s<r<=t}
  dt_r A (summed directly, never as a difference of prefix sums, so nothing cancels and it
  is always <= 0) gives the masked decay matrix L[t, s] = exp(seg[t, s]) (s <= t); then
      y_chunk = ((C B^T) * L) @ (dt x)  +  exp(cs_t) * (C @ S_prev^T)
      S_next  = exp(cs_T) * S_prev + (dt x * exp(seg[T, s]))^T @ B
  are batched matrix products (cs = inclusive cumulative sum of dt A in the chunk): the
  Mamba-1 `cumulative` scan is its special case with one decay per (channel, state).
  A NaN inside a chunk reaches every output of that chunk through the matrix products (0 *
  NaN is NaN); the `linear` scan confines it to later steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as _dev

from .scan import prefix_scan, run_chunks, same_segment

__all__ = [
    "SSD_ALGORITHMS",
    "SSD_DEFAULT_CHUNK",
    "ssd_chunk_associative",
    "ssd_chunk_cumulative",
    "ssd_chunk_linear",
    "ssd_scan",
]

Array = Any

#: Default chunk length per algorithm for `chunk_size="auto"` (measured on CPU, README):
#: the SSD form is matrix products over (T, T) blocks; the prefix scan holds (T, H, P, N).
SSD_DEFAULT_CHUNK = {"linear": 64, "associative": 8, "cumulative": 64}


def _heads(m: Array, heads: int, axis: int, *, xp) -> Array:
    """Repeat the G groups of axis `axis` to H heads (head h reads group h // (H/G))."""
    groups = m.shape[axis]
    if groups == heads:
        return m
    shape = m.shape
    expanded = xp.expand_dims(m, axis=axis + 1)
    target = (*shape[: axis + 1], heads // groups, *shape[axis + 1 :])
    return xp.reshape(xp.broadcast_to(expanded, target), (*shape[:axis], heads, *shape[axis + 1 :]))


def ssd_chunk_linear(S, dt, x, Bm, Cm, A, *, xp=None, keep=None):
    """One chunk of the sequential recurrence.  S (B,H,P,N); dt (B,T,H); x (B,T,H,P);
    Bm, Cm (B,T,G,N); A (H,); keep (B,T) or None (0 where a packed sequence starts)."""
    xp = xp if xp is not None else array_namespace(S, dt)
    heads = A.shape[0]
    bh, ch = _heads(Bm, heads, 2, xp=xp), _heads(Cm, heads, 2, xp=xp)
    decay = xp.exp(dt * A)  # (B,T,H), in (0, 1]
    if keep is not None:
        decay = decay * keep[..., None]
    dx = dt[..., None] * x  # (B,T,H,P)
    ys = []
    for t in range(dt.shape[1]):
        S = decay[:, t, :, None, None] * S + dx[:, t, :, :, None] * bh[:, t, :, None, :]
        ys.append(xp.matmul(S, ch[:, t, :, :, None])[..., 0])
    return xp.stack(ys, axis=1), S


def ssd_chunk_associative(S, dt, x, Bm, Cm, A, *, xp=None, keep=None):
    """One chunk by the (decay, input) prefix scan of `mamba_core.scan.prefix_scan`."""
    xp = xp if xp is not None else array_namespace(S, dt)
    heads = A.shape[0]
    bh, ch = _heads(Bm, heads, 2, xp=xp), _heads(Cm, heads, 2, xp=xp)
    a = xp.exp(dt * A)[..., None, None]  # (B,T,H,1,1)
    if keep is not None:
        a = a * keep[..., None, None, None]
    b = (dt[..., None] * x)[..., None] * bh[:, :, :, None, :]  # (B,T,H,P,N)
    a, b = prefix_scan(a, b, xp=xp)
    hs = a * S[:, None, ...] + b
    return xp.matmul(hs, ch[..., None])[..., 0], hs[:, -1, ...]


def ssd_chunk_cumulative(S, dt, x, Bm, Cm, A, *, xp=None, keep=None):
    """One chunk in the SSD form: masked segment-sum decays and batched matrix products."""
    xp = xp if xp is not None else array_namespace(S, dt)
    heads = A.shape[0]
    length = dt.shape[1]
    a = xp.permute_dims(dt * A, (0, 2, 1))  # (B,H,T), <= 0
    idx = xp.arange(length, device=_dev(dt))
    later = idx[:, None] > idx[None, :]  # (T_r, T_s): r > s
    causal = idx[:, None] >= idx[None, :]  # (T_t, T_s): s <= t
    zero = xp.zeros_like(a[..., None])
    # seg[b, h, t, s] = sum_{s < r <= t} a[b, h, r]: a cumulative sum over r of masked terms
    seg = xp.cumulative_sum(xp.where(later, a[..., None], zero), axis=2)  # (B,H,T,T)
    from_start = None
    if keep is not None:  # packed sequences: no decay across a sequence start
        same, from_start = same_segment(keep, xp=xp)
        causal = causal & same[:, None, ...]
        from_start = from_start[:, None, :]  # (B,1,T)
    decay = xp.where(causal, xp.exp(seg), zero)
    bg = xp.permute_dims(Bm, (0, 2, 1, 3))  # (B,G,T,N)
    cg = xp.permute_dims(Cm, (0, 2, 1, 3))
    scores = _heads(xp.matmul(cg, xp.matrix_transpose(bg)), heads, 1, xp=xp)  # (B,H,T,T)
    xdt = xp.permute_dims(x * dt[..., None], (0, 2, 1, 3))  # (B,H,T,P)
    y = xp.matmul(scores * decay, xdt)  # within the chunk
    cs = xp.cumulative_sum(a, axis=2)  # (B,H,T), decay from the chunk start, <= 0
    ch = _heads(cg, heads, 1, xp=xp)  # (B,H,T,N)
    from_prev = xp.exp(cs)
    if from_start is not None:
        from_prev = xp.where(from_start, from_prev, xp.zeros_like(from_prev))
    y = y + from_prev[..., None] * xp.matmul(ch, xp.matrix_transpose(S))  # from S_prev
    to_end = decay[:, :, length - 1, :]  # (B,H,T): decay from s to the chunk end
    bh = _heads(bg, heads, 1, xp=xp)
    S = from_prev[:, :, length - 1][..., None, None] * S + xp.matmul(
        xp.matrix_transpose(xdt * to_end[..., None]), bh
    )
    return xp.permute_dims(y, (0, 2, 1, 3)), S


#: Algorithm name -> chunk function (S, dt, x, Bm, Cm, A, *, xp) -> (y_chunk, S).
SSD_ALGORITHMS: dict[str, Callable[..., tuple[Array, Array]]] = {
    "linear": ssd_chunk_linear,
    "associative": ssd_chunk_associative,
    "cumulative": ssd_chunk_cumulative,
}


def ssd_scan(
    x: Array,
    dt: Array,
    A: Array,
    Bm: Array,
    Cm: Array,
    S0: Array,
    *,
    algorithm: str = "cumulative",
    chunk_size: int | str | None = None,
    xp=None,
    keep: Array | None = None,
) -> tuple[Array, Array]:
    """Run the Mamba-2 scan over the whole sequence, chunk by chunk (see module doc).

    `keep` (B, L): 0 where a packed sequence starts, as in `mamba_core.scan`.
    Returns y (B, L, H, P) and the final state S_L (B, H, P, N).
    """
    xp = xp if xp is not None else array_namespace(x, dt, A, Bm, Cm, S0)
    return scan_chunks(
        SSD_ALGORITHMS, SSD_DEFAULT_CHUNK, algorithm, chunk_size, S0, dt, x, Bm, Cm, A, xp, keep
    )


def scan_chunks(table, defaults, algorithm, chunk_size, S0, dt, x, Bm, Cm, A, xp, keep):
    """Run `table[algorithm]` chunk by chunk (`run_chunks`), the chunk length from
    `chunk_size` or `defaults` ("auto"/None): the walk shared by the Mamba-2 and -3 scans."""
    try:
        chunk_fn = table[algorithm]
    except KeyError:
        raise ValueError(
            f"algorithm={algorithm!r} is invalid: expected one of {sorted(table)}"
        ) from None
    step = defaults[algorithm] if chunk_size in (None, "auto") else int(chunk_size)
    return run_chunks(chunk_fn, S0, dt, x, Bm, Cm, A, step, xp=xp, keep=keep)
