"""Input checks shared by every entry point: errors say what was expected and what was received."""

from __future__ import annotations

from typing import Any

_DOCS = {3: "(batch, seq_len, hidden_size)", 2: "(batch, hidden_size)"}


def check_input_shape(value: Any, ndim: int, hidden_size: int, *, owner: str, what: str) -> None:
    """`value` must be an array of `ndim` axes, the last one `hidden_size`, none empty."""
    doc = _DOCS.get(ndim, f"({ndim} axes, the last hidden_size)")
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        raise TypeError(
            f"{owner} expected {what} as an array of shape {doc}; received {type(value).__name__}"
        )
    shape = tuple(value.shape)
    if len(shape) != ndim:
        raise ValueError(
            f"{owner} expected {what} as a {ndim}-D array {doc}; received {what}.shape={shape}"
        )
    if shape[-1] != hidden_size:
        raise ValueError(
            f"{owner} expected {what} with last axis hidden_size={hidden_size} {doc}; "
            f"received {what}.shape={shape}"
        )
    if any(s == 0 for s in shape):
        raise ValueError(
            f"{owner} expected {what} with no empty axis {doc}; received {what}.shape={shape}"
        )
