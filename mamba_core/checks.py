"""Input and state checks shared by every entry point: errors say what was expected and what
was received.

- `check_input_shape`: an input's rank, last axis and emptiness.
- `float_numpy`: the one normalisation of a non-native input (a NumPy array, a list, another
  library's array) into a native-endian NumPy floating array, or a `TypeError`; every backend
  calls it, so every backend accepts exactly what NumPy accepts.
- `unpack_state` / `check_state`: the one validation of a decode state (a state NamedTuple,
  a plain tuple, or a mapping of its fields; arrays of any backend), against the shapes the
  mixer declares for it.  Under `jax.jit` it runs on the static shapes, at trace time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

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


def float_error(owner: str, what: str, dtype: Any, target: str = "") -> TypeError:
    """The one message for an input whose dtype is not real floating."""
    cast = f" (it is cast to {target})" if target else ""
    return TypeError(
        f"{owner} expected {what} of a real floating dtype{cast}; received {what}.dtype={dtype}"
    )


def float_numpy(value: Any, *, owner: str, what: str, target: str = "") -> np.ndarray:
    """A non-native input as a native-endian NumPy floating array (float16/32/64).

    Accepted: any real floating NumPy dtype, in either byte order (`'>f4'` is swapped,
    `longdouble` becomes float64, which every framework has); torch tensors and JAX arrays
    of another backend (through `to_numpy`).  Rejected with a `TypeError` naming what was
    received: integer, bool, complex, object, string, bytes, datetime and structured arrays,
    and `numpy.ma.MaskedArray` (its mask would be silently dropped).
    """
    from .params import to_numpy

    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(
            f"{owner} does not accept a numpy.ma.MaskedArray as {what}: its mask would be "
            f"ignored; pass {what}.filled(0.0) (and an attention_mask, where the entry point "
            "takes one)"
        )
    try:
        arr = to_numpy(value)
    except Exception as exc:  # an object that cannot become an array at all
        raise TypeError(
            f"{owner} expected {what} as an array of real floating numbers; received "
            f"{type(value).__name__} ({exc})"
        ) from None
    if arr.dtype.kind != "f":
        raise float_error(owner, what, arr.dtype, target)
    if arr.dtype.itemsize > 8:  # longdouble: no framework has it
        arr = arr.astype(np.float64)
    elif not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def unpack_state(
    state: Any, fields: tuple[str, ...], *, owner: str, kind: str = "state NamedTuple"
) -> tuple[Any, ...]:
    """The arrays of `state`: a NamedTuple with `fields`, a plain tuple of that length, or a
    mapping with those keys."""
    if isinstance(state, Mapping):
        missing = [f for f in fields if f not in state]
        if missing:
            raise ValueError(
                f"{owner}: a state mapping needs the keys {list(fields)}; missing {missing}"
            )
        return tuple(state[f] for f in fields)
    if isinstance(state, tuple) and len(state) == len(fields):
        return tuple(state)
    names = ", ".join(fields)
    raise TypeError(
        f"{owner}: state must be a {kind}, a ({names}) tuple or a mapping with those "
        f"keys; received {type(state).__name__}"
        + (f" of length {len(state)}" if isinstance(state, tuple) else "")
    )


def check_state(
    state: Any,
    expected: Mapping[str, tuple[tuple[int, ...], str]],
    *,
    owner: str,
    batch: int,
    kind: str = "state NamedTuple",
) -> tuple[Any, ...]:
    """Validate `state` against `expected` = {field: (shape, meaning)}; return its arrays.

    Every field must be an array of exactly the expected shape and of a real floating dtype.
    """
    arrays = unpack_state(state, tuple(expected), owner=owner, kind=kind)
    for value, (name, (shape, doc)) in zip(arrays, expected.items(), strict=False):
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            raise TypeError(
                f"{owner}: state.{name} must be an array of shape {shape} {doc}; received "
                f"{type(value).__name__}"
            )
        received = tuple(value.shape)
        if received != shape:
            raise ValueError(
                f"{owner}: state.{name}: expected shape {shape} {doc} for a batch of {batch}; "
                f"received state.{name}.shape={received}"
            )
        if not is_real_floating(value):
            raise float_error(owner, f"state.{name}", value.dtype)
    return arrays


#: dtype -> whether it is real floating, for the other libraries' dtypes (asked once each:
#: the namespace lookup costs tens of microseconds, and a decode step asks it every token)
_REAL_FLOATING: dict[Any, bool] = {}


def is_real_floating(value: Any) -> bool:
    """Whether an array (any library) has a real floating dtype (NumPy: without dispatch)."""
    if isinstance(value, np.ndarray):
        return value.dtype.kind == "f"
    known = _REAL_FLOATING.get(value.dtype)
    if known is None:
        try:
            from array_api_compat import array_namespace

            known = bool(array_namespace(value).isdtype(value.dtype, "real floating"))
        except TypeError:
            known = "float" in str(value.dtype)
        _REAL_FLOATING[value.dtype] = known
    return known


def packed_index(
    shape: tuple[int, int], seq_idx: Any = None, cu_seqlens: Any = None, *, owner: str
) -> Any:
    """The (B, L) sequence index of a packed batch, checked, or None when not packed.

    `seq_idx` (B, L): integers, non-decreasing along L in each row; a new sequence starts
    wherever the value changes (the official Mamba-2 convention).  `cu_seqlens` (S+1,):
    integer offsets into a batch of one packed row, starting at 0, strictly increasing and
    ending at L (the flash-attention / varlen convention).  Concrete arrays are checked value
    by value and come back as NumPy int64; traced ones (under `jax.jit`) by shape and dtype.
    """
    from .params import to_numpy

    if seq_idx is None and cu_seqlens is None:
        return None
    if seq_idx is not None and cu_seqlens is not None:
        raise ValueError(f"{owner}: pass seq_idx or cu_seqlens, not both")
    batch, length = shape
    value = seq_idx if seq_idx is not None else cu_seqlens
    what = "seq_idx" if seq_idx is not None else "cu_seqlens"
    try:
        arr = np.asarray(to_numpy(value))
    except Exception:  # a tracer: shape and dtype only, values are unknown here
        arr = None
    dtype = arr.dtype if arr is not None else np.dtype(str(getattr(value, "dtype", "float32")))
    vshape = tuple(getattr(value, "shape", np.shape(value)))
    if dtype.kind not in "iu":
        raise ValueError(f"{owner}: {what} must be integers; received {what}.dtype={dtype}")
    if seq_idx is not None:
        if vshape != (batch, length):
            raise ValueError(
                f"{owner}: seq_idx must have shape (batch, seq_len) = {(batch, length)}; "
                f"received seq_idx.shape={vshape}"
            )
        if arr is None:
            return value
        if (np.diff(arr, axis=1) < 0).any():
            raise ValueError(f"{owner}: seq_idx must be non-decreasing along each row")
        return arr.astype(np.int64)
    if batch != 1:
        raise ValueError(
            f"{owner}: cu_seqlens describes one packed row: inputs must have batch 1; received "
            f"batch {batch}"
        )
    if len(vshape) != 1 or vshape[0] < 2:
        raise ValueError(
            f"{owner}: cu_seqlens must be 1-D with S+1 >= 2 offsets; received shape {vshape}"
        )
    if arr is None:  # traced: count the boundaries at or before every position
        import array_api_compat

        xp = array_api_compat.array_namespace(value)
        pos = xp.arange(length)[:, None]
        return xp.sum(xp.astype(pos >= value[None, 1:-1], value.dtype), axis=1)[None, :]
    if arr[0] != 0 or arr[-1] != length or (np.diff(arr) <= 0).any():
        raise ValueError(
            f"{owner}: cu_seqlens must start at 0, increase strictly and end at seq_len={length}; "
            f"received {arr.tolist()}"
        )
    return np.repeat(np.arange(len(arr) - 1), np.diff(arr))[None, :].astype(np.int64)
