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

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from array_api_compat import array_namespace
from array_api_compat import device as _device

from .checks import check_state
from .config import MambaConfig
from .ops import activation_fn, causal_conv1d, is_half, linear, own, softplus
from .scan import chunk_linear, selective_scan

__all__ = [
    "PARAM_NAMES",
    "MambaState",
    "core_scan",
    "default_scan",
    "init_state",
    "mixer_forward",
    "mixer_step",
    "param_shapes",
    "prepare_params",
    "scan_dtype",
    "state_shapes",
    "validate_state",
]

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


class MambaState(NamedTuple):
    """Decode state after the last token seen.

    conv_state (B, E, K): the last K inputs of the causal conv (x_in), oldest first
        (the HuggingFace `MambaCache.conv_states` / official `conv_state` layout).
    ssm_state  (B, E, N): h, the SSM state (float32 for 16-bit compute dtypes with
        mixed precision, otherwise the compute dtype).
    """

    conv_state: Array
    ssm_state: Array


def state_shapes(config: MambaConfig, batch: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """{state field: (shape, meaning)} for a batch of `batch` sequences."""
    e, n, k = config.d_inner, config.d_state, config.d_conv
    return {
        "conv_state": ((batch, e, k), "(batch, d_inner, d_conv)"),
        "ssm_state": ((batch, e, n), "(batch, d_inner, d_state)"),
    }


def validate_state(
    state: Any, config: MambaConfig, batch: int, *, owner: str, convert: Callable | None = None
) -> MambaState:
    """The one state check of every entry point (see `mamba_core.checks.check_state`).

    `state` may be a `MambaState`, a plain (conv_state, ssm_state) tuple or a mapping with
    those keys, its arrays of any backend; `convert(array, field)` brings each to the
    caller's library, dtype and device.
    """
    arrays = check_state(
        state, state_shapes(config, batch), owner=owner, batch=batch, kind="MambaState"
    )
    if convert is not None:
        arrays = tuple(convert(a, f) for a, f in zip(arrays, MambaState._fields, strict=False))
    return MambaState(*arrays)


def scan_dtype(dtype, config: MambaConfig, *, xp):
    """The dtype the scan runs in for compute dtype `dtype` (see module doc)."""
    if config.use_mixed_precision and is_half(dtype, xp=xp):
        return xp.float32
    return dtype


def init_state(config: MambaConfig, batch_size: int, *, dtype, xp, device=None) -> MambaState:
    """The all-zero state of a fresh sequence (what a call without `state=` starts from)."""
    e, n, k = config.d_inner, config.d_state, config.d_conv
    return MambaState(
        conv_state=xp.zeros((batch_size, e, k), dtype=dtype, device=device),
        ssm_state=xp.zeros(
            (batch_size, e, n), dtype=scan_dtype(dtype, config, xp=xp), device=device
        ),
    )


def _cast(a, dtype, xp):
    return a if a.dtype == dtype else xp.astype(a, dtype)


def core_scan(algorithm: str, chunk_size: int | str = "auto") -> ScanFn:
    """The core's generic scan `algorithm` as a `scan(u, dt, A, Bm, Cm, h0)` callable."""

    def scan(u, dt, A, Bm, Cm, h0):
        return selective_scan(u, dt, A, Bm, Cm, h0, algorithm=algorithm, chunk_size=chunk_size)

    return scan


def default_scan(config: MambaConfig) -> ScanFn:
    """The core's generic scan for `config.scan_type` ("auto" -> "linear")."""
    algorithm = "linear" if config.scan_type == "auto" else config.scan_type
    return core_scan(algorithm, config.chunk_size)


def mixer_forward(
    params: Mapping[str, Array],
    x: Array,
    config: MambaConfig,
    state: MambaState | None = None,
    *,
    scan: ScanFn | None = None,
    xp=None,
) -> tuple[Array, MambaState]:
    """The mixer over a whole sequence.

    params: official-name dict (see `param_shapes`); x (B, L, H); state: the state to
    continue from (None = a fresh sequence).  `scan(u, dt, A, Bm, Cm, h0) -> (y, h)` replaces
    the selective scan (a backend's native kernel); default: the core's for
    `config.scan_type`.

    Returns out (B, L, H) in x's dtype and the state after the last token.
    """
    xp = xp if xp is not None else array_namespace(x)
    if scan is None:
        scan = default_scan(config)
    e, n, r = config.d_inner, config.d_state, config.dt_rank
    act = activation_fn(config.activation)
    dtype = x.dtype
    sdtype = scan_dtype(dtype, config, xp=xp)

    def p(name):
        return _cast(params[name], dtype, xp)

    xz = linear(x, p("in_proj.weight"), p("in_proj.bias") if config.use_bias else None, xp=xp)
    x_in, z = xz[..., :e], xz[..., e:]
    conv_state = None if state is None else _cast(state.conv_state, dtype, xp)
    x_conv, new_conv_state = causal_conv1d(
        x_in,
        p("conv1d.weight"),
        p("conv1d.bias") if config.use_conv_bias else None,
        conv_state,
        xp=xp,
    )
    u = act(x_conv, xp=xp)
    x_dbl = linear(u, p("x_proj.weight"), xp=xp)
    dt_low, b_mat, c_mat = x_dbl[..., :r], x_dbl[..., r : r + n], x_dbl[..., r + n :]
    dt = linear(dt_low, p("dt_proj.weight"), xp=xp)
    dt = softplus(_cast(dt, sdtype, xp) + _cast(params["dt_proj.bias"], sdtype, xp), xp=xp)
    if "A" in params:  # precomputed by `prepare_params` (decode loops)
        a_mat = _cast(params["A"], sdtype, xp)
    else:
        a_mat = -xp.exp(_cast(params["A_log"], sdtype, xp))
    if state is None:
        h0 = xp.zeros((x.shape[0], e, n), dtype=sdtype, device=_device(x))
    else:
        h0 = _cast(state.ssm_state, sdtype, xp)
    u_s = _cast(u, sdtype, xp)
    y, h = scan(u_s, dt, a_mat, _cast(b_mat, sdtype, xp), _cast(c_mat, sdtype, xp), h0)
    y = y + u_s * _cast(params["D"], sdtype, xp)
    y = _cast(y, dtype, xp) * act(z, xp=xp)
    out = linear(y, p("out_proj.weight"), p("out_proj.bias") if config.use_bias else None, xp=xp)
    return out, MambaState(new_conv_state, own(h, xp=xp))


def _step_scan(u, dt, A, Bm, Cm, h0):
    return chunk_linear(h0, dt, u, Bm, Cm, A)


def mixer_step(
    params: Mapping[str, Array],
    state: MambaState,
    x_t: Array,
    config: MambaConfig,
    *,
    scan: ScanFn | None = None,
    xp=None,
) -> tuple[Array, MambaState]:
    """One decode step: x_t (B, H) and the state before it -> (y_t (B, H), new state).

    The same arithmetic as `mixer_forward` on a length-1 sequence with the linear scan
    (or `scan`, a backend's native one).
    """
    xp = xp if xp is not None else array_namespace(x_t)
    step_scan = _step_scan if scan is None else scan
    y, new_state = mixer_forward(params, x_t[:, None, :], config, state, scan=step_scan, xp=xp)
    return y[:, 0, :], new_state


def prepare_params(params: Mapping[str, Array], config: MambaConfig, *, xp=None) -> dict:
    """`params` plus "A" = -exp(A_log) in the scan dtype, computed once.

    `mixer_forward` / `mixer_step` use a precomputed "A" when present, which saves E*N
    exponentials per call: worth it in a decode loop, where they are as many as the scan's.
    """
    xp = xp if xp is not None else array_namespace(params["A_log"])
    sdtype = scan_dtype(params["in_proj.weight"].dtype, config, xp=xp)
    return {**params, "A": -xp.exp(_cast(params["A_log"], sdtype, xp))}
