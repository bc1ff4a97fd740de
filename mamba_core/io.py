"""Checkpoints: atomic saves, and loads that validate every file before allocating a weight.

A checkpoint directory holds `config.json` and `model.safetensors` (never a pickle).

Saving is crash-safe: each file is written to an unnamed temporary file in the same
directory (`O_TMPFILE` on Linux), flushed to disk, and only then given a hidden name
`.NAME.PID.*.tmp` and renamed over the old one (`os.replace`, atomic), weights first.  A
process killed in the sub-millisecond between those two calls (or, where `O_TMPFILE` is
missing, at any time during the write) leaves that hidden file behind; the next save or load
of the directory removes the ones whose process has ended.

The weights file's metadata carries the whole config and a `save_id` that `config.json`
repeats, so the two files are bound: if a save is interrupted between the two
renames, the loader sees the mismatch and takes the config stored with the weights.  After
any interruption the directory therefore loads the complete old checkpoint or the complete
new one, never a mix.  Files get the modes the user's umask gives.

Loading reads only the safetensors header (names, shapes, dtypes, offsets) and checks it
against the config and the file's size before any tensor is read; tensors are then read one
at a time (`CheckpointWeights`), so loading costs the model's size once, not twice.  Every
error names the file and what is wrong with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import uuid
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from .config import MambaConfig

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "WEIGHTS_FILE",
    "CheckpointError",
    "CheckpointWeights",
    "atomic_write",
    "read_checkpoint",
    "read_safetensors_header",
    "write_checkpoint",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "mamba-core"
FORMAT_VERSION = 2
#: format versions this release reads (1: config.json only; 2: config bound to the weights)
READABLE_VERSIONS = (1, 2)
_META_KEY = "mamba_core"
#: safetensors dtype codes -> NumPy dtype names (the floating ones a weight may have)
FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_MAX_HEADER = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read; the message names the file."""


def _safetensors():
    try:
        import safetensors.numpy as st
    except ImportError:
        raise ImportError(
            "saving and loading weights needs the 'safetensors' package: "
            "pip install 'mamba-core[io]'"
        ) from None
    return st


# ---------------------------------------------------------------------------- writing
def _tmp_name(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def _link_anonymous(fd: int, target: str) -> bool:
    """Give the unnamed (`O_TMPFILE`) file `fd` the name `target`: linkat(2) with
    AT_SYMLINK_FOLLOW through /proc (os.link does not pass that flag)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, at_symlink_follow = -100, 0x400
        source = f"/proc/self/fd/{fd}".encode()
        return libc.linkat(at_fdcwd, source, at_fdcwd, os.fsencode(target), at_symlink_follow) == 0
    except (OSError, AttributeError):
        return False


def _write_synced(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` by `data` atomically: readers see the old file or the new one.

    The data goes to an unnamed file (`O_TMPFILE`) that gets a name only once it is complete
    and on disk, so a process killed mid-write leaves nothing behind; where that is not
    available, to a hidden `.NAME.PID.*.tmp` file that the next save removes.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    tmp = _tmp_name(path)
    named = False
    try:
        fd = -1
        if hasattr(os, "O_TMPFILE"):
            with contextlib.suppress(OSError):  # a filesystem without O_TMPFILE support
                fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o666)
        if fd >= 0:
            try:
                _write_synced(fd, data)
                named = _link_anonymous(fd, tmp)
            finally:
                os.close(fd)
        if not named:
            named = True
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                _write_synced(fd, data)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if named:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_stale_temporaries(directory: str) -> None:
    """Remove `.NAME.PID.*.tmp` files left by saves whose process no longer runs."""
    for entry in os.listdir(directory):
        parts = entry.split(".")
        if not (entry.startswith(".") and entry.endswith(".tmp") and len(parts) >= 4):
            continue
        try:
            pid = int(parts[-3])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, entry))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def write_checkpoint(
    directory: str | os.PathLike,
    config: MambaConfig,
    dtype: str,
    tensors: Mapping[str, np.ndarray],
    *,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write `config.json` and `model.safetensors` into `directory`, crash-safely."""
    if not isinstance(directory, (str, os.PathLike)) or os.fspath(directory) == "":
        raise ValueError(
            f"save_pretrained expected a directory path (a non-empty str or os.PathLike); "
            f"received {directory!r}"
        )
    st = _safetensors()
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "config": config.to_dict(),
        "save_id": uuid.uuid4().hex,
        **(extra or {}),
    }
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    blob = st.save(arrays, metadata={"format": "np", _META_KEY: json.dumps(meta, sort_keys=True)})
    del arrays
    atomic_write(os.path.join(directory, WEIGHTS_FILE), blob)
    del blob
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    atomic_write(os.path.join(directory, CONFIG_FILE), text.encode("utf-8"))
    _remove_stale_temporaries(directory)


# ---------------------------------------------------------------------------- reading
def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, Any]]:
    """(metadata, {name: {"dtype", "shape", "data_offsets"}}) of a safetensors file, read
    from its header only, after checking that the file is one and is complete."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        plausible = length is not None and length <= min(size - 8, _MAX_HEADER)
        raw = fh.read(length) if plausible else b""
    if not raw.startswith(b"{"):  # a safetensors header is a JSON object: say what it is
        if head[:4] == b"PK\x03\x04":
            raise CheckpointError(
                f"{path!r} is not a safetensors file (looks like a zip archive, e.g. a "
                "torch.save checkpoint); convert it: torch.load(path, weights_only=True), then "
                "safetensors.torch.save_file(...)"
            )
        if head[:1] == b"\x80":
            raise CheckpointError(
                f"{path!r} is not a safetensors file (looks like a pickle); it is never "
                "unpickled: convert it with torch.load(path, weights_only=True) and "
                "safetensors.torch.save_file(...)"
            )
        if length is None:
            raise CheckpointError(
                f"{path!r} is not a safetensors file: {size} bytes, shorter than the 8-byte "
                "header length (truncated?)"
            )
        if not plausible:
            raise CheckpointError(
                f"{path!r} is not a complete safetensors file: its header claims {length} bytes "
                f"but the file has {size} (truncated, or not a safetensors file)"
            )
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise TypeError("the header is not a JSON object")
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{path!r} has a corrupt safetensors header ({exc})") from None
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - len(raw)
    end = 0
    for name, info in header.items():
        try:
            dtype, shape, (start, stop) = info["dtype"], info["shape"], info["data_offsets"]
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            ok = 0 <= start <= stop and stop - start == count * _ITEMSIZE[dtype]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path!r}: tensor {name!r} has a corrupt header entry {info}")
        end = max(end, stop)
    if end > data_size:
        raise CheckpointError(
            f"{path!r} is truncated: its tensors need {end} bytes of data, the file has {data_size}"
        )
    return metadata, header


def check_header(
    header: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], *, path: str, config
) -> None:
    """Every tensor of the header against `expected` shapes; one error lists every problem."""
    found = {
        name: (tuple(info["shape"]), FLOAT_DTYPES.get(info["dtype"], info["dtype"]))
        for name, info in header.items()
    }
    from .params import raise_mismatch

    raise_mismatch(found, expected, config=config, source=path)


class CheckpointWeights(Mapping):
    """The tensors of a checked safetensors file, each read from disk when asked for.

    `dtypes[name]` is the stored dtype name; bfloat16 tensors come back as float32 (NumPy
    has no bfloat16; the widening is exact).
    """

    def __init__(self, path: str, header: Mapping[str, Any]) -> None:
        self.path = path
        self.shapes = {name: tuple(info["shape"]) for name, info in header.items()}
        self.dtypes = {name: FLOAT_DTYPES[info["dtype"]] for name, info in header.items()}
        self._offsets = {name: info["data_offsets"] for name, info in header.items()}
        with open(path, "rb") as fh:
            (self._data_start,) = struct.unpack("<Q", fh.read(8))
        self._data_start += 8

    def __getitem__(self, name: str) -> np.ndarray:
        start, stop = self._offsets[name]
        stored = self.dtypes[name]
        raw = np.fromfile(
            self.path,
            dtype="<u2" if stored == "bfloat16" else np.dtype(stored).newbyteorder("<"),
            count=(stop - start) // (2 if stored == "bfloat16" else np.dtype(stored).itemsize),
            offset=self._data_start + start,
        )
        if stored == "bfloat16":  # the top half of a float32
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        elif not raw.dtype.isnative:
            raw = raw.astype(raw.dtype.newbyteorder("="))
        return raw.reshape(self.shapes[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path!r} is not a UTF-8 JSON file ({exc})") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path!r} is not valid JSON: {exc}") from None


def _check_meta(meta: Any, path: str) -> dict[str, Any]:
    if not isinstance(meta, dict) or "config" not in meta:
        raise CheckpointError(f"{path!r} is not a mamba-core config (no 'config' entry)")
    fmt = meta.get("format", FORMAT)
    if fmt != FORMAT:
        raise CheckpointError(f"{path!r} has format={fmt!r}; this release reads {FORMAT!r}")
    version = meta.get("format_version", 1)
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path!r} has format_version={version!r}; this release reads format versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (written by a newer mamba-core?)"
        )
    if not isinstance(meta["config"], dict):
        raise CheckpointError(f"{path!r}: 'config' must be a JSON object")
    return meta


def read_checkpoint(
    directory: str | os.PathLike, expected_shapes
) -> tuple[MambaConfig, str, CheckpointWeights]:
    """(config, dtype name, weights) of a checkpoint directory, checked before any weight is
    read.  `expected_shapes(config)` gives the {name: shape} the config needs."""
    directory = os.fspath(directory)
    cfg_path = os.path.join(directory, CONFIG_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    with contextlib.suppress(OSError):  # a read-only directory stays as it is
        _remove_stale_temporaries(directory)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(
            f"{weights_path!r} not found: a pretrained directory holds {CONFIG_FILE} and "
            f"{WEIGHTS_FILE} (written by save_pretrained)"
        )
    meta = None
    if os.path.isfile(cfg_path):
        meta = _check_meta(_read_json(cfg_path), cfg_path)
    metadata, header = read_safetensors_header(weights_path)
    bound = None
    if _META_KEY in metadata:
        try:
            bound = _check_meta(json.loads(metadata[_META_KEY]), weights_path)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{weights_path!r} has corrupt metadata ({exc})") from None
    if meta is None and bound is None:
        raise FileNotFoundError(
            f"{cfg_path!r} not found: a pretrained directory holds {CONFIG_FILE} and "
            f"{WEIGHTS_FILE} (written by save_pretrained)"
        )
    source = cfg_path
    if bound is not None and (meta is None or meta.get("save_id") != bound.get("save_id")):
        warnings.warn(
            f"{cfg_path!r} does not belong to {weights_path!r} (an interrupted save?); "
            "using the config stored with the weights",
            RuntimeWarning,
            stacklevel=3,
        )
        meta, source = bound, weights_path
    assert meta is not None
    try:
        config = MambaConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source!r} holds an invalid config: {exc}") from None
    check_header(header, expected_shapes(config), path=weights_path, config=config)
    dtype = meta.get("dtype") or "float32"
    return config, dtype, CheckpointWeights(weights_path, header)
