"""The durable file store: ``<data-dir>/studies/<study>/<series>/<sop>.dcm``.

A file becomes visible under ``studies/`` only by an atomic rename of a fully
written, fsync'ed file from ``<data-dir>/tmp`` (same filesystem), followed by an
fsync of the directory that received it. So a crash can leave a stray temp
file, never a partial instance.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from scp.records import InstanceHeader
from scp.uids import check_uid

STUDIES = "studies"
TMP = "tmp"


LOCK_FILE = "lock"
_DURABLE_DIRS_REMEMBERED = 20_000


class DataDirInUse(RuntimeError):
    """Another server (or ``reindex``) holds the data dir."""


class DataDirLock:
    """An exclusive lock on a data dir, held by the server while it runs and by ``reindex``.

    Two servers on one data dir would both deliver its outbox and both reconcile its index; a reindex under a
    running server holds the index's write lock while it reads every file, so C-STOREs time out. An advisory
    ``flock`` on ``<data-dir>/lock`` is released by the kernel when the process dies, so a crash never leaves a
    stale lock; the file holds the holder's PID for the message.
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.path = Path(data_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`DataDirInUse` naming the process that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(f"{self.path.parent} is in use by process {holder} (a running server?) or by "
                               "its receiver processes (`workers`), which end soon after it; stop it "
                               "first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    @property
    def fd(self) -> int | None:
        """The locked file's descriptor: a child process that inherits it holds the lock too (receivers)."""
        return self._fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None


class StoredFileState(NamedTuple):
    """A stored file as the filesystem has it: what reconciliation compares with the index's row."""

    path: str  # relative to the data dir
    size: int
    mtime: float


class Store:
    """Places received files durably at their final path and finds them again."""

    def __init__(self, data_dir: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.studies_dir = self.data_dir / STUDIES
        self.tmp_dir = self.data_dir / TMP
        self._fsync = fsync
        self._root = str(self.data_dir)
        self._dirs_lock = threading.Lock()
        # series directories whose entries up to studies/ this process has made durable (see _ready_dir)
        self._durable_dirs: dict[str, tuple[int, int, int]] = {}
        for directory in (self.data_dir, self.studies_dir, self.tmp_dir):
            directory.mkdir(parents=True, exist_ok=True)

    @property
    def durable(self) -> bool:
        """True when files (and the directories that receive them) are fsync'ed before they count as stored."""
        return self._fsync

    @staticmethod
    def relative_path(header: InstanceHeader) -> str:
        """The instance's path relative to the data dir (UIDs checked again: paths are built from them)."""
        study = check_uid(header.study_uid, "Study Instance UID")
        series = check_uid(header.series_uid, "Series Instance UID")
        sop = check_uid(header.sop_uid, "SOP Instance UID")
        return f"{STUDIES}/{study}/{series}/{sop}.dcm"

    def absolute(self, relative: str) -> Path:
        """The absolute path of a stored file, refusing anything outside ``studies/``."""
        path = (self.data_dir / relative).resolve()
        if self.studies_dir not in path.parents:
            raise ValueError(f"{relative!r} is outside the store")
        return path

    def commit(self, temp_path: str | os.PathLike[str], header: InstanceHeader, *, fd: int | None = None,
               size: int | None = None) -> tuple[str, int]:
        """Make the fully received file at ``temp_path`` durable at its final place.

        Returns the relative path and the size. ``temp_path`` must be in
        :attr:`tmp_dir` (same filesystem) so that the rename is atomic. ``fd``, the
        file still open from receiving it, saves opening it again (with ``size``, a stat).
        """
        relative = self.relative_path(header)
        final = os.path.join(self._root, relative)
        if fd is not None:
            if self._fsync:
                os.fsync(fd)
            if size is None:
                size = os.fstat(fd).st_size
        else:
            with open(temp_path, "rb") as handle:
                if self._fsync:
                    os.fsync(handle.fileno())
                size = os.fstat(handle.fileno()).st_size
        directory = os.path.dirname(final)
        self._ready_dir(directory)
        try:
            os.replace(temp_path, final)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            self._copy_in(temp_path, Path(final))
        if self._fsync:
            fsync_dir(directory)
        return relative, size

    def _copy_in(self, source: str | os.PathLike[str], final: Path) -> None:
        """The temp file is on another filesystem (e.g. two embedded servers in one process): copy it
        into our tmp dir, make it durable, then rename as usual."""
        staging = self.tmp_dir / f".copy-{final.name}.{os.getpid()}"
        shutil.copyfile(source, staging)
        if self._fsync:
            with open(staging, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(staging, final)
        os.unlink(source)

    def remove(self, relative: str) -> None:
        """Remove a stored file (a replaced duplicate living at another path)."""
        path = self.absolute(relative)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        if self._fsync:
            fsync_dir(path.parent)

    def free_bytes(self) -> int:
        """Space left for unprivileged writers on the store's filesystem."""
        stat = os.statvfs(self.data_dir)
        return stat.f_bavail * stat.f_frsize

    def clean_tmp(self) -> int:
        """Remove temp files a crash left behind; returns how many were removed."""
        removed = 0
        for entry in os.scandir(self.tmp_dir):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
        return removed

    def stored_file_states(self) -> Iterator[StoredFileState]:
        """Every stored instance file with its size and modification time, in a stable order."""
        for relative, entry in self._stored_entries():
            try:
                stat = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # removed since its directory was listed
                continue
            yield StoredFileState(relative, stat.st_size, stat.st_mtime)

    def file_state(self, relative: str) -> StoredFileState | None:
        """The size and modification time of a stored file; None when it is gone."""
        try:
            stat = os.stat(os.path.join(self._root, relative), follow_symlinks=False)
        except FileNotFoundError:
            return None
        return StoredFileState(relative, stat.st_size, stat.st_mtime)

    def _stored_entries(self) -> Iterator[tuple[str, os.DirEntry[str]]]:
        for study in sorted(os.scandir(self.studies_dir), key=lambda e: e.name):
            if not study.is_dir(follow_symlinks=False):
                continue
            for series in sorted(os.scandir(study.path), key=lambda e: e.name):
                if not series.is_dir(follow_symlinks=False):
                    continue
                for entry in sorted(os.scandir(series.path), key=lambda e: e.name):
                    if entry.name.endswith(".dcm") and entry.is_file(follow_symlinks=False):
                        yield f"{STUDIES}/{study.name}/{series.name}/{entry.name}", entry

    def _ready_dir(self, directory: str) -> None:
        """Make sure the study/series ``directory`` exists and, when durable, that its entries up to
        ``studies/`` survive a power cut before a file placed in it is acknowledged.

        A directory counts as durable once this process has fsync'ed the parents of it and of its study
        directory, for as long as it is the same directory (see :func:`_identity`). A directory found made by
        another thread or process, whose maker may not have fsync'ed its parent yet, gets its parents
        fsync'ed here first: once per directory and process.
        """
        if not self._fsync:
            if not os.path.isdir(directory):
                self._make_dirs(directory)
            return
        try:
            identity = _identity(directory)
        except FileNotFoundError:
            identity = None
        if identity is None or self._durable_dirs.get(directory) != identity:
            self._make_dirs(directory)

    def _make_dirs(self, directory: str) -> None:
        """Create what is missing of the study/series directories and, when durable, fsync the parent of
        each (one thread at a time); then remember the series directory as durable."""
        study = os.path.dirname(directory)
        with self._dirs_lock:
            for path in (study, directory):
                try:
                    os.mkdir(path)
                except FileExistsError:
                    pass  # made by another thread or process: its entry may not be durable yet either
            if not self._fsync:
                return
            identity = _identity(directory)  # before the fsyncs: one made again meanwhile is not taken for it
            if self._durable_dirs.get(directory) == identity:
                return  # another thread did it while this one waited for the lock
            fsync_dir(os.path.dirname(study))
            fsync_dir(study)
            if len(self._durable_dirs) > _DURABLE_DIRS_REMEMBERED:
                self._durable_dirs.clear()  # forgetting costs an fsync of two parents per directory, once
            self._durable_dirs[directory] = identity


def _identity(series: str) -> tuple[int, int, int]:
    """What tells a series directory from one removed and made again at the same path (a retention job, a
    restore): inode numbers alone do not, ext4 hands a freed one out again at once; the study directory's
    change time does, as it moves whenever a series directory in it is made or removed (and a study
    directory made again has its own)."""
    study = os.stat(os.path.dirname(series))
    return os.stat(series).st_ino, study.st_ino, study.st_ctime_ns


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename, creation or removal in ``directory`` durable (the entry survives, or stays gone, a power cut)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
