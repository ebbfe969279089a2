"""One received C-STORE dataset → a durable file and an index row, or a DIMSE failure.

This is the hot path: it reads header tags only, never pixel data, and does no
FHIR or HTTP work. It sits between the association (which owns the network) and
the store/index (which own the disk).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import sqlite3
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from scp.header import HeaderError, read_header
from scp.index import Index
from scp.metrics import Metrics
from scp.records import InstanceHeader, Provenance, StoredInstance
from scp.store import Store

log = logging.getLogger("scp.ingest")

# C-STORE statuses (PS3.4 Annex B.2.3, PS3.7 Annex C)
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111

_RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.ENOMEM}
_SQLITE_FULL = 13  # primary result code: "database or disk is full"

DuplicatePolicy = Literal["replace", "keep-first", "reject"]


def receive_failure_status(error: OSError) -> int:
    """The DIMSE status for an I/O error while receiving or storing: 0xA700 when resources ran out."""
    return OUT_OF_RESOURCES if error.errno in _RESOURCE_ERRNOS else PROCESSING_FAILURE


class Rejected(Exception):
    """The instance was not stored; ``status`` and ``comment`` go back to the sender.

    Reasons quote received values, which can hold any byte, and the comment becomes the response's
    Error Comment (LO in a command set: default repertoire, no backslash). One that cannot be encoded
    makes pynetdicom abort the association instead of answering, so ``comment`` is kept to printable
    ASCII without backslashes (anything else becomes ``?``; also keeps control characters out of logs).
    """

    def __init__(self, status: int, comment: str) -> None:
        comment = _printable(comment)
        super().__init__(comment)
        self.status = status
        self.comment = comment


def error_comment(text: str) -> str:
    """``text`` as a valid DIMSE Error Comment: printable ASCII without backslash, at most 64 characters."""
    return _printable(text)[:64]


def _printable(text: str) -> str:
    return "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in text)


@dataclass(frozen=True, slots=True)
class Accepted:
    """A stored instance and every study whose content it changed (none when a duplicate was kept out)."""

    instance: StoredInstance
    touched_studies: tuple[str, ...]


_SOP_LOCK_STRIPES = 256


class _SopLocks:
    """One lock per SOP Instance UID (striped): what one instance's stores do to its file and row is serialised.

    Storing reads the instance's row, places the file, writes the row, then removes the copy the row
    replaced. Two associations storing the same SOP Instance UID at once (a move to another study and a
    re-send, say) would otherwise interleave those steps: one removes the file the other just placed, and
    an acknowledged instance is lost, or the row describes the other copy's file. Different instances
    rarely share a stripe, so parallel associations still store in parallel.

    With receiver processes (``workers``) the stripe is also locked across processes: a one-byte
    open-file-description lock (Linux ``F_OFD_SETLKW``) at the stripe's offset in ``shared_file``. Not a
    classic POSIX record lock: those belong to the process, and the kernel's deadlock check then sees two
    processes, each with one thread holding a stripe and another waiting for the other's, as a deadlock
    (``EDEADLK``, a store answered 0x0110) where none exists, since a thread never holds two stripes; and
    closing any other descriptor of the file would drop them. The descriptor is shared by this process's
    threads, so the thread lock is taken first. The stripe comes from CRC-32 (``hash()`` differs between
    processes). Only the server creates the file (``create``): a receiver started after it was deleted
    fails loudly instead of locking a file nobody else locks.
    """

    def __init__(self, stripes: int = _SOP_LOCK_STRIPES, shared_file: str | os.PathLike[str] | None = None,
                 create: bool = True) -> None:
        self._locks = [threading.Lock() for _ in range(stripes)]
        self._fd: int | None = None
        if shared_file is not None:
            self._fd = os.open(shared_file, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)

    @contextlib.contextmanager
    def __call__(self, sop_uid: str) -> Iterator[None]:
        stripe = zlib.crc32(sop_uid.encode()) % len(self._locks)
        with self._locks[stripe]:
            fd = self._fd
            if fd is None:
                yield
                return
            fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _flock(fcntl.F_WRLCK, stripe))
            try:
                yield
            finally:
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, stripe))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _flock(kind: int, offset: int) -> bytes:
    """A ``struct flock`` for one byte at ``offset`` (Linux, 64-bit ``off_t``; l_pid 0 as OFD locks require)."""
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, offset, 1, 0)


class Ingest:
    """Turns a fully received dataset file into a stored, indexed instance."""

    def __init__(self, store: Store, index: Index, metrics: Metrics | None = None, *,
                 min_free_bytes: int = 0, max_instance_bytes: int = 0,
                 duplicate_policy: DuplicatePolicy = "replace", shared_lock_file: str | None = None,
                 create_lock_file: bool = True) -> None:
        self.store = store
        self.index = index
        self.metrics = metrics or Metrics()
        self.min_free_bytes = min_free_bytes
        self.max_instance_bytes = max_instance_bytes
        self.duplicate_policy = duplicate_policy
        # with a file: stores by other processes are serialised too (see _SopLocks)
        self._sop_lock = _SopLocks(shared_file=shared_lock_file, create=create_lock_file)

    def close(self) -> None:
        """Let go of the shared lock file (nothing else is held between stores)."""
        self._sop_lock.close()

    def accept(self, temp_path: str | os.PathLike[str], *, sop_instance_uid: str | None,
               sop_class_uid: str | None, provenance: Provenance, head: bytes | bytearray = b"",
               fd: int | None = None,
               size: int | None = None) -> Accepted:
        """Store the dataset at ``temp_path`` (a Part-10 file in the store's tmp dir).

        ``sop_instance_uid`` / ``sop_class_uid`` are the C-STORE request's
        Affected SOP Instance/Class UIDs; the dataset must agree with them.
        What the receiver still holds saves reading and opening the file again: ``head``
        (its first bytes) with its ``size``, and ``fd`` (the file, open, for the fsync).
        Raises :class:`Rejected` with the DIMSE status to answer.
        """
        self._check_free_space()
        self._check_size(temp_path, size)
        header = self._header(temp_path, sop_instance_uid, sop_class_uid, head, size)
        with self._sop_lock(header.sop_uid):
            return self._place(temp_path, header, provenance, fd, size)

    def _place(self, temp_path: str | os.PathLike[str], header: InstanceHeader, provenance: Provenance,
               fd: int | None, size: int | None) -> Accepted:
        """Apply the duplicate policy, make the file durable in the store, write its row, drop what it replaced."""
        existing = self.index.get(header.sop_uid)
        if existing is not None:
            kept = self._duplicate(temp_path, existing)
            if kept is not None:
                return kept
        try:
            relative, size = self.store.commit(temp_path, header, fd=fd, size=size)
        except OSError as exc:
            if exc.errno in _RESOURCE_ERRNOS:
                raise Rejected(OUT_OF_RESOURCES, f"cannot store: {os.strerror(exc.errno or 0)}") from exc
            raise
        stored = StoredInstance(header=header, path=relative, size=size, provenance=provenance)
        try:
            replaced = self.index.put(stored)
        except Exception as exc:
            self._withdraw(relative, header, existing)
            if _is_full(exc):
                raise Rejected(OUT_OF_RESOURCES, "cannot index: database or disk is full") from exc
            raise
        self.metrics.instances.inc()
        self.metrics.bytes.inc(size)
        touched = [header.study_uid]
        if replaced is not None:
            if replaced.path != relative:
                self._remove_replaced(replaced.path)
            if replaced.study_uid != header.study_uid:
                log.warning("SOP Instance %s moved from study %s to %s", header.sop_uid,
                            replaced.study_uid, header.study_uid)
                touched.append(replaced.study_uid)
        return Accepted(stored, tuple(touched))

    def _remove_replaced(self, relative: str) -> None:
        """Remove the copy a new one replaced. The new one is stored and indexed whatever happens here: a
        failure is logged, and the copy left behind is removed by the next start-up reconciliation."""
        try:
            self.store.remove(relative)
        except OSError as exc:
            log.error("cannot remove %s, replaced by a newer copy: %s", relative, exc)

    def _withdraw(self, relative: str, header: InstanceHeader, existing: StoredInstance | None) -> None:
        """The file is in place but its index row could not be written: the sender will get a failure, so
        take the file back out of ``studies/`` unless an indexed instance lives at that path."""
        if existing is not None and existing.path == relative:
            log.error("SOP Instance %s: the new copy replaced the stored file but its index row could not "
                      "be written; the file and the index disagree until `reindex`", header.sop_uid)
            return
        try:
            current = self.index.get(header.sop_uid)
            if current is not None and current.path == relative:
                return  # another association stored and indexed the same instance meanwhile
            self.store.remove(relative)
        except Exception:
            log.exception("cannot take %s back after its index row failed", relative)

    def _check_free_space(self) -> None:
        if self.min_free_bytes <= 0:
            return
        free = self.store.free_bytes()
        if free < self.min_free_bytes:
            raise Rejected(OUT_OF_RESOURCES, f"store has {free // 2**20} MB free, below the minimum")

    def _check_size(self, temp_path: str | os.PathLike[str], size: int | None) -> None:
        if self.max_instance_bytes <= 0:
            return
        if (size if size is not None else os.path.getsize(temp_path)) > self.max_instance_bytes:
            raise Rejected(OUT_OF_RESOURCES, f"instance larger than {self.max_instance_bytes // 2**20} MB")

    @staticmethod
    def _header(temp_path: str | os.PathLike[str], sop_instance_uid: str | None,
                sop_class_uid: str | None, head: bytes | bytearray = b"",
                size: int | None = None) -> InstanceHeader:
        try:
            header = read_header(temp_path, head, size)
        except HeaderError as exc:
            raise Rejected(CANNOT_UNDERSTAND, str(exc)) from exc
        if sop_instance_uid is not None and header.sop_uid != str(sop_instance_uid).rstrip("\x00 "):
            raise Rejected(CANNOT_UNDERSTAND, "dataset SOP Instance UID differs from the C-STORE request's")
        if sop_class_uid is not None and header.sop_class_uid != str(sop_class_uid).rstrip("\x00 "):
            raise Rejected(DATASET_DOES_NOT_MATCH_SOP_CLASS,
                           "dataset SOP Class UID differs from the C-STORE request's")
        return header

    def _duplicate(self, temp_path: str | os.PathLike[str], existing: StoredInstance) -> Accepted | None:
        """Apply the duplicate policy; returns the answer when the new copy is not stored.

        Content digests are only computed here, when a SOP Instance UID comes
        again, so the common path pays nothing for duplicate detection.
        """
        try:
            identical = _digest(temp_path) == _digest(self.store.absolute(existing.path))
        except FileNotFoundError:  # removed behind our back (by hand, a retention job): the row is stale
            log.warning("SOP Instance %s received again; its stored file %s is gone, the new copy is stored",
                        existing.header.sop_uid, existing.path)
            return None
        self.metrics.duplicates.labels(identical="yes" if identical else "no").inc()
        log.info("SOP Instance %s received again (%s content; policy %s)", existing.header.sop_uid,
                 "identical" if identical else "different", self.duplicate_policy)
        if self.duplicate_policy == "keep-first":
            return Accepted(existing, ())
        if self.duplicate_policy == "reject":
            raise Rejected(DUPLICATE_SOP_INSTANCE, "SOP Instance UID already stored")
        return None


def _is_full(exc: BaseException) -> bool:
    """True when ``exc`` (or what it was raised while handling) says the disk is full.

    A failed COMMIT may surface as the ROLLBACK's "no transaction is active" error, with the
    SQLITE_FULL error as its context, so the chain is followed.
    """
    seen: BaseException | None = exc
    for _ in range(16):  # a chain is short; never loop on a cyclic one
        if seen is None:
            break
        if isinstance(seen, sqlite3.Error) and (getattr(seen, "sqlite_errorcode", 0) & 0xFF) == _SQLITE_FULL:
            return True
        if isinstance(seen, OSError) and seen.errno in _RESOURCE_ERRNOS:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's content, read in chunks so memory stays flat."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()
