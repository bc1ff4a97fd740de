"""The mixer-independent face of the mixers: every function dispatches on `config.version`
through `mamba_core.mixers.mixer_for` (one table, no version branches).

    y, state = mixer_forward(params, x, config, state=None, scan=None)   # x (B, L, hidden)
    y_t, state = mixer_step(params, state, x_t, config)                  # x_t (B, hidden)

Parameters are flat dicts keyed by the official / HuggingFace names (`param_shapes`);
decode states are immutable NamedTuples (`MambaState` for Mamba-1, `Mamba2State` for
Mamba-2), checked on every entry point by `validate_state`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .checks import check_state
from .config import MambaConfig
from .mixers import mixer_for
from .mixers.mamba1 import PARAM_NAMES, MambaState
from .mixers.mamba2 import Mamba2State
from .ops import scan_dtype

__all__ = [
    "PARAM_NAMES",
    "Mamba2State",
    "MambaState",
    "core_scan",
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


def param_shapes(config: MambaConfig) -> dict[str, tuple[int, ...]]:
    """The parameter names this config has, with their shapes, in state-dict order."""
    return mixer_for(config).param_shapes(config)


def state_shapes(config: MambaConfig, batch: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """{state field: (shape, meaning)} for a batch of `batch` sequences."""
    return mixer_for(config).state_shapes(config, batch)


def init_state(config: MambaConfig, batch_size: int, *, dtype, xp, device=None):
    """The all-zero state of a fresh sequence (what a call without `state=` starts from)."""
    mixer = mixer_for(config)
    sdtype = scan_dtype(dtype, config, xp=xp)
    return mixer.State(
        *(
            xp.zeros(
                shape, dtype=sdtype if name in mixer.SCAN_DTYPE_FIELDS else dtype, device=device
            )
            for name, (shape, _) in mixer.state_shapes(config, batch_size).items()
        )
    )


def validate_state(
    state: Any, config: MambaConfig, batch: int, *, owner: str, convert: Callable | None = None
):
    """The one state check of every entry point (see `mamba_core.checks.check_state`).

    `state` may be the mixer's state NamedTuple, a plain tuple of its fields or a mapping
    with those keys, its arrays of any backend; `convert(array, field)` brings each to the
    caller's library, dtype and device.
    """
    mixer = mixer_for(config)
    arrays = check_state(
        state,
        mixer.state_shapes(config, batch),
        owner=owner,
        batch=batch,
        kind=mixer.State.__name__,
    )
    if convert is not None:
        arrays = tuple(convert(a, f) for a, f in zip(arrays, mixer.State._fields, strict=False))
    return mixer.State(*arrays)


def state_dtype_field(config: MambaConfig, field: str) -> bool:
    """Whether state `field` is kept in the scan dtype (else in the compute dtype)."""
    return field in mixer_for(config).SCAN_DTYPE_FIELDS


def core_scan(config: MambaConfig, algorithm: str) -> ScanFn:
    """The core's generic scan `algorithm` for this config's mixer."""
    return mixer_for(config).core_scan(algorithm, config.chunk_size)


def mixer_forward(
    params: Mapping[str, Array],
    x: Array,
    config: MambaConfig,
    state: Any = None,
    *,
    scan: ScanFn | None = None,
    xp=None,
    attention_mask: Array | None = None,
    seq_idx: Array | None = None,
):
    """The mixer over a whole sequence: x (B, L, hidden) -> (out (B, L, hidden), state).

    `scan` replaces the core's scan for `config.scan_type` (a backend's native kernel);
    `attention_mask` (B, L) of 0/1 (1 = real token) leaves padded positions out; `seq_idx`
    (B, L) integers, non-decreasing: packed sequences, each as if run on its own (the state
    returned is the last sequence's).
    """
    return mixer_for(config).forward(
        params,
        x,
        config,
        state,
        scan=scan,
        xp=xp,
        attention_mask=attention_mask,
        seq_idx=seq_idx,
    )


def mixer_step(
    params: Mapping[str, Array],
    state: Any,
    x_t: Array,
    config: MambaConfig,
    *,
    scan: ScanFn | None = None,
    xp=None,
):
    """One decode step: x_t (B, hidden) and the state before it -> (y_t (B, hidden), state).

    The same arithmetic as `mixer_forward` on a length-1 sequence with the linear scan (or
    `scan`, a backend's native one).
    """
    mixer = mixer_for(config)
    step_scan = mixer.step_scan if scan is None else scan
    y, new_state = mixer.forward(params, x_t[:, None, :], config, state, scan=step_scan, xp=xp)
    return y[:, 0, :], new_state


def prepare_params(params: Mapping[str, Array], config: MambaConfig, *, xp) -> dict:
    """`params` plus what a decode loop should not recompute every token (A = -exp(A_log))."""
    return mixer_for(config).prepare(params, config, xp=xp)
