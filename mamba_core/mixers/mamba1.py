"""The Mamba-1 mixer (Mamba paper, Section 3 and Figure 3), forward and one-token decode.

Glossary: B batch, L length, H hidden_size, E = expand_factor*H, N d_state, R dt_rank,
K d_conv.

    xz    = x @ in_proj.weight.T (+ in_proj.bias)              (B,L,2E) -> x_in, z (B,L,E)
    u     = act(causal_depthwise_conv(x_in))                   (B,L,E)
    x_dbl = u @ x_proj.weight.T                                (B,L,R+2N) -> dt_low, Bm, Cm
    dt    = softplus(dt_low @ dt_proj.weight.T + dt_proj.bias) (B,L,E)
    A     = -exp(A_log)                                        (E,N)
    y     = selective_scan(u, dt, A, Bm, Cm) + D*u             (B,L,E)
    out   = (y * act(z)) @ out_proj.weight.T (+ out_proj.bias) (B,L,H)

Parameters live in a flat dict keyed by the official / HuggingFace state-dict names.  The
decode state is an immutable `MambaState` value; nothing is updated in place.

Precision: everything runs in the dtype of `x`.  For a 16-bit `x` (bfloat16, float16) with
`config.use_mixed_precision` (the default), dt, the decays, the scan and its state run in
float32 and only the projections, the conv and the gate stay in 16 bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
from array_api_compat import array_namespace
from array_api_compat import device as _device

from ..config import MambaConfig
from ..ops import activation_fn, cast, causal_conv1d, linear, own, packed_keep, scan_dtype, softplus
from ..scan import DEFAULT_CHUNK, chunk_linear, selective_scan

NAME = "mamba1"
ARCHITECTURE = "Selective State Space Model (Mamba-1 mixer)"

Array = Any
ScanFn = Callable[..., tuple[Array, Array]]

#: Official / HuggingFace parameter names, in state-dict order (biases only when configured).
PARAM_NAMES = (
    "in_proj.weight",
    "in_proj.bias",
    "conv1d.weight",
    "conv1d.bias",
    "x_proj.weight",
    "dt_proj.weight",
    "dt_proj.bias",
    "A_log",
    "D",
    "out_proj.weight",
    "out_proj.bias",
)


def param_shapes(config: MambaConfig) -> dict[str, tuple[int, ...]]:
    """The parameter names this config has, with their shapes."""
    h, e, n, r, k = config.dims
    shapes = {
        "in_proj.weight": (2 * e, h),
        "in_proj.bias": (2 * e,),
        "conv1d.weight": (e, 1, k),
        "conv1d.bias": (e,),
        "x_proj.weight": (r + 2 * n, e),
        "dt_proj.weight": (e, r),
        "dt_proj.bias": (e,),
        "A_log": (e, n),
        "D": (e,),
        "out_proj.weight": (h, e),
        "out_proj.bias": (h,),
    }
    if not config.use_bias:
        del shapes["in_proj.bias"], shapes["out_proj.bias"]
    if not config.use_conv_bias:
        del shapes["conv1d.bias"]
    return shapes


#: the axis of each parameter that runs along the channels E (tensor-parallel sharding):
#: the conv and the scan are independent per channel; x_proj / out_proj contract over E
SHARDED_AXIS = {
    "in_proj.weight": 0,
    "in_proj.bias": 0,
    "conv1d.weight": 0,
    "conv1d.bias": 0,
    "x_proj.weight": 1,
    "dt_proj.weight": 0,
    "dt_proj.bias": 0,
    "A_log": 0,
    "D": 0,
    "out_proj.weight": 1,
}


def inverse_softplus_dt(config: MambaConfig, count: int, rng: np.random.Generator) -> np.ndarray:
    """softplus^-1(dt) with dt log-uniform in [dt_min, dt_max], floored at dt_init_floor (the
    official dt initialisation, shared by every mixer)."""
    log_lo, log_hi = math.log(config.dt_min), math.log(config.dt_max)
    dt = np.exp(rng.uniform(size=count) * (log_hi - log_lo) + log_lo)
    dt = np.maximum(dt, config.dt_init_floor)
    return dt + np.log(-np.expm1(-dt))


def init_params(config: MambaConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The official scheme (state-spaces/mamba `Mamba.__init__`, HF `MambaMixer`), float64:
    linears and conv uniform in +-1/sqrt(fan_in); `dt_proj.weight` uniform in
    +-dt_rank**-0.5 * dt_scale; `dt_proj.bias` = softplus^-1(dt); `A_log[e, n] = log(n+1)`
    (S4D-real); `D = 1`."""
    h, e, n, r, k = config.dims

    def uniform(shape, bound):
        return rng.uniform(-bound, bound, size=shape)

    params: dict[str, np.ndarray] = {}
    params["in_proj.weight"] = uniform((2 * e, h), 1 / math.sqrt(h))
    if config.use_bias:
        params["in_proj.bias"] = uniform((2 * e,), 1 / math.sqrt(h))
    params["conv1d.weight"] = uniform((e, 1, k), 1 / math.sqrt(k))
    if config.use_conv_bias:
        params["conv1d.bias"] = uniform((e,), 1 / math.sqrt(k))
    params["x_proj.weight"] = uniform((r + 2 * n, e), 1 / math.sqrt(e))
    params["dt_proj.weight"] = uniform((e, r), r**-0.5 * config.dt_scale)
    params["dt_proj.bias"] = inverse_softplus_dt(config, e, rng)
    params["A_log"] = np.log(np.broadcast_to(np.arange(1, n + 1, dtype=np.float64), (e, n)))
    params["D"] = np.ones(e)
    params["out_proj.weight"] = uniform((h, e), 1 / math.sqrt(e))
    if config.use_bias:
        params["out_proj.bias"] = uniform((h,), 1 / math.sqrt(e))
    return params


class MambaState(NamedTuple):
    """Decode state after the last token seen.

    conv_state (B, E, K): the last K inputs of the causal conv (x_in), oldest first
        (the HuggingFace `MambaCache.conv_states` / official `conv_state` layout).
    ssm_state  (B, E, N): h, the SSM state (float32 for 16-bit compute dtypes with
        mixed precision, otherwise the compute dtype).
    """

    conv_state: Array
    ssm_state: Array


State = MambaState


def state_shapes(config: MambaConfig, batch: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """{state field: (shape, meaning)} for a batch of `batch` sequences."""
    e, n, k = config.d_inner, config.d_state, config.d_conv
    return {
        "conv_state": ((batch, e, k), "(batch, d_inner, d_conv)"),
        "ssm_state": ((batch, e, n), "(batch, d_inner, d_state)"),
    }


#: state fields kept in the scan dtype (float32 under mixed precision); the rest: compute dtype
SCAN_DTYPE_FIELDS = ("ssm_state",)


def describe(config: MambaConfig) -> str:
    """The sizes that decide this mixer's parameter shapes (`MambaConfig.describe`)."""
    return (
        f"hidden_size={config.hidden_size}, d_inner={config.d_inner}, "
        f"d_state={config.d_state}, dt_rank={config.dt_rank}, d_conv={config.d_conv}, "
        f"use_bias={config.use_bias}, use_conv_bias={config.use_conv_bias}"
    )


def default_chunk(algorithm: str) -> int:
    return DEFAULT_CHUNK[algorithm]


def core_scan(algorithm: str, chunk_size: int | str = "auto") -> ScanFn:
    """The core's generic scan `algorithm` as a `scan(u, dt, A, Bm, Cm, h0)` callable."""

    def scan(u, dt, A, Bm, Cm, h0, keep=None):
        return selective_scan(
            u, dt, A, Bm, Cm, h0, algorithm=algorithm, chunk_size=chunk_size, keep=keep
        )

    return scan


def auto_scan(backend: str, platform: str, config: MambaConfig) -> str:
    """What `scan_type="auto"` runs.  CPU: `linear` on every backend (measured, README
    "Scans").  JAX on a TPU: `associative` with `use_tpu_optimizations`; JAX on a GPU:
    `associative`; PyTorch on CUDA: `cumulative` (few kernel launches per chunk)."""
    if backend == "jax" and platform == "tpu":
        return "associative" if config.use_tpu_optimizations else "linear"
    if platform == "gpu":
        return "associative" if backend == "jax" else "cumulative"
    return "linear"


def forward(
    params: Mapping[str, Array],
    x: Array,
    config: MambaConfig,
    state: MambaState | None = None,
    *,
    scan: ScanFn | None = None,
    xp=None,
    attention_mask: Array | None = None,
    seq_idx: Array | None = None,
) -> tuple[Array, MambaState]:
    """The mixer over a whole sequence.

    params: official-name dict (see `param_shapes`); x (B, L, H); state: the state to
    continue from (None = a fresh sequence).  `scan(u, dt, A, Bm, Cm, h0) -> (y, h)` replaces
    the selective scan (a backend's native kernel); default: the core's for
    `config.scan_type`.

    `attention_mask` (B, L) of 0/1 (1 = real token): a padded position feeds nothing to the
    conv (its input is zeroed) and leaves the SSM state unchanged (its dt is zeroed: decay 1,
    input 0), so real positions of a left-padded row equal the unpadded run.
    `seq_idx` (B, L) integers: packed sequences; at every change the conv sees nothing of
    the previous sequence and the SSM state restarts from zero (`scan(..., keep=...)`).

    Returns out (B, L, H) in x's dtype and the state after the last token.
    """
    xp = xp if xp is not None else array_namespace(x)
    if scan is None:
        scan = core_scan(
            "linear" if config.scan_type == "auto" else config.scan_type, config.chunk_size
        )
    e, n, r = config.d_inner, config.d_state, config.dt_rank
    act = activation_fn(config.activation)
    dtype = x.dtype
    sdtype = scan_dtype(dtype, config, xp=xp)

    def p(name):
        return cast(params[name], dtype, xp)

    xz = linear(x, p("in_proj.weight"), p("in_proj.bias") if config.use_bias else None, xp=xp)
    x_in, z = xz[..., :e], xz[..., e:]
    if attention_mask is not None:
        x_in = x_in * cast(attention_mask, dtype, xp)[..., None]
    conv_state = None if state is None else cast(state.conv_state, dtype, xp)
    x_conv, new_conv_state = causal_conv1d(
        x_in,
        p("conv1d.weight"),
        p("conv1d.bias") if config.use_conv_bias else None,
        conv_state,
        xp=xp,
        seq_idx=seq_idx,
    )
    u = act(x_conv, xp=xp)
    x_dbl = linear(u, p("x_proj.weight"), xp=xp)
    dt_low, b_mat, c_mat = x_dbl[..., :r], x_dbl[..., r : r + n], x_dbl[..., r + n :]
    dt_pre = cast(linear(dt_low, p("dt_proj.weight"), xp=xp), sdtype, xp)
    dt_bias = cast(params["dt_proj.bias"], sdtype, xp)
    if "A" in params:  # precomputed by `prepare` (decode loops)
        a_mat = cast(params["A"], sdtype, xp)
    else:
        a_mat = -xp.exp(cast(params["A_log"], sdtype, xp))
    if state is None:
        h0 = xp.zeros((x.shape[0], e, n), dtype=sdtype, device=_device(x))
    else:
        h0 = cast(state.ssm_state, sdtype, xp)
    u_s = cast(u, sdtype, xp)
    b_mat, c_mat = cast(b_mat, sdtype, xp), cast(c_mat, sdtype, xp)
    d_skip = cast(params["D"], sdtype, xp)
    dt = softplus(dt_pre + dt_bias, xp=xp)
    if attention_mask is not None:
        dt = dt * cast(attention_mask, sdtype, xp)[..., None]
    packed = {} if seq_idx is None else {"keep": packed_keep(seq_idx, sdtype, xp=xp)}
    y, h = scan(u_s, dt, a_mat, b_mat, c_mat, h0, **packed)
    y = y + u_s * d_skip
    y = cast(y, dtype, xp) * act(z, xp=xp)
    out = linear(y, p("out_proj.weight"), p("out_proj.bias") if config.use_bias else None, xp=xp)
    return out, MambaState(new_conv_state, own(h, xp=xp))


def step_scan(u, dt, A, Bm, Cm, h0, keep=None):
    """The scan of a one-token step: one step of the recurrence."""
    return chunk_linear(h0, dt, u, Bm, Cm, A, keep=keep)


def prepare(params: Mapping[str, Array], config: MambaConfig, *, xp) -> dict:
    """`params` plus "A" = -exp(A_log) in the scan dtype, computed once (a decode loop
    would otherwise spend E*N exponentials per token on it, as many as the scan's)."""
    sdtype = scan_dtype(params["in_proj.weight"].dtype, config, xp=xp)
    return {**params, "A": -xp.exp(cast(params["A_log"], sdtype, xp))}


def conv_inputs(params: Mapping[str, Array], x: Array, config: MambaConfig, *, xp) -> Array:
    """The conv's inputs for tokens x (B, T, H): x_in = the first E rows of in_proj (B,T,E)."""
    e = config.d_inner
    w = cast(params["in_proj.weight"], x.dtype, xp)[:e, ...]
    b = cast(params["in_proj.bias"], x.dtype, xp)[:e] if config.use_bias else None
    return linear(x, w, b, xp=xp)
