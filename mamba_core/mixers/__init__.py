"""The mixers: one module per Mamba version, all with the same face, chosen through one table.

Each module defines: `NAME`, `ARCHITECTURE`, `PARAM_NAMES`, `param_shapes(config)`,
`init_params(config, rng)`, `State` (its decode-state NamedTuple), `state_shapes(config,
batch)`, `SCAN_DTYPE_FIELDS`, `forward(params, x, config, state, *, scan, xp)`,
`step_scan`, `prepare(params, config, *, xp)`, `core_scan(algorithm, chunk_size)`,
`default_chunk(algorithm)`, `auto_scan(backend, platform, config)` and `describe(config)`.
The adapter, the backends and the modules dispatch through `mixer_for(config)` and never
branch on a version.
"""

from __future__ import annotations

from types import ModuleType

from ..config import MambaConfig
from . import mamba1, mamba2, mamba3

__all__ = ["MIXERS", "mixer_for"]

#: config.version -> the mixer module
MIXERS: dict[str, ModuleType] = {m.NAME: m for m in (mamba1, mamba2, mamba3)}


def mixer_for(config: MambaConfig) -> ModuleType:
    """The mixer module `config.version` names."""
    return MIXERS[config.version]
