"""The default sink: ``<data-dir>/fhir/ImagingStudy/<StudyInstanceUID>.json``, written atomically.

A study without stored instances is withdrawn by removing its file (the directory entry fsync'ed,
so a power cut does not bring it back).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import orjson

from scp.sinks.base import Delivery, DeliveryError, Publication
from scp.store import fsync_dir


_TEMP_NAME = ".{name}.{pid}.{thread}.tmp"  # a resource being written (write_json_atomically)


class DirectorySink:
    """Writes each ImagingStudy as one JSON file whose name is the resource id (the Study Instance UID)."""

    name = "directory"

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.folder = self.root / "ImagingStudy"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync

    def clean_leftovers(self) -> int:
        """Remove the temp files of writes a crash interrupted (only the server calls this, at start, holding the
        data dir: another process's write may be in flight otherwise). How many were removed."""
        removed = 0
        for temp in self.folder.glob(_TEMP_NAME.format(name="*.json", pid="*", thread="*")):
            temp.unlink(missing_ok=True)
            removed += 1
        return removed

    def path_for(self, study_uid: str) -> Path:
        return self.folder / f"{study_uid}.json"

    def publish(self, publication: Publication) -> Delivery:
        path = self.path_for(publication.study_uid)
        write_json_atomically(path, publication.resource, fsync=self._fsync)
        return Delivery(self.name, str(path))

    def withdraw(self, study_uid: str) -> Delivery:
        """Remove the study's file; one already gone is success (the sink holds nothing for the study)."""
        path = self.path_for(study_uid)
        try:
            path.unlink()
            removed = True
        except FileNotFoundError:
            removed = False
        except IsADirectoryError as exc:  # not ours to remove: trying again will not help
            raise DeliveryError(f"cannot remove {path}: {exc}", retryable=False) from None
        if self._fsync:  # also when gone: an earlier attempt may have removed it and died before the fsync
            fsync_dir(path.parent)
        return Delivery(self.name, f"removed {path}" if removed else f"{path} was not there",
                        fields={"removed": removed})


def write_json_atomically(path: Path, document: Any, *, fsync: bool = True) -> None:
    """Write ``document`` to ``path`` so that readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(_TEMP_NAME.format(name=path.name, pid=os.getpid(), thread=threading.get_ident()))
    data = orjson.dumps(document, option=orjson.OPT_INDENT_2)
    with open(temp, "wb") as handle:
        handle.write(data)
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(temp, path)
    if fsync:
        fsync_dir(path.parent)
