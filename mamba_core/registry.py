"""Backends: the base class every runtime implements and the registry that finds them.

A backend is looked up by name and its framework is imported only when it is asked for
(`import mamba_core` imports no framework).  `"auto"` prefers JAX, then PyTorch, then NumPy,
among the installed ones.  A known backend whose framework is missing falls back to NumPy
with a warning (or raises `ImportError` when fallback is off); an unknown name is a
`ValueError` listing the known ones: a typo never silently becomes another runtime.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from .config import MambaConfig
from .mixer import prepare_params
from .mixers import mixer_for

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "Backend",
    "BackendSpec",
    "Resolution",
    "backend_installed",
    "get_backend",
    "installed_backends",
]

logger = logging.getLogger("mamba_core")

#: The upstream fallback message, kept verbatim so existing log filters keep working.
FALLBACK_MESSAGE = "Usando implementación fallback de Mamba"


@dataclass(frozen=True)
class BackendSpec:
    name: str
    module: str  # the backend module, imported on demand
    framework: str  # the import name of the framework it needs
    extra: str | None  # the pip extra that installs it
    description: str


BACKENDS: dict[str, BackendSpec] = {
    "numpy": BackendSpec(
        "numpy", "mamba_core.backends.numpy", "numpy", None, "NumPy (CPU), always installed"
    ),
    "jax": BackendSpec(
        "jax", "mamba_core.backends.jax", "jax", "jax", "JAX (CPU/GPU/TPU), jit-compiled"
    ),
    "torch": BackendSpec(
        "torch", "mamba_core.backends.torch", "torch", "torch", "PyTorch (CPU/CUDA), eager"
    ),
}
AUTO_ORDER = ("jax", "torch", "numpy")


class Resolution(NamedTuple):
    requested: str
    used: str
    fallback_used: bool
    reason: str | None


class Backend:
    """What a runtime provides to the adapter.  Subclasses set `name`, `xp`, `dtypes`."""

    name: str = ""
    xp: Any = None
    #: dtype name -> the framework's dtype, for the dtypes this backend supports
    dtypes: Mapping[str, Any] = {}

    # ---------------------------------------------------------------- arrays
    def dtype(self, name: str):
        try:
            return self.dtypes[name]
        except KeyError:
            raise ValueError(
                f"dtype={name!r} is not supported by the {self.name} backend; "
                f"expected one of {sorted(self.dtypes)}"
            ) from None

    def is_native(self, value: Any) -> bool:
        raise NotImplementedError

    def asarray(self, value: Any, dtype=None, device=None):
        """A native array from a NumPy array, a native array or any array-like."""
        raise NotImplementedError

    def resolve_device(self, device: Any = None):
        """The device to place weights and inputs on (None: the framework default)."""
        if device not in (None, "cpu"):
            raise ValueError(
                f"device={device!r} is invalid for the {self.name} backend: expected None or 'cpu'"
            )
        return None

    def device_of(self, value: Any) -> str:
        return "cpu"

    def platform(self, device: Any = None) -> str:
        """'cpu', 'gpu' or 'tpu'."""
        return "cpu"

    # ---------------------------------------------------------------- compute
    def auto_scan(self, platform: str, config: MambaConfig) -> str:
        """The algorithm `scan_type="auto"` runs on this platform (the mixer's rule)."""
        return mixer_for(config).auto_scan(self.name, platform, config)

    def chunk_size(self, algorithm: str, config: MambaConfig, platform: str) -> int:
        """The chunk length T `algorithm` runs with (for `chunk_size="auto"`, its default)."""
        if config.chunk_size != "auto":
            return int(config.chunk_size)
        return mixer_for(config).default_chunk(algorithm)

    def forward(
        self,
        params,
        x,
        config: MambaConfig,
        state: Any,
        scan_type: str,
        attention_mask=None,
        seq_idx=None,
    ):
        """The mixer over x with this backend's native scans (see `mamba_core.mixer`)."""
        raise NotImplementedError

    def prepare(self, params, config: MambaConfig):
        """Params for `step`, with what a decode loop should not recompute every token."""
        return prepare_params(params, config, xp=self.xp)

    def step(self, prepared, state: Any, x_t, config: MambaConfig):
        """One decode step with `prepare`d params."""
        raise NotImplementedError

    def call_info(self) -> dict[str, Any]:
        """Extra per-call metrics (e.g. compile time); empty by default."""
        return {}

    # ---------------------------------------------------------------- language models
    def asarray_int(self, value, device=None):
        """Token ids (a NumPy int64 array) as a native integer array."""
        return self.asarray(value, None, device)

    def lm_forward(self, params, ids, config, states, attention_mask, dtype):
        """`mamba_core.models.lm_forward` with this backend's mixer (its native scans)."""
        from .models import lm_forward

        mixer_cfg = config.mixer
        scan_type = (
            mixer_cfg.scan_type
            if mixer_cfg.scan_type != "auto"
            else self.auto_scan(self.platform(getattr(self, "_lm_device", None)), mixer_cfg)
        )

        def mixer(p, v, s, m):
            return self.forward(p, v, mixer_cfg, s, scan_type, attention_mask=m)

        return lm_forward(
            params, ids, config, states, dtype=dtype, mixer=mixer, attention_mask=attention_mask,
            xp=self.xp,
        )  # fmt: skip

    def prepare_lm(self, params, config):
        """`params` plus each layer's decode-time constants (see `prepare`)."""
        out = dict(params)
        for i in range(config.n_layer):
            prefix = f"backbone.layers.{i}.mixer."
            layer = {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}
            for name, value in self.prepare(layer, config.mixer).items():
                out[prefix + name] = value
        return out

    def lm_step(self, params, states, ids, config, dtype):
        """One decode step of the whole model: ids (B,) -> (logits (B, V), states)."""
        from .models import lm_forward

        def mixer(p, v, s, m):
            y, st = self.step(p, s, v[:, 0, :], config.mixer)
            return y[:, None, :], st

        logits, new_states = lm_forward(
            params, ids[:, None], config, states, dtype=dtype, mixer=mixer, xp=self.xp
        )
        return logits[:, 0, :], new_states


_INSTANCES: dict[str, Backend] = {}


def backend_installed(name: str) -> bool:
    """Whether the framework `name` needs can be imported (without importing it)."""
    spec = _spec(name)
    try:
        return importlib.util.find_spec(spec.framework) is not None
    except (ImportError, ValueError):
        return False


def installed_backends() -> list[str]:
    """Known backends whose framework is installed, in `auto` preference order."""
    return [name for name in AUTO_ORDER if backend_installed(name)]


def _spec(name: str) -> BackendSpec:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, received {type(name).__name__} {name!r}")
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}: expected 'auto' or one of {sorted(BACKENDS)}"
        ) from None


def _load(name: str) -> Backend:
    if name not in _INSTANCES:
        module = importlib.import_module(BACKENDS[name].module)
        _INSTANCES[name] = module.get_backend()
    return _INSTANCES[name]


def get_backend(name: str = "auto", *, allow_fallback: bool = True) -> tuple[Backend, Resolution]:
    """The backend called `name` and how it was resolved.

    "auto" picks the first installed of `AUTO_ORDER` that imports; one that is installed but
    broken (its import raises anything: a jax/jaxlib mismatch, a missing shared library) is
    skipped with a `RuntimeWarning` naming it and the error.  A named backend whose
    framework is not installed falls back to NumPy with a `RuntimeWarning` (its message
    starts with the upstream text "Usando implementación fallback de Mamba"), or raises
    `ImportError` naming the pip extra when `allow_fallback=False`.  A named backend that is
    installed but broken raises `ImportError` naming the framework and the cause: a broken
    installation is for the user to repair, not to run around silently.
    """
    if not isinstance(allow_fallback, bool):
        raise TypeError(
            f"allow_fallback must be a bool (True or False); received "
            f"{type(allow_fallback).__name__} {allow_fallback!r}"
        )
    if name == "auto":
        for candidate in AUTO_ORDER:
            if backend_installed(candidate):
                try:
                    return _load(candidate), Resolution("auto", candidate, False, None)
                except Exception as exc:  # installed but broken: try the next one
                    message = (
                        f"backend {candidate!r} is installed but importing "
                        f"'{BACKENDS[candidate].framework}' failed "
                        f"({type(exc).__name__}: {exc}); trying the next backend"
                    )
                    warnings.warn(message, RuntimeWarning, stacklevel=2)
                    logger.warning(message)
        raise ImportError("no backend could be imported (NumPy itself failed)")
    spec = _spec(name)
    if backend_installed(name):
        try:
            return _load(name), Resolution(name, name, False, None)
        except Exception as exc:
            raise ImportError(
                f"backend {name!r} is installed but broken: importing '{spec.framework}' "
                f"failed ({type(exc).__name__}: {exc}). Repair the installation (e.g. "
                f"pip install --force-reinstall 'mamba-core[{spec.extra or 'all'}]') or pick "
                "another backend"
            ) from exc
    reason = f"the '{spec.framework}' package is not installed"
    install = f"pip install 'mamba-core[{spec.extra}]'" if spec.extra else "pip install numpy"
    if not allow_fallback:
        raise ImportError(
            f"backend {name!r} is not available: {reason}. Install it with: {install}"
        )
    message = (
        f"{FALLBACK_MESSAGE}: backend {name!r} is not available ({reason}); "
        f"running on NumPy instead. Install it with: {install}"
    )
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    logger.warning(message)
    return _load("numpy"), Resolution(name, "numpy", True, reason)
