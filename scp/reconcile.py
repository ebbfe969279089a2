"""Make the index agree with the stored files: at start-up (after a crash) and on ``reindex``.

The files under ``studies/`` are the truth. A file without a row is indexed from its header; a row without a
file is dropped; a file that changed since its row was written (another size, or written clearly after the
row's receive time: a replacement renamed in just before a crash) is indexed again. Two files holding one SOP
Instance UID (a replacement in another study interrupted between placing the new copy and removing the old)
are resolved as the replacement would have been: the newer file stays, the older one is removed. Provenance
that only the index knew (AE titles, peer, association) is kept for files it still matches.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

from scp.header import HeaderError, read_header
from scp.index import Index
from scp.records import Provenance, StoredInstance
from scp.store import Store, StoredFileState

log = logging.getLogger("scp.reconcile")

# A file counts as written after its row only this much later: a row's receive time is taken after its file
# was written, but a file server's clock may run ahead of ours (re-reading every file each start would
# republish every study and drop its provenance).
MTIME_SLACK = 5.0


class StoreLooksEmpty(RuntimeError):
    """``studies/`` holds no instance although the index lists some: storage not mounted, or the wrong data dir."""


def reconcile(store: Store, index: Index) -> list[str]:
    """Index new or changed files, resolve two copies of one instance, drop rows of missing files.

    Returns the studies whose content changed. Raises :class:`StoreLooksEmpty`, changing nothing, when every
    indexed file is missing: dropping every row would withdraw every published study from every sink, which
    an unmounted volume must not do (``reindex`` accepts such a loss explicitly).
    """
    indexed = index.paths()
    changed: set[str] = set()
    on_disk: set[str] = set()
    for state in store.stored_file_states():
        on_disk.add(state.path)
        row = indexed.get(state.path)
        if row is not None and row[0] == state.size and state.mtime <= row[1] + MTIME_SLACK:
            continue  # the file the row describes
        stored = _from_file(store, state, None)
        if stored is None or not _keep_newest(store, index, stored, state, changed):
            continue
        index.put(stored)
        changed.add(stored.header.study_uid)
        log.info("indexed %s, %s", state.path,
                 "stored before the last stop but not in the index" if row is None else "changed since indexed")
    if indexed and not on_disk:
        raise StoreLooksEmpty(
            f"{store.studies_dir} holds no instance but the index lists {len(indexed)}: is the storage mounted? "
            "If the files are really gone, `imagingstudy-scp reindex` makes the index agree (the next start then "
            "withdraws their ImagingStudy resources)")
    missing = sorted(indexed.keys() - on_disk)
    if missing:
        changed.update(index.remove_paths(missing))
        log.warning("%d index rows had no file and were removed", len(missing))
    return sorted(changed)


def _keep_newest(store: Store, index: Index, stored: StoredInstance, state: StoredFileState,
                 changed: set[str]) -> bool:
    """When the index holds the same SOP Instance at another path whose file exists, keep the newer file and
    remove the other; True when ``stored`` is the one to index."""
    current = index.get(stored.header.sop_uid)
    if current is None or current.path == state.path:
        return True
    other = store.file_state(current.path)
    if other is None:
        return True  # its row is dropped with the missing files, or replaced by this one now
    if other.mtime >= state.mtime:  # a tie (one clock tick, coarse timestamps) keeps the indexed copy
        _remove_older_copy(store, state.path, current.path)
        return False
    _remove_older_copy(store, current.path, state.path)
    changed.add(current.header.study_uid)
    return True


def _remove_older_copy(store: Store, older: str, newer: str) -> None:
    log.warning("%s and %s hold the same SOP Instance; the older copy %s is removed", older, newer, older)
    try:
        store.remove(older)
    except OSError as exc:
        log.error("cannot remove %s: %s", older, exc)


def reindex(store: Store, index: Index) -> int:
    """Rebuild every instance row from the stored files; returns the number of rows."""
    previous = {i.path: i for i in index.all_instances()}
    return index.replace_all(_all_from_files(store, previous))


def _all_from_files(store: Store, previous: dict[str, StoredInstance]) -> Iterator[StoredInstance]:
    """One instance per stored file; of two files with one SOP Instance UID, the newer is indexed and the
    older removed (yielded later, the newer replaces the older's row)."""
    newest: dict[str, StoredFileState] = {}
    for state in store.stored_file_states():
        stored = _from_file(store, state, previous.get(state.path))
        if stored is None:
            continue
        sop = stored.header.sop_uid
        seen = newest.get(sop)
        if seen is not None:
            if seen.mtime > state.mtime or (seen.mtime == state.mtime and state.path not in previous):
                _remove_older_copy(store, state.path, seen.path)  # a tie keeps the copy the index had
                continue
            _remove_older_copy(store, seen.path, state.path)
        newest[sop] = state
        yield stored


def _from_file(store: Store, state: StoredFileState, known: StoredInstance | None) -> StoredInstance | None:
    """The instance a stored file holds; ``known`` (its earlier row) lends its provenance if the size matches."""
    path = os.path.join(store.data_dir, state.path)
    try:
        header = read_header(path)
    except (HeaderError, OSError) as exc:
        log.error("cannot index %s: %s", state.path, exc)
        return None
    if known is not None and known.size == state.size:
        provenance = known.provenance
    else:
        provenance = Provenance(None, None, None, None, received_at=state.mtime)
    return StoredInstance(header=header, path=state.path, size=state.size, provenance=provenance)
