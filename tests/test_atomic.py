"""Atomic writes: a killed writer's temporary file is removed by the next writer of the
same path, and only then (live writers hold a lock; other files are never touched)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from embcomp._atomic import atomic_output, remove_stale_temporaries, remove_stale_temporaries_in
from embcomp.io import write_vectors

pytest.importorskip("fcntl")


def _age(path, seconds: float = 120) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_only_old_unlocked_temporaries_of_the_same_path_are_removed(tmp_path):
    final = tmp_path / "codes.npy"
    stale = tmp_path / ".codes.npy.k3x_9q0a.tmp"
    young = tmp_path / ".codes.npy.abcdefgh.tmp"
    not_ours = [
        tmp_path / ".codes.npy.skipped.tsv.abcdefgh.tmp",  # another output's
        tmp_path / ".codes.npy.abcdefg.tmp",  # not an 8-character mkstemp name
        tmp_path / ".codes.npy.ABCDEFGH.tmp",
        tmp_path / ".codes.npy.abcdefgh.tmp.keep",
        tmp_path / "codes.npy.abcdefgh.tmp",
        tmp_path / ".other.npy.abcdefgh.tmp",
    ]
    for path in [stale, young, *not_ours]:
        path.write_bytes(b"partial")
    for path in [stale, *not_ours]:
        _age(path)
    assert remove_stale_temporaries(final) == [(stale.name, 7)]
    assert not stale.exists() and young.exists()
    assert all(path.exists() for path in not_ours)


def test_a_directory_sweep_removes_the_stale_temporaries_of_the_names_given(tmp_path):
    """One scan for a writer of many small files (a store, a batch job's records), and
    only of the names it writes."""
    stale = [
        tmp_path / ".codes.npy.k3x_9q0a.tmp",
        tmp_path / ".codes.npy.json.abcdefgh.tmp",
        tmp_path / ".codes.npy.skipped.tsv.abcdefgh.tmp",
        tmp_path / ".x.abcdefgh.tmp",
    ]
    young = tmp_path / ".other.npy.abcdefgh.tmp"
    not_ours = [
        tmp_path / ".codes.npy.abcdefg.tmp",  # not an 8-character mkstemp name
        tmp_path / ".codes.npy.ABCDEFGH.tmp",
        tmp_path / "codes.npy.abcdefgh.tmp",  # not hidden
        tmp_path / "..abcdefgh.tmp",  # no final name
        tmp_path / ".x.tmp",
        tmp_path / ".codes.npy_abcdefgh.tmp",
    ]
    for path in [*stale, young, *not_ours]:
        path.write_bytes(b"partial")
    for path in [*stale, *not_ours]:
        _age(path)
    (tmp_path / ".dir.abcdefgh.tmp").mkdir()  # a directory is never a writer's file
    _age(tmp_path / ".dir.abcdefgh.tmp")
    others = tmp_path / ".notes.txt.abcdefgh.tmp"  # another program's, in a shared directory
    others.write_bytes(b"partial")
    _age(others)
    ours = {"codes.npy", "codes.npy.json", "codes.npy.skipped.tsv", "x", "other.npy", "dir"}
    removed = remove_stale_temporaries_in(tmp_path, ours.__contains__)
    assert sorted(removed) == sorted((path.name, 7) for path in stale)
    assert not any(path.exists() for path in stale)
    assert young.exists() and others.exists() and all(path.exists() for path in not_ours)
    assert (tmp_path / ".dir.abcdefgh.tmp").is_dir()
    assert remove_stale_temporaries_in(tmp_path / "missing", ours.__contains__) == []


@contextlib.contextmanager
def _locked_by_another_process(path):
    """A live process holding the lock on ``path`` for the duration of the block."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.communicate("")


def test_a_temporary_locked_by_a_live_process_is_kept(tmp_path):
    """The writer may be another process (or machine): its lock is what protects it."""
    held = tmp_path / ".codes.npy.abcdefgh.tmp"
    held.write_bytes(b"partial")
    _age(held)
    with _locked_by_another_process(held):
        assert remove_stale_temporaries(tmp_path / "codes.npy") == []
        assert held.exists()
    assert remove_stale_temporaries(tmp_path / "codes.npy") == [(held.name, 7)]


def test_a_writer_locks_its_own_temporary_file(tmp_path):
    final = tmp_path / "x.npy"
    with atomic_output(final) as handle:
        handle.write(b"partial")
        (temporary,) = tmp_path.glob(".x.npy.*.tmp")
        _age(temporary)  # even old, it is in use
        assert remove_stale_temporaries(final) == []
    assert final.read_bytes() == b"partial" and list(tmp_path.glob(".*")) == []


def test_writing_an_output_removes_its_stale_temporary(tmp_path, caplog):
    stale = tmp_path / ".v.npy.abcdefgh.tmp"
    stale.write_bytes(b"x" * 100)
    _age(stale)
    with caplog.at_level("WARNING", logger="embcomp"):
        write_vectors(tmp_path / "v.npy", np.ones((2, 3), dtype=np.float32))
    assert not stale.exists() and "interrupted write" in caplog.text
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), np.ones((2, 3)))


def _scratch(parent, name: str, lock: bool = True):
    scratch = parent / name
    scratch.mkdir()
    (scratch / "part-0.parquet").write_bytes(b"p" * 10)
    if lock:
        scratch.with_name(name + ".lock").write_bytes(b"")
        _age(scratch.with_name(name + ".lock"))
    return scratch


def test_a_ray_run_removes_scratch_of_killed_runs_only(tmp_path):
    from embcomp.batch._ray import _remove_stale_scratch

    output = tmp_path / "codes"
    killed = _scratch(tmp_path, ".codes.tmp-0123456789ab")
    live = _scratch(tmp_path, ".codes.tmp-aaaaaaaaaaaa")
    unguarded = _scratch(tmp_path, ".codes.tmp-bbbbbbbbbbbb", lock=False)  # not ours to judge
    other = _scratch(tmp_path, ".codes2.tmp-cccccccccccc")
    lonely_lock = tmp_path / ".codes.tmp-dddddddddddd.lock"  # killed before its directory
    lonely_lock.write_bytes(b"")
    _age(lonely_lock)
    with _locked_by_another_process(live.with_name(live.name + ".lock")):
        _remove_stale_scratch(output)
    assert not killed.exists() and not killed.with_name(killed.name + ".lock").exists()
    assert not lonely_lock.exists()
    assert live.exists() and unguarded.exists() and other.exists()


def test_guard_holds_its_lock_and_removes_it(tmp_path):
    from embcomp._atomic import guard, remove_stale_directory

    scratch = tmp_path / ".out.tmp-0123456789ab"
    lock = tmp_path / ".out.tmp-0123456789ab.lock"
    with guard(scratch):
        scratch.mkdir()
        _age(lock)
        assert remove_stale_directory(scratch) is None and scratch.exists()
    assert not lock.exists() and scratch.exists()


class _Signal(BaseException):
    """Stands for the exception a SIGTERM handler raises."""


def test_a_signal_just_after_the_temporary_is_created_leaves_nothing(tmp_path, monkeypatch):
    """tempfile.mkstemp names its file only once it exists: a SIGTERM landing in
    between (seen under load) left the temporary behind, so a terminated run was not
    clean. The name is now known before the file exists; name collisions retry and
    never remove the other writer's file."""
    import embcomp._atomic as atomic
    from embcomp.batch._engine import check_writable

    real = atomic._create_exclusive
    created = []

    def create_then_signal(path):
        fd = real(path)
        created.append(path)
        os.close(fd)
        raise _Signal

    monkeypatch.setattr(atomic, "_create_exclusive", create_then_signal)
    with pytest.raises(_Signal), atomic_output(tmp_path / "codes.npy") as handle:
        handle.write(b"never")
    with pytest.raises(_Signal):
        check_writable(tmp_path)
    assert len(created) == 2 and list(tmp_path.iterdir()) == []

    # A taken name is skipped and the other writer's file left alone, also when the
    # signal lands while the next name is being created.
    other = tmp_path / ".codes.npy.taken___.tmp"
    other.write_bytes(b"another writer's")
    monkeypatch.setattr(atomic, "_create_exclusive", real)
    monkeypatch.setattr(atomic, "_random_name", iter(["taken___", "free____"]).__next__)
    with atomic_output(tmp_path / "codes.npy") as handle:
        handle.write(b"kept")
    monkeypatch.setattr(atomic, "_create_exclusive", create_then_signal)
    monkeypatch.setattr(atomic, "_random_name", iter(["taken___", "next____"]).__next__)
    with pytest.raises(_Signal), atomic_output(tmp_path / "codes.npy") as handle:
        handle.write(b"never")
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "codes.npy"]
    assert other.read_bytes() == b"another writer's"
    assert (tmp_path / "codes.npy").read_bytes() == b"kept"


def test_an_output_that_is_a_directory_is_refused_before_anything_is_written(tmp_path):
    """save_codec(codec, "/tmp") wrote the whole artifact to a temporary in /, then failed
    in os.replace with a bare IsADirectoryError naming that temporary."""
    import embcomp
    from embcomp.exceptions import InputError

    codec = embcomp.make_codec("int8").fit(
        np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    )
    (tmp_path / "out").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(InputError, match="is a directory; give a file path inside it"):
        embcomp.save_codec(codec, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert list((tmp_path / "out").iterdir()) == []
