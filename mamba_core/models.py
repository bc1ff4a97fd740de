"""Mamba blocks and language models over any mixer, in pure Array API.

Glossary: B batch, L length, D hidden_size, V vocab_size, n_layer layers.

    block(x)  = x + mixer(rmsnorm(x) * norm.weight)          (residual in float32 or wider
                                                              with residual_in_fp32)
    lm(ids)   = rmsnorm_f(blocks(embedding[ids])) @ head.T    head = embedding when tied

Parameter names are the HuggingFace `MambaForCausalLM` / `Mamba2ForCausalLM` ones:
`backbone.embeddings.weight` (V, D), `backbone.layers.{i}.norm.weight`,
`backbone.layers.{i}.mixer.<mixer names>`, `backbone.norm_f.weight`, `lm_head.weight` (only
when the embeddings are not tied).  Decode states: one mixer state per layer (a list).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from .config import MambaConfig, _is_int, _is_real, resolve_config
from .mixer import mixer_forward, param_shapes
from .ops import cast
from .params import init_params

__all__ = [
    "LMConfig",
    "block_forward",
    "init_lm_params",
    "layer_params",
    "lm_forward",
    "lm_param_shapes",
    "rms_norm",
]

Array = Any

EMBEDDING = "backbone.embeddings.weight"
NORM_F = "backbone.norm_f.weight"
LM_HEAD = "lm_head.weight"


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """A Mamba language model: `n_layer` blocks of the `mixer` config.

    `vocab_size` is the number of embedding rows (already padded, as checkpoints store it);
    `norm_epsilon` is the blocks' and the final RMSNorm's eps; `residual_in_fp32` keeps the
    residual stream in at least float32 (the official models' default).
    """

    mixer: MambaConfig = dataclasses.field(default_factory=MambaConfig)
    n_layer: int = 2
    vocab_size: int = 256
    tie_embeddings: bool = True
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "mixer", resolve_config(self.mixer))
        errors = []
        for name in ("n_layer", "vocab_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                errors.append(f"{name}={value!r} is invalid: expected a positive int")
        for name in ("tie_embeddings", "residual_in_fp32"):
            if not isinstance(getattr(self, name), bool):
                errors.append(f"{name}={getattr(self, name)!r} is invalid: expected a bool")
        if not _is_real(self.norm_epsilon) or not self.norm_epsilon > 0:
            errors.append(f"norm_epsilon={self.norm_epsilon!r} is invalid: expected a number > 0")
        if errors:
            raise ValueError("invalid LMConfig: " + "; ".join(errors))

    @property
    def hidden_size(self) -> int:
        return self.mixer.hidden_size

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["mixer"] = self.mixer.to_dict()
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LMConfig:
        values = dict(values)
        values["mixer"] = MambaConfig.from_dict(values.get("mixer", {}))
        return cls(**values)

    def describe(self) -> str:
        return (
            f"n_layer={self.n_layer}, vocab_size={self.vocab_size}, "
            f"tie_embeddings={self.tie_embeddings}, {self.mixer.describe()}"
        )


def lm_param_shapes(config: LMConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the model with its shape, in HuggingFace state-dict order."""
    d, v = config.hidden_size, config.vocab_size
    shapes = {EMBEDDING: (v, d)}
    mixer = param_shapes(config.mixer)
    for i in range(config.n_layer):
        shapes[f"backbone.layers.{i}.norm.weight"] = (d,)
        for name, shape in mixer.items():
            shapes[f"backbone.layers.{i}.mixer.{name}"] = shape
    shapes[NORM_F] = (d,)
    if not config.tie_embeddings:
        shapes[LM_HEAD] = (v, d)
    return shapes


def init_lm_params(config: LMConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Float64 NumPy parameters: embeddings (and an untied head) normal with std 0.02, norms
    1, each mixer by its official scheme from its own seed drawn from `seed`."""
    rng = np.random.default_rng(seed)
    d, v = config.hidden_size, config.vocab_size
    params = {EMBEDDING: rng.normal(0.0, 0.02, size=(v, d))}
    layer_seeds = rng.integers(0, 2**62, size=config.n_layer)
    for i in range(config.n_layer):
        params[f"backbone.layers.{i}.norm.weight"] = np.ones(d)
        for name, value in init_params(config.mixer, int(layer_seeds[i])).items():
            params[f"backbone.layers.{i}.mixer.{name}"] = value
    params[NORM_F] = np.ones(d)
    if not config.tie_embeddings:
        params[LM_HEAD] = rng.normal(0.0, 0.02, size=(v, d))
    return params


def layer_params(params: Mapping[str, Array], i: int) -> tuple[Array, dict[str, Array]]:
    """(norm weight, mixer params) of layer i."""
    prefix = f"backbone.layers.{i}.mixer."
    mixer = {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}
    return params[f"backbone.layers.{i}.norm.weight"], mixer


def rms_norm(x: Array, weight: Array, eps: float, *, xp=None) -> Array:
    """x / sqrt(mean(x**2) + eps) * weight over the last axis, computed in at least float32
    (HuggingFace `MambaRMSNorm`), returned in x's dtype."""
    xp = xp if xp is not None else array_namespace(x)
    wide = cast(x, _wide(x.dtype, xp), xp)
    normed = wide / xp.sqrt(xp.mean(wide * wide, axis=-1, keepdims=True) + eps)
    return cast(normed, x.dtype, xp) * cast(weight, x.dtype, xp)


def _wide(dtype, xp):
    """float32 for 16-bit dtypes, the dtype itself otherwise."""
    return xp.float32 if xp.finfo(dtype).bits < 32 else dtype


def block_forward(
    norm_weight: Array,
    mixer_params: Mapping[str, Array],
    x: Array,
    config: LMConfig | MambaConfig,
    state: Any = None,
    *,
    mixer: Callable | None = None,
    attention_mask: Array | None = None,
    norm_epsilon: float = 1e-5,
    residual_in_fp32: bool = True,
    xp=None,
):
    """One pre-norm residual block: (x + mixer(rmsnorm(x)), mixer state).

    `mixer(params, x, state, attention_mask) -> (y, state)` is a backend's mixer forward
    (default: the core's with the config's scan).  The residual stays in at least float32
    with `residual_in_fp32`; the output has the residual's dtype.
    """
    xp = xp if xp is not None else array_namespace(x)
    mixer_cfg = config.mixer if isinstance(config, LMConfig) else config
    if mixer is None:

        def mixer(p, v, s, m):
            return mixer_forward(p, v, mixer_cfg, s, attention_mask=m, xp=xp)

    residual = cast(x, _wide(x.dtype, xp), xp) if residual_in_fp32 else x
    hidden = rms_norm(x, norm_weight, norm_epsilon, xp=xp)
    y, new_state = mixer(mixer_params, hidden, state, attention_mask)
    return residual + cast(y, residual.dtype, xp), new_state


def lm_forward(
    params: Mapping[str, Array],
    input_ids: Array,
    config: LMConfig,
    states: list | None = None,
    *,
    dtype=None,
    mixer: Callable | None = None,
    attention_mask: Array | None = None,
    xp=None,
):
    """input_ids (B, L) integers -> (logits (B, L, V), per-layer states).

    `dtype`: the compute dtype (default: the embeddings'); `mixer`: a backend's mixer
    forward (see `block_forward`); `attention_mask` (B, L) of 0/1 (1 = real token): padded
    positions leave every state unchanged and feed nothing to later tokens.
    """
    xp = xp if xp is not None else array_namespace(input_ids, params[EMBEDDING])
    emb = params[EMBEDDING]
    dtype = dtype if dtype is not None else emb.dtype
    batch, length = input_ids.shape
    h = xp.reshape(xp.take(emb, xp.reshape(input_ids, (-1,)), axis=0), (batch, length, -1))
    h = cast(h, dtype, xp)
    new_states = []
    for i in range(config.n_layer):
        norm_w, mixer_p = layer_params(params, i)
        h, st = block_forward(
            norm_w,
            mixer_p,
            h,
            config,
            None if states is None else states[i],
            mixer=mixer,
            attention_mask=attention_mask,
            norm_epsilon=config.norm_epsilon,
            residual_in_fp32=config.residual_in_fp32,
            xp=xp,
        )
        new_states.append(st)
    h = rms_norm(cast(h, dtype, xp), params[NORM_F], config.norm_epsilon, xp=xp)
    head = params[EMBEDDING] if config.tie_embeddings else params[LM_HEAD]
    logits = xp.matmul(h, xp.matrix_transpose(cast(head, dtype, xp)))
    return logits, new_states
