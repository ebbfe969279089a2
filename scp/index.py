"""The study index: one SQLite row per stored instance, with a memory cache of studies.

SQLite (WAL) is the source the mapping reads from and survives restarts; the
stored files remain the ultimate truth (``reindex`` and start-up reconciliation
rebuild rows from them). The memory part caches the instance list of recently
touched studies so that assembling a large study on release does not re-read
and re-parse every row; a cached study is used only while its row count and
newest rowid still match SQLite, so a writer in another process cannot make it
stale.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from scp.records import InstanceHeader, Provenance, StoredInstance

INDEX_FILE = "index.sqlite3"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    attributes TEXT NOT NULL,  -- JSON: keyword → decoded DICOM value(s)
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    calling_aet TEXT,
    called_aet TEXT,
    peer TEXT,
    association_id TEXT,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_study ON instances (study_uid, received_at);
CREATE TABLE IF NOT EXISTS publications (
    study_uid TEXT PRIMARY KEY,
    instance_count INTEGER NOT NULL,
    last_received_at REAL NOT NULL,
    published_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_COLUMNS = (
    "sop_uid, study_uid, series_uid, sop_class_uid, transfer_syntax_uid, attributes, path, size, "
    "calling_aet, called_aet, peer, association_id, received_at"
)


@dataclass(frozen=True, slots=True)
class Replaced:
    """What an insert displaced: the previous row for the same SOP Instance UID."""

    study_uid: str
    path: str


@dataclass(frozen=True, slots=True)
class StudySummary:
    """One line of the study list."""

    study_uid: str
    instances: int
    series: int
    last_received_at: float
    published_at: float | None
    published_up_to: float | None  # received_at of the newest instance the last publication covered
    patient_id: str | None
    modalities: list[str]

    @property
    def publication_state(self) -> str:
        if self.published_at is None:
            return "pending"
        return "published" if (self.published_up_to or 0) >= self.last_received_at else "outdated"


class Index:
    """SQLite-backed instance index, safe to use from several threads."""

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL", cache_instances: int = 20_000) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = self._connect(synchronous)
        self._cache: OrderedDict[str, tuple[tuple[int, int], list[StoredInstance]]] = OrderedDict()
        # ~3 KB of memory per cached instance (measured): 20,000 holds the largest studies (re-read at each
        # release anyway, a put drops its study) in ~60 MB; 200,000 grew a long-running server by ~600 MB
        self._cache_budget = cache_instances
        self._data_version = -1

    def _connect(self, synchronous: str) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.executescript(_SCHEMA)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        return db

    def ping(self) -> None:
        """Raise unless the database answers (readiness)."""
        with self._lock:
            self._db.execute("SELECT count(*) FROM meta").fetchone()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writing ---------------------------------------------------------------------------

    def put(self, stored: StoredInstance) -> Replaced | None:
        """Insert or replace the row of ``stored``; returns the row it replaced, if any."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                previous = self._db.execute(
                    "SELECT study_uid, path FROM instances WHERE sop_uid = ?", (stored.header.sop_uid,)
                ).fetchone()
                self._db.execute(f"INSERT OR REPLACE INTO instances ({_COLUMNS}) VALUES "
                                 "(?,?,?,?,?,?,?,?,?,?,?,?,?)", _row(stored))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
                    self._db.execute("ROLLBACK")
                raise
            self._cache.pop(stored.header.study_uid, None)
            if previous is not None:
                self._cache.pop(previous[0], None)
        return Replaced(previous[0], previous[1]) if previous else None

    def replace_all(self, instances: Iterable[StoredInstance]) -> int:
        """Replace every instance row by ``instances`` in one transaction (reindex); the rows there are now.

        A later instance with the SOP Instance UID of an earlier one replaces it.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM instances")
                for stored in instances:
                    self._db.execute(f"INSERT OR REPLACE INTO instances ({_COLUMNS}) VALUES "
                                     "(?,?,?,?,?,?,?,?,?,?,?,?,?)", _row(stored))
                count = int(self._db.execute("SELECT count(*) FROM instances").fetchone()[0])
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
                    self._db.execute("ROLLBACK")
                raise
            self._cache.clear()
        return count

    def remove_paths(self, paths: Iterable[str]) -> list[str]:
        """Drop the rows of files that are gone; returns the studies that lost instances."""
        studies: set[str] = set()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for path in paths:
                    row = self._db.execute("SELECT study_uid FROM instances WHERE path = ?", (path,)).fetchone()
                    if row:
                        studies.add(row[0])
                        self._db.execute("DELETE FROM instances WHERE path = ?", (path,))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
                    self._db.execute("ROLLBACK")
                raise
            for study in studies:
                self._cache.pop(study, None)
        return sorted(studies)

    def record_publication(self, study_uid: str, instance_count: int, last_received_at: float,
                           published_at: float) -> None:
        """Remember that the study was published as it stood at ``last_received_at``."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO publications VALUES (?,?,?,?)",
                (study_uid, instance_count, last_received_at, published_at),
            )

    # -- reading ---------------------------------------------------------------------------

    def study_instances(self, study_uid: str) -> list[StoredInstance]:
        """Every instance of the study, oldest first (the mapping lets later values win)."""
        with self._lock:
            self._forget_if_changed_elsewhere()
            state = self._db.execute(
                "SELECT count(*), coalesce(max(rowid), 0) FROM instances WHERE study_uid = ?", (study_uid,)
            ).fetchone()
            cached = self._cache.get(study_uid)
            if cached is not None and cached[0] == tuple(state):
                self._cache.move_to_end(study_uid)
                return list(cached[1])
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM instances WHERE study_uid = ? ORDER BY received_at, rowid",
                (study_uid,),
            ).fetchall()
            instances = [_stored(row) for row in rows]
            self._remember(study_uid, (state[0], state[1]), instances)
        return list(instances)

    def study_state(self, study_uid: str) -> tuple[int, float] | None:
        """The study's instance count and when its latest instance arrived; None when it has none.

        What start-up recovery compares with the outbox, without reading every row of the study.
        """
        with self._lock:
            count, up_to = self._db.execute(
                "SELECT count(*), max(received_at) FROM instances WHERE study_uid = ?", (study_uid,)
            ).fetchone()
        return (count, up_to) if count else None

    def get(self, sop_uid: str) -> StoredInstance | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone()
        return _stored(row) if row else None

    def all_instances(self) -> list[StoredInstance]:
        """Every row in a stable order (sop UID), for comparisons and reindex checks."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM instances ORDER BY sop_uid").fetchall()
        return [_stored(row) for row in rows]

    def paths(self) -> dict[str, tuple[int, float]]:
        """Stored path → (size, received at) of every row (start-up reconciliation)."""
        with self._lock:
            return {path: (size, received_at) for path, size, received_at
                    in self._db.execute("SELECT path, size, received_at FROM instances")}

    def studies(self) -> list[StudySummary]:
        """One summary per study, oldest activity first (the latest Patient ID wins, like the mapping)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT i.study_uid, count(*), count(DISTINCT i.series_uid), max(i.received_at), "
                "p.published_at, p.last_received_at, "
                "(SELECT json_extract(j.attributes, '$.PatientID') FROM instances j WHERE j.study_uid = i.study_uid "
                " AND json_extract(j.attributes, '$.PatientID') IS NOT NULL ORDER BY j.received_at DESC LIMIT 1), "
                "(SELECT group_concat(m, '/') FROM (SELECT DISTINCT json_extract(k.attributes, '$.Modality') AS m "
                " FROM instances k WHERE k.study_uid = i.study_uid AND m IS NOT NULL ORDER BY m)) "
                "FROM instances i LEFT JOIN publications p ON p.study_uid = i.study_uid "
                "GROUP BY i.study_uid ORDER BY max(i.received_at)"
            ).fetchall()
        return [StudySummary(study_uid=r[0], instances=r[1], series=r[2], last_received_at=r[3],
                             published_at=r[4], published_up_to=r[5], patient_id=r[6],
                             modalities=r[7].split("/") if r[7] else []) for r in rows]

    def unpublished_studies(self) -> list[str]:
        """Studies with instances received after (or never covered by) their last publication."""
        with self._lock:
            rows = self._db.execute(
                "SELECT i.study_uid FROM instances i LEFT JOIN publications p ON p.study_uid = i.study_uid "
                "GROUP BY i.study_uid "
                "HAVING p.study_uid IS NULL OR max(i.received_at) > p.last_received_at "
                "OR count(*) != p.instance_count ORDER BY max(i.received_at)"
            ).fetchall()
        return [row[0] for row in rows]

    def _forget_if_changed_elsewhere(self) -> None:
        """Drop the cache when another connection (a ``reindex`` in another process) committed since the last
        look: rewritten rows can keep a study's count and largest rowid, which is all the cache checks."""
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:
            self._cache.clear()
            self._data_version = version

    def _remember(self, study_uid: str, state: tuple[int, int], instances: list[StoredInstance]) -> None:
        if len(instances) > self._cache_budget:
            return
        self._cache[study_uid] = (state, instances)
        total = sum(len(v[1]) for v in self._cache.values())
        while total > self._cache_budget and self._cache:
            _, (_, dropped) = self._cache.popitem(last=False)
            total -= len(dropped)


def _row(stored: StoredInstance) -> tuple[Any, ...]:
    header, prov = stored.header, stored.provenance
    return (
        header.sop_uid, header.study_uid, header.series_uid, header.sop_class_uid,
        header.transfer_syntax_uid, orjson.dumps(dict(header.attributes)).decode(), stored.path, stored.size,
        prov.calling_aet, prov.called_aet, prov.peer, prov.association_id, prov.received_at,
    )


def _stored(row: tuple[Any, ...]) -> StoredInstance:
    header = InstanceHeader(
        sop_uid=row[0], study_uid=row[1], series_uid=row[2], sop_class_uid=row[3],
        transfer_syntax_uid=row[4], attributes=orjson.loads(row[5]),
    )
    provenance = Provenance(calling_aet=row[8], called_aet=row[9], peer=row[10],
                            association_id=row[11], received_at=row[12])
    return StoredInstance(header=header, path=row[6], size=row[7], provenance=provenance)
