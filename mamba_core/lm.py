"""`MambaLM` and `MambaBlock`: language models and residual blocks on any backend.

    lm = MambaLM.from_pretrained("mamba-130m-hf/", backend="numpy")   # HF or official layout
    logits, states = lm(input_ids)                                     # (B, L, V), per layer
    logits, states = lm.step(next_ids, states)                         # (B, V): O(1) per token
    tokens = lm.generate(input_ids, max_new_tokens=32)                 # prefill + steps

The math is `mamba_core.models` (Array API); each backend runs it with its own mixer scans
(JAX: the whole model under one `jax.jit`).  Sampling runs in NumPy float64 on the logits,
so the same seed gives the same samples on every backend for the same logits.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from .checks import check_input_shape
from .config import MambaConfig, resolve_config
from .models import LMConfig, init_lm_params, lm_param_shapes, rms_norm
from .module import BackendIO, MambaModule, _dtype_name
from .params import raise_mismatch, to_numpy
from .registry import get_backend

__all__ = ["GenerationMixin", "MambaBlock", "MambaLM", "sample_next"]


def _ids(value: Any, what: str, vocab: int, ndim: int) -> np.ndarray:
    """Token ids as an int64 NumPy array of `ndim` axes, every id in [0, vocab)."""
    arr = to_numpy(value) if not isinstance(value, (list, tuple)) else np.asarray(value)
    if arr.dtype.kind not in "iu":
        raise TypeError(
            f"MambaLM expected {what} of an integer dtype; received {what}.dtype={arr.dtype}"
        )
    if arr.ndim != ndim or 0 in arr.shape:
        raise ValueError(
            f"MambaLM expected {what} as a non-empty {ndim}-D array of token ids; received "
            f"{what}.shape={arr.shape}"
        )
    if arr.min() < 0 or arr.max() >= vocab:
        raise ValueError(
            f"MambaLM expected token ids in [0, {vocab}); received {what} with values in "
            f"[{arr.min()}, {arr.max()}]"
        )
    return arr.astype(np.int64)


def _mask(value: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    if value is None:
        return None
    arr = np.asarray(to_numpy(value))
    if arr.shape != shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {shape} (1 = real token, 0 = "
            f"padding); received attention_mask.shape={arr.shape}"
        )
    if not np.isin(arr, (0, 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    return arr


def sample_next(
    logits: np.ndarray,
    rng: np.random.Generator | None,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> np.ndarray:
    """The next token of every row of logits (B, V): argmax, or a sample after temperature,
    top-k and top-p (nucleus) filtering, drawn by inverse CDF with `rng` in float64."""
    logits = np.asarray(logits, dtype=np.float64)
    if not do_sample:
        return np.argmax(logits, axis=-1)
    scaled = logits / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = np.sort(scaled, axis=-1)[:, -top_k][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        keep_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p < top_p  # always keeps the top
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    u = rng.random(probs.shape[0])[:, None]
    return np.minimum((np.cumsum(probs, axis=-1) < u).sum(axis=-1), probs.shape[-1] - 1)


class GenerationMixin:
    """`generate` for any model with `_prefill(ids, attention_mask) -> (last logits (B, V)
    as NumPy, states)`, `_decode(ids (B,), states) -> (logits (B, V) as NumPy, states)` and
    `config.vocab_size`: the same loop (and the same NumPy sampling) on every backend."""

    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        do_sample: bool = False,
        seed: int | None = None,
        eos_token_id: int | None = None,
        attention_mask: Any = None,
        stream: bool = False,
    ):
        """Prompt (B, L) -> the prompt followed by up to `max_new_tokens` tokens (B, L + T)
        as a NumPy int64 array; with `stream=True`, an iterator of the new tokens (B,) one
        step at a time.  The prompt is prefilled with one forward call, then every token is
        one O(1) step.  Prompts of different lengths: left-pad them and pass
        `attention_mask` (1 = real token).  Rows that produced `eos_token_id` continue with it;
        generation stops when every row has.  Sampling (`do_sample`, `temperature`, `top_k`,
        `top_p`) draws from a NumPy generator seeded with `seed`.
        """
        ids = _ids(input_ids, "input_ids", self.config.vocab_size, 2)
        if (
            not isinstance(max_new_tokens, int)
            or isinstance(max_new_tokens, bool)
            or max_new_tokens < 0
        ):
            raise ValueError(f"max_new_tokens must be an int >= 0; received {max_new_tokens!r}")
        if do_sample and not (temperature > 0):
            raise ValueError(f"temperature must be > 0 when sampling; received {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None; received {top_k!r}")
        if top_p is not None and not (0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None; received {top_p!r}")
        options = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
        tokens = self._generate(
            ids, max_new_tokens, attention_mask, eos_token_id, options, np.random.default_rng(seed)
        )
        if stream:
            return tokens
        new = list(tokens)
        return np.concatenate([ids, np.stack(new, axis=1)], axis=1) if new else ids

    def _generate(self, ids, max_new_tokens, attention_mask, eos, options, rng) -> Iterator:
        if max_new_tokens == 0:
            return
        last, states = self._prefill(ids, attention_mask)
        done = np.zeros(ids.shape[0], dtype=bool)
        for i in range(max_new_tokens):
            nxt = sample_next(last, rng, **options)
            if eos is not None:
                nxt = np.where(done, eos, nxt)
                done |= nxt == eos
            yield nxt
            if i + 1 == max_new_tokens or (eos is not None and done.all()):
                return
            last, states = self._decode(nxt, states)


class PretrainedMixin:
    """`save_pretrained` for any language model with `config` and `params_dict()` (HF names
    -> arrays of any backend): `MambaLM`, `MambaLMTorch` and `MambaLMFlax` write the same
    files."""

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the HuggingFace layout (config.json + model.safetensors), crash-safely: it
        loads in transformers' `MambaForCausalLM` / `Mamba2ForCausalLM` and back here (a
        Mamba-3 model: model_type "mamba3", back here only; transformers has no Mamba-3
        class).  bfloat16 weights are written as float32 (lossless)."""
        from .checkpoints import write_lm_checkpoint

        write_lm_checkpoint(
            directory, self.config, {k: to_numpy(v) for k, v in self.params_dict().items()}
        )


class MambaLM(GenerationMixin, PretrainedMixin):
    """A Mamba language model (embedding -> blocks -> RMSNorm -> head) on one backend.

    Args:
        config: an `LMConfig` (or a dict of its fields, `mixer` a `MambaConfig` dict).
        backend, dtype, seed, allow_fallback, device: as `MambaModule`.
        state_dict: weights under the HuggingFace names (`backbone.embeddings.weight`, ...).
    """

    def __init__(
        self,
        config: LMConfig | Mapping[str, Any],
        backend: str = "auto",
        dtype: Any = "float32",
        seed: int = 0,
        *,
        allow_fallback: bool = True,
        device: Any = None,
        state_dict: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config if isinstance(config, LMConfig) else LMConfig.from_dict(config)
        self.backend, self.resolution = get_backend(backend, allow_fallback=allow_fallback)
        self.dtype = _dtype_name(dtype)
        self._dtype = self.backend.dtype(self.dtype)
        self._device = self.backend.resolve_device(device)
        expected = lm_param_shapes(self.config)
        if state_dict is None:
            weights: Mapping[str, Any] = init_lm_params(self.config, seed)
        else:
            found = {}
            for name, value in state_dict.items():
                shape = getattr(value, "shape", None)
                if shape is None:
                    value = np.asarray(value)
                    shape = value.shape
                found[name] = (tuple(shape), "float32")
            if self.config.tie_embeddings:
                found.pop("lm_head.weight", None)
            raise_mismatch(found, expected, config=self.config)
            weights = state_dict
        owned = state_dict is None or hasattr(weights, "shapes")  # init or read from disk
        self.params = {
            name: self.backend.asarray(
                np.asarray(to_numpy(weights[name])) if owned else np.array(to_numpy(weights[name])),
                self._dtype,
                self._device,
            )
            for name in expected
        }
        self._step_params: dict | None = None

    # ------------------------------------------------------------------ compute
    def _native_ids(self, ids: np.ndarray):
        return self.backend.asarray_int(ids, self._device)

    def __call__(self, input_ids: Any, *, states: list | None = None, attention_mask: Any = None):
        """input_ids (B, L) -> (logits (B, L, V), per-layer states after the last token)."""
        ids = _ids(input_ids, "input_ids", self.config.vocab_size, 2)
        mask = _mask(attention_mask, ids.shape)
        native_mask = (
            None if mask is None else self.backend.asarray(mask, self._dtype, self._device)
        )
        if states is not None:
            states = self._states(states, ids.shape[0])
        return self.backend.lm_forward(
            self.params, self._native_ids(ids), self.config, states, native_mask, self._dtype
        )

    def step(self, token_ids: Any, states: list):
        """One decode step: token_ids (B,) and the states -> (logits (B, V), new states)."""
        ids = _ids(token_ids, "token_ids", self.config.vocab_size, 1)
        states = self._states(states, ids.shape[0])
        if self._step_params is None:
            self._step_params = self.backend.prepare_lm(self.params, self.config)
        return self.backend.lm_step(
            self._step_params, states, self._native_ids(ids), self.config, self._dtype
        )

    def _states(self, states: Any, batch: int) -> list:
        if not isinstance(states, (list, tuple)) or len(states) != self.config.n_layer:
            raise ValueError(
                f"MambaLM expected states as a list of {self.config.n_layer} per-layer states; "
                f"received {type(states).__name__}"
                + (f" of length {len(states)}" if isinstance(states, (list, tuple)) else "")
            )
        io = BackendIO(self.backend, self.dtype, self._device, self.config.mixer)
        io.owner = "MambaLM"
        return [io._state(s, batch) for s in states]

    def init_states(self, batch_size: int) -> list:
        """Zero states of a fresh sequence, one per layer."""
        from .mixer import init_state

        return [
            init_state(
                self.config.mixer,
                batch_size,
                dtype=self._dtype,
                xp=self.backend.xp,
                device=self._device,
            )
            for _ in range(self.config.n_layer)
        ]

    def _prefill(self, ids: np.ndarray, attention_mask: Any):
        logits, states = self(ids, attention_mask=attention_mask)
        return to_numpy(logits[:, -1, :]), states

    def _decode(self, ids: np.ndarray, states: list):
        logits, states = self.step(ids, states)
        return to_numpy(logits), states

    # ------------------------------------------------------------------ weights
    def state_dict(self) -> dict[str, np.ndarray]:
        """A copy of the weights under the HuggingFace names."""
        return {k: np.array(to_numpy(v), copy=True) for k, v in self.params.items()}

    def params_dict(self) -> dict[str, Any]:
        """The weights under the HuggingFace names (this model's own arrays, not copies)."""
        return dict(self.params)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, backend: str = "auto", dtype: Any = "float32", **kwargs
    ) -> MambaLM:
        """Load a local HuggingFace (`MambaForCausalLM`, `Mamba2ForCausalLM`; single or
        sharded safetensors) or official `mamba_ssm` checkpoint, checked before any weight is
        read; no network, never a pickle."""
        from .checkpoints import read_lm_checkpoint

        config, weights, _ = read_lm_checkpoint(directory)
        return cls(config, backend=backend, dtype=dtype, state_dict=weights, **kwargs)

    def num_parameters(self) -> int:
        return int(sum(int(np.prod(s)) for s in lm_param_shapes(self.config).values()))


class MambaBlock:
    """A pre-norm residual block (RMSNorm -> mixer -> residual add) with the `MambaModule`
    face: `block(x, mask=None)` returns a dict with `output`, `metrics`, `state`, `success`.

    Its weights: `norm.weight` and `mixer.<mixer names>` (the HuggingFace block names).
    """

    def __init__(
        self,
        config: MambaConfig | Mapping[str, Any] | None = None,
        backend: str = "auto",
        dtype: Any = "float32",
        seed: int = 0,
        *,
        norm_epsilon: float = 1e-5,
        residual_in_fp32: bool = True,
        **kwargs: Any,
    ) -> None:
        self.mixer = MambaModule(
            resolve_config(config), backend=backend, dtype=dtype, seed=seed, **kwargs
        )
        self.config = self.mixer.config
        self.norm_epsilon = norm_epsilon
        self.residual_in_fp32 = residual_in_fp32
        self.norm_weight = self.mixer.backend.asarray(
            np.ones(self.config.hidden_size), self.mixer._dtype, self.mixer._device
        )

    def __call__(self, inputs: Any, mask: Any = None, *, state: Any = None, training: bool = False):
        check_input_shape(inputs, 3, self.config.hidden_size, owner="MambaBlock", what="inputs")
        x = self.mixer._array(inputs, "inputs", 3)
        xp = self.mixer.backend.xp
        hidden = rms_norm(x, self.norm_weight, self.norm_epsilon, xp=xp)
        result = self.mixer(hidden, training, state=state, attention_mask=mask)
        residual = x
        if self.residual_in_fp32 and xp.finfo(x.dtype).bits < 32:
            residual = xp.astype(x, xp.float32)
        result["output"] = residual + xp.astype(result["output"], residual.dtype)
        result["processing_info"]["module_type"] = "MambaBlock"
        return result

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {"norm.weight": np.array(to_numpy(self.norm_weight), copy=True)}
        out.update({f"mixer.{k}": v for k, v in self.mixer.state_dict().items()})
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        prefix = "mixer."
        if "norm.weight" not in state_dict:
            raise ValueError("state dict does not match the block: missing keys: ['norm.weight']")
        self.mixer.load_state_dict(
            {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        )
        norm = np.asarray(to_numpy(state_dict["norm.weight"]))
        if norm.shape != (self.config.hidden_size,):
            raise ValueError(
                f"norm.weight: expected shape ({self.config.hidden_size},), received {norm.shape}"
            )
        self.norm_weight = self.mixer.backend.asarray(norm, self.mixer._dtype, self.mixer._device)
