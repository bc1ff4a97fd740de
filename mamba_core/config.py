"""`MambaConfig`: every field of the upstream `MambaModule` config, validated.

Glossary (used in every module of the package):
    B batch, L sequence length, H hidden_size, E = expand_factor * H (d_inner),
    N d_state, R dt_rank, K d_conv, T chunk length.

A config is built from keyword arguments, from a dict (`MambaConfig.from_dict`), from
another `MambaConfig`, or from a TOML table (`MambaConfig.from_toml(path,
table="modules.mamba")`).  Every bad value raises `ValueError` naming the field, the value
received and what is allowed; an unknown key raises with the nearest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import warnings
from collections.abc import Mapping
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

__all__ = ["ACTIVATIONS", "SCAN_TYPES", "VERSIONS", "MambaConfig", "resolve_config"]

#: Activation names accepted by `MambaConfig.activation` ("silu" is an alias of "swish").
ACTIVATIONS = ("swish", "silu", "gelu", "relu")
#: Scan algorithms accepted by `MambaConfig.scan_type`.
SCAN_TYPES = ("auto", "linear", "associative", "cumulative")
#: Mixer versions accepted by `MambaConfig.version` (`mamba_core.mixers.MIXERS`).
VERSIONS = ("mamba1", "mamba2", "mamba3")
#: the conv / dt-projection fields Mamba-3 does not have: its config leaves them unset
_NOT_MAMBA3 = {"d_conv": 4, "use_conv_bias": True, "dt_rank": 32}
#: the Mamba-3-only fields and their defaults (other versions must leave them so)
_MAMBA3_ONLY = {
    "rope_fraction": 0.5,
    "mimo": False,
    "mimo_rank": 4,
    "outproj_norm": False,
    "A_floor": 1e-4,
}


class _Unset:
    """The default of a field whose value depends on `version` (see `_NOT_MAMBA3`)."""

    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()
#: Keys a `[modules.mamba]` TOML table may carry that are not layer fields.
_TABLE_ONLY_KEYS = frozenset({"enabled"})
_FLOAT32_MAX = 3.4028234663852886e38


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    """Configuration of one Mamba mixer layer.

    Field defaults are the upstream `MambaModule` defaults, except `use_bias` (False, the
    official and HuggingFace default; upstream declared True but never used a bias) and
    `scan_type` ("auto": each backend picks its fastest stable algorithm for the device; see
    README "Scans").

    `version` picks the mixer ("mamba1" by default, so every existing config keeps its
    meaning).  Mamba-2 fields (used when `version == "mamba2"`): `num_heads` (H) and
    `head_dim` (P) with H * P = d_inner ("auto" derives one from the other; head_dim is 64
    when both are "auto"), `n_groups` (G, divides H), `time_step_limit` (min, max) clamp on
    dt, `A_init_range` (A drawn uniform in it at init); `layer_norm_epsilon` is the gated
    RMSNorm's eps.  `dt_rank` and `dt_scale` are Mamba-1 only.
    """

    hidden_size: int = 768
    d_state: int = 64
    d_conv: int = _UNSET  # 4 (Mamba-1 and -2); None for Mamba-3
    expand_factor: int = 2
    dt_rank: int | str = _UNSET  # 32 (Mamba-1); None for Mamba-3
    use_bias: bool = False
    use_conv_bias: bool = _UNSET  # True (Mamba-1 and -2); None for Mamba-3
    activation: str = "swish"
    layer_norm_epsilon: float = 1e-5
    use_tpu_optimizations: bool = True
    use_mixed_precision: bool = True
    scan_type: str = "auto"
    chunk_size: int | str = "auto"
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    version: str = "mamba1"
    num_heads: int | str = "auto"
    head_dim: int | str = "auto"
    n_groups: int = 1
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    A_init_range: tuple[float, float] = (1.0, 16.0)
    rope_fraction: float = 0.5
    mimo: bool = False
    mimo_rank: int = 4
    outproj_norm: bool = False
    A_floor: float = 1e-4

    def __post_init__(self) -> None:
        errors = []
        if self.version == "mamba3":
            for name in _NOT_MAMBA3:
                value = getattr(self, name)
                if value is _UNSET or value is None:
                    object.__setattr__(self, name, None)
                else:
                    errors.append(
                        f"{name}={value!r} is invalid for version='mamba3': Mamba-3 has no "
                        "conv and no dt projection (leave d_conv, use_conv_bias and dt_rank "
                        "unset)"
                    )
            if errors:
                raise ValueError("invalid MambaConfig: " + "; ".join(errors))
        else:
            for name, default in _NOT_MAMBA3.items():
                if getattr(self, name) is _UNSET:
                    object.__setattr__(self, name, default)
            for name, default in _MAMBA3_ONLY.items():
                value = getattr(self, name)
                if value != default or type(value) is not type(default):
                    errors.append(
                        f"{name}={value!r} applies to version='mamba3' only (version="
                        f"{self.version!r}; leave it at {default!r})"
                    )
        for name in ("time_step_limit", "A_init_range"):  # JSON / TOML give lists
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

        def bad(field: str, allowed: str) -> None:
            errors.append(f"{field}={getattr(self, field)!r} is invalid: expected {allowed}")

        for name in ("hidden_size", "d_state", "d_conv", "expand_factor"):
            value = getattr(self, name)
            if (value is not None or name != "d_conv") and (not _is_int(value) or value < 1):
                bad(name, "a positive int")
        if self.dt_rank is None:
            pass  # Mamba-3
        elif self.dt_rank == "auto":
            if _is_int(self.hidden_size) and self.hidden_size >= 1:
                object.__setattr__(self, "dt_rank", math.ceil(self.hidden_size / 16))
        elif not _is_int(self.dt_rank) or self.dt_rank < 1:
            bad("dt_rank", "a positive int or 'auto' (= ceil(hidden_size / 16))")
        if self.chunk_size != "auto" and (not _is_int(self.chunk_size) or self.chunk_size < 1):
            bad("chunk_size", "a positive int or 'auto' (each scan's default)")
        for name in ("use_bias", "use_conv_bias", "use_tpu_optimizations", "use_mixed_precision"):
            if not isinstance(getattr(self, name), bool) and not (
                name == "use_conv_bias" and self.version == "mamba3"
            ):
                bad(name, "a bool (True or False)")
        if self.activation not in ACTIVATIONS:
            bad("activation", f"one of {', '.join(map(repr, ACTIVATIONS))}")
        if self.scan_type not in SCAN_TYPES:
            bad("scan_type", f"one of {', '.join(map(repr, SCAN_TYPES))}")
        for name in ("layer_norm_epsilon", "dt_min", "dt_max", "dt_scale"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                bad(name, "a finite number > 0")
        if not _is_real(self.dt_init_floor) or not (
            math.isfinite(self.dt_init_floor) and self.dt_init_floor >= 0
        ):
            bad("dt_init_floor", "a finite number >= 0")
        if not errors and self.dt_max < self.dt_min:
            errors.append(
                f"dt_max={self.dt_max!r} is invalid: expected dt_max >= dt_min "
                f"(dt_min={self.dt_min!r})"
            )
        if self.version not in VERSIONS:
            bad("version", f"one of {', '.join(map(repr, VERSIONS))}")
        elif self.version in ("mamba2", "mamba3") and not errors:
            errors.extend(self._check_mamba2())
            if self.version == "mamba3" and not errors:
                errors.extend(self._check_mamba3())
        if not errors:  # the initial weights must be finite in float32
            bounds = {
                # dt_proj.weight bound (Mamba-1)
                "dt_scale": self.dt_scale / math.sqrt(self.dt_rank or 1),
                "dt_max": self.dt_max,  # softplus^-1(dt) ~ dt for large dt: dt_proj.bias
                "dt_init_floor": self.dt_init_floor,
            }
            for name, bound in bounds.items():
                if bound > _FLOAT32_MAX:
                    errors.append(
                        f"{name}={getattr(self, name)!r} is invalid: the initial weights it "
                        f"gives ({bound:.3g}) overflow float32 (max {_FLOAT32_MAX:.3g})"
                    )
        if errors:
            raise ValueError("invalid MambaConfig: " + "; ".join(errors))

    def _check_mamba2(self) -> list[str]:
        """Validate and resolve the Mamba-2 fields (num_heads / head_dim "auto")."""
        errors = []
        e = self.d_inner
        heads, dim = self.num_heads, self.head_dim
        for name, value in (("num_heads", heads), ("head_dim", dim)):
            if value != "auto" and (not _is_int(value) or value < 1):
                errors.append(f"{name}={value!r} is invalid: expected a positive int or 'auto'")
        if not _is_int(self.n_groups) or self.n_groups < 1:
            errors.append(f"n_groups={self.n_groups!r} is invalid: expected a positive int")
        for name in ("time_step_limit", "A_init_range"):
            pair = getattr(self, name)
            if not (
                isinstance(pair, tuple)
                and len(pair) == 2
                and all(_is_real(v) and not math.isnan(v) for v in pair)
                and pair[0] <= pair[1]
            ):
                errors.append(f"{name}={pair!r} is invalid: expected a (min, max) pair, min <= max")
        if errors:
            return errors
        if self.time_step_limit[0] < 0:
            errors.append(f"time_step_limit={self.time_step_limit!r} is invalid: expected min >= 0")
        lo, hi = self.A_init_range
        if not (lo > 0 and math.isfinite(hi)):
            errors.append(
                f"A_init_range={self.A_init_range!r} is invalid: expected 0 < min <= max < inf"
            )
        if heads == "auto" and dim == "auto":
            dim = 64
        if heads == "auto":
            if e % dim:
                errors.append(
                    f"head_dim={dim} does not divide d_inner = expand_factor * hidden_size = {e}"
                    " (set num_heads or head_dim)"
                )
                return errors
            heads = e // dim
        elif dim == "auto":
            if e % heads:
                errors.append(
                    f"num_heads={heads} does not divide d_inner = expand_factor * hidden_size = "
                    f"{e} (set head_dim)"
                )
                return errors
            dim = e // heads
        if heads * dim != e:
            errors.append(
                f"num_heads * head_dim = {heads} * {dim} = {heads * dim} != d_inner = "
                f"expand_factor * hidden_size = {e}"
            )
        elif heads % self.n_groups:
            errors.append(f"n_groups={self.n_groups} does not divide num_heads={heads}")
        if not errors:
            object.__setattr__(self, "num_heads", heads)
            object.__setattr__(self, "head_dim", dim)
        return errors

    def _check_mamba3(self) -> list[str]:
        """Validate the Mamba-3 fields (after the heads / groups of `_check_mamba2`)."""
        errors = []
        if self.rope_fraction not in (0.5, 1.0) or isinstance(self.rope_fraction, bool):
            errors.append(
                f"rope_fraction={self.rope_fraction!r} is invalid: expected 0.5 or 1.0 (the "
                "fraction of d_state rotated, as upstream)"
            )
        for name in ("mimo", "outproj_norm"):
            if not isinstance(getattr(self, name), bool):
                errors.append(f"{name}={getattr(self, name)!r} is invalid: expected a bool")
        if not _is_int(self.mimo_rank) or self.mimo_rank < 1:
            errors.append(f"mimo_rank={self.mimo_rank!r} is invalid: expected a positive int")
        if self.use_bias:
            errors.append("use_bias=True is invalid for version='mamba3': its linears have no bias")
        if not _is_real(self.A_floor) or not (math.isfinite(self.A_floor) and self.A_floor > 0):
            errors.append(f"A_floor={self.A_floor!r} is invalid: expected a finite number > 0")
        if errors:
            return errors
        if self.rope_angles < 1:
            errors.append(
                f"d_state={self.d_state} with rope_fraction={self.rope_fraction} gives no rotary "
                "angle (int(d_state * rope_fraction) rounded down to even must be >= 2)"
            )
        if self.mimo and self.d_state % 2:
            errors.append(
                f"d_state={self.d_state} is invalid with mimo=True: MIMO rotates the halves "
                "(j, j + d_state/2) of the state, so d_state must be even"
            )
        return errors

    @property
    def rope_angles(self) -> int:
        """Mamba-3's number of rotary angles S = (int(N * rope_fraction) rounded down to even)
        / 2."""
        s = int(self.d_state * self.rope_fraction)
        return (s - s % 2) // 2

    @property
    def ranks(self) -> int:
        """Mamba-3's R: mimo_rank with MIMO, else 1."""
        return self.mimo_rank if self.mimo else 1

    # ------------------------------------------------------------------ derived sizes
    @property
    def d_inner(self) -> int:
        """E = expand_factor * hidden_size, the width of the SSM."""
        return self.expand_factor * self.hidden_size

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        """(H, E, N, R, K): hidden_size, d_inner, d_state, dt_rank, d_conv."""
        return self.hidden_size, self.d_inner, self.d_state, self.dt_rank, self.d_conv

    # ------------------------------------------------------------------ constructors
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], strict: bool = True) -> MambaConfig:
        """Build from a mapping of field names; the TOML-level key `enabled` is ignored.

        An unknown key raises `ValueError` with the nearest valid field name; with
        `strict=False` unknown keys (another module's, in a shared table) are ignored with
        one `UserWarning` that lists them.
        """
        if not isinstance(values, Mapping):
            raise TypeError(
                f"MambaConfig.from_dict expected a mapping of field names to values, "
                f"received {type(values).__name__}"
            )
        names = cls.field_names()
        unknown = [k for k in values if k not in names and k not in _TABLE_ONLY_KEYS]
        if unknown and not strict:
            warnings.warn(
                f"MambaConfig ignores keys that are not its fields: {unknown}",
                UserWarning,
                stacklevel=2,
            )
            unknown = []
        if unknown:
            messages = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                messages.append(f"{key!r} is not a MambaConfig field{hint}")
            raise ValueError("; ".join(messages) + f" (valid fields: {', '.join(names)})")
        return cls(**{k: v for k, v in values.items() if k in names})

    @classmethod
    def from_toml(
        cls, path: str | os.PathLike, table: str = "modules.mamba", strict: bool = True
    ) -> MambaConfig:
        """Read a config from the (dotted) `table` of the TOML file at `path` (`strict` as in
        `from_dict`)."""
        if not isinstance(table, str):
            raise TypeError(
                f"table must be a dotted table name like 'modules.mamba' (a str); received "
                f"{type(table).__name__} {table!r}"
            )
        try:
            with open(path, "rb") as fh:
                document = tomllib.load(fh)
        except UnicodeDecodeError as exc:
            raise ValueError(f"{os.fspath(path)!r} is not a UTF-8 TOML file ({exc})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{os.fspath(path)!r} is not valid TOML: {exc}") from None
        node: Any = document
        walked = []
        for part in table.split(".") if table else []:
            walked.append(part)
            if not isinstance(node, Mapping) or part not in node:
                raise ValueError(
                    f"TOML file {os.fspath(path)!r} has no table [{'.'.join(walked)}] "
                    f"(expected a [{table}] table)"
                )
            node = node[part]
        if not isinstance(node, Mapping):
            raise ValueError(
                f"[{table}] in {os.fspath(path)!r} is a {type(node).__name__}, expected a table"
            )
        return cls.from_dict(node, strict=strict)

    def replace(self, **changes: Any) -> MambaConfig:
        """A copy with some fields changed (validated like a new config)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def describe(self) -> str:
        """The sizes that decide the parameter shapes, for error messages (its mixer's)."""
        from .mixers import mixer_for  # the mixers import this module

        return mixer_for(self).describe(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_config(config: MambaConfig | Mapping[str, Any] | None = None, **overrides: Any):
    """Turn `None`, a dict or a `MambaConfig` (plus keyword overrides) into a `MambaConfig`."""
    if config is None:
        base: dict[str, Any] = {}
    elif isinstance(config, MambaConfig):
        base = config.to_dict()
    elif isinstance(config, Mapping):
        base = dict(config)
    else:
        raise TypeError(
            "config must be a MambaConfig, a dict of MambaConfig fields or None; "
            f"received {type(config).__name__}"
        )
    if not overrides and isinstance(config, MambaConfig):
        return config
    return MambaConfig.from_dict({**base, **overrides})
