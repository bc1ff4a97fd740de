"""`MambaFlax`: the Mamba mixer as a Flax NNX module, parameters under the official names.

    from flax import nnx
    from mamba_core.backends.flax import MambaFlax
    model = MambaFlax(MambaConfig(hidden_size=256, d_state=16), rngs=nnx.Rngs(0))
    y = model(x)                                   # x (B, L, H) -> y (B, L, H)
    nnx.state(model, nnx.Param)                    # in_proj.weight, conv1d.weight, ..., A_log, D

The computation is the JAX backend's `forward` / `step` (jit-compiled, chunked scans), so a
`MambaFlax` and a `MambaModule(backend="jax")` with the same weights give the same numbers.
Parameter paths join to the official / HuggingFace state-dict keys: `in_proj.weight`,
`conv1d.weight` (E, 1, K), `conv1d.bias`, `x_proj.weight`, `dt_proj.weight`, `dt_proj.bias`,
`A_log`, `D`, `out_proj.weight` (+ `in_proj.bias`, `out_proj.bias` with `use_bias`).

A Flax Linen model can hold one through the NNX bridge:
`nnx.bridge.to_linen(MambaFlax, config, seed=0)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_core.checks import check_input_shape
from mamba_core.config import MambaConfig, resolve_config
from mamba_core.io import CheckpointWeights
from mamba_core.lm import GenerationMixin, PretrainedMixin
from mamba_core.mixer import MambaState, init_state, param_shapes
from mamba_core.models import LMConfig, init_lm_params, lm_param_shapes
from mamba_core.params import check_state_dict, init_params, raise_mismatch, to_numpy

from .jax import forward, step

__all__ = ["MambaBlockFlax", "MambaFlax", "MambaLMFlax"]


class _Params(nnx.Module):
    """A holder whose attributes are the parameters of one official submodule."""

    def __init__(self, **arrays: Any) -> None:
        for name, value in arrays.items():
            setattr(self, name, nnx.Param(value))


class MambaFlax(nnx.Module):
    """One Mamba mixer as a Flax NNX module.

    Args:
        config: a `MambaConfig`, a dict of its fields or None.
        rngs: `nnx.Rngs`; its `params` stream draws the initialisation seed (construct the
            module eagerly, not under `jit`/`eval_shape`: the official init runs in NumPy).
        seed: an explicit seed instead of `rngs`; the same seed gives the same weights as
            `MambaModule(config, seed=seed)` on every backend.
        dtype: compute dtype (None: the input's); param_dtype: storage dtype of the weights.
        scan_type: overrides `config.scan_type` ("auto" runs `linear`).
        state_dict: official-name weights to load instead of initialising (checked first,
            then each array is placed once; no initialisation is computed).
    """

    def __init__(
        self,
        config: MambaConfig | Mapping[str, Any] | None = None,
        *,
        rngs: nnx.Rngs | None = None,
        seed: int | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        scan_type: str | None = None,
        state_dict: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = resolve_config(config)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.scan_type = scan_type
        if state_dict is not None:
            if not isinstance(state_dict, CheckpointWeights):
                state_dict = check_state_dict(state_dict, self.config)
            self._assign(state_dict)
            return
        if seed is None:
            if rngs is None:
                raise TypeError("MambaFlax needs rngs=nnx.Rngs(...) or seed=<int>")
            seed = int(jax.random.randint(rngs.params(), (), 0, 2**31 - 1))
        self._assign(init_params(self.config, seed))

    def _assign(self, weights: Mapping[str, np.ndarray]) -> None:
        groups: dict[str, dict[str, Any]] = {}
        for key in param_shapes(self.config):  # one tensor at a time
            arr = jnp.asarray(weights[key], dtype=self.param_dtype)
            owner, _, leaf = key.partition(".")
            if leaf:
                groups.setdefault(owner, {})[leaf] = arr
            else:
                setattr(self, key, nnx.Param(arr))
        for owner, arrays in groups.items():
            setattr(self, owner, _Params(**arrays))

    # ---------------------------------------------------------------- weights
    def params_dict(self) -> dict[str, jax.Array]:
        """{official name: array}: the pytree the functional API takes."""
        flat = nnx.to_flat_state(nnx.state(self, nnx.Param))
        return {".".join(map(str, path)): var.get_value() for path, var in flat}

    def state_dict(self) -> dict[str, np.ndarray]:
        """A copy of the weights as NumPy arrays under the official names."""
        return {k: np.array(to_numpy(v), copy=True) for k, v in self.params_dict().items()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace the weights (any array-likes under the official names, checked)."""
        self._assign(check_state_dict(state_dict, self.config))

    @classmethod
    def from_state_dict(cls, config, state_dict: Mapping[str, Any], **kwargs) -> MambaFlax:
        return cls(config, state_dict=state_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, directory, **kwargs) -> MambaFlax:
        """Load a `save_pretrained` directory (config.json + model.safetensors), checked
        before anything is allocated (see `MambaModule.from_pretrained`)."""
        from mamba_core.module import load_pretrained

        config, _, weights = load_pretrained(directory)
        return cls(config, state_dict=weights, **kwargs)

    # ---------------------------------------------------------------- compute
    def _input(self, x, ndim: int, what: str):
        x = jnp.asarray(x)
        check_input_shape(x, ndim, self.config.hidden_size, owner="MambaFlax", what=what)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"MambaFlax expected a floating {what}, received {x.dtype}")
        return x if self.dtype is None else x.astype(self.dtype)

    def __call__(
        self,
        x,
        state: MambaState | None = None,
        *,
        return_state: bool = False,
        attention_mask=None,
        seq_idx=None,
        cu_seqlens=None,
    ):
        """x (B, L, H) -> y (B, L, H) (and the state after the last token, `return_state`);
        `attention_mask`, `seq_idx`, `cu_seqlens` as in the JAX `forward`."""
        x = self._input(x, 3, "x")
        y, new_state = forward(
            self.params_dict(), x, self.config, state, scan_type=self.scan_type,
            attention_mask=attention_mask, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
        )  # fmt: skip
        return (y, new_state) if return_state else y

    def step(self, x_t, state: MambaState | None = None):
        """One decode step: x_t (B, H) -> (y_t (B, H), new state)."""
        x_t = self._input(x_t, 2, "x_t")
        if state is None:
            state = self.init_state(x_t.shape[0], dtype=x_t.dtype)
        return step(self.params_dict(), state, x_t, self.config)

    def init_state(self, batch_size: int, *, dtype: Any = None) -> MambaState:
        return init_state(
            self.config, batch_size, dtype=dtype or self.dtype or self.param_dtype, xp=jnp
        )


# ---------------------------------------------------------------- blocks and language models
def _nested(flat: Mapping[str, Any]) -> Any:
    """{"a.0.b": v} -> {"a": {"0": {"b": v}}}."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *owners, leaf = name.split(".")
        node = tree
        for part in owners:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _module_of(tree: Mapping[str, Any]) -> Any:
    """Holders for dict nodes (nnx.List where every key is an index), nnx.Param leaves: so
    that joined parameter paths are exactly the flat names."""
    children = {
        k: (_module_of(v) if isinstance(v, dict) else nnx.Param(v)) for k, v in tree.items()
    }
    if children and all(k.isdigit() for k in children):
        return nnx.List([children[str(i)] for i in range(len(children))])
    holder = _Params()
    for k, v in children.items():
        setattr(holder, k, v)
    return holder


class MambaLMFlax(GenerationMixin, PretrainedMixin, nnx.Module):
    """A Mamba language model as a Flax NNX module; parameter paths join to the HuggingFace
    names (`backbone.embeddings.weight`, `backbone.layers.0.mixer.in_proj.weight`, ...).
    The computation is the JAX backend's (the whole model under one jit)."""

    def __init__(
        self,
        config: LMConfig | Mapping[str, Any],
        *,
        rngs: nnx.Rngs | None = None,
        seed: int | None = None,
        param_dtype: Any = jnp.float32,
        state_dict: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config if isinstance(config, LMConfig) else LMConfig.from_dict(config)
        self.param_dtype = param_dtype
        shapes = lm_param_shapes(self.config)
        if state_dict is None:
            if seed is None:
                if rngs is None:
                    raise TypeError("MambaLMFlax needs rngs=nnx.Rngs(...) or seed=<int>")
                seed = int(jax.random.randint(rngs.params(), (), 0, 2**31 - 1))
            state_dict = init_lm_params(self.config, seed)
        else:
            found = {
                k: (tuple(getattr(v, "shape", np.shape(v))), "float32")
                for k, v in state_dict.items()
            }
            if self.config.tie_embeddings:
                found.pop("lm_head.weight", None)
            raise_mismatch(found, shapes, config=self.config)
        flat = {k: jnp.asarray(to_numpy(state_dict[k]), dtype=param_dtype) for k in shapes}
        for name, module in vars(_module_of(_nested(flat))).items():
            if isinstance(module, (nnx.Module, nnx.List, nnx.Param)):
                setattr(self, name, module)

    @classmethod
    def from_pretrained(cls, directory, **kwargs) -> MambaLMFlax:
        from mamba_core.checkpoints import read_lm_checkpoint

        config, weights, _ = read_lm_checkpoint(directory)
        return cls(config, state_dict=weights, **kwargs)

    def params_dict(self) -> dict[str, jax.Array]:
        flat = nnx.to_flat_state(nnx.state(self, nnx.Param))
        return {".".join(map(str, path)): var.get_value() for path, var in flat}

    def __call__(self, input_ids, attention_mask=None, states=None, *, return_states=False):
        """input_ids (B, L) -> logits (B, L, V) (and the per-layer states)."""
        from .jax import lm_call

        ids = jnp.asarray(input_ids)
        mask = None if attention_mask is None else jnp.asarray(attention_mask, self.param_dtype)
        logits, new_states = lm_call(
            self.params_dict(), ids, states, mask, config=self.config, dtype=self.param_dtype
        )
        return (logits, new_states) if return_states else logits

    def step(self, token_ids, states):
        """One decode step: token_ids (B,) -> (logits (B, V), new per-layer states)."""
        from .jax import _lm_step_jit

        return _lm_step_jit(
            self.params_dict(),
            list(states),
            jnp.asarray(token_ids),
            config=self.config,
            dtype=jnp.dtype(self.param_dtype),
        )

    def _prefill(self, ids, attention_mask):
        logits, states = self(ids, attention_mask, return_states=True)
        return to_numpy(logits[:, -1, :]), states

    def _decode(self, ids, states):
        logits, states = self.step(ids, states)
        return to_numpy(logits), states


class MambaBlockFlax(nnx.Module):
    """A pre-norm residual block as an NNX module: `block(x, mask)`; parameters
    `norm.weight` and `mixer.<official names>`."""

    def __init__(self, config=None, *, norm_epsilon: float = 1e-5, residual_in_fp32: bool = True,
                 **kwargs: Any) -> None:  # fmt: skip
        self.mixer = MambaFlax(config, **kwargs)
        self.config = self.mixer.config
        self.norm = _Params(weight=jnp.ones(self.config.hidden_size, self.mixer.param_dtype))
        self.norm_epsilon, self.residual_in_fp32 = norm_epsilon, residual_in_fp32

    def __call__(self, x, mask=None, state=None, *, return_state: bool = False):
        from mamba_core.models import block_forward

        x = self.mixer._input(x, 3, "x")
        params = self.mixer.params_dict()
        scan_type = self.mixer.scan_type

        def run(p, v, s, m):
            return forward(p, v, self.config, s, scan_type=scan_type, attention_mask=m)

        y, new_state = block_forward(
            self.norm.weight.get_value(), params, x, self.config, state, mixer=run,
            attention_mask=None if mask is None else jnp.asarray(mask, x.dtype),
            norm_epsilon=self.norm_epsilon, residual_in_fp32=self.residual_in_fp32, xp=jnp,
        )  # fmt: skip
        return (y, new_state) if return_state else y
