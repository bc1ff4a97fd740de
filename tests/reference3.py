"""An independent float64 Mamba-3 reference, token by token, written from the equations of
MAMBA3.md ("Forward" and "Decode step"): the original recurrence with beta and gamma (not
the augmented state, not the chunked form), unreduced angles, plain loops."""

from __future__ import annotations

import math

import numpy as np


def _softplus(x):
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def _rms(v, w=None):
    out = v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + 1e-5)
    return out if w is None else out * w


def _rotate(m, phi, halved):
    """m (N,), phi (S,): rotate the S pairs."""
    out = m.copy()
    n = m.shape[0]
    for j, angle in enumerate(phi):
        i0, i1 = (j, j + n // 2) if halved else (2 * j, 2 * j + 1)
        a, b = m[i0], m[i1]
        out[i0] = a * math.cos(angle) - b * math.sin(angle)
        out[i1] = a * math.sin(angle) + b * math.cos(angle)
    return out


def mamba3_reference(params, u, cfg, state=None):
    """u (B, L, D) float64 -> (out (B, L, D), (angle, h, k, v)) one token at a time."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    batch, length, _ = u.shape
    e, n, g = cfg.d_inner, cfg.d_state, cfg.n_groups
    hd = cfg.head_dim
    heads = e // hd
    r = cfg.mimo_rank if cfg.mimo else 1
    s = int(n * cfg.rope_fraction)
    s = (s - s % 2) // 2
    widths = [e, e, r * g * n, r * g * n, heads, heads, heads, s]
    cuts = np.cumsum([0, *widths])
    out = np.zeros_like(u)
    if state is None:
        angle = np.zeros((batch, heads, s))
        h = np.zeros((batch, heads, hd, n))
        k_prev = np.zeros((batch, r, heads, n))
        x_prev = np.zeros((batch, heads, hd))
    else:
        angle, h, k_prev, x_prev = (np.array(a, np.float64) for a in state)
    for b in range(batch):
        for t in range(length):
            row = p["in_proj.weight"] @ u[b, t]
            z, x, bp, cp, dd_dt, dd_a, trap, ang = (row[cuts[i] : cuts[i + 1]] for i in range(8))
            z, x = z.reshape(heads, hd), x.reshape(heads, hd)
            bn = _rms(bp.reshape(r, g, n), p["B_norm.weight"])
            cn = _rms(cp.reshape(r, g, n), p["C_norm.weight"])
            dt = _softplus(dd_dt + p["dt_bias"])
            f = np.where(dd_a >= 0, 1 + dd_a, 1 / (1 - np.minimum(dd_a, 0)))
            big_a = -np.maximum(f, cfg.A_floor)
            alpha = np.exp(dt * big_a)
            lam = 1 / (1 + np.exp(-trap))
            beta, gam = (1 - lam) * dt * alpha, lam * dt
            angle[b] = angle[b] + math.pi * np.tanh(ang)[None, :] * dt[:, None]
            new_k = np.zeros((r, heads, n))
            o = np.zeros((heads, hd))
            for hh in range(heads):
                grp = hh // (heads // g)
                upd_prev = np.zeros((hd, n))
                upd_now = np.zeros((hd, n))
                vs, qs = [], []
                for rr in range(r):
                    kk = _rotate(bn[rr, grp] + p["B_bias"][hh, rr], angle[b, hh], cfg.mimo)
                    qq = _rotate(cn[rr, grp] + p["C_bias"][hh, rr], angle[b, hh], cfg.mimo)
                    mx = p["mimo_x"][hh, rr] if cfg.mimo else 1.0
                    v_now, v_old = x[hh] * mx, x_prev[b, hh] * mx
                    upd_prev += np.outer(v_old, k_prev[b, rr, hh])
                    upd_now += np.outer(v_now, kk)
                    new_k[rr, hh] = kk
                    vs.append(v_now)
                    qs.append(qq)
                h[b, hh] = alpha[hh] * h[b, hh] + beta[hh] * upd_prev + gam[hh] * upd_now
                for rr in range(r):
                    y = h[b, hh] @ qs[rr] + p["D"][hh] * vs[rr]
                    zr = z[hh] * (p["mimo_z"][hh, rr] if cfg.mimo else 1.0)
                    if cfg.outproj_norm:
                        y = _rms(y, p["norm.weight"][hh * hd : (hh + 1) * hd])
                    gated = y * zr / (1 + np.exp(-zr))
                    o[hh] += gated * (p["mimo_o"][hh, rr] if cfg.mimo else 1.0)
            out[b, t] = p["out_proj.weight"] @ o.reshape(-1)
            k_prev[b], x_prev[b] = new_k, x
    return out, (np.remainder(angle, 2 * math.pi), h, k_prev, x_prev)
