"""Run a function over row blocks of a large array, on a small shared thread pool.

numpy releases the GIL inside its kernels, so two threads over disjoint blocks use
both cores. Blocks are sized so a block's float32 working set stays cache-resident.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

# ~1 MiB of float32 input per block: big enough to amortize Python overhead,
# small enough that the temporaries of a block stay in L2.
_BLOCK_BYTES = 1 << 20
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def default_threads() -> int:
    """Worker threads: ``EMBCOMP_THREADS`` if set, else the CPUs this process may use."""
    env = os.environ.get("EMBCOMP_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=default_threads(), thread_name_prefix="embcomp")
        return _pool


def rows_per_block(row_bytes: int) -> int:
    """Rows per block for rows of ``row_bytes`` bytes (float32 input width * 4)."""
    return max(64, _BLOCK_BYTES // max(1, row_bytes))


def for_each_block(n: int, block_rows: int, work: Callable[[int, int], None]) -> None:
    """Call ``work(start, stop)`` for every block of ``[0, n)``, in parallel when it pays.

    Exceptions are re-raised in block order, so the error about the earliest bad row wins.
    """
    starts = range(0, n, block_rows)
    if len(starts) <= 1 or default_threads() == 1:
        for start in starts:
            work(start, min(start + block_rows, n))
        return
    pool = _get_pool()
    futures = [pool.submit(work, s, min(s + block_rows, n)) for s in starts]
    for future in futures:
        future.result()
