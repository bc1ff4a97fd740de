"""An independent float64 reference of the Mamba-1 mixer, written plainly from the equations
in DESIGN.md: one token at a time, its own conv buffer, einsum contractions, `logaddexp` for
softplus.  It shares no code with `mamba_core`; the tests check the library against it.
"""

from __future__ import annotations

import math

import numpy as np


def _act(name, lib=np):
    if name in ("swish", "silu"):
        return lambda v: v / (1.0 + lib.exp(-v))
    if name == "gelu":  # tanh approximation, as jax.nn.gelu's default
        c = math.sqrt(2.0 / math.pi)
        return lambda v: 0.5 * v * (1.0 + lib.tanh(c * (v + 0.044715 * v**3)))
    if name == "relu":
        return lambda v: lib.where(v > 0, v, 0.0)
    raise ValueError(name)


def reference_forward(params, x, config, state=None, lib=np):
    """params: official-name dict; x (B, L, H).  Returns out (B, L, H), (conv (B,E,K), h (B,E,N)).

    `lib` is NumPy, or `jax.numpy` (float64) to differentiate the reference with `jax.grad`.
    """
    np = lib  # the same plain code on either library
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    x = np.asarray(x, dtype=np.float64)
    batch, length, _ = x.shape
    e, n, r, k = config.d_inner, config.d_state, config.dt_rank, config.d_conv
    act = _act(config.activation, lib)
    if state is None:
        window = np.zeros((batch, k, e))  # the last K conv inputs, oldest first
        h = np.zeros((batch, e, n))
    else:
        window = np.transpose(np.asarray(state[0], np.float64), (0, 2, 1))
        h = np.asarray(state[1], np.float64)
    a = -np.exp(p["A_log"])
    outs = []
    for t in range(length):
        xz = x[:, t] @ p["in_proj.weight"].T
        if config.use_bias:
            xz = xz + p["in_proj.bias"]
        x_in, z = xz[:, :e], xz[:, e:]
        window = np.concatenate([window[:, 1:], x_in[:, None, :]], axis=1)
        conv = np.einsum("bke,ek->be", window, p["conv1d.weight"][:, 0, :])
        if config.use_conv_bias:
            conv = conv + p["conv1d.bias"]
        u = act(conv)
        x_dbl = u @ p["x_proj.weight"].T
        dt_low, b_t, c_t = x_dbl[:, :r], x_dbl[:, r : r + n], x_dbl[:, r + n :]
        dt = np.logaddexp(0.0, dt_low @ p["dt_proj.weight"].T + p["dt_proj.bias"])
        h = np.exp(dt[:, :, None] * a) * h + (dt * u)[:, :, None] * b_t[:, None, :]
        y = np.einsum("ben,bn->be", h, c_t) + p["D"] * u
        y = y * act(z)
        out = y @ p["out_proj.weight"].T
        if config.use_bias:
            out = out + p["out_proj.bias"]
        outs.append(out)
    return np.stack(outs, axis=1), (np.transpose(window, (0, 2, 1)), h)


def reference_scan(u, dt, A, Bm, Cm, h0):
    """The bare selective scan, one step at a time in float64: y (B,L,E), h (B,E,N)."""
    u, dt, A, Bm, Cm, h = (np.asarray(v, np.float64) for v in (u, dt, A, Bm, Cm, h0))
    ys = []
    for t in range(u.shape[1]):
        h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[:, :, None] * Bm[:, t, None, :]
        ys.append(np.einsum("ben,bn->be", h, Cm[:, t]))
    return np.stack(ys, axis=1), h


def reference_forward_mamba2(params, x, config, state=None, lib=np):
    """An independent float64 Mamba-2 mixer, one token at a time, one head at a time, from the
    equations of the issue: params official-name dict; x (B, L, D).  Returns
    out (B, L, D), (conv (B, C, K), S (B, H, P, N)).  `lib`: NumPy or jax.numpy (float64).
    """
    np = lib
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    x = np.asarray(x, dtype=np.float64)
    batch, length, _ = x.shape
    e, n, k = config.d_inner, config.d_state, config.d_conv
    heads, dim, groups = config.num_heads, config.head_dim, config.n_groups
    conv_dim = e + 2 * groups * n
    act = _act(config.activation, lib)
    silu = _act("swish", lib)
    lo, hi = config.time_step_limit
    if state is None:
        window = np.zeros((batch, k, conv_dim))
        S = [np.zeros((batch, dim, n)) for _ in range(heads)]
    else:
        window = np.transpose(np.asarray(state[0], np.float64), (0, 2, 1))
        S = [np.asarray(state[1], np.float64)[:, h] for h in range(heads)]
    a = -np.exp(p["A_log"])
    outs = []
    for t in range(length):
        proj = x[:, t] @ p["in_proj.weight"].T
        if config.use_bias:
            proj = proj + p["in_proj.bias"]
        z, xbc, dt_raw = proj[:, :e], proj[:, e : e + conv_dim], proj[:, e + conv_dim :]
        window = np.concatenate([window[:, 1:], xbc[:, None, :]], axis=1)
        conv = np.einsum("bkc,ck->bc", window, p["conv1d.weight"][:, 0, :])
        if config.use_conv_bias:
            conv = conv + p["conv1d.bias"]
        conv = act(conv)
        xs, b_all, c_all = conv[:, :e], conv[:, e : e + groups * n], conv[:, e + groups * n :]
        dt = np.logaddexp(0.0, dt_raw + p["dt_bias"])
        dt = np.minimum(np.maximum(dt, lo), hi)
        ys = []
        for h in range(heads):
            g = h // (heads // groups)
            x_h = xs[:, h * dim : (h + 1) * dim]
            b_g, c_g = b_all[:, g * n : (g + 1) * n], c_all[:, g * n : (g + 1) * n]
            decay = np.exp(dt[:, h] * a[h])[:, None, None]
            S[h] = decay * S[h] + (dt[:, h : h + 1] * x_h)[:, :, None] * b_g[:, None, :]
            ys.append(np.einsum("bpn,bn->bp", S[h], c_g) + p["D"][h] * x_h)
        y = np.concatenate(ys, axis=1) * silu(z)
        size = e // groups
        normed = []
        for g in range(groups):
            part = y[:, g * size : (g + 1) * size]
            normed.append(
                part / np.sqrt(np.mean(part**2, axis=1, keepdims=True) + config.layer_norm_epsilon)
            )
        y = np.concatenate(normed, axis=1) * p["norm.weight"]
        out = y @ p["out_proj.weight"].T
        if config.use_bias:
            out = out + p["out_proj.bias"]
        outs.append(out)
    return np.stack(outs, axis=1), (np.transpose(window, (0, 2, 1)), np.stack(S, axis=1))


def reference_lm(params, ids, lm_config):
    """An independent float64 language model: embedding, per-layer RMSNorm + the per-token
    mixer reference + residual, final RMSNorm, head.  Returns logits (B, L, V)."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    eps = lm_config.norm_epsilon
    mixer_ref = (
        reference_forward_mamba2 if lm_config.mixer.version == "mamba2" else reference_forward
    )

    def rms(v, w):
        return v / np.sqrt(np.mean(v**2, axis=-1, keepdims=True) + eps) * w

    h = p["backbone.embeddings.weight"][np.asarray(ids)]
    for i in range(lm_config.n_layer):
        prefix = f"backbone.layers.{i}.mixer."
        mixer = {k[len(prefix) :]: v for k, v in p.items() if k.startswith(prefix)}
        y, _ = mixer_ref(mixer, rms(h, p[f"backbone.layers.{i}.norm.weight"]), lm_config.mixer)
        h = h + y
    h = rms(h, p["backbone.norm_f.weight"])
    head = p["backbone.embeddings.weight"] if lm_config.tie_embeddings else p["lm_head.weight"]
    return h @ head.T
