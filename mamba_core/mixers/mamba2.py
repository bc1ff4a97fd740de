"""The Mamba-2 mixer (SSD, "Transformers are SSMs", Dao & Gu 2024, Section 7), forward and
one-token decode.

Glossary: B batch, L length, D hidden_size, E = expand_factor*D (d_inner), H num_heads,
P head_dim (H*P = E), G n_groups (G | H), N d_state, K d_conv, C = E + 2GN (conv_dim).

    [z | xBC | dt] = x @ in_proj.weight.T (+ bias)     sizes [E | C | H]      (B,L,2E+2GN+H)
    xBC  = act(causal_depthwise_conv(xBC))              all C channels          (B,L,C)
    x, Bm, Cm = split(xBC)                              (B,L,H,P), (B,L,G,N) x2
    dt   = clamp(softplus(dt + dt_bias), time_step_limit)                      (B,L,H)
    A    = -exp(A_log)                                  one scalar per head     (H,)
    S_t  = exp(dt_t A) S_{t-1} + dt_t x_t (outer) B_{t,g(h)}                   (B,H,P,N)
    y    = S_t @ C_{t,g(h)} + D_h x_t                                          (B,L,H,P)
    y    = rmsnorm_grouped(y * silu(z)) * norm.weight   RMS over G groups of E/G channels
    out  = y @ out_proj.weight.T (+ bias)                                      (B,L,D)

Head h reads group g(h) = h // (H/G).  The gate is applied before the norm (HuggingFace
`MambaRMSNormGated`, official `RMSNormGated(norm_before_gate=False)`).  `activation` is the
conv's activation (swish by default, as the official layer); the gate is always SiLU.

Precision: as Mamba-1 (`mamba1.py`): dt, the decays, the scan, its state and the gated norm
run in float32 for 16-bit inputs under `use_mixed_precision`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
from array_api_compat import array_namespace
from array_api_compat import device as _device

from ..config import MambaConfig
from ..ops import (
    activation_fn,
    cast,
    causal_conv1d,
    gated_rmsnorm,
    linear,
    own,
    packed_keep,
    scan_dtype,
    softplus,
)
from ..ssd import SSD_DEFAULT_CHUNK, ssd_chunk_linear, ssd_scan
from .mamba1 import inverse_softplus_dt

NAME = "mamba2"
ARCHITECTURE = "Structured State Space Duality (Mamba-2 mixer)"

Array = Any
ScanFn = Callable[..., tuple[Array, Array]]

#: Official / HuggingFace parameter names, in official state-dict order.
PARAM_NAMES = (
    "in_proj.weight",
    "in_proj.bias",
    "conv1d.weight",
    "conv1d.bias",
    "dt_bias",
    "A_log",
    "D",
    "norm.weight",
    "out_proj.weight",
    "out_proj.bias",
)


#: the axis of each parameter that runs along the heads (tensor-parallel sharding); in_proj
#: and the conv mix z, x, B, C and dt rows and stay replicated
SHARDED_AXIS = {"dt_bias": 0, "A_log": 0, "D": 0, "norm.weight": 0, "out_proj.weight": 1}


def sizes(config: MambaConfig) -> tuple[int, int, int, int, int, int, int]:
    """(D, E, H, P, G, N, K)."""
    return (
        config.hidden_size,
        config.d_inner,
        config.num_heads,
        config.head_dim,
        config.n_groups,
        config.d_state,
        config.d_conv,
    )


def conv_dim(config: MambaConfig) -> int:
    return config.d_inner + 2 * config.n_groups * config.d_state


def param_shapes(config: MambaConfig) -> dict[str, tuple[int, ...]]:
    """The parameter names this config has, with their shapes."""
    d, e, h, _, _g, _n, k = sizes(config)
    c = conv_dim(config)
    shapes = {
        "in_proj.weight": (e + c + h, d),
        "in_proj.bias": (e + c + h,),
        "conv1d.weight": (c, 1, k),
        "conv1d.bias": (c,),
        "dt_bias": (h,),
        "A_log": (h,),
        "D": (h,),
        "norm.weight": (e,),
        "out_proj.weight": (d, e),
        "out_proj.bias": (d,),
    }
    if not config.use_bias:
        del shapes["in_proj.bias"], shapes["out_proj.bias"]
    if not config.use_conv_bias:
        del shapes["conv1d.bias"]
    return shapes


def init_params(config: MambaConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The official scheme (state-spaces/mamba `Mamba2.__init__`), float64: linears and conv
    uniform in +-1/sqrt(fan_in); `dt_bias` = softplus^-1(dt), dt log-uniform in
    [dt_min, dt_max] floored at dt_init_floor; `A_log` = log(A), A uniform in A_init_range;
    `D = 1`; `norm.weight = 1`."""
    d, e, h, _, _, _, k = sizes(config)
    c = conv_dim(config)

    def uniform(shape, bound):
        return rng.uniform(-bound, bound, size=shape)

    params: dict[str, np.ndarray] = {}
    params["in_proj.weight"] = uniform((e + c + h, d), 1 / math.sqrt(d))
    if config.use_bias:
        params["in_proj.bias"] = uniform((e + c + h,), 1 / math.sqrt(d))
    params["conv1d.weight"] = uniform((c, 1, k), 1 / math.sqrt(k))
    if config.use_conv_bias:
        params["conv1d.bias"] = uniform((c,), 1 / math.sqrt(k))
    params["dt_bias"] = inverse_softplus_dt(config, h, rng)
    lo, hi = config.A_init_range
    params["A_log"] = np.log(rng.uniform(lo, hi, size=h))
    params["D"] = np.ones(h)
    params["norm.weight"] = np.ones(e)
    params["out_proj.weight"] = uniform((d, e), 1 / math.sqrt(e))
    if config.use_bias:
        params["out_proj.bias"] = uniform((d,), 1 / math.sqrt(e))
    return params


class Mamba2State(NamedTuple):
    """Decode state after the last token seen (the HuggingFace `Mamba2Cache` layout).

    conv_state (B, C, K): the last K conv inputs (x, B and C channels), oldest first.
    ssm_state  (B, H, P, N): the SSM state (float32 for 16-bit compute under mixed precision).
    """

    conv_state: Array
    ssm_state: Array


State = Mamba2State
SCAN_DTYPE_FIELDS = ("ssm_state",)


def state_shapes(config: MambaConfig, batch: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """{state field: (shape, meaning)} for a batch of `batch` sequences."""
    _, _, h, p, _, n, k = sizes(config)
    return {
        "conv_state": (
            (batch, conv_dim(config), k),
            "(batch, d_inner + 2*n_groups*d_state, d_conv)",
        ),
        "ssm_state": ((batch, h, p, n), "(batch, num_heads, head_dim, d_state)"),
    }


def describe(config: MambaConfig) -> str:
    """The sizes that decide this mixer's parameter shapes (`MambaConfig.describe`)."""
    return (
        f"version='mamba2', hidden_size={config.hidden_size}, d_inner={config.d_inner}, "
        f"d_state={config.d_state}, num_heads={config.num_heads}, "
        f"head_dim={config.head_dim}, n_groups={config.n_groups}, d_conv={config.d_conv}, "
        f"use_bias={config.use_bias}, use_conv_bias={config.use_conv_bias}"
    )


def default_chunk(algorithm: str) -> int:
    return SSD_DEFAULT_CHUNK[algorithm]


def core_scan(algorithm: str, chunk_size: int | str = "auto") -> ScanFn:
    """The core's generic scan `algorithm` as a `scan(x, dt, A, Bm, Cm, S0)` callable."""

    def scan(x, dt, A, Bm, Cm, S0, keep=None):
        return ssd_scan(x, dt, A, Bm, Cm, S0, algorithm=algorithm, chunk_size=chunk_size, keep=keep)

    return scan


def auto_scan(backend: str, platform: str, config: MambaConfig) -> str:
    """`cumulative` (the SSD form: matrix products) everywhere: the fastest on CPU on every
    backend (measured, README "Mamba-2"), and the form designed for tensor cores."""
    return "cumulative"


def forward(
    params: Mapping[str, Array],
    x: Array,
    config: MambaConfig,
    state: Mamba2State | None = None,
    *,
    scan: ScanFn | None = None,
    xp=None,
    attention_mask: Array | None = None,
    seq_idx: Array | None = None,
) -> tuple[Array, Mamba2State]:
    """The mixer over a whole sequence: x (B, L, D) -> out (B, L, D), state after the last
    token.  `scan(x, dt, A, Bm, Cm, S0) -> (y, S)` replaces the core's scan for
    `config.scan_type` (a backend's native kernel).  `attention_mask` (B, L) of 0/1: padded
    positions feed nothing to the conv and leave the state unchanged (as in Mamba-1);
    `seq_idx` (B, L): packed sequences, restarting the conv and the state (as in Mamba-1)."""
    xp = xp if xp is not None else array_namespace(x)
    if scan is None:
        algorithm = "cumulative" if config.scan_type == "auto" else config.scan_type
        scan = core_scan(algorithm, config.chunk_size)
    _, e, h, p, g, n, _ = sizes(config)
    batch, length, _ = x.shape
    act = activation_fn(config.activation)
    dtype = x.dtype
    sdtype = scan_dtype(dtype, config, xp=xp)

    def w(name):
        return cast(params[name], dtype, xp)

    proj = linear(x, w("in_proj.weight"), w("in_proj.bias") if config.use_bias else None, xp=xp)
    c = conv_dim(config)
    z, xbc, dt = proj[..., :e], proj[..., e : e + c], proj[..., e + c :]
    if attention_mask is not None:
        xbc = xbc * cast(attention_mask, dtype, xp)[..., None]
    conv_state = None if state is None else cast(state.conv_state, dtype, xp)
    xbc, new_conv_state = causal_conv1d(
        xbc,
        w("conv1d.weight"),
        w("conv1d.bias") if config.use_conv_bias else None,
        conv_state,
        xp=xp,
        seq_idx=seq_idx,
    )
    xbc = cast(act(xbc, xp=xp), sdtype, xp)
    xs = xp.reshape(xbc[..., :e], (batch, length, h, p))
    b_mat = xp.reshape(xbc[..., e : e + g * n], (batch, length, g, n))
    c_mat = xp.reshape(xbc[..., e + g * n :], (batch, length, g, n))
    dt = softplus(cast(dt, sdtype, xp) + cast(params["dt_bias"], sdtype, xp), xp=xp)
    lo, hi = config.time_step_limit
    if lo > 0 or hi < math.inf:
        dt = xp.clip(dt, min=lo if lo > 0 else None, max=hi if hi < math.inf else None)
    if attention_mask is not None:
        dt = dt * cast(attention_mask, sdtype, xp)[..., None]
    if "A" in params:  # precomputed by `prepare` (decode loops)
        a_vec = cast(params["A"], sdtype, xp)
    else:
        a_vec = -xp.exp(cast(params["A_log"], sdtype, xp))
    if state is None:
        s0 = xp.zeros((batch, h, p, n), dtype=sdtype, device=_device(x))
    else:
        s0 = cast(state.ssm_state, sdtype, xp)
    packed = {} if seq_idx is None else {"keep": packed_keep(seq_idx, sdtype, xp=xp)}
    y, s = scan(xs, dt, a_vec, b_mat, c_mat, s0, **packed)
    y = y + xs * cast(params["D"], sdtype, xp)[:, None]
    y = xp.reshape(y, (batch, length, e))
    y = gated_rmsnorm(y, z, params["norm.weight"], g, config.layer_norm_epsilon, xp=xp)
    out = linear(
        cast(y, dtype, xp),
        w("out_proj.weight"),
        w("out_proj.bias") if config.use_bias else None,
        xp=xp,
    )
    return out, Mamba2State(new_conv_state, own(s, xp=xp))


def step_scan(x, dt, A, Bm, Cm, S0, keep=None):
    """The scan of a one-token step: one step of the recurrence."""
    return ssd_chunk_linear(S0, dt, x, Bm, Cm, A, keep=keep)


def prepare(params: Mapping[str, Array], config: MambaConfig, *, xp) -> dict:
    """`params` plus "A" = -exp(A_log) in the scan dtype, computed once."""
    sdtype = scan_dtype(params["in_proj.weight"].dtype, config, xp=xp)
    return {**params, "A": -xp.exp(cast(params["A_log"], sdtype, xp))}


def conv_inputs(params: Mapping[str, Array], x: Array, config: MambaConfig, *, xp) -> Array:
    """The conv's inputs for tokens x (B, T, D): xBC = in_proj rows [E, E + C) (B,T,C)."""
    e, c = config.d_inner, conv_dim(config)
    w = cast(params["in_proj.weight"], x.dtype, xp)[e : e + c, ...]
    b = cast(params["in_proj.bias"], x.dtype, xp)[e : e + c] if config.use_bias else None
    return linear(x, w, b, xp=xp)
