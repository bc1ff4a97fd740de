"""mamba-core: a framework-agnostic Mamba (selective state space model) layer.

One pure-math core written against the Python Array API standard runs on NumPy, JAX and
PyTorch; each backend may replace the scan with a native kernel; `MambaModule` gives every
runtime the same face (the CapibaraGPT `IModule` interface).  Importing this package imports
no framework: JAX and PyTorch load only when their backend is asked for.
"""

from .config import ACTIVATIONS, SCAN_TYPES, MambaConfig
from .mixer import PARAM_NAMES, MambaState, init_state, mixer_forward, mixer_step, param_shapes
from .module import IModule, MambaModule, available_modules, create_module, load_pretrained
from .params import check_state_dict, init_params
from .registry import BACKENDS, backend_installed, get_backend, installed_backends
from .scan import selective_scan

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "PARAM_NAMES",
    "SCAN_TYPES",
    "IModule",
    "MambaConfig",
    "MambaModule",
    "MambaState",
    "__version__",
    "available_modules",
    "backend_installed",
    "check_state_dict",
    "create_module",
    "get_backend",
    "init_params",
    "init_state",
    "installed_backends",
    "load_pretrained",
    "mixer_forward",
    "mixer_step",
    "param_shapes",
    "selective_scan",
]
