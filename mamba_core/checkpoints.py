"""Language-model checkpoints from a local directory: the HuggingFace layout
(`MambaForCausalLM` / `Mamba2ForCausalLM`) and the official `mamba_ssm` layout, read as small
mapping tables from their names to ours; and the HuggingFace layout written back (a Mamba-3
model as model_type "mamba3", which only this package reads: transformers has no Mamba-3).

Only safetensors are read (never a pickle).  Everything is checked before a weight is read:
the config, then every tensor's name, shape and dtype in every shard's header; weights are
then read one tensor at a time.  Errors name the file and the tensor.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from .config import MambaConfig
from .io import (
    FLOAT_DTYPES,
    CheckpointError,
    CheckpointWeights,
    _read_json,
    atomic_write,
    read_safetensors_header,
)
from .models import EMBEDDING, LM_HEAD, LMConfig, lm_param_shapes
from .params import raise_mismatch

__all__ = [
    "config_from_hf",
    "config_from_official",
    "config_to_hf",
    "read_lm_checkpoint",
    "write_lm_checkpoint",
]

#: HF / official activation names -> ours
_ACTIVATIONS = {"silu": "swish", "swish": "swish", "gelu": "gelu", "gelu_pytorch_tanh": "gelu",
                "relu": "relu"}  # fmt: skip
#: the config.json model_types read (HuggingFace's two; "mamba3" is ours, see `_TO_HF`)
_HF_KINDS = ("mamba", "mamba2", "mamba3")
#: official state-dict names -> ours (= HuggingFace's)
_OFFICIAL_NAMES = {"backbone.embedding.weight": EMBEDDING}
CONVERT_HINT = (
    'convert it once, safely (no code is run): python -c "import torch, safetensors.torch as s; '
    "s.save_file({k: v.contiguous() for k, v in torch.load('pytorch_model.bin', "
    "weights_only=True).items()}, 'model.safetensors')\""
)


def _float(value: Any) -> float:
    """A number from JSON, including transformers' {"__float__": "Infinity"} encoding."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    return float(value)


def _activation(name: str, path: str) -> str:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise CheckpointError(
            f"{path!r}: activation {name!r} is not supported (expected one of "
            f"{sorted(_ACTIVATIONS)})"
        ) from None


def config_from_hf(c: Mapping[str, Any], path: str = "config.json") -> LMConfig:
    """An `LMConfig` from a HuggingFace `MambaConfig` / `Mamba2Config` dict, or the
    model_type "mamba3" config.json that `config_to_hf` writes for a Mamba-3 model."""
    kind = c.get("model_type")
    if kind not in _HF_KINDS:
        raise CheckpointError(
            f"{path!r}: model_type={kind!r} is not a Mamba language model (expected one of "
            f"{', '.join(map(repr, _HF_KINDS))})"
        )
    try:
        common = dict(
            hidden_size=c["hidden_size"],
            d_state=c["state_size"],
            expand_factor=int(c["expand"]),
            use_bias=bool(c.get("use_bias", False)),
            activation=_activation(c.get("hidden_act", "silu"), path),
            dt_min=c.get("time_step_min", 0.001),
            dt_max=c.get("time_step_max", 0.1),
            dt_init_floor=c.get("time_step_floor", 1e-4),
            layer_norm_epsilon=c.get("layer_norm_epsilon", 1e-5),
        )
        if kind != "mamba3":
            common.update(d_conv=c["conv_kernel"], use_conv_bias=bool(c.get("use_conv_bias", True)))
        if kind != "mamba":
            limit = c.get("time_step_limit", (0.0, float("inf")))
            common.update(
                num_heads=c["num_heads"],
                head_dim=c["head_dim"],
                n_groups=c.get("n_groups", 1),
                time_step_limit=(_float(limit[0]), _float(limit[1])),
            )
        if kind == "mamba":
            mixer = MambaConfig(
                **common,
                dt_rank=c.get("time_step_rank", "auto"),
                dt_scale=c.get("time_step_scale", 1.0),
            )
        elif kind == "mamba2":
            if c.get("norm_before_gate", False) or not c.get("rms_norm", True):
                raise CheckpointError(
                    f"{path!r}: only rms_norm=True, norm_before_gate=False Mamba-2 models are "
                    "supported (the official and HuggingFace default)"
                )
            mixer = MambaConfig(**common, version="mamba2")
        else:
            mixer = MambaConfig(
                **common,
                version="mamba3",
                **{name: c[name] for name in _MAMBA3_FIELDS if name in c},
            )
        return LMConfig(
            mixer=mixer,
            n_layer=c["num_hidden_layers"],
            vocab_size=c["vocab_size"],
            tie_embeddings=bool(c.get("tie_word_embeddings", True)),
            norm_epsilon=c.get("layer_norm_epsilon", 1e-5),
            residual_in_fp32=bool(c.get("residual_in_fp32", True)),
        )
    except KeyError as exc:
        raise CheckpointError(f"{path!r} lacks the field {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path!r} holds an invalid config: {exc}") from None


def config_from_official(c: Mapping[str, Any], path: str = "config.json") -> LMConfig:
    """An `LMConfig` from an official `mamba_ssm` `MambaConfig` dict (d_model, n_layer,
    ssm_cfg, pad_vocab_size_multiple, tie_embeddings, ...)."""
    ssm = dict(c.get("ssm_cfg") or {})
    layer = ssm.pop("layer", "Mamba1")
    try:
        vocab = int(c["vocab_size"])
        multiple = int(c.get("pad_vocab_size_multiple", 8))
        if vocab % multiple:
            vocab += multiple - vocab % multiple
        common = dict(
            hidden_size=c["d_model"],
            d_conv=ssm.get("d_conv", 4),
            expand_factor=int(ssm.get("expand", 2)),
            use_bias=bool(ssm.get("bias", False)),
            use_conv_bias=bool(ssm.get("conv_bias", True)),
            dt_min=ssm.get("dt_min", 0.001),
            dt_max=ssm.get("dt_max", 0.1),
            dt_init_floor=ssm.get("dt_init_floor", 1e-4),
        )
        if layer == "Mamba1":
            mixer = MambaConfig(
                **common,
                d_state=ssm.get("d_state", 16),
                dt_rank=ssm.get("dt_rank", "auto"),
                dt_scale=ssm.get("dt_scale", 1.0),
            )
        elif layer == "Mamba2":
            limit = ssm.get("dt_limit", (0.0, float("inf")))
            mixer = MambaConfig(
                **common,
                version="mamba2",
                d_state=ssm.get("d_state", 128),
                head_dim=ssm.get("headdim", 64),
                n_groups=ssm.get("ngroups", 1),
                time_step_limit=(_float(limit[0]), _float(limit[1])),
            )
        else:
            raise CheckpointError(f"{path!r}: ssm_cfg.layer={layer!r} is not supported")
        if not c.get("rms_norm", True):
            raise CheckpointError(f"{path!r}: rms_norm=False (LayerNorm blocks) is not supported")
        return LMConfig(
            mixer=mixer,
            n_layer=c["n_layer"],
            vocab_size=vocab,
            tie_embeddings=bool(c.get("tie_embeddings", True)),
            norm_epsilon=c.get("norm_epsilon", 1e-5),
            residual_in_fp32=bool(c.get("residual_in_fp32", True)),
        )
    except KeyError as exc:
        raise CheckpointError(f"{path!r} lacks the field {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path!r} holds an invalid config: {exc}") from None


def _hf_conv(m: MambaConfig) -> dict[str, Any]:
    return {"conv_kernel": m.d_conv, "use_conv_bias": m.use_conv_bias}


def _hf_heads(m: MambaConfig) -> dict[str, Any]:
    return {
        "num_heads": m.num_heads,
        "head_dim": m.head_dim,
        "n_groups": m.n_groups,
        "time_step_limit": list(m.time_step_limit),
    }


#: each version's own config.json fields.  transformers has no Mamba-3 class, so a Mamba-3
#: model is written with model_type "mamba3" and no "architectures": it loads back here (and
#: a HuggingFace tool refuses it by name instead of building a Mamba-1 model from it).
_TO_HF = {
    "mamba1": lambda m: {
        **_hf_conv(m),
        "model_type": "mamba",
        "architectures": ["MambaForCausalLM"],
        "time_step_rank": m.dt_rank,
        "time_step_scale": m.dt_scale,
    },
    "mamba2": lambda m: {
        **_hf_conv(m),
        **_hf_heads(m),
        "model_type": "mamba2",
        "architectures": ["Mamba2ForCausalLM"],
        "rms_norm": True,
        "norm_before_gate": False,
    },
    "mamba3": lambda m: {
        **_hf_heads(m),
        "model_type": "mamba3",
        **{name: getattr(m, name) for name in _MAMBA3_FIELDS},
    },
}
#: the Mamba-3 fields a config.json of model_type "mamba3" carries under our own names
_MAMBA3_FIELDS = ("rope_fraction", "mimo", "mimo_rank", "outproj_norm", "A_floor")


def config_to_hf(config: LMConfig) -> dict[str, Any]:
    """The HuggingFace config.json of `config` (Mamba-1 and -2 load in transformers; every
    version loads back here)."""
    m = config.mixer
    act = {"swish": "silu", "silu": "silu", "gelu": "gelu_pytorch_tanh", "relu": "relu"}
    return {
        "hidden_size": m.hidden_size,
        "state_size": m.d_state,
        "expand": m.expand_factor,
        "use_bias": m.use_bias,
        "hidden_act": act[m.activation],
        "time_step_min": m.dt_min,
        "time_step_max": m.dt_max,
        "time_step_floor": m.dt_init_floor,
        "layer_norm_epsilon": config.norm_epsilon,
        "num_hidden_layers": config.n_layer,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "residual_in_fp32": config.residual_in_fp32,
        **_TO_HF[m.version](m),
    }


class ShardedWeights(Mapping):
    """Our name -> a tensor read on access from whichever shard holds it."""

    def __init__(self, entries: Mapping[str, tuple[CheckpointWeights, str]]) -> None:
        self._entries = dict(entries)
        self.shapes = {k: w.shapes[n] for k, (w, n) in self._entries.items()}

    def __getitem__(self, name: str) -> np.ndarray:
        weights, stored = self._entries[name]
        return weights[stored]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def _weight_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(index):
        data = _read_json(index)
        try:
            files = sorted(set(data["weight_map"].values()))
        except (KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index!r} has no valid 'weight_map'") from None
        for name in files:
            if os.path.basename(name) != name:
                raise CheckpointError(f"{index!r} names a shard outside the directory: {name!r}")
        return [os.path.join(directory, f) for f in files]
    if os.path.isfile(single):
        return [single]
    for legacy in ("pytorch_model.bin", "model.pt", "pytorch_model.bin.index.json"):
        if os.path.exists(os.path.join(directory, legacy)):
            raise CheckpointError(
                f"{os.path.join(directory, legacy)!r} is a pickle checkpoint, which is never "
                f"loaded here (unpickling runs code); {CONVERT_HINT}"
            )
    raise FileNotFoundError(
        f"{directory!r} has no model.safetensors or model.safetensors.index.json"
    )


def read_lm_checkpoint(directory: str | os.PathLike) -> tuple[LMConfig, ShardedWeights, str]:
    """(config, weights, layout) of a HuggingFace or official checkpoint directory, checked
    before any weight is read.  `layout` is "hf" or "official"."""
    directory = os.fspath(directory)
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path!r} not found")
    raw = _read_json(cfg_path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path!r} is not a JSON object")
    if "model_type" in raw:
        layout, config = "hf", config_from_hf(raw, cfg_path)
    elif "d_model" in raw:
        layout, config = "official", config_from_official(raw, cfg_path)
    else:
        raise CheckpointError(
            f"{cfg_path!r} is neither a HuggingFace (model_type) nor an official mamba_ssm "
            "(d_model) config"
        )
    entries: dict[str, tuple[CheckpointWeights, str]] = {}
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    expected = lm_param_shapes(config)
    for path in _weight_files(directory):
        _, header = read_safetensors_header(path)
        bad = [n for n, i in header.items() if i["dtype"] not in FLOAT_DTYPES]
        if bad:
            info = header[bad[0]]
            raise CheckpointError(
                f"{path!r}: tensor {bad[0]!r} has dtype {info['dtype']}; expected a floating dtype"
            )
        weights = CheckpointWeights(path, header)
        for stored, info in header.items():
            name = _OFFICIAL_NAMES.get(stored, stored)
            if name == LM_HEAD and config.tie_embeddings:
                continue  # the official layout stores the tied head too
            entries[name] = (weights, stored)
            found[name] = (tuple(info["shape"]), FLOAT_DTYPES[info["dtype"]])
    raise_mismatch(found, expected, config=config, source=directory)
    return config, ShardedWeights({k: entries[k] for k in expected}), layout


def write_lm_checkpoint(
    directory: str | os.PathLike, config: LMConfig, tensors: Mapping[str, np.ndarray]
) -> None:
    """Write the HuggingFace layout (config.json + model.safetensors, HF names), crash-safely
    (weights first, each file atomically replaced; see `mamba_core.io`)."""
    from .io import _safetensors

    directory = os.fspath(directory)
    if directory == "":
        raise ValueError("save_pretrained expected a directory path; received ''")
    os.makedirs(directory, exist_ok=True)
    save_id = uuid.uuid4().hex
    hf = {**config_to_hf(config), "mamba_core_save_id": save_id}
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    blob = _safetensors().save(arrays, metadata={"format": "pt", "mamba_core_save_id": save_id})
    atomic_write(os.path.join(directory, "model.safetensors"), blob)
    text = json.dumps(hf, indent=2, sort_keys=True, default=float) + "\n"
    atomic_write(os.path.join(directory, "config.json"), text.encode("utf-8"))
