"""The block runner's BLAS thread limit: held while calls run, restored after them."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import embcomp._blocks as blocks
from embcomp import make_codec
from embcomp._validation import env_int
from embcomp.exceptions import InputError


class FakeBlas:
    """An ``openblas_set_num_threads_local``: sets the count of the process or of the
    calling thread, returns the previous one."""

    def __init__(self, per_thread: bool, count: int = 4) -> None:
        self.per_thread = per_thread
        self.count = count
        self.local = threading.local()

    def current(self) -> int:
        return getattr(self.local, "count", self.count) if self.per_thread else self.count

    def __call__(self, count: int) -> int:
        old = self.current()
        if self.per_thread:
            self.local.count = count
        else:
            self.count = count
        return old


@pytest.mark.parametrize("count", [1, 4])
@pytest.mark.parametrize("per_thread", [False, True])
def test_a_setter_is_classified_as_per_thread_or_process_wide(per_thread, count):
    """Also when the process runs one BLAS thread (a limit a user may raise later)."""
    fake = FakeBlas(per_thread, count)
    assert blocks._sets_per_thread(fake) == per_thread
    assert fake.current() == count


def test_blas_is_held_to_one_thread_while_calls_run_and_restored_after(monkeypatch):
    """Two calls at once, each over many blocks on two threads: every block sees one
    BLAS thread, and afterwards the counts are what they were (a process-wide count
    restored by each thread from what it saw would end on 1)."""
    fakes = [FakeBlas(per_thread=False), FakeBlas(per_thread=True)]
    setters = [blocks._BlasSetter(fake, fake.per_thread) for fake in fakes]
    monkeypatch.setattr(blocks, "_blas_setters", setters)
    monkeypatch.setenv("EMBCOMP_THREADS", "2")
    seen: list[list[int]] = []

    def work(start, stop, scratch):
        seen.append([fake.current() for fake in fakes])
        time.sleep(0.0005)

    for _ in range(5):
        calls = [
            threading.Thread(
                target=blocks.map_blocks, args=(64 * 30, 64, work), kwargs={"uses_blas": True}
            )
            for _ in range(2)
        ]
        for call in calls:
            call.start()
        for call in calls:
            call.join()
        assert fakes[0].count == 4  # the process-wide count, once the last call left
    assert len(seen) == 5 * 2 * 30 and all(counts == [1, 1] for counts in seen)
    assert fakes[1].current() == 4  # this thread's own count was never touched


def test_codec_calls_leave_the_real_blas_thread_counts_as_they_were(monkeypatch):
    setters = blocks._get_blas_setters()
    if not setters:
        pytest.skip("no OpenBLAS with openblas_set_num_threads_local is loaded")

    def counts() -> list[int]:
        values = [s.set(1) for s in setters]
        for setter, value in zip(setters, values, strict=True):
            setter.set(value)
        return values

    monkeypatch.setattr(blocks, "_BLOCK_BYTES", 1)
    monkeypatch.setattr(blocks, "_MIN_PRODUCT_ROWS", 64)
    monkeypatch.setenv("EMBCOMP_THREADS", "2")
    X = np.random.default_rng(0).standard_normal((3000, 48)).astype(np.float32)
    before = counts()
    codec = make_codec("pca16,int8").fit(X)
    for _ in range(20):
        codec.decode(codec.encode(X))
        assert counts() == before


def test_environment_settings_with_bad_values_name_the_variable(monkeypatch):
    monkeypatch.setenv("EMBCOMP_THREADS", "two")
    with pytest.raises(InputError, match="EMBCOMP_THREADS must be a whole number; got 'two'"):
        blocks.default_threads()
    monkeypatch.setenv("EMBCOMP_THREADS", "0")
    with pytest.raises(InputError, match="EMBCOMP_THREADS must be at least 1; got 0"):
        blocks.default_threads()
    monkeypatch.setenv("EMBCOMP_THREADS", " 3 ")
    assert blocks.default_threads() == 3
    monkeypatch.delenv("EMBCOMP_THREADS")
    assert blocks.default_threads() >= 1
    assert env_int("EMBCOMP_NOT_SET_ANYWHERE", 5) == 5


def test_a_bad_stream_threshold_fails_the_import_with_a_clear_error():
    env = {**os.environ, "EMBCOMP_STREAM_BYTES": "64MB"}
    done = subprocess.run(
        [sys.executable, "-c", "import embcomp"], env=env, capture_output=True, text=True
    )
    assert done.returncode != 0
    assert "EMBCOMP_STREAM_BYTES must be a whole number; got '64MB'" in done.stderr


# -- how rows are handed out ----------------------------------------------------------------
def drain_alone(run, mine):
    """The chunks one thread owning range ``mine`` takes when it runs alone."""
    chunks = []
    while (chunk := run._take(mine)) is not None:
        chunks.append(chunk)
    return chunks


def test_each_thread_starts_at_its_own_contiguous_range():
    run = blocks._Run(1000, 100, None, 2, divisible=False)
    assert run._take(0) == (0, 100)
    assert run._take(1) == (500, 600)  # far from thread 0: no huge page faulted twice
    run = blocks._Run(1003, 100, None, 3, divisible=True)
    assert [run._take(s)[0] for s in range(3)] == [0, 334, 668]


@pytest.mark.parametrize("divisible", [False, True])
@pytest.mark.parametrize(
    "n, block_rows, threads", [(1000, 100, 2), (1037, 64, 3), (5, 64, 2), (0, 8, 1)]
)
def test_one_thread_alone_takes_every_row_once_in_chunks_of_at_most_a_block(
    divisible, n, block_rows, threads
):
    run = blocks._Run(n, block_rows, None, threads, divisible=divisible)
    chunks = drain_alone(run, 0)
    seen = np.zeros(n, dtype=np.int64)
    for start, stop in chunks:
        assert 0 < stop - start <= block_rows
        seen[start:stop] += 1
        if not divisible:  # whole blocks: the grouping a reducer's rounding depends on
            assert start % block_rows == 0 and (stop - start == block_rows or stop == n)
    np.testing.assert_array_equal(seen, 1)
    assert run._done() and run._take(0) is None


def test_divisible_work_gets_shorter_chunks_near_the_end_of_a_range():
    run = blocks._Run(1000, 80, None, 1, divisible=True)
    sizes = [stop - start for start, stop in drain_alone(run, 0)]
    assert sizes[:11] == [80] * 11  # whole blocks while two or more are left
    assert sizes[11:] == [60, 30, 15, 10, 5]  # then half of what is left, down to 80 // 8


def test_a_thread_whose_range_is_done_takes_from_the_back_of_the_fullest_range():
    run = blocks._Run(1000, 100, None, 2, divisible=False)
    own = [(start, start + 100) for start in range(0, 500, 100)]
    assert drain_alone(run, 0)[:6] == [*own, (900, 1000)]
    run = blocks._Run(1000, 100, None, 2, divisible=True)
    run._take(1)  # thread 1 has (500, 600) in hand
    chunks = drain_alone(run, 0)
    own = [chunk for chunk in chunks if chunk[1] <= 500]
    assert chunks[: len(own)] == own and sum(b - a for a, b in own) == 500
    assert chunks[len(own) :][:5] == [(900, 1000), (800, 900), (700, 800), (650, 700), (625, 650)]


def test_after_a_failure_only_rows_before_it_are_handed_out():
    run = blocks._Run(1000, 100, None, 2, divisible=False)
    assert run._take(1) == (500, 600)
    run.errors[500] = ValueError("bad row 512")
    assert drain_alone(run, 1) == [(0, 100), (100, 200), (200, 300), (300, 400), (400, 500)]
    assert run._done()


def test_the_earliest_bad_row_wins_when_a_later_one_fails_first(monkeypatch):
    monkeypatch.setenv("EMBCOMP_THREADS", "2")
    later_failed = threading.Event()

    def work(start, stop, scratch):
        if start <= 700 < stop:
            later_failed.set()
            raise ValueError("row 700")
        if start <= 130 < stop:
            later_failed.wait(timeout=5)  # (alone, one thread reaches 130 first anyway)
            raise ValueError("row 130")

    for divisible in (False, True):
        later_failed.clear()
        with pytest.raises(ValueError, match="row 130"):
            blocks.map_blocks(1000, 10, work, divisible=divisible)


@pytest.mark.parametrize("threads", ["2", "3"])
def test_threads_cover_every_row_once(monkeypatch, threads):
    monkeypatch.setenv("EMBCOMP_THREADS", threads)  # 3: more ranges than pool workers
    seen = np.zeros(20_011, dtype=np.int64)
    lock = threading.Lock()

    def work(start, stop, scratch):
        time.sleep(0.0005)
        with lock:
            seen[start:stop] += 1

    for divisible in (False, True):
        seen[:] = 0
        blocks.map_blocks(seen.size, 257, work, divisible=divisible)
        np.testing.assert_array_equal(seen, 1)


def test_workers_see_the_callers_cancellation_check():
    """The check lives in a context variable, which does not follow work into the
    pool's threads: map_blocks installs it in each worker, and a raise stops the call."""
    from embcomp._cancel import cancel_when, checkpoint

    seen = []

    def work(start, stop, _scratch):
        checkpoint()
        time.sleep(0.002)  # synchronization only: let the other thread take blocks too

    def check():
        seen.append(threading.current_thread().name)

    with cancel_when(check):
        blocks.map_blocks(64, 1, work)
    assert len(seen) == 64 and len(set(seen)) == min(2, blocks.default_threads())

    class Stop(Exception):
        pass

    def stop():
        raise Stop

    with pytest.raises(Stop), cancel_when(stop):
        blocks.map_blocks(64, 1, work)
    blocks.map_blocks(64, 1, work)  # no check outside the block


def test_product_blocks_are_powers_of_two_that_split_a_1000_row_call():
    """~1 MiB of input rounded down to a power of two, at least 512 rows: a 1,000-row
    call of 384-d to 4,096-d input is two near halves (one for each core), while narrow
    rows, whose products are too small to share, keep one block per 1 MiB."""
    for d, rows in [(1, 1 << 18), (64, 4096), (128, 2048), (256, 1024), (257, 512)]:
        assert blocks.rows_per_block(4 * d) == rows
    for d in (384, 768, 1536, 3072, 4096, 16384):
        assert blocks.rows_per_block(4 * d) == 512


def test_a_1000_row_call_of_a_codec_with_a_reducer_runs_on_two_threads(monkeypatch):
    monkeypatch.setenv("EMBCOMP_THREADS", "2")
    X = np.random.default_rng(0).standard_normal((1000, 384)).astype(np.float32)
    codec = make_codec("pca192,int8").fit(X)
    codes = codec.encode(X)
    seen: list[tuple[str, int]] = []
    reducer = type(codec.reducer)
    transform = reducer.transform_block

    def spy(self, block, *args, **kwargs):
        time.sleep(0.01)  # synchronization only: let the pool's worker start
        seen.append((threading.current_thread().name, len(block)))
        return transform(self, block, *args, **kwargs)

    monkeypatch.setattr(reducer, "transform_block", spy)
    np.testing.assert_array_equal(codec.encode(X), codes)
    assert sorted(rows for _, rows in seen) == [488, 512]
    assert len({name for name, _ in seen}) == 2
