"""Make the index agree with the stored files: at start-up (after a crash) and on ``reindex``.

The files under ``studies/`` are the truth. A file without a row is indexed
from its header; a row without a file is dropped. Provenance that only the
index knew (AE titles, peer, association) is kept for files it still matches.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

from scp.header import HeaderError, read_header
from scp.index import Index
from scp.records import Provenance, StoredInstance
from scp.store import Store

log = logging.getLogger("scp.reconcile")


def reconcile(store: Store, index: Index) -> list[str]:
    """Index unindexed files, drop rows of missing files; returns the studies that changed."""
    indexed = index.paths()
    on_disk = set(store.stored_files())
    changed: set[str] = set()
    for relative in sorted(on_disk - indexed.keys()):
        stored = _from_file(store, relative, None)
        if stored is not None:
            index.put(stored)
            changed.add(stored.header.study_uid)
            log.info("indexed %s, stored before the last stop but not in the index", relative)
    missing = sorted(indexed.keys() - on_disk)
    if missing:
        changed.update(index.remove_paths(missing))
        log.warning("%d index rows had no file and were removed", len(missing))
    return sorted(changed)


def reindex(store: Store, index: Index) -> int:
    """Rebuild every instance row from the stored files; returns the number of rows."""
    previous = {i.path: i for i in index.all_instances()}
    return index.replace_all(_all_from_files(store, previous))


def _all_from_files(store: Store, previous: dict[str, StoredInstance]) -> Iterator[StoredInstance]:
    for relative in store.stored_files():
        stored = _from_file(store, relative, previous.get(relative))
        if stored is not None:
            yield stored


def _from_file(store: Store, relative: str, known: StoredInstance | None) -> StoredInstance | None:
    path = store.absolute(relative)
    try:
        header = read_header(path)
        stat = os.stat(path)
    except (HeaderError, OSError) as exc:
        log.error("cannot index %s: %s", relative, exc)
        return None
    if known is not None and known.size == stat.st_size:
        provenance = known.provenance
    else:
        provenance = Provenance(None, None, None, None, received_at=stat.st_mtime)
    return StoredInstance(header=header, path=relative, size=stat.st_size, provenance=provenance)
