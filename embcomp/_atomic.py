"""Write files so that a crash never leaves a partial file under the final name."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from .exceptions import InputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, no clean-up
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("embcomp")

# A temporary file left by a writer that was killed (SIGKILL, power loss: no ``except``
# ran) is removed by the next write to the same path once it is unlocked and has not
# changed for this long. Live writers hold a lock on theirs; the wait also covers the
# instant between creating the file and locking it, and file systems without locks.
STALE_AFTER_SECONDS = 60.0
_NAME_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789_"  # tempfile.mkstemp's, too
_NAME_CHARS = set(_NAME_ALPHABET)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Outputs get the permissions a plain open() would give them.
_FILE_MODE = 0o666 & ~_current_umask()
_CREATE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)


def _create_exclusive(path: Path) -> int:
    """Create ``path``, which must not exist; returns its descriptor."""
    return os.open(path, _CREATE_FLAGS, _FILE_MODE)


def _random_name() -> str:
    return "".join(secrets.choice(_NAME_ALPHABET) for _ in range(8))


class Temporary:
    """A temporary file ``.<final name>.<8 random characters>.tmp`` in ``directory``
    (the names :func:`remove_stale_temporaries_in` knows), which :meth:`remove` removes
    whenever an exception stopped its writer, however early.

    ``tempfile.mkstemp`` names its file only once it exists: a signal landing between
    the two (a SIGTERM turned into an exception) left the file behind, unnamed. Here
    ``path`` is set before the file is created, so :meth:`remove` finds it whether or
    not the creation finished, and cleared if the name turns out to be taken (another
    writer's file, never ours to remove).
    """

    def __init__(self, directory: Path, final_name: str) -> None:
        self.directory = directory
        self.final_name = final_name
        self.path: Path | None = None

    def create(self) -> int:
        """Create the file; returns its descriptor (open for reading and writing)."""
        for _ in range(100):
            self.path = self.directory / f".{self.final_name}.{_random_name()}.tmp"
            try:
                return _create_exclusive(self.path)
            except FileExistsError:
                self.path = None
        raise FileExistsError(errno.EEXIST, "no unused temporary file name", str(self.directory))

    def remove(self) -> None:
        """Remove the file if it was (or may have been) created; errors are ignored."""
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike[str], mode: str = "wb", *, clean_stale: bool = True
) -> Iterator[IO[bytes]]:
    """Open a temporary file beside ``path``; rename it to ``path`` only on success.

    On any exception the temporary file is removed and ``path`` is left untouched. The
    writer holds an advisory lock on its temporary file; with ``clean_stale``, the
    temporary files of earlier writers of ``path`` that died without cleaning up (see
    :func:`remove_stale_temporaries`) are removed first.
    """
    final = Path(path)
    if final.is_dir():  # os.replace would fail only after the whole file was written
        raise InputError(
            f"output {str(path)!r} is a directory; give a file path inside it, "
            f"e.g. {str(final / 'out')!r}"
        )
    directory = final.parent if str(final.parent) else Path(".")
    if not directory.is_dir():
        raise InputError(f"output directory {str(directory)!r} does not exist; create it first")
    if clean_stale:
        remove_stale_temporaries(final)
    temporary = Temporary(directory, final.name)
    try:
        try:
            fd = temporary.create()
        except PermissionError as exc:
            where = str(directory)
            raise InputError(f"cannot write to directory {where!r}: {exc.strerror}") from exc
        _try_lock(fd)  # released when the file is closed
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        assert temporary.path is not None
        os.replace(temporary.path, final)
    except BaseException:
        temporary.remove()
        raise


def atomic_write_bytes(
    path: str | os.PathLike[str], data: bytes, *, clean_stale: bool = False
) -> None:
    """Write ``data`` to ``path`` atomically. Small files skip the search for stale
    temporaries by default: their writers sweep the directory once instead (see
    :func:`remove_stale_temporaries_in`)."""
    with atomic_output(path, clean_stale=clean_stale) as handle:
        handle.write(data)


def _try_lock(fd: int) -> bool:
    """Take an exclusive advisory lock on ``fd`` without waiting; False if that is not
    possible (held by another process, or no locks on this file system)."""
    if fcntl is None:  # pragma: no cover
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _if_stale(path: str | os.PathLike[str]) -> Iterator[os.stat_result | None]:
    """Yield the status of the file at ``path`` if its writer is gone (no one else holds
    its lock, and it has not changed for ``STALE_AFTER_SECONDS``), holding its lock for
    the block; else None. Errors (the file vanished, no permission) also give None."""
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        yield None
        return
    try:
        info = os.fstat(fd)
        stale = time.time() - info.st_mtime >= STALE_AFTER_SECONDS and _try_lock(fd)
        # Locked by us: is the name still this file? (A writer that just finished
        # renamed it away; a new one may have taken the name since.)
        stale = stale and os.stat(path, follow_symlinks=False).st_ino == info.st_ino
    except OSError:
        stale = False
    try:
        yield info if stale else None
    finally:
        os.close(fd)


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """Remove the temporary files that :func:`atomic_output` writers of ``path`` left
    behind when they were killed; returns the ``(name, bytes)`` of each one removed.

    A temporary file (``.<name>.<random>.tmp`` beside ``path``) is stale when no process
    holds its lock and it has not changed for ``STALE_AFTER_SECONDS``. A live writer,
    on this machine or another one sharing the file system, holds its lock until it
    renames or removes the file, so its file is never touched. Without advisory locks
    (Windows, some network file systems) nothing is removed.
    """
    final = Path(path)
    directory = final.parent if str(final.parent) else Path(".")
    return remove_stale_temporaries_in(directory, lambda name: name == final.name)


def remove_stale_temporaries_in(
    directory: str | os.PathLike[str], ours: Callable[[str], bool]
) -> list[tuple[str, int]]:
    """:func:`remove_stale_temporaries` for every file name in ``directory`` that
    ``ours(name)`` accepts, in one scan: for a writer of many files there (a store, a
    batch job's outputs) whose small writes skip the search. Only names the caller
    writes: another program's temporary files in a shared directory are its own."""
    folder = Path(directory)
    removed: list[tuple[str, int]] = []
    try:
        with os.scandir(folder) as scan:
            names = [e.name for e in scan if e.name.startswith(".") and e.name.endswith(".tmp")]
    except OSError:
        return removed
    for name in names:
        # mkstemp's names: ".<final name>." + 8 of _NAME_CHARS + ".tmp"
        final, middle = name[1:-13], name[-12:-4]
        if len(name) < 15 or name[-13] != "." or set(middle) - _NAME_CHARS or not ours(final):
            continue
        temporary = folder / name
        with _if_stale(temporary) as info, contextlib.suppress(OSError):
            if info is None or not stat.S_ISREG(info.st_mode):
                continue
            os.unlink(temporary)
            removed.append((name, info.st_size))
            logger.warning(
                "removed %s (%d bytes), the temporary file of an interrupted write of %s",
                temporary, info.st_size, folder / final,
            )  # fmt: skip
    return removed


@contextlib.contextmanager
def guard(directory: Path) -> Iterator[None]:
    """Hold a lock on ``<directory>.lock`` (created here, removed at the end) while the
    block writes ``directory``: :func:`remove_stale_directory` then knows it is in use.
    Create the guard before the directory."""
    lock = directory.with_name(directory.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    try:
        _try_lock(fd)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # before closing, which lets go of the lock
        os.close(fd)


def remove_stale_directory(directory: Path) -> int | None:
    """Remove ``directory`` and its ``.lock`` if a :func:`guard` made that lock and its
    holder is gone (see :func:`_if_stale`); returns the bytes of files removed, or None
    if nothing was (no lock file: not ours to judge)."""
    lock = directory.with_name(directory.name + ".lock")
    with _if_stale(lock) as info:
        if info is None:
            return None
        size = 0
        if directory.is_dir() and not directory.is_symlink():
            size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
            shutil.rmtree(directory, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
    logger.warning("removed %s (%d bytes), the scratch of an interrupted run", directory, size)
    return size
