"""The CPU thread pool the NumPy scans (and the compiled kernels) spread their work over.

The selective scan is independent per (batch row, channel): `blocks` cuts (B, E) into one
slice per thread, `run_blocks` runs a function on every slice (NumPy and the compiled
kernels release the GIL inside their loops, so the slices run at the same time).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = [
    "MIN_PARALLEL_WORK",
    "SPLIT_ROWS",
    "blocks",
    "num_threads",
    "plan_blocks",
    "plan_rows",
    "run_all",
    "run_blocks",
    "split_product",
]

# Below this much work (B*L*E*N state updates), threads cost more than they save (waking
# them and handing the GIL around costs tens of microseconds; a batch-1 decode step is
# about that much work in all).
MIN_PARALLEL_WORK = 1 << 19
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
_PREFIX = "mamba-scan"


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None or _POOL._max_workers != workers:
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=_PREFIX)
    return _POOL


def blocks(batch: int, channels: int, threads: int) -> list[tuple[int, int, int, int]]:
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


def plan_blocks(
    batch: int, channels: int, work: int, threads: int | None = None
) -> list[tuple[int, int, int, int]]:
    """The (b0, b1, e0, e1) blocks for `work` state updates: one per thread when the work is
    worth the threads, else one."""
    if work < MIN_PARALLEL_WORK:  # (before asking the OS for the CPUs: a decode step)
        return blocks(batch, channels, 1)
    return blocks(batch, channels, threads if threads is not None else num_threads())


def plan_rows(batch: int, work: int, threads: int | None = None) -> list[tuple[int, int]]:
    """(b0, b1) ranges of whole batch rows for `work` state updates: one per thread (at most
    one per row) when the work is worth the threads, else one range.  For kernels whose rows
    cannot be cut into channel blocks (a decode step reduces over all channels)."""
    if work < MIN_PARALLEL_WORK:  # (before asking the OS for the CPUs: a decode step)
        return [(0, batch)]
    workers = threads if threads is not None else num_threads()
    parts = max(1, min(batch, workers))
    edges = [batch * i // parts for i in range(parts + 1)]
    return list(itertools.pairwise(edges))


def run_all(fn: Callable[[int], None], count: int) -> None:
    """`fn(0)`, ..., `fn(count - 1)`, on the pool when there are several."""
    if count == 1:
        fn(0)
        return
    for future in [_pool(count).submit(fn, i) for i in range(count)]:
        future.result()


def run_blocks(
    fn: Callable[[int, int, int, int], None],
    batch: int,
    channels: int,
    work: int,
    threads: int | None = None,
) -> None:
    """`fn(b0, b1, e0, e1)` on every block of (batch, channels), on the pool when `work`
    (state updates) is worth the threads."""
    slices = plan_blocks(batch, channels, work, threads)
    run_all(lambda i: fn(*slices[i]), len(slices))


#: from this many rows (per thread), `split_product` cuts a product into row slices
SPLIT_ROWS = 256
_BLAS_LIBS: tuple | None = None


def _blas_libs() -> tuple:
    """The thread controls of the BLAS libraries loaded in this process (threadpoolctl,
    looked up once); () when threadpoolctl is not installed."""
    global _BLAS_LIBS
    if _BLAS_LIBS is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - the `fast` extra installs it
            _BLAS_LIBS = ()
        else:
            _BLAS_LIBS = tuple(ThreadpoolController().select(user_api="blas").lib_controllers)
    return _BLAS_LIBS


def split_product(rows: np.ndarray, weight_t: np.ndarray, out: np.ndarray,
                  threads: int | None = None) -> bool:  # fmt: skip
    """out = rows @ weight_t as one single-threaded BLAS call per pool thread on a slice of
    the rows, when there are rows enough and a BLAS whose threads can be set; False (out
    untouched) otherwise.

    Why: after a multithreaded call, OpenBLAS's (and MKL's) worker threads spin for up to
    ~0.1 s waiting for the next one, on the cores the compiled kernels run on next: the
    Mamba-2 scan kernel took 47-56 ms right after a product against 30-34 ms alone
    (measured on an AVX-512 AMD EPYC, 2 cores).  With the BLAS at one thread for the
    duration, no worker of its own runs; the pool's threads (idle between kernels) run the
    slices.  The product alone is 10-15% slower this way, a layer's forward 10-20% faster."""
    workers = threads if threads is not None else num_threads()
    parts = min(workers, rows.shape[0] // SPLIT_ROWS)
    if parts < 2 or threading.current_thread().name.startswith(_PREFIX):
        return False  # (never from a pool thread: it would wait on its own pool)
    libs = _blas_libs()
    if not libs:
        return False
    edges = [rows.shape[0] * i // parts for i in range(parts + 1)]

    def part(i: int) -> None:
        lo, hi = edges[i], edges[i + 1]
        np.matmul(rows[lo:hi], weight_t, out=out[lo:hi])

    before = [lib.num_threads for lib in libs]
    for lib in libs:
        lib.set_num_threads(1)
    try:
        run_all(part, parts)
    finally:
        for lib, count in zip(libs, before, strict=True):
            lib.set_num_threads(count)
    return True
