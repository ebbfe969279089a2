"""One received C-STORE dataset → a durable file and an index row, or a DIMSE failure.

This is the hot path: it reads header tags only, never pixel data, and does no
FHIR or HTTP work. It sits between the association (which owns the network) and
the store/index (which own the disk).
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

from scp.header import HeaderError, read_header
from scp.index import Index
from scp.records import Provenance, StoredInstance
from scp.store import Store

log = logging.getLogger("scp.ingest")

# C-STORE failure statuses (PS3.4 Annex B.2.3)
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110

_RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.ENOMEM}


class Rejected(Exception):
    """The instance was not stored; ``status`` and ``comment`` go back to the sender."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


@dataclass(frozen=True, slots=True)
class Accepted:
    """A stored instance and every study whose content it changed."""

    instance: StoredInstance
    touched_studies: tuple[str, ...]


class Ingest:
    """Turns a fully received dataset file into a stored, indexed instance."""

    def __init__(self, store: Store, index: Index) -> None:
        self.store = store
        self.index = index

    def accept(self, temp_path: str | os.PathLike[str], *, sop_instance_uid: str | None,
               sop_class_uid: str | None, provenance: Provenance) -> Accepted:
        """Store the dataset at ``temp_path`` (a Part-10 file in the store's tmp dir).

        ``sop_instance_uid`` / ``sop_class_uid`` are the C-STORE request's
        Affected SOP Instance/Class UIDs; the dataset must agree with the first.
        Raises :class:`Rejected` with the DIMSE status to answer.
        """
        try:
            header = read_header(temp_path)
        except HeaderError as exc:
            raise Rejected(CANNOT_UNDERSTAND, str(exc)) from exc
        if sop_instance_uid is not None and header.sop_uid != str(sop_instance_uid).rstrip("\x00 "):
            raise Rejected(CANNOT_UNDERSTAND,
                           "dataset SOP Instance UID differs from the C-STORE request's")
        if sop_class_uid is not None and header.sop_class_uid != str(sop_class_uid).rstrip("\x00 "):
            raise Rejected(DATASET_DOES_NOT_MATCH_SOP_CLASS,
                           "dataset SOP Class UID differs from the C-STORE request's")
        try:
            relative, size = self.store.commit(temp_path, header)
        except OSError as exc:
            if exc.errno in _RESOURCE_ERRNOS:
                raise Rejected(OUT_OF_RESOURCES, f"cannot store: {os.strerror(exc.errno or 0)}") from exc
            raise
        stored = StoredInstance(header=header, path=relative, size=size, provenance=provenance)
        replaced = self.index.put(stored)
        touched = [header.study_uid]
        if replaced is not None:
            if replaced.path != relative:
                self.store.remove(replaced.path)
            if replaced.study_uid != header.study_uid:
                log.warning("SOP Instance %s moved from study %s to %s", header.sop_uid,
                            replaced.study_uid, header.study_uid)
                touched.append(replaced.study_uid)
        return Accepted(stored, tuple(touched))
