"""The Mamba-3 mixer (Lahoti et al., ICLR 2026; arXiv 2603.15569), forward and one-token
decode, from the specification in the repository's MAMBA3.md (written from the official
`mamba_ssm/modules/mamba3.py` and its plain-PyTorch references).

Glossary: B batch, L length, D hidden_size, E = expand_factor*D, H num_heads, P head_dim
(H*P = E), G n_groups (G | H), N d_state, R ranks (mimo_rank with MIMO, else 1), S rotary
angles (int(N*rope_fraction) rounded down to even, halved).

    [z|x|Bp|Cp|dd_dt|dd_A|trap|ang] = u @ in_proj.weight.T     [E|E|RGN|RGN|H|H|H|S]
    k = RMS_N(Bp)*B_norm + B_bias,  q = RMS_N(Cp)*C_norm + C_bias      (B,L,H,R,N)
    dt = softplus(dd_dt + dt_bias);  A = -max(f(dd_A), A_floor), f(a) = 1+a (a>=0),
         1/(1-a) (a<0);  a = dt*A <= 0;  lam = sigmoid(trap)
    phi_t = phi_{t-1} + pi*tanh(ang_t)*dt_t (per head); k, q rotated by phi (SISO:
         interleaved pairs (2j, 2j+1); MIMO: halves (j, j+N/2); j < S)
    v_r = x (.) mimo_x_r (SISO v = x);  alpha = exp(a), beta = (1-lam)*dt*alpha, gam = lam*dt
    h_t = alpha_t h_{t-1} + beta_t sum_r v_{t-1,r} k_{t-1,r}^T + gam_t sum_r v_{t,r} k_{t,r}^T
    y_r = h_t q_r + D v_r;  g_r = [RMS_P(y_r)*norm_h] (.) silu(z (.) mimo_z_r)
    out = flatten(sum_r mimo_o_r (.) g_r) @ out_proj.weight.T

The sequence runs in the augmented form (MAMBA3.md "Chunked / parallel form"):
Sb_t = h_t + sig_t sum_r v_{t,r} k_{t,r}^T with sig_t = dt_{t+1}(1-lam_{t+1}) is a plain
SSD state with keys (gam+sig) k, scanned by `mamba_core.ssd3` (any of the three algorithms),
and y = q Sb - sig sum_r (q.k_r) v_r.  Angles are reduced mod 2*pi per step and per chunk.

Precision: dt, A, the decays, the angles, the scan and its state run in float32 for 16-bit
inputs under `use_mixed_precision`; the decode state's `k` and `v` stay in the model dtype
(as upstream's `allocate_inference_cache`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
from array_api_compat import array_namespace
from array_api_compat import device as _device

from ..config import MambaConfig
from ..ops import cast, linear, own, packed_keep, scan_dtype, silu, softplus
from ..ssd import _heads
from ..ssd3 import SSD3_DEFAULT_CHUNK, ssd3_chunk_linear, ssd3_scan
from .mamba1 import inverse_softplus_dt

NAME = "mamba3"
ARCHITECTURE = "Mamba-3 mixer (trapezoidal, rotary, SISO / MIMO)"

Array = Any
ScanFn = Callable[..., tuple[Array, Array]]

#: Official parameter names (state-spaces/mamba `Mamba3`), in state-dict order.
PARAM_NAMES = (
    "in_proj.weight",
    "dt_bias",
    "B_bias",
    "C_bias",
    "B_norm.weight",
    "C_norm.weight",
    "D",
    "mimo_x",
    "mimo_z",
    "mimo_o",
    "norm.weight",
    "out_proj.weight",
)

#: the axis of each parameter that runs along the heads (tensor-parallel sharding)
SHARDED_AXIS = {
    "dt_bias": 0,
    "B_bias": 0,
    "C_bias": 0,
    "D": 0,
    "mimo_x": 0,
    "mimo_z": 0,
    "mimo_o": 0,
    "norm.weight": 0,
    "out_proj.weight": 1,
}
#: the RMSNorm eps of B, C and the output norm (upstream's)
EPS = 1e-5
#: angles are summed in chunks of this many steps, reduced mod 2*pi between them
ANGLE_CHUNK = 64


def sizes(config: MambaConfig) -> tuple[int, int, int, int, int, int, int, int]:
    """(D, E, H, P, G, N, R, S)."""
    return (
        config.hidden_size,
        config.d_inner,
        config.num_heads,
        config.head_dim,
        config.n_groups,
        config.d_state,
        config.ranks,
        config.rope_angles,
    )


def proj_splits(config: MambaConfig) -> list[int]:
    """The widths of z, x, Bp, Cp, dd_dt, dd_A, trap, ang in in_proj's output."""
    _, e, h, _, g, n, r, s = sizes(config)
    return [e, e, r * g * n, r * g * n, h, h, h, s]


def param_shapes(config: MambaConfig) -> dict[str, tuple[int, ...]]:
    """The parameter names this config has, with their shapes."""
    d, e, h, p, _, n, r, _ = sizes(config)
    shapes = {
        "in_proj.weight": (sum(proj_splits(config)), d),
        "dt_bias": (h,),
        "B_bias": (h, r, n),
        "C_bias": (h, r, n),
        "B_norm.weight": (n,),
        "C_norm.weight": (n,),
        "D": (h,),
        "mimo_x": (h, r, p),
        "mimo_z": (h, r, p),
        "mimo_o": (h, r, p),
        "norm.weight": (e,),
        "out_proj.weight": (d, e),
    }
    if not config.mimo:
        del shapes["mimo_x"], shapes["mimo_z"], shapes["mimo_o"]
    if not config.outproj_norm:
        del shapes["norm.weight"]
    return shapes


def init_params(config: MambaConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The official initialisation (float64): linears uniform in +-1/sqrt(fan_in); `dt_bias`
    = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] floored at dt_init_floor; B/C
    biases, norms and D one; mimo_x and mimo_o 1/R, mimo_z 1."""
    d, e, h, p, _, _, r, _ = sizes(config)
    shapes = param_shapes(config)
    params: dict[str, np.ndarray] = {}
    params["in_proj.weight"] = rng.uniform(-1, 1, size=shapes["in_proj.weight"]) / math.sqrt(d)
    params["dt_bias"] = inverse_softplus_dt(config, h, rng)
    for name in ("B_bias", "C_bias", "B_norm.weight", "C_norm.weight", "D", "norm.weight"):
        if name in shapes:
            params[name] = np.ones(shapes[name])
    if config.mimo:
        params["mimo_x"] = np.full((h, r, p), 1.0 / r)
        params["mimo_z"] = np.ones((h, r, p))
        params["mimo_o"] = np.full((h, r, p), 1.0 / r)
    params["out_proj.weight"] = rng.uniform(-1, 1, size=(d, e)) / math.sqrt(e)
    return {name: params[name] for name in shapes}


class Mamba3State(NamedTuple):
    """Decode state after the last token seen (upstream's `allocate_inference_cache`).

    angle     (B, H, S): the rotary angles, mod 2*pi (float32 under mixed precision).
    ssm_state (B, H, P, N): the state h (float32 under mixed precision).
    k         (B, R, H, N): the last token's rotated, biased key (before the gam scale).
    v         (B, H, P): the last token's x (before the MIMO projection).
    """

    angle: Array
    ssm_state: Array
    k: Array
    v: Array


State = Mamba3State
SCAN_DTYPE_FIELDS = ("angle", "ssm_state")


def state_shapes(config: MambaConfig, batch: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """{state field: (shape, meaning)} for a batch of `batch` sequences."""
    _, _, h, p, _, n, r, s = sizes(config)
    return {
        "angle": ((batch, h, s), "(batch, num_heads, rope angles)"),
        "ssm_state": ((batch, h, p, n), "(batch, num_heads, head_dim, d_state)"),
        "k": ((batch, r, h, n), "(batch, ranks, num_heads, d_state)"),
        "v": ((batch, h, p), "(batch, num_heads, head_dim)"),
    }


def describe(config: MambaConfig) -> str:
    """The sizes that decide this mixer's parameter shapes (`MambaConfig.describe`)."""
    return (
        f"version='mamba3', hidden_size={config.hidden_size}, d_inner={config.d_inner}, "
        f"d_state={config.d_state}, num_heads={config.num_heads}, "
        f"head_dim={config.head_dim}, n_groups={config.n_groups}, rope_fraction="
        f"{config.rope_fraction}, mimo={config.mimo}, mimo_rank={config.mimo_rank}, "
        f"outproj_norm={config.outproj_norm}"
    )


def default_chunk(algorithm: str) -> int:
    return SSD3_DEFAULT_CHUNK[algorithm]


def core_scan(algorithm: str, chunk_size: int | str = "auto") -> ScanFn:
    """The core's generic scan `algorithm` as a `scan(v, a, A, k, q, S0)` callable."""

    def scan(v, a, A, k, q, S0, keep=None):
        return ssd3_scan(v, a, A, k, q, S0, algorithm=algorithm, chunk_size=chunk_size, keep=keep)

    return scan


def auto_scan(backend: str, platform: str, config: MambaConfig) -> str:
    """`cumulative` (the SSD form: matrix products) everywhere, as Mamba-2."""
    return "cumulative"


# ---------------------------------------------------------------- pieces of the forward
def _rms(v: Array, weight: Array | None, *, xp) -> Array:
    out = v / xp.sqrt(xp.mean(v * v, axis=-1, keepdims=True) + EPS)
    return out if weight is None else out * weight


def _big_a(dd_a: Array, floor: float, *, xp) -> Array:
    """-max(f(dd_A), A_floor), f(a) = 1 + a for a >= 0 and 1/(1 - a) for a < 0."""
    pos = dd_a >= 0
    safe = xp.where(pos, xp.zeros_like(dd_a), dd_a)  # no division by a large 1 - a elsewhere
    f = xp.where(pos, 1.0 + dd_a, 1.0 / (1.0 - safe))
    return -xp.maximum(f, xp.full_like(f, floor))


def angles(inc: Array, angle0: Array, keep: Array | None, *, xp) -> Array:
    """phi_t = phi_{t-1} + inc_t from angle0 (restarting at 0 where keep is 0), mod 2*pi.

    inc (B, L, H, S), angle0 (B, H, S).  Each increment is reduced mod 2*pi, summed inside
    chunks of ANGLE_CHUNK steps by a masked (T, T) product, and the chunk totals (reduced)
    are carried by a masked product over chunks: no sum grows past a few hundred radians,
    however long the sequence."""
    two_pi = 2 * math.pi
    batch, length, heads, count = inc.shape
    inc = xp.remainder(inc, two_pi)
    t = min(ANGLE_CHUNK, length)
    chunks = -(-length // t)
    pad = chunks * t - length
    dev = _device(inc)
    if keep is None:
        keep = xp.ones((batch, length), dtype=inc.dtype, device=dev)
    if pad:
        inc = xp.concat([inc, xp.zeros((batch, pad, heads, count), dtype=inc.dtype, device=dev)], 1)
        keep = xp.concat([keep, xp.ones((batch, pad), dtype=keep.dtype, device=dev)], axis=1)
    seg = xp.cumulative_sum(1.0 - keep, axis=1)  # (B, L'): sequences started up to t
    seg_c = xp.reshape(seg, (batch, chunks, t))
    idx = xp.arange(t, device=dev)
    inside = (idx[:, None] >= idx[None, :]) & (seg_c[:, :, :, None] == seg_c[:, :, None, :])
    flat = xp.reshape(inc, (batch, chunks, t, heads * count))
    local = xp.matmul(xp.astype(inside, inc.dtype), flat)  # (B, C, T, H*S)
    totals = xp.remainder(local[:, :, t - 1, :], two_pi)  # (B, C, H*S)
    ends = seg_c[:, :, t - 1]  # (B, C): the sequence at each chunk's end
    cidx = xp.arange(chunks, device=dev)
    before = (cidx[:, None] > cidx[None, :]) & (ends[:, :, None] == ends[:, None, :])
    # the carry into chunk c: the totals of earlier chunks of the sequence running at c-1
    carry = xp.remainder(xp.matmul(xp.astype(before, inc.dtype), totals), two_pi)
    prev_end = xp.concat([xp.zeros_like(ends[:, :1]), ends[:, :-1]], axis=1)  # (B, C)
    gets = xp.astype(seg_c == prev_end[:, :, None], inc.dtype)  # no start since the carry
    first = xp.astype(seg_c == 0, inc.dtype)  # still the sequence angle0 belongs to
    phi = (
        local
        + gets[..., None] * carry[:, :, None, :]
        + first[..., None] * xp.reshape(angle0, (batch, 1, 1, heads * count))
    )
    phi = xp.reshape(xp.remainder(phi, two_pi), (batch, chunks * t, heads, count))
    return phi[:, :length, ...]


def rotate(m: Array, cos: Array, sin: Array, halved: bool, *, xp) -> Array:
    """Rotate the S angle pairs of m (..., H, R, N) by (cos, sin) (..., H, S): SISO pairs
    (2j, 2j+1), MIMO (`halved`) pairs (j, j + N/2); the other dims pass."""
    n, s = m.shape[-1], cos.shape[-1]
    c, sn = cos[..., None, :], sin[..., None, :]
    if halved:
        half = n // 2
        a, b = m[..., :s], m[..., half : half + s]
        return xp.concat(
            [a * c - b * sn, m[..., s:half], a * sn + b * c, m[..., half + s :]], axis=-1
        )
    pairs = xp.reshape(m[..., : 2 * s], (*m.shape[:-1], s, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    turned = xp.reshape(xp.stack([a * c - b * sn, a * sn + b * c], axis=-1), (*m.shape[:-1], 2 * s))
    return xp.concat([turned, m[..., 2 * s :]], axis=-1) if 2 * s < n else turned


def _last_real(values: Array, previous: Array, mask: Array | None, *, xp) -> Array:
    """values (B, L, ...) at each row's last real token (mask (B, L) of 0/1; right padding
    leaves later positions out); `previous` where a row has none; values[:, -1] unmasked."""
    if mask is None:
        return values[:, -1, ...]
    nxt = xp.concat([mask[:, 1:], xp.zeros_like(mask[:, :1])], axis=1)
    last = mask * (1 - nxt)  # (B, L): 1 at the last real token
    extra = (1,) * (values.ndim - 2)
    picked = xp.sum(xp.reshape(last, (*last.shape, *extra)) * values, axis=1)
    none = xp.reshape(1 - xp.sum(last, axis=1), (last.shape[0], *extra))
    return picked + none * previous


def forward(
    params: Mapping[str, Array],
    x: Array,
    config: MambaConfig,
    state: Mamba3State | None = None,
    *,
    scan: ScanFn | None = None,
    xp=None,
    attention_mask: Array | None = None,
    seq_idx: Array | None = None,
) -> tuple[Array, Mamba3State]:
    """The mixer over a whole sequence: x (B, L, D) -> out (B, L, D), state after the last
    token.  `scan(v, a, A, k, q, S0) -> (y, S)` replaces the core's scan for
    `config.scan_type` (a backend's chunk driver).  `attention_mask` (B, L) of 0/1: padded
    positions leave the state unchanged (dt = 0 there, no input); `seq_idx` (B, L): packed
    sequences, each restarting the state, the angles and the trapezoid's previous token."""
    xp = xp if xp is not None else array_namespace(x)
    if scan is None:
        algorithm = "cumulative" if config.scan_type == "auto" else config.scan_type
        scan = core_scan(algorithm, config.chunk_size)
    _, e, h, p, g, n, r, _ = sizes(config)
    batch, length, _ = x.shape
    dtype = x.dtype
    sdtype = scan_dtype(dtype, config, xp=xp)
    dev = _device(x)

    def f32(name):  # the float32-created parameters (dt_bias, biases, D, mimo_*)
        return cast(params[name], sdtype, xp)

    proj = linear(x, cast(params["in_proj.weight"], dtype, xp), None, xp=xp)
    bounds = np.cumsum([0, *proj_splits(config)])
    z, xs, bp, cp, dd_dt, dd_a, trap, ang = (
        proj[..., int(lo) : int(hi)] for lo, hi in itertools.pairwise(bounds)
    )
    mask = None if attention_mask is None else cast(attention_mask, sdtype, xp)
    z = cast(xp.reshape(z, (batch, length, h, p)), sdtype, xp)
    xs = cast(xp.reshape(xs, (batch, length, h, p)), sdtype, xp)
    if mask is not None:
        xs = xs * mask[..., None, None]

    def keys(raw, norm, bias):  # (B,L,R*G*N) -> (B,L,H,R,N)
        m = _rms(cast(xp.reshape(raw, (batch, length, r, g, n)), sdtype, xp), f32(norm), xp=xp)
        m = xp.permute_dims(_heads(m, h, 3, xp=xp), (0, 1, 3, 2, 4))  # (B,L,H,R,N)
        return m + f32(bias)

    k, q = keys(bp, "B_norm.weight", "B_bias"), keys(cp, "C_norm.weight", "C_bias")
    dt = softplus(cast(dd_dt, sdtype, xp) + f32("dt_bias"), xp=xp)  # (B,L,H)
    if mask is not None:
        dt = dt * mask[..., None]
    a = dt * _big_a(cast(dd_a, sdtype, xp), config.A_floor, xp=xp)
    lam = 1.0 / (1.0 + xp.exp(-cast(trap, sdtype, xp)))
    keep = None if seq_idx is None else packed_keep(seq_idx, sdtype, xp=xp)
    # rotary angles, per head through dt
    inc = math.pi * xp.tanh(cast(ang, sdtype, xp))[:, :, None, :] * dt[..., None]
    s_count = config.rope_angles
    angle0 = (
        xp.zeros((batch, h, s_count), dtype=sdtype, device=dev)
        if state is None
        else cast(state.angle, sdtype, xp)
    )
    phi = angles(inc, angle0, keep, xp=xp)  # (B,L,H,S)
    cos, sin = xp.cos(phi), xp.sin(phi)
    kt = rotate(k, cos, sin, config.mimo, xp=xp)
    qt = rotate(q, cos, sin, config.mimo, xp=xp)
    v = xs[..., None, :] * f32("mimo_x") if config.mimo else xs[..., None, :]  # (B,L,H,R,P)
    # the trapezoid: gam weighs this token, sig_t = dt_{t+1}(1 - lam_{t+1}) the next one's
    # look-back at it (0 after the last token and before a packed sequence's start)
    gam = lam * dt
    nxt = dt * (1.0 - lam)
    zero_row = xp.zeros_like(nxt[:, :1, :])
    sig = xp.concat([nxt[:, 1:, :], zero_row], axis=1)
    if keep is not None:
        sig = sig * xp.concat([keep[:, 1:], xp.ones_like(keep[:, :1])], axis=1)[..., None]
    if state is None:
        s0 = xp.zeros((batch, h, p, n), dtype=sdtype, device=dev)
    else:  # the augmented start: h + dt_0 (1 - lam_0) sum_r v_prev,r k_prev,r^T
        x_prev = cast(state.v, sdtype, xp)[:, :, None, :]  # (B,H,1,P)
        v_prev = x_prev * f32("mimo_x") if config.mimo else x_prev  # (B,H,R,P)
        k_prev = xp.permute_dims(cast(state.k, sdtype, xp), (0, 2, 1, 3))  # (B,H,R,N)
        outer = xp.matmul(xp.matrix_transpose(v_prev), k_prev)  # (B,H,P,N)
        s0 = cast(state.ssm_state, sdtype, xp) + nxt[:, 0, :, None, None] * outer
    kh = (gam + sig)[..., None, None] * kt
    packed = {} if keep is None else {"keep": keep}
    y, s = scan(v, a, None, kh, qt, s0, **packed)  # y (B,L,H,R,P) = q Sb
    if r == 1:  # SISO: one dot product per token and head (not a batch of 1x1 products)
        correction = xp.vecdot(qt, kt)[..., None] * v
    else:
        correction = xp.matmul(xp.matmul(qt, xp.matrix_transpose(kt)), v)  # (R,R) @ (R,P)
    y = y - sig[..., None, None] * correction + f32("D")[:, None, None] * v
    zr = z[..., None, :] * f32("mimo_z") if config.mimo else z[..., None, :]
    if config.outproj_norm:
        y = _rms(y, xp.reshape(cast(params["norm.weight"], sdtype, xp), (h, 1, p)), xp=xp)
    gated = y * silu(zr, xp=xp)
    o = xp.sum(gated * f32("mimo_o"), axis=3) if config.mimo else gated[:, :, :, 0, :]
    out = linear(
        cast(xp.reshape(o, (batch, length, e)), dtype, xp),
        cast(params["out_proj.weight"], dtype, xp),
        None,
        xp=xp,
    )
    # the decode state: angles (unchanged by padding), h, and the last real token's k and x
    if state is None:
        k_prev = xp.zeros((batch, h, r, n), dtype=sdtype, device=dev)
        x_last_prev = xp.zeros((batch, h, p), dtype=sdtype, device=dev)
    else:
        k_prev = xp.permute_dims(cast(state.k, sdtype, xp), (0, 2, 1, 3))
        x_last_prev = cast(state.v, sdtype, xp)
    k_last = _last_real(kt, k_prev, mask, xp=xp)  # (B,H,R,N)
    x_last = _last_real(xs, x_last_prev, mask, xp=xp)
    new_state = Mamba3State(
        own(phi[:, -1, ...], xp=xp),
        own(s, xp=xp),
        cast(xp.permute_dims(k_last, (0, 2, 1, 3)), dtype, xp),
        cast(x_last, dtype, xp),
    )
    return out, new_state


def step_scan(v, a, A, k, q, S0, keep=None):
    """The scan of a one-token step: one step of the recurrence."""
    return ssd3_chunk_linear(S0, a, v, k, q, A, keep=keep)


def prepare(params: Mapping[str, Array], config: MambaConfig, *, xp) -> dict:
    """Nothing to precompute: `params` as they are."""
    return dict(params)


def conv_inputs(params: Mapping[str, Array], x: Array, config: MambaConfig, *, xp) -> Array:
    raise ValueError(
        "Mamba-3 has no conv: context parallelism (which exchanges a conv halo) supports "
        "version='mamba1' and 'mamba2'"
    )
