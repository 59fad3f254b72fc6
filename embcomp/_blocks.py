"""Run a function over row blocks of a large array, on every core, with reusable scratch.

numpy releases the GIL inside its kernels, so threads working on disjoint blocks use
all cores. The calling thread works too. Each thread works through a contiguous range
of blocks, then takes blocks left in the others' ranges (see :class:`_Run`), so a busy
core never holds up the others and a call made from inside a worker cannot deadlock
the pool. Each worker gets a :class:`Scratch` for the whole call:
kernels write their temporaries into the same few block-sized buffers block after
block instead of allocating (and page-faulting) fresh ones, so the memory a call uses
beyond its output is a few blocks per worker whatever ``n`` is.

BLAS: a matrix product inside a worker must not start BLAS's own threads (two
OpenBLAS thread teams on two cores serialize on OpenBLAS's server lock and run
several times slower). Where the loaded OpenBLAS has ``openblas_set_num_threads_local``
(0.3.27+) BLAS is held to one thread while a call runs (see :func:`blas_single_thread`);
elsewhere callers that multiply matrices pass ``uses_blas=True`` and their blocks run
on the calling thread alone, leaving the parallelism to BLAS.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._cancel import cancel_when, current_check
from ._validation import check_float32_range, env_int

__all__ = [
    "Scratch",
    "blas_single_thread",
    "default_threads",
    "float32_block",
    "for_each_block",
    "map_blocks",
    "cache_rows_per_block",
    "rows_per_block",
]

# ~1 MiB of float32 input per block: big enough that the ~15 numpy calls a kernel
# makes per block cost little next to the work, small enough that a block and its
# temporaries mostly stay in a core's L2 cache.
_BLOCK_BYTES = 1 << 20
# A codec with a reducer multiplies each block by its projection. Single-threaded sgemm
# on 512 rows runs within 4% of its speed on 1,024 (a 1,024-row minimum made 1,000-row
# calls one block: one core, 0.55-0.65x FAISS's two-thread PCA; with 512, 0.8-1.1x).
_MIN_PRODUCT_ROWS = 512
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def default_threads() -> int:
    """Threads per call: ``EMBCOMP_THREADS`` if set, else the CPUs this process may use."""
    threads = env_int("EMBCOMP_THREADS", None, minimum=1)
    if threads is not None:
        return threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def rows_per_block(row_bytes: int) -> int:
    """Rows per block of a codec's matrix products, for rows of ``row_bytes`` bytes
    (float32 input width * 4).

    About 1 MiB of input rounded down to a power of two, at least ``_MIN_PRODUCT_ROWS``:
    512 rows from 257 dims up (the power of two splits a 1,000-row call of 384-d
    input in two near halves, where 1 MiB's 682 rows gave one thread twice the other's
    work), more for narrower rows, whose products are too small to be worth a thread
    each. Codecs with a reducer cut their input at multiples of this, and callers that
    need a codec's results to be independent of how they group rows rely on that.
    """
    rows = _BLOCK_BYTES // max(1, row_bytes)
    return max(_MIN_PRODUCT_ROWS, 1 << (rows.bit_length() - 1) if rows else 0)


def cache_rows_per_block(row_bytes: int) -> int:
    """Rows per block of a numpy kernel with block-sized temporaries: ~1 MiB of input."""
    return max(64, _BLOCK_BYTES // max(1, row_bytes))


class Scratch:
    """Block-sized buffers that one worker reuses from block to block within a call.

    ``get(name, shape, dtype)`` returns an uninitialized C-contiguous array viewing a
    buffer kept under ``name``; the buffer grows when a larger request arrives, so the
    last, shorter block of a call reuses it too.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        size = dtype.itemsize
        for extent in shape:
            size *= extent
        buffer = self._buffers.get(name)
        if buffer is None or buffer.nbytes < size:
            buffer = np.empty(max(size, 1), dtype=np.uint8)
            self._buffers[name] = buffer
        return buffer[:size].view(dtype).reshape(shape)


def float32_block(
    X: np.ndarray, start: int, stop: int, scratch: Scratch
) -> tuple[np.ndarray, bool]:
    """Rows ``start:stop`` of ``X`` as a C-contiguous float32 array, and whether it is a copy.

    A float32 C-contiguous ``X`` gives a view (not to be written to); anything else
    (float16/float64, strided) is converted into the worker's scratch, once.
    """
    rows = X[start:stop]
    if rows.dtype == np.float32 and rows.flags.c_contiguous:
        return rows, False
    block = scratch.get("input", rows.shape, np.float32)
    with np.errstate(over="ignore"):  # float64 beyond float32 range -> inf: named below
        np.copyto(block, rows, casting="same_kind")
    if rows.dtype.itemsize > 4 and not np.isfinite(block).all():
        check_float32_range(rows, row_offset=start)
    return block, True


# -- BLAS threads ------------------------------------------------------------------------
@dataclass
class _BlasSetter:
    """``openblas_set_num_threads_local`` of one loaded OpenBLAS, and whether what it sets
    is really per thread: it is in some builds, while in others (numpy's and faiss-cpu's
    wheels) it sets the count of the whole process, like ``openblas_set_num_threads``."""

    set: Callable[[int], int]
    per_thread: bool


_blas_setters: list[_BlasSetter] | None = None
_blas_lock = threading.Lock()
# Process-wide limits: how many calls hold them, and the counts to restore after the last.
_shared_holders = 0
_shared_saved: list[int] = []


def _find_blas_setters() -> list[_BlasSetter]:
    """The thread-count setter of every OpenBLAS loaded in this process."""
    functions: list[Callable[[int], int]] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split(None, 5)[-1].strip() for line in maps if ".so" in line}
    except OSError:  # not Linux: no thread control, callers fall back
        return []
    for path in sorted(p for p in paths if "openblas" in os.path.basename(p).lower()):
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in ("openblas_set_num_threads_local", "scipy_openblas_set_num_threads_local64_"):
            function = getattr(library, symbol, None)
            if function is not None:
                function.argtypes = [ctypes.c_int]
                function.restype = ctypes.c_int
                functions.append(function)
                break
    return [_BlasSetter(f, _sets_per_thread(f)) for f in functions]


def _sets_per_thread(setter: Callable[[int], int]) -> bool:
    """Whether a count set in another thread leaves this thread's count alone."""
    mine = setter(1)
    setter(mine)
    other = 2 if mine <= 1 else 1  # a count different from this thread's
    probe = threading.Thread(target=setter, args=(other,))
    probe.start()
    probe.join()
    seen = setter(mine)  # what this thread has now (and back to what it had)
    return seen != other


def _get_blas_setters() -> list[_BlasSetter]:
    global _blas_setters
    with _blas_lock:
        if _blas_setters is None:
            import numpy.linalg  # noqa: F401 - make sure numpy's BLAS is loaded first

            _blas_setters = _find_blas_setters()
        return _blas_setters


def can_limit_blas() -> bool:
    """Whether BLAS can be held to one thread per caller (see :func:`blas_single_thread`)."""
    return bool(_get_blas_setters())


@contextlib.contextmanager
def blas_single_thread() -> Iterator[None]:
    """Within the block, BLAS calls made by this thread use one thread (if supported).

    A per-thread setter is set and restored by each thread for itself. A process-wide
    one is set by the first thread to enter and restored by the last to leave: each
    thread restoring what it saw would race (A saves 2, B saves A's 1, A restores 2,
    B restores 1) and leave the whole process on one BLAS thread. While such a limit
    is held, BLAS calls of other threads of the process use one thread too.
    """
    global _shared_holders, _shared_saved
    setters = _get_blas_setters()
    own = [s for s in setters if s.per_thread]
    shared = [s for s in setters if not s.per_thread]
    previous = [s.set(1) for s in own]
    if shared:
        with _blas_lock:
            if _shared_holders == 0:
                _shared_saved = [s.set(1) for s in shared]
            _shared_holders += 1
    try:
        yield
    finally:
        if shared:
            with _blas_lock:
                _shared_holders -= 1
                if _shared_holders == 0:
                    for setter, value in zip(shared, _shared_saved, strict=True):
                        setter.set(max(1, value))
        for setter, value in zip(own, previous, strict=True):
            setter.set(max(1, value))


# -- the pool --------------------------------------------------------------------------
def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=max(1, default_threads() - 1), thread_name_prefix="embcomp"
            )
        return _pool


class _Run:
    """One call's rows, handed out a chunk at a time to whichever thread asks next.

    The rows are cut into one contiguous range per thread. A thread takes chunks from
    the front of its range; once its range is used up, it takes chunks from the back
    of the range with the most rows left. So a busy core never holds up the others, and
    yet two threads rarely write neighbouring rows at the same time: a fresh output's
    pages are faulted in 2 MiB huge pages, and threads filling the same huge pages at
    once fault them twice over. int8 decode of 100,000 x 768 into fresh memory on 2
    threads: 8 MiB blocks dealt out in turn 31.6 ms, 2 MiB blocks 45 ms, contiguous
    halves 30.3 ms (FAISS, whose OpenMP loop splits the rows in halves: 29.9 ms).

    Chunks are ``block_rows`` long and start at multiples of it, unless ``divisible``
    (``work`` gives the same results however rows are grouped): then chunks near the
    end of a range get shorter (half of what is left, down to an eighth of a block), so
    the threads finish together rather than one waiting out another's last block.
    """

    def __init__(
        self,
        n: int,
        block_rows: int,
        work: Callable[[int, int, Scratch], None],
        threads: int,
        *,
        divisible: bool,
    ) -> None:
        self.n = n
        self.block_rows = block_rows
        self.divisible = divisible
        self.work = work
        # The caller's cancellation check (a context variable: it does not follow the
        # work into the pool's threads by itself), so every worker's checkpoints see it.
        self.check = current_check()
        if divisible:
            cuts = [s * n // threads for s in range(threads + 1)]
        else:
            n_blocks = -(-n // block_rows)
            cuts = [min(n, s * n_blocks // threads * block_rows) for s in range(threads + 1)]
        # range s: rows front[s] .. back[s]-1, not yet handed out
        self.front = cuts[:-1]
        self.back = cuts[1:]
        self.ranges_claimed = 0
        self.taken = 0
        self.finished = 0
        self.active = 0  # threads inside drain (the BLAS limit is restored as they leave)
        self.errors: dict[int, BaseException] = {}  # by the first row of the failed chunk
        self.cond = threading.Condition()

    def _size(self, left: int) -> int:
        """Rows of the next chunk of a range with ``left`` rows left (divisible work)."""
        return min(left, self.block_rows, max(self.block_rows // 8, 1, -(-left // 2)))

    def _take(self, mine: int) -> tuple[int, int] | None:
        """The next chunk ``(start, stop)`` for the thread that owns range ``mine``;
        None when there is none.

        Once a chunk has failed, only rows before it are handed out (from the fronts of
        the ranges): every chunk before it runs, so the earliest failure is reported.
        """
        with self.cond:
            chunk = self._claim(mine)
            if chunk is not None:
                self.taken += 1
            return chunk

    def _claim(self, mine: int) -> tuple[int, int] | None:
        ranges = range(len(self.front))
        limit = min(self.errors) if self.errors else self.n
        for s in (mine, *ranges) if self.errors else (mine,):
            front, back = self.front[s], self.back[s]
            if front < min(back, limit):  # from the front
                size = self._size(back - front) if self.divisible else self.block_rows
                self.front[s] = min(front + size, back)
                return front, self.front[s]
        if self.errors:
            return None
        fullest = max(ranges, key=lambda s: self.back[s] - self.front[s])
        front, back = self.front[fullest], self.back[fullest]
        if front >= back:
            return None
        if self.divisible:  # from the back
            start = back - self._size(back - front)
        else:  # its last block
            start = max(front, (back - 1) // self.block_rows * self.block_rows)
        self.back[fullest] = start
        return start, back

    def _done(self) -> bool:
        limit = min(self.errors) if self.errors else self.n
        return all(f >= min(b, limit) for f, b in zip(self.front, self.back, strict=True))

    def drain(self) -> None:
        """Process blocks until none are left (or one has failed).

        A worker that starts after the last block was taken returns at once, without
        touching BLAS's thread count: the call may have returned already.
        """
        with self.cond:
            if self._done():
                return
            mine = self.ranges_claimed % len(self.front)
            self.ranges_claimed += 1
            self.active += 1
        try:
            scratch = Scratch()
            cancel = cancel_when(self.check) if self.check else contextlib.nullcontext()
            with blas_single_thread(), cancel:
                while (chunk := self._take(mine)) is not None:
                    try:
                        self.work(*chunk, scratch)
                    except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
                        with self.cond:
                            self.errors[chunk[0]] = exc
                    finally:
                        with self.cond:
                            self.finished += 1
                            self.cond.notify_all()
        finally:
            with self.cond:
                self.active -= 1
                self.cond.notify_all()

    def wait(self) -> None:
        """Wait until every block handed out has finished and every thread has left
        :meth:`drain` (so BLAS's thread count is restored); raise the earliest error."""
        with self.cond:
            while self.finished < self.taken or self.active:
                self.cond.wait()
            if self.errors:
                raise self.errors[min(self.errors)]


def map_blocks(
    n: int,
    block_rows: int,
    work: Callable[[int, int, Scratch], None],
    *,
    uses_blas: bool = False,
    divisible: bool = False,
) -> None:
    """Call ``work(start, stop, scratch)`` for every block of ``[0, n)``, on all threads.

    ``scratch`` belongs to the calling worker for the whole call. Set ``uses_blas`` when
    ``work`` multiplies matrices: without per-thread BLAS control the blocks then run
    on the calling thread only (BLAS parallelizes each product instead). Blocks are
    ``block_rows`` rows starting at multiples of it, unless ``divisible`` (``work``'s
    results do not depend on how rows are grouped): then some are shorter and start
    anywhere (see :class:`_Run`).

    If blocks fail, the exception of the earliest failing block is raised (so the
    error names the first bad row), after every block in progress has finished.
    """
    # One block (a small call) runs here without reading the thread settings (1.5 us).
    threads = 1 if n <= block_rows else min(default_threads(), -(-n // block_rows))
    if uses_blas and not can_limit_blas():
        threads = 1
    if threads <= 1:  # all on this thread, in order (the first failure is the earliest)
        scratch = Scratch()
        # BLAS is only held to one thread for work that multiplies matrices: setting and
        # restoring its thread count cost 5-12 us, up to a quarter of a 1,000-row decode.
        with blas_single_thread() if uses_blas else contextlib.nullcontext():
            for start in range(0, n, block_rows):
                work(start, min(start + block_rows, n), scratch)
        return
    run = _Run(n, block_rows, work, threads, divisible=divisible)
    pool = _get_pool()
    for _ in range(threads - 1):
        pool.submit(run.drain)
    run.drain()
    run.wait()


def for_each_block(n: int, block_rows: int, work: Callable[[int, int], None]) -> None:
    """Call ``work(start, stop)``, which may multiply matrices, for every block of
    ``[0, n)``, in parallel (:func:`map_blocks` with ``uses_blas``).

    Exceptions are re-raised in block order, so the error about the earliest bad row wins.
    """
    map_blocks(n, block_rows, lambda start, stop, _scratch: work(start, stop), uses_blas=True)
