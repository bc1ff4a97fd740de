"""The NumPy backend: the core's math on NumPy arrays, with a native threaded linear scan.

Glossary: B batch, L length, E d_inner, N d_state.

The core's generic scans run as they are (`associative`, `cumulative`).  `linear` (and
`auto`) use `scan_linear` below: the same recurrence, step by step, with every elementwise
operation writing into preallocated (E_block, N) buffers that stay in the CPU cache, and the
independent (batch, channel-block) slices spread over a thread pool (NumPy releases the GIL
inside its loops).  Its working memory is O(B*E*N) whatever L is.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import array_api_compat.numpy as xp_numpy
import numpy as np

from mamba_core.config import MambaConfig
from mamba_core.mixer import core_scan, mixer_forward, mixer_step
from mamba_core.params import to_numpy
from mamba_core.registry import Backend

__all__ = ["NumpyBackend", "get_backend", "num_threads", "scan_linear"]

# Below this much work (B*L*E*N state updates), threads cost more than they save (waking
# them and handing the GIL around costs tens of microseconds; a batch-1 decode step is
# about that much work in all).
_MIN_PARALLEL_WORK = 1 << 19
# Never split a batch row into channel blocks narrower than this.
_MIN_BLOCK_CHANNELS = 64


def num_threads() -> int:
    """Threads for the scan: $MAMBA_CORE_NUM_THREADS, else the CPUs this process may use."""
    env = os.environ.get("MAMBA_CORE_NUM_THREADS")
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(
                f"MAMBA_CORE_NUM_THREADS={env!r} is invalid: expected a positive int"
            ) from None
        if value < 1:
            raise ValueError(f"MAMBA_CORE_NUM_THREADS={env!r} is invalid: expected >= 1")
        return value
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


_POOL: ThreadPoolExecutor | None = None


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None or _POOL._max_workers != workers:
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mamba-scan")
    return _POOL


def _blocks(batch: int, channels: int, threads: int) -> list[tuple[int, int, int, int]]:
    """(b0, b1, e0, e1) slices covering (batch, channels): `threads` of them when possible,
    whole batch rows first, channel blocks when there are fewer rows than threads."""
    if threads <= 1:
        return [(0, batch, 0, channels)]
    if batch >= threads:
        edges = np.linspace(0, batch, threads + 1).astype(int)
        return [(int(edges[i]), int(edges[i + 1]), 0, channels) for i in range(threads)]
    per_row = max(1, min(-(-threads // batch), channels // _MIN_BLOCK_CHANNELS))
    edges = np.linspace(0, channels, per_row + 1).astype(int)
    return [
        (b, b + 1, int(edges[i]), int(edges[i + 1])) for b in range(batch) for i in range(per_row)
    ]


def scan_linear(u, dt, A, Bm, Cm, h0, *, threads: int | None = None, keep=None):
    """The sequential selective scan (see `mamba_core.scan`) on NumPy arrays.

    u, dt (B,L,E); A (E,N); Bm, Cm (B,L,N); h0 (B,E,N) -> y (B,L,E), h_L (B,E,N).
    keep (B,L) or None: 0 where a packed sequence starts (the state restarts).
    The inputs are only read; the state is updated in this function's own buffer.
    """
    batch, length, channels = u.shape
    dtype = u.dtype
    du = (dt * u)[..., None]  # (B, L, E, 1)
    dt_col = dt[..., None]  # (B, L, E, 1)
    b_row = Bm[:, :, None, :]  # (B, L, 1, N)
    c_col = Cm[..., None]  # (B, L, N, 1)
    y = np.empty((batch, length, channels, 1), dtype=dtype)
    h = np.array(h0, dtype=dtype, copy=True, order="C")
    a_mat = np.ascontiguousarray(A, dtype=dtype)

    def run(b0: int, b1: int, e0: int, e1: int) -> None:
        hb = h[b0:b1, e0:e1]
        ab = a_mat[e0:e1]
        buf = np.empty_like(hb)
        dtb, dub, bb, cb = dt_col[b0:b1, :, e0:e1], du[b0:b1, :, e0:e1], b_row[b0:b1], c_col[b0:b1]
        yb = y[b0:b1, :, e0:e1]
        kb = None if keep is None else keep[b0:b1, :, None, None]
        for t in range(length):
            np.multiply(dtb[:, t], ab, out=buf)
            np.exp(buf, out=buf)  # exp(dt*A): exponent <= 0
            if kb is not None:
                np.multiply(buf, kb[:, t], out=buf)
            np.multiply(hb, buf, out=hb)
            np.multiply(dub[:, t], bb[:, t], out=buf)
            np.add(hb, buf, out=hb)
            np.matmul(hb, cb[:, t], out=yb[:, t])

    workers = threads if threads is not None else num_threads()
    if batch * length * channels * A.shape[1] < _MIN_PARALLEL_WORK:
        workers = 1
    blocks = _blocks(batch, channels, workers)
    if len(blocks) == 1:
        run(*blocks[0])
    else:
        for future in [_pool(workers).submit(run, *blk) for blk in blocks]:
            future.result()
    return y[..., 0], h


#: (mixer version, scan_type) -> native NumPy scan; the rest run the core's generic scans
NATIVE_SCANS = {("mamba1", "linear"): scan_linear}


class NumpyBackend(Backend):
    name = "numpy"
    xp = xp_numpy
    dtypes: ClassVar[dict[str, Any]] = {
        "float32": np.float32,
        "float64": np.float64,
        "float16": np.float16,
    }

    def is_native(self, value: Any) -> bool:
        return isinstance(value, np.ndarray)

    def asarray(self, value: Any, dtype=None, device=None):
        arr = value if isinstance(value, np.ndarray) else to_numpy(value)
        return arr if dtype is None or arr.dtype == dtype else arr.astype(dtype)

    def device_of(self, value: Any) -> str:
        return "cpu"

    def scan_fn(self, scan_type: str, config: MambaConfig):
        """The native scan where there is one (NATIVE_SCANS), else the core's."""
        native = NATIVE_SCANS.get((config.version, scan_type))
        return native if native is not None else core_scan(config, scan_type)

    def forward(
        self, params, x, config: MambaConfig, state: Any, scan_type: str, attention_mask=None,
        seq_idx=None,
    ):  # fmt: skip
        scan = self.scan_fn(scan_type, config)
        return mixer_forward(
            params, x, config, state, scan=scan, xp=self.xp, attention_mask=attention_mask,
            seq_idx=seq_idx,
        )  # fmt: skip

    def step(self, prepared, state: Any, x_t, config: MambaConfig):
        scan = NATIVE_SCANS.get((config.version, "linear"))
        return mixer_step(prepared, state, x_t, config, scan=scan, xp=self.xp)


_BACKEND = NumpyBackend()


def get_backend() -> NumpyBackend:
    return _BACKEND
