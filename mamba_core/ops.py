"""Elementwise and small building blocks of the Mamba mixer, in pure Array API.

Glossary: B batch, L length, H hidden_size, E = expand_factor*H, N d_state, R dt_rank,
K d_conv.  Every function takes arrays first and `xp=None` keyword-only; the namespace is
found from the inputs (`array_api_compat.array_namespace`), so the result is an array of the
caller's library on the caller's device.  Only standard calls are used (the core runs on
`array_api_strict`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from array_api_compat import array_namespace, is_jax_array, is_numpy_array, is_torch_array
from array_api_compat import device as _device

__all__ = [
    "activation_fn",
    "cast",
    "causal_conv1d",
    "gated_rmsnorm",
    "gelu_tanh",
    "is_half",
    "linear",
    "own",
    "packed_keep",
    "relu",
    "scan_dtype",
    "silu",
    "softplus",
]

Array = Any


def _ns(xp, *arrays):
    return xp if xp is not None else array_namespace(*arrays)


def own(a: Array, *, xp=None) -> Array:
    """`a` holding exactly its own memory: a copy when it is a view into a larger buffer.

    A decode state must not keep the (B, L, ...) buffer it was sliced from alive (a server
    caching one state per prompt would pay O(L) for each); arrays that already own their
    memory are returned as they are (no copy per decode step).
    """
    if is_numpy_array(a):
        return a if a.base is None else a.copy()
    if is_torch_array(a):
        return a if a._base is None else a.clone()
    if is_jax_array(a):  # immutable buffers: a slice is never a view
        return a
    xp = _ns(xp, a)
    return xp.asarray(a, copy=True)


def is_half(dtype, *, xp) -> bool:
    """True for 16-bit floating dtypes (float16, bfloat16)."""
    return xp.finfo(dtype).bits < 32


def scan_dtype(dtype, config, *, xp):
    """The dtype the scan (and its state) runs in for compute dtype `dtype`: float32 for a
    16-bit dtype under `config.use_mixed_precision`, otherwise `dtype` itself."""
    if config.use_mixed_precision and is_half(dtype, xp=xp):
        return xp.float32
    return dtype


def cast(a: Array, dtype, xp) -> Array:
    """`a` in `dtype` (no copy when it already is)."""
    return a if a.dtype == dtype else xp.astype(a, dtype)


def softplus(x: Array, *, xp=None) -> Array:
    """log(1 + exp(x)), computed without overflow: max(x, 0) + log1p(exp(-|x|))."""
    xp = _ns(xp, x)
    return xp.maximum(x, xp.zeros_like(x)) + xp.log1p(xp.exp(-xp.abs(x)))


def silu(x: Array, *, xp=None) -> Array:
    """SiLU / swish: x * sigmoid(x) = x / (1 + exp(-x))."""
    xp = _ns(xp, x)
    return x / (1.0 + xp.exp(-x))


_GELU_C = math.sqrt(2.0 / math.pi)


def gelu_tanh(x: Array, *, xp=None) -> Array:
    """GELU, tanh approximation (`jax.nn.gelu` default, `F.gelu(approximate="tanh")`).

    The exact erf form is not expressible in the Array API standard (it has no erf).
    """
    xp = _ns(xp, x)
    return 0.5 * x * (1.0 + xp.tanh(_GELU_C * (x + 0.044715 * (x * x * x))))


def relu(x: Array, *, xp=None) -> Array:
    """max(x, 0); NaN stays NaN."""
    xp = _ns(xp, x)
    return xp.maximum(x, xp.zeros_like(x))


_ACTIVATIONS: dict[str, Callable[..., Array]] = {
    "swish": silu,
    "silu": silu,
    "gelu": gelu_tanh,
    "relu": relu,
}


def activation_fn(name: str) -> Callable[..., Array]:
    """The activation called `name` (see `mamba_core.config.ACTIVATIONS`)."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"activation={name!r} is invalid: expected one of {sorted(_ACTIVATIONS)}"
        ) from None


def gated_rmsnorm(y: Array, z: Array, weight: Array, groups: int, eps: float, *, xp=None) -> Array:
    """RMSNorm(y * silu(z)) over `groups` equal groups of the last axis, times `weight`
    (HuggingFace `MambaRMSNormGated`, the official Mamba-2 `RMSNormGated` with
    norm_before_gate=False).  Computed in y's dtype; z is cast to it."""
    xp = _ns(xp, y)
    g = y * silu(cast(z, y.dtype, xp), xp=xp)
    shape = g.shape
    grouped = xp.reshape(g, (*shape[:-1], groups, shape[-1] // groups))
    variance = xp.mean(grouped * grouped, axis=-1, keepdims=True)
    grouped = grouped / xp.sqrt(variance + eps)
    return xp.reshape(grouped, shape) * cast(weight, y.dtype, xp)


def linear(x: Array, weight: Array, bias: Array | None = None, *, xp=None) -> Array:
    """x @ weight.T (+ bias), PyTorch `nn.Linear` layout: weight (out, in), x (..., in)."""
    xp = _ns(xp, x, weight)
    if x.ndim > 2:  # one (prod(lead), in) @ (in, out) product, never a loop of matrix-vector ones
        lead = x.shape[:-1]
        y = xp.reshape(xp.matmul(xp.reshape(x, (-1, x.shape[-1])), weight.mT), (*lead, -1))
    else:
        y = xp.matmul(x, weight.mT)
    if bias is not None:
        y = y + bias
    return y


def causal_conv1d(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    conv_state: Array | None = None,
    *,
    xp=None,
    seq_idx: Array | None = None,
) -> tuple[Array, Array]:
    """Causal depthwise 1-D convolution along L, as `nn.Conv1d(E, E, K, groups=E,
    padding=K-1)` followed by keeping the first L outputs.

    x (B, L, E); weight (E, 1, K); bias (E,) or None; conv_state (B, E, K) or None (zeros):
    the last K inputs seen before `x`, oldest first (the HuggingFace / official cache
    layout; only the newest K-1 of them reach the output).

    seq_idx (B, L) integers or None: packed sequences (a new one starts wherever the value
    changes); an output sees only inputs of its own sequence (the conv state counts as the
    first token's sequence), and the returned state holds only the last sequence's inputs.

    Returns out (B, L, E) and the new conv state (B, E, K): the last K inputs, oldest first.
    """
    xp = _ns(xp, x, weight)
    batch, length, channels = x.shape
    k = weight.shape[-1]
    if conv_state is None:
        past = xp.zeros((batch, k - 1, channels), dtype=x.dtype, device=_device(x))
    else:
        past = xp.permute_dims(conv_state[:, :, 1:], (0, 2, 1))
    xpad = xp.concat([past, x], axis=1)  # (B, L+K-1, E)
    w = weight[:, 0, :]  # (E, K)
    same = None
    if seq_idx is not None:  # the sequence of every padded position (past = the first's)
        first = xp.broadcast_to(seq_idx[:, :1], (batch, k - 1))
        spad = xp.concat([first, seq_idx], axis=1)  # (B, L+K-1)

        def same(j):  # input j+t belongs to the sequence of output t
            return (spad[:, j : j + length] == seq_idx)[..., None]

        zero = xp.zeros_like(x[:, :1, :])
    out = xpad[:, 0:length, :] * w[:, 0]
    if same is not None:
        out = xp.where(same(0), out, zero)
    for j in range(1, k):
        term = xpad[:, j : j + length, :] * w[:, j]
        out = out + (term if same is None else xp.where(same(j), term, zero))
    if bias is not None:
        out = out + bias
    window = xpad[:, length - 1 :, :]  # (B, K, E)
    if seq_idx is not None:  # only the last sequence's inputs carry over
        window = xp.where((spad[:, length - 1 :] == seq_idx[:, -1:])[..., None], window, zero)
    new_state = own(xp.permute_dims(window, (0, 2, 1)), xp=xp)  # (B, E, K)
    return out, new_state


def packed_keep(seq_idx: Array, dtype, *, xp=None) -> Array:
    """(B, L) of dtype: 0 where a packed sequence starts after the first token (seq_idx
    changes), 1 elsewhere: the factor on the state's decay that restarts it."""
    xp = _ns(xp, seq_idx)
    change = seq_idx[:, 1:] != seq_idx[:, :-1]
    ones = xp.ones((seq_idx.shape[0], 1), dtype=dtype, device=_device(seq_idx))
    rest = xp.where(change, xp.zeros_like(ones), xp.ones_like(ones))
    return xp.concat([ones, rest], axis=1)
