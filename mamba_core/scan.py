"""The selective scan (Mamba paper, Section 3.2 / Algorithm 2), three ways, in pure Array API.

Recurrence, per batch b, channel e and state n (zero-order-hold discretisation of A, Euler
for B, as in the official implementation):

    h_t = exp(dt_t * A) * h_{t-1} + (dt_t * u_t) * B_t        h: (B, E, N)
    y_t = sum_n h_t[..., n] * C_t[n]                          y: (B, E)

Shapes (glossary: B batch, L length, E d_inner, N d_state, T chunk length):
    u, dt   (B, L, E)      dt > 0 (already through softplus)
    A       (E, N)         A < 0  (= -exp(A_log))
    Bm, Cm  (B, L, N)
    h0      (B, E, N)
    returns y (B, L, E) (without the D*u skip term) and h_L (B, E, N).

Every algorithm walks the sequence chunk by chunk (T steps at a time) and carries the state
between chunks, so its working memory is O(B*T*E*N) (O(B*T*T*E*N) for `cumulative`), never
O(B*L*E*N).  None of them takes the exponential of a positive number: every decay factor is
exp(non-positive), so they stay finite for any length and any dt.

- `linear`: the sequential recurrence above, step by step.  It is the reference: the other
  two are checked against it.
- `associative`: inside a chunk, an inclusive parallel prefix scan (Hillis-Steele) with the
  operator (a1, b1) * (a2, b2) = (a1*a2, a2*b1 + b2) on (decay, input) pairs:
  log2(T) levels, O(log n) parallel depth.
- `cumulative`: inside a chunk, cumulative sums of the log-decays give every decay between
  two steps s <= t as exp(sum_{r=s+1..t} dt_r*A) (a "segment sum", always <= 0, summed
  directly rather than as a difference of two prefix sums so nothing cancels), then all
  states of the chunk at once as a masked sum over s.  This is the form that maps onto
  tensor-core style hardware (CUDA); it spends (T+1)/2 exponentials per element.
  The textbook "exp(S_t) * cumsum(exp(-S_s) * b_s)" form is *not* used: exp(-S_s) overflows
  as soon as a chunk's total log-decay passes about -88 in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as _dev

__all__ = [
    "ALGORITHMS",
    "DEFAULT_CHUNK",
    "chunk_associative",
    "chunk_cumulative",
    "chunk_linear",
    "prefix_scan",
    "resolve_chunk",
    "run_chunks",
    "selective_scan",
]

Array = Any

#: Default chunk length per algorithm when `MambaConfig.chunk_size == "auto"` (measured on
#: CPU, README "Scans"): the associative scan does log2(T) full passes per chunk and the
#: cumulative one holds (T, T) decay blocks per channel, so both want short chunks here.
DEFAULT_CHUNK = {"linear": 64, "associative": 8, "cumulative": 4}


def resolve_chunk(algorithm: str, chunk_size: int | str | None) -> int:
    if chunk_size in (None, "auto"):
        return DEFAULT_CHUNK[algorithm]
    return int(chunk_size)


def _discretize(h, dt, u, Bm, A, *, xp):
    """dA = exp(dt*A) and dBu = (dt*u) * B for one chunk: both (B, T, E, N)."""
    dA = xp.exp(dt[..., None] * A)
    dBu = (dt * u)[..., None] * Bm[:, :, None, :]
    return dA, dBu


def _readout(hs, Cm, *, xp):
    """y_t = h_t . C_t for every step of a chunk: (B,T,E,N), (B,T,N) -> (B,T,E)."""
    return xp.matmul(hs, Cm[..., None])[..., 0]


def chunk_linear(h, dt, u, Bm, Cm, A, *, xp=None, keep=None):
    """One chunk of the sequential recurrence.  h (B,E,N); dt, u (B,T,E); Bm, Cm (B,T,N);
    keep (B,T) or None: 0 where a new packed sequence starts (its decay from the previous
    state is 0: the state restarts), 1 elsewhere."""
    xp = xp if xp is not None else array_namespace(h, dt)
    dA, dBu = _discretize(h, dt, u, Bm, A, xp=xp)
    if keep is not None:
        dA = dA * keep[:, :, None, None]
    ys = []
    for t in range(dt.shape[1]):
        h = dA[:, t, ...] * h + dBu[:, t, ...]
        ys.append(xp.matmul(h, Cm[:, t, :, None])[..., 0])
    return xp.stack(ys, axis=1), h


def prefix_scan(a, b, *, xp):
    """Inclusive Hillis-Steele prefix scan along axis 1 with the operator
    (a1, b1) * (a2, b2) = (a1*a2, a2*b1 + b2): log2(T) levels.  Returns (a, b) where a[:, t]
    is the product of the decays up to t and b[:, t] the state reached from a zero start."""
    length = b.shape[1]
    shift = 1
    while shift < length:
        # combine every element t with the running prefix ending at t - shift
        a_prev = xp.concat([xp.ones_like(a[:, :shift, ...]), a[:, : length - shift, ...]], axis=1)
        b_prev = xp.concat([xp.zeros_like(b[:, :shift, ...]), b[:, : length - shift, ...]], axis=1)
        b = a * b_prev + b
        a = a * a_prev
        shift *= 2
    return a, b


def chunk_associative(h, dt, u, Bm, Cm, A, *, xp=None, keep=None):
    """One chunk by an inclusive Hillis-Steele prefix scan over (decay, input) pairs."""
    xp = xp if xp is not None else array_namespace(h, dt)
    dA, dBu = _discretize(h, dt, u, Bm, A, xp=xp)
    if keep is not None:
        dA = dA * keep[:, :, None, None]
    a, b = prefix_scan(dA, dBu, xp=xp)
    hs = a * h[:, None, ...] + b  # a is now the decay from the chunk start to t
    return _readout(hs, Cm, xp=xp), hs[:, -1, ...]


def same_segment(keep, *, xp):
    """For keep (B,T) (0 = a packed sequence starts): (B,T_t,T_s) True where no sequence
    starts in (s, t], i.e. step s still reaches step t; and (B,T) True where no sequence
    starts in [0, t], i.e. the state before the chunk still reaches step t."""
    starts = xp.cumulative_sum(1.0 - keep, axis=1)  # (B,T): sequences started up to t
    return starts[:, :, None] == starts[:, None, :], starts == 0


def chunk_cumulative(h, dt, u, Bm, Cm, A, *, xp=None, keep=None):
    """One chunk from cumulative sums of log-decays (segment sums), all steps at once."""
    xp = xp if xp is not None else array_namespace(h, dt)
    length = dt.shape[1]
    log_a = dt[..., None] * A  # (B,T,E,N), <= 0
    dBu = (dt * u)[..., None] * Bm[:, :, None, :]  # (B,T,E,N)
    idx = xp.arange(length, device=_dev(dt))
    later = (idx[:, None] > idx[None, :])[:, :, None, None]  # (T_r, T_s): r > s
    causal = (idx[:, None] >= idx[None, :])[:, :, None, None]  # (T_t, T_s): s <= t
    zero = xp.zeros_like(log_a[:, :, None, ...])
    # seg[b, t, s] = sum_{s < r <= t} log_a[b, r]: a cumulative sum over r of masked terms
    seg = xp.cumulative_sum(xp.where(later, log_a[:, :, None, ...], zero), axis=1)
    # masked with `where`, not multiplied by 0: a NaN at step s must not reach steps t < s
    if keep is not None:  # packed sequences: no decay across a sequence start
        same, from_start = same_segment(keep, xp=xp)
        causal = causal & same[..., None, None]
    terms = xp.where(causal, xp.exp(seg) * dBu[:, None, ...], zero)  # (B,T_t,T_s,E,N)
    decay_from_start = xp.exp(xp.cumulative_sum(log_a, axis=1))  # (B,T,E,N)
    if keep is not None:
        decay_from_start = xp.where(from_start[..., None, None], decay_from_start, zero[:, 0])
    hs = xp.sum(terms, axis=2) + decay_from_start * h[:, None, ...]
    return _readout(hs, Cm, xp=xp), hs[:, -1, ...]


#: Algorithm name -> chunk function (h, dt, u, Bm, Cm, A, *, xp) -> (y_chunk, h).
ALGORITHMS: dict[str, Callable[..., tuple[Array, Array]]] = {
    "linear": chunk_linear,
    "associative": chunk_associative,
    "cumulative": chunk_cumulative,
}


def selective_scan(
    u: Array,
    dt: Array,
    A: Array,
    Bm: Array,
    Cm: Array,
    h0: Array,
    *,
    algorithm: str = "linear",
    chunk_size: int | str | None = None,
    xp=None,
    keep: Array | None = None,
) -> tuple[Array, Array]:
    """Run the selective scan over the whole sequence, chunk by chunk (see module doc).

    `keep` (B, L) or None: 0 at the first token of each packed sequence (the state restarts
    from zero there), 1 elsewhere.  Returns y (B, L, E) and the final state h_L (B, E, N).
    """
    xp = xp if xp is not None else array_namespace(u, dt, A, Bm, Cm, h0)
    try:
        chunk_fn = ALGORITHMS[algorithm]
    except KeyError:
        raise ValueError(
            f"algorithm={algorithm!r} is invalid: expected one of {sorted(ALGORITHMS)}"
        ) from None
    step = resolve_chunk(algorithm, chunk_size)
    return run_chunks(chunk_fn, h0, dt, u, Bm, Cm, A, step, xp=xp, keep=keep)


def run_chunks(chunk_fn, h0, dt, u, Bm, Cm, A, step: int, *, xp, keep=None):
    """Walk the sequence (axis 1 of dt, u, Bm, Cm, keep) `step` steps at a time, carrying the
    state: `chunk_fn(h, dt, u, Bm, Cm, A, xp=xp[, keep=...]) -> (y_chunk, h)`.
    Returns (y, h_L)."""
    length = dt.shape[1]
    h = h0
    ys = []
    for start in range(0, length, step):
        stop = min(start + step, length)
        y, h = chunk_fn(
            h,
            dt[:, start:stop, ...],
            u[:, start:stop, ...],
            Bm[:, start:stop, ...],
            Cm[:, start:stop, ...],
            A,
            xp=xp,
            **({} if keep is None else {"keep": keep[:, start:stop]}),
        )
        ys.append(y)
    return (ys[0] if len(ys) == 1 else xp.concat(ys, axis=1)), h
