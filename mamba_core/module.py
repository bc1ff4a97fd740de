"""`MambaModule`: the CapibaraGPT `IModule` face over any backend.

    module = MambaModule({"hidden_size": 768, "d_state": 64}, backend="auto")
    result = module(np.random.randn(2, 512, 768))      # float64 input, cast to float32
    result["output"]            # (2, 512, 768), an array of the backend's library
    result["metrics"]           # what ran: backend, device, dtype, scan_used, ...
    result["state"]             # MambaState after the last token; pass it back as state=

Unlike the upstream module, errors are raised (`ValueError` / `TypeError` saying what was
expected and what was received) instead of being swallowed into `success=False` with the
input returned as output: a result that is returned is always a real Mamba output.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np
from array_api_compat import device as device_of

from .checks import check_input_shape, float_error, float_numpy, is_real_floating, packed_index
from .config import MambaConfig, resolve_config
from .io import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE, CheckpointWeights, read_checkpoint
from .io import write_checkpoint as _write_checkpoint
from .mixer import (
    MambaState,
    init_state,
    param_shapes,
    scan_dtype,
    state_dtype_field,
    validate_state,
)
from .mixers import mixer_for
from .params import check_state_dict, init_params, to_numpy
from .registry import Backend, backend_installed, get_backend

__all__ = ["IModule", "MambaModule", "available_modules", "create_module"]

logger = logging.getLogger("mamba_core")

DTYPE_NAMES = ("float32", "float64", "bfloat16", "float16")
#: what `dtype=None` means (also for a checkpoint whose config.json says "dtype": null)
DEFAULT_DTYPE = "float32"
__all__ += ["CONFIG_FILE", "FORMAT_VERSION", "WEIGHTS_FILE"]


class IModule(ABC):
    """The modular-model interface: a module maps inputs to a dict of results."""

    @abstractmethod
    def __call__(self, inputs: Any, training: bool = False) -> dict[str, Any]:
        """Process inputs and return a dict with at least `output`, `metrics`, `success`."""

    def setup_tpu_optimizations(self) -> Any:
        """Optional TPU set-up hook."""
        return None


def _dtype_name(dtype: Any) -> str:
    if dtype is None:
        return DEFAULT_DTYPE
    if isinstance(dtype, str):
        name = dtype
    else:
        text = str(dtype)
        if text.startswith("torch."):
            name = text[len("torch.") :]
        else:
            try:
                name = np.dtype(dtype).name
            except TypeError:
                name = text
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype={dtype!r} is invalid: expected one of {DTYPE_NAMES}")
    return name


class BackendIO:
    """Inputs, states and masks brought to one backend, dtype and device with the package's
    checks and messages (the one normalisation every entry point of the adapter uses)."""

    owner = "MambaModule"

    def __init__(self, backend: Backend, dtype: str, device: Any, config: MambaConfig) -> None:
        self.backend, self.dtype, self.config = backend, dtype, config
        self._dtype = backend.dtype(dtype)
        self._device = device

    def _scan_dtype(self):
        return scan_dtype(self._dtype, self.config, xp=self.backend.xp)

    def _native_float(self, value: Any, what: str):
        """`value` as a backend array of a real floating dtype (one normalisation for every
        backend: `mamba_core.checks.float_numpy` for anything not native)."""
        if not self.backend.is_native(value) or isinstance(value, np.ma.MaskedArray):
            return float_numpy(value, owner=self.owner, what=what, target=self.dtype)
        if not is_real_floating(value):
            raise float_error(self.owner, what, value.dtype, self.dtype)
        return value

    def _array(self, value: Any, what: str, ndim: int):
        """Validate an input array and bring it to the backend, dtype and device."""
        check_input_shape(value, ndim, self.config.hidden_size, owner=self.owner, what=what)
        return self.backend.asarray(self._native_float(value, what), self._dtype, self._device)

    def _state(self, state: Any, batch: int) -> MambaState:
        def convert(value, field):
            dtype = self._scan_dtype() if state_dtype_field(self.config, field) else self._dtype
            native = self._native_float(value, f"state.{field}")
            return self.backend.asarray(native, dtype, self._device)

        return validate_state(state, self.config, batch, owner=self.owner, convert=convert)

    def _write(self, output, piece, start: int, shape: tuple[int, int, int]):
        """Write `piece` (B, T, D) at [start, start + T) of `output` along L, allocating an
        uninitialised `shape` output first (NumPy / PyTorch arrays: no concatenation copy)."""
        if output is None:
            output = self.backend.xp.empty(shape, dtype=piece.dtype, device=device_of(piece))
        output[:, start : start + piece.shape[1], ...] = piece
        return output

    def _varlen(self, x, seq_of: np.ndarray, state: Any, scan_used: str):
        """`cu_seqlens` with one state per sequence in and out.  NumPy and PyTorch run each
        sequence as its own call on its stretch of the row (the work of one packed row, no
        padding); JAX, where every new length would compile, runs the padded batch."""
        if self.backend.name == "jax":
            return self._varlen_padded(x, seq_of, state, scan_used)
        xp = self.backend.xp
        lengths = np.bincount(seq_of)
        count = len(lengths)
        st = None if state is None else self._state(state, count)
        output, states, start = None, [], 0
        for i, length in enumerate(lengths.tolist()):
            own = None if st is None else type(st)(*(f[i : i + 1, ...] for f in st))
            out, new = self.backend.forward(
                self.params, x[:, start : start + length, ...], self.config, own, scan_used
            )
            output = self._write(output, out, start, (1, x.shape[1], out.shape[2]))
            states.append(new)
            start += length
        stacked = type(states[0])(*(xp.concat(list(f), axis=0) for f in zip(*states, strict=True)))
        return output, stacked

    def _varlen_padded(self, x, seq_of: np.ndarray, state: Any, scan_used: str):
        """The S sequences of one packed row as a right-padded (S, Lmax) batch with an
        attention mask: one batched call, each sequence from its own initial state (leading
        axis S of `state`), and the state after each sequence's last token.  The padded tail
        leaves the SSM state unchanged; the conv state (the last K conv inputs) is rebuilt
        from each sequence's last K tokens and its initial conv state."""
        xp, k = self.backend.xp, self.config.d_conv
        lengths = np.bincount(seq_of)
        count, longest = len(lengths), int(lengths.max())
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        pos = np.arange(longest)
        real = pos[None, :] < lengths[:, None]  # (S, Lmax)
        gather = np.where(real, starts[:, None] + pos[None, :], 0)

        def take(rows, index):  # rows (N, X) backend array, index (...) -> (..., X)
            flat = self.backend.asarray_int(index.reshape(-1), self._device)
            return xp.reshape(xp.take(rows, flat, axis=0), (*index.shape, rows.shape[-1]))

        xb = take(x[0, ...], gather)
        st = None if state is None else self._state(state, count)
        mask = self.backend.asarray(real.astype(np.float64), self._dtype, self._device)
        out, new_state = self.backend.forward(
            self.params, xb, self.config, st, scan_used, attention_mask=mask
        )
        output = take(
            xp.reshape(out, (count * longest, -1)),
            (np.arange(count)[:, None] * longest + pos)[real][None, :],
        )
        if "conv_state" not in new_state._fields:  # no conv (Mamba-3): the masked run's state
            return output, new_state
        # the conv state: entries n..n+K-1 of [initial conv state (K) | the n conv inputs]
        j = np.arange(k)
        from_input = lengths[:, None] - k + j[None, :] >= 0  # (S, K)
        tail = take(x[0, ...], np.where(from_input, starts[:, None] + lengths[:, None] - k + j, 0))
        inputs = mixer_for(self.config).conv_inputs(self.params, tail, self.config, xp=xp)
        if st is None:
            initial = xp.zeros_like(inputs)
        else:  # (S, C, K) -> (S, K, C), read at n + j (< K where from_input is False)
            init = xp.permute_dims(st.conv_state, (0, 2, 1))
            flat = xp.reshape(init, (count * k, -1))
            initial = take(
                flat, np.arange(count)[:, None] * k + np.minimum(lengths[:, None] + j, k - 1)
            )
        use = self.backend.asarray(
            from_input[..., None].astype(np.float64), self._dtype, self._device
        )
        window = xp.where(use > 0, xp.astype(inputs, self._dtype), initial)
        conv = xp.permute_dims(window, (0, 2, 1))
        return output, type(new_state)(conv, new_state.ssm_state)

    def _mask(self, mask: Any, shape: tuple[int, int]):
        """A (batch, seq_len) mask of 0/1 (bool, int or float) as a backend array."""
        arr = np.asarray(to_numpy(mask))
        if arr.shape != shape:
            raise ValueError(
                f"{self.owner} expected attention_mask of shape (batch, seq_len) = {shape} (1 = "
                f"real token, 0 = padding); received attention_mask.shape={arr.shape}"
            )
        if arr.dtype.kind not in "biuf" or not np.isin(arr, (0, 1)).all():
            raise ValueError(
                f"{self.owner} expected attention_mask of 0 (padding) and 1 (real token) only; "
                f"received dtype {arr.dtype} with values {np.unique(arr)[:5]}"
            )
        return self.backend.asarray(arr.astype(np.float64), self._dtype, self._device)


class MambaModule(BackendIO, IModule):
    """One Mamba mixer layer on the chosen backend, with the upstream `MambaModule` interface.

    Args:
        config: a `MambaConfig`, a dict of its fields (the TOML key `enabled` is ignored) or
            None for the defaults.
        backend: "auto" (JAX, then PyTorch, then NumPy), "numpy", "jax" or "torch".
        dtype: "float32" (default; also what None means), "float64", "bfloat16" or "float16"
            (where the backend has it); inputs of another floating precision are cast to it.
        seed: initialisation seed; the same seed gives the same weights on every backend.
        allow_fallback: when the requested backend's framework is missing, run on NumPy with
            a warning (True) or raise `ImportError` (False).
        device: backend device (a `jax.Device`, a `torch.device` or a string like "cuda:0");
            None for the framework's default.
        state_dict: official-name weights to load instead of initialising.
        **fields: config fields, on their own or overriding `config`'s
            (`MambaModule(hidden_size=768)`, `MambaModule(cfg, d_state=16)`): the upstream
            registry builds modules as `cls(**kwargs)`.
    """

    def __init__(
        self,
        config: MambaConfig | Mapping[str, Any] | None = None,
        backend: str = "auto",
        dtype: Any = "float32",
        seed: int = 0,
        *,
        allow_fallback: bool = True,
        device: Any = None,
        state_dict: Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        self.config = resolve_config(config, **fields)
        if not isinstance(allow_fallback, bool):
            raise TypeError(
                f"allow_fallback must be a bool (True or False); received "
                f"{type(allow_fallback).__name__} {allow_fallback!r}"
            )
        self.logger = logger
        self.backend: Backend
        self.backend, self.resolution = get_backend(backend, allow_fallback=allow_fallback)
        self.dtype = _dtype_name(dtype)
        self._dtype = self.backend.dtype(self.dtype)
        self._device = self.backend.resolve_device(device)
        self.d_inner = self.config.d_inner
        self.seed = seed
        if isinstance(state_dict, CheckpointWeights):  # checked by read_checkpoint, owned
            self.params = self._params_to_backend(state_dict, copy=False)
        elif state_dict is not None:
            self.params = self._params_to_backend(check_state_dict(state_dict, self.config))
        else:
            self.params = self._params_to_backend(init_params(self.config, seed), copy=False)
        self._prepared: dict[str, Any] | None = None
        self._calls = 0
        self.logger.info(
            "MambaModule initialised: hidden=%d d_state=%d backend=%s dtype=%s",
            self.config.hidden_size,
            self.config.d_state,
            self.backend.name,
            self.dtype,
        )

    # ------------------------------------------------------------------ helpers
    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def device(self) -> str:
        return self.backend.device_of(next(iter(self.params.values())))

    def _params_to_backend(self, weights: Mapping[str, Any], *, copy: bool = True) -> dict:
        """Backend arrays of `weights`, one tensor at a time (a checkpoint's tensors are read
        here, so loading holds one model plus one tensor, never two models); `copy` keeps
        caller-owned arrays from being aliased."""
        out = {}
        for name in param_shapes(self.config):
            value = weights[name]
            out[name] = self.backend.asarray(
                np.array(value, copy=True) if copy else value, self._dtype, self._device
            )
        return out

    def _scan_used(self) -> str:
        if self.config.scan_type != "auto":
            return self.config.scan_type
        return self.backend.auto_scan(self.backend.platform(self._device), self.config)

    def _metrics(self, batch: int, length: int, scan_used: str) -> dict[str, Any]:
        platform = self.backend.platform(self._device)
        return {
            "mamba_active": True,
            "version": self.config.version,
            "complexity": "O(log n)" if scan_used == "associative" else "O(n)",
            "work_complexity": "O(n)",
            "sequence_length": length,
            "batch_size": batch,
            "d_state": self.config.d_state,
            "selective_scan_used": True,
            "tpu_optimized": bool(
                self.backend.name == "jax" and platform == "tpu" and scan_used == "associative"
            ),
            "backend": self.backend.name,
            "requested_backend": self.resolution.requested,
            "fallback_used": self.resolution.fallback_used,
            "device": self.device,
            "platform": platform,
            "dtype": self.dtype,
            "scan_dtype": self._scan_dtype_name(),
            "scan_type": self.config.scan_type,
            "scan_used": scan_used,
            "chunk_size": self.backend.chunk_size(scan_used, self.config, platform),
            **self.backend.call_info(),
        }

    def _scan_dtype_name(self) -> str:
        return self.dtype if self._scan_dtype() == self._dtype else "float32"

    # ------------------------------------------------------------------ the interface
    def __call__(
        self,
        inputs: Any,
        training: bool = False,
        *,
        state: Any = None,
        attention_mask: Any = None,
        seq_idx: Any = None,
        cu_seqlens: Any = None,
    ) -> dict[str, Any]:
        """Run the mixer over `inputs` (batch, seq_len, hidden_size).

        `state=` continues from a previous call's `result["state"]` (or `init_state`);
        `attention_mask` (batch, seq_len) of 0/1 (1 = real token, the HuggingFace
        convention): padded positions leave the state unchanged and feed nothing to later
        tokens, so the real positions of a left-padded row equal the unpadded run;
        `seq_idx` (batch, seq_len) non-decreasing integers, or `cu_seqlens` (S+1,) offsets
        into one packed row: packed sequences, each computed exactly as if run on its own
        (the conv sees nothing of the previous sequence and the state restarts at each
        start); `result["state"]` is the state after each row's last token (its last
        sequence's); `state=` continues each row's first sequence.
        `training` is recorded (the mixer has no dropout, so it changes no math).
        """
        if not isinstance(training, bool):
            raise TypeError(f"training must be a bool, received {type(training).__name__}")
        x = self._array(inputs, "inputs", 3)
        batch, length, _ = x.shape
        mask = None if attention_mask is None else self._mask(attention_mask, (batch, length))
        packed = packed_index((batch, length), seq_idx, cu_seqlens, owner=self.owner)
        scan_used = self._scan_used()
        if cu_seqlens is not None:  # one state per sequence, in and out
            if mask is not None:
                raise ValueError(f"{self.owner}: cu_seqlens and attention_mask exclude each other")
            output, new_state = self._varlen(x, np.asarray(packed[0]), state, scan_used)
        else:
            st = None if state is None else self._state(state, batch)
            if packed is not None:
                packed = self.backend.asarray_int(packed, self._device)
            if packed is None and mask is None and not training and self._pieces(length) > 1:
                output, new_state = self._long(x, st, scan_used)
            else:
                output, new_state = self.backend.forward(
                    self.params, x, self.config, st, scan_used, attention_mask=mask, seq_idx=packed
                )
        metrics = self._metrics(batch, length, scan_used)
        self._calls += 1
        return {
            "output": output,
            "metrics": metrics,
            "processing_info": {
                "module_type": "MambaModule",
                "memory_efficiency": f"O(1) state per sequence: {self._state_bytes(batch)} bytes",
                "architecture": mixer_for(self.config).ARCHITECTURE,
                "complexity_advantage": f"O(n) vs O(n²) for seq_len={length}",
                "training_mode": training,
                "backend": self.backend.name,
                "use_flax": False,
            },
            "success": True,
            "state": new_state,
        }

    #: inference over more tokens than this runs the whole mixer piece by piece along L,
    #: carrying the state (None: never): peak memory is then the input, the output and one
    #: piece's activations, not (B, L, E)-sized activations (set per instance to change)
    long_chunk: int | None = 4096

    def _pieces(self, length: int) -> int:
        return 1 if not self.long_chunk else -(-length // self.long_chunk)

    def _long(self, x, state, scan_used: str):
        """The mixer over a long sequence in pieces of `long_chunk` tokens, each continuing
        the previous piece's state (exactly the one-call result: states compose)."""
        xp, step = self.backend.xp, self.long_chunk
        mutable = self.backend.name != "jax"  # NumPy / PyTorch: write into one output
        pieces, output = [], None
        for start in range(0, x.shape[1], step):
            out, state = self.backend.forward(
                self.params, x[:, start : start + step, ...], self.config, state, scan_used
            )
            if not mutable:
                pieces.append(out)
                continue
            output = self._write(output, out, start, (x.shape[0], x.shape[1], out.shape[2]))
        return (output if mutable else xp.concat(pieces, axis=1)), state

    def _state_bytes(self, batch: int) -> int:
        from .mixer import state_shapes

        item = np.dtype("float32" if self._scan_dtype_name() == "float32" else self.dtype).itemsize
        return int(
            sum(np.prod(shape) for shape, _ in state_shapes(self.config, batch).values()) * item
        )

    def init_state(self, batch_size: int) -> MambaState:
        """The zero state of a fresh sequence for `batch_size` sequences."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, received {batch_size!r}")
        return init_state(
            self.config, batch_size, dtype=self._dtype, xp=self.backend.xp, device=self._device
        )

    def step(self, x_t: Any, state: Any = None) -> tuple[Any, MambaState]:
        """One decode step: x_t (batch, hidden_size) -> (y_t (batch, hidden_size), state)."""
        x = self._array(x_t, "x_t", 2)
        st = self.init_state(x.shape[0]) if state is None else self._state(state, x.shape[0])
        if self._prepared is None:
            self._prepared = self.backend.prepare(self.params, self.config)
        return self.backend.step(self._prepared, st, x, self.config)

    def setup_tpu_optimizations(self) -> dict[str, Any]:
        """Report (and log) what TPU-specific choices apply on this device.

        On a TPU with `use_tpu_optimizations`, `scan_type="auto"` runs the associative scan;
        nothing is claimed on other platforms.
        """
        platform = self.backend.platform(self._device)
        scan_used = self._scan_used()
        info = {
            "platform": platform,
            "tpu_available": platform == "tpu",
            "use_tpu_optimizations": self.config.use_tpu_optimizations,
            "scan_used": scan_used,
            "tpu_optimized": bool(
                self.backend.name == "jax" and platform == "tpu" and scan_used == "associative"
            ),
        }
        self.logger.info("setup_tpu_optimizations: %s", info)
        return info

    def get_config(self) -> dict[str, Any]:
        return self.config.to_dict()

    def get_metrics(self) -> dict[str, Any]:
        scan_used = self._scan_used()
        return {
            "module_type": "MambaModule",
            "version": self.config.version,
            "hidden_size": self.config.hidden_size,
            "d_state": self.config.d_state,
            "d_inner": self.config.d_inner,
            "d_conv": self.config.d_conv,
            "expand_factor": self.config.expand_factor,
            "dt_rank": self.config.dt_rank,
            "complexity": "O(log n)" if scan_used == "associative" else "O(n)",
            "scan_type": self.config.scan_type,
            "scan_used": scan_used,
            "chunk_size": self.backend.chunk_size(
                scan_used, self.config, self.backend.platform(self._device)
            ),
            "tpu_optimizations": self.config.use_tpu_optimizations,
            "mixed_precision": self.config.use_mixed_precision,
            "jax_available": backend_installed("jax"),
            "flax_available": _installed("flax"),
            "torch_available": backend_installed("torch"),
            "use_flax": False,
            "backend": self.backend.name,
            "requested_backend": self.resolution.requested,
            "fallback_used": self.resolution.fallback_used,
            "dtype": self.dtype,
            "device": self.device,
            "num_parameters": self.num_parameters(),
            "calls": self._calls,
        }

    # ------------------------------------------------------------------ weights
    def num_parameters(self) -> int:
        return int(sum(int(np.prod(s)) for s in param_shapes(self.config).values()))

    def state_dict(self) -> dict[str, np.ndarray]:
        """A copy of the weights as NumPy arrays under the official / HuggingFace keys
        (writing into it never changes the module).

        bfloat16 weights come back as float32 (NumPy has no bfloat16; the widening is exact).
        """
        return {name: np.array(to_numpy(value), copy=True) for name, value in self.params.items()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace the weights; any array-likes, checked key by key and shape by shape."""
        self.params = self._params_to_backend(check_state_dict(state_dict, self.config))
        self._prepared = None

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `config.json` and `model.safetensors` (no pickle) into `directory`.

        Crash-safe: after any interruption the directory holds the complete old checkpoint
        or the complete new one (see `mamba_core.io`).
        """
        tensors = {name: to_numpy(value) for name, value in self.params.items()}
        _write_checkpoint(directory, self.config, self.dtype, tensors)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, backend: str = "auto", dtype: Any = None, **kwargs
    ) -> MambaModule:
        """Load a `save_pretrained` directory on any backend (dtype defaults to the saved one).

        The checkpoint is checked (config, every tensor's name, shape and dtype, the file's
        completeness) before any weight is read.
        """
        config, saved_dtype, weights = load_pretrained(directory)
        return cls(
            config,
            backend=backend,
            dtype=saved_dtype if dtype is None else dtype,
            state_dict=weights,
            **kwargs,
        )


def load_pretrained(
    directory: str | os.PathLike,
) -> tuple[MambaConfig, str, CheckpointWeights]:
    """(config, dtype name, weights) of a `save_pretrained` directory.

    Everything is checked before a weight is read; the weights are a mapping that reads each
    tensor from disk when it is asked for (`mamba_core.io.CheckpointWeights`).
    """
    return read_checkpoint(directory, param_shapes)


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


_MODULE_OPTIONS = ("backend", "dtype", "seed", "allow_fallback", "device", "state_dict")

#: The modular-model registry: name -> module class.
available_modules: dict[str, type[IModule]] = {"mamba": MambaModule}


def create_module(name: str, config: Mapping[str, Any] | None = None, /, **kwargs: Any) -> IModule:
    """Build a registered module: `create_module("mamba", hidden_size=256, backend="numpy")`.

    Keyword arguments that are `MambaModule` options (backend, dtype, seed, allow_fallback,
    device, state_dict) go to the constructor, the others are config fields.
    """
    try:
        cls = available_modules[name]
    except KeyError:
        raise ValueError(
            f"unknown module {name!r}: expected one of {sorted(available_modules)}"
        ) from None
    options = {k: kwargs.pop(k) for k in _MODULE_OPTIONS if k in kwargs}
    merged = {**(dict(config) if config is not None else {}), **kwargs}
    return cls(merged, **options)
