"""The durable outbox between assembly and the sinks: one row per (sink, study), in SQLite.

A study is recorded here, for every sink, as soon as the association that touched it ends;
the publisher's workers deliver what is due and record what happened. The row is the study's
delivery state for that sink:

``pending``
    to be delivered (again). Submitting a study that is already pending does not add a row: it
    bumps the row's ``revision``, so pending revisions of a study collapse into the latest (a
    worker always assembles what the index holds when the study's turn comes). A delivery that
    fails with a retryable error stays pending with ``next_attempt_at`` pushed back
    (exponential backoff with jitter, capped), for as long as it takes.
``delivered``
    the sink accepted the study as it stood at ``delivered_count`` instances, newest received at
    ``delivered_up_to`` (the index's own notion of "covered"). ``delivered_count`` 0 means the
    study was *withdrawn*: it had no stored instances any more (its last instance moved to another
    study, or its files were removed), and the sink was told to drop what it held, which it did;
    ``delivered_up_to`` is then when the study was seen empty, so that an older delivery made
    beside the workers (``publish``) cannot be recorded over the withdrawal (:meth:`Outbox.record_direct`).
``dead``
    the sink refused it for good (a non-retryable answer, or a resource that failed our own
    validation); ``last_error`` and ``outcome`` (the server's OperationOutcome) say why. Dead
    items wait for ``imagingstudy-scp outbox retry`` or for new content of the study. A dead item
    with ``tried_count`` 0 is a withdrawal the sink refused.

The file is ``<data-dir>/outbox.sqlite3`` (WAL): the server, ``outbox`` and ``publish`` may use
it at the same time from different processes; the server's workers poll it, so a retry asked for
by the command line is picked up within a second.
"""

from __future__ import annotations

import random
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OUTBOX_FILE = "outbox.sqlite3"

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    sink TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'dead')),
    revision INTEGER NOT NULL,          -- bumped by every submission of the study
    queued_at REAL,                     -- when the row last became pending (wall clock)
    ended_at REAL,                      -- earliest association end not yet delivered (latency)
    last_ended_at REAL,                 -- latest association end not yet delivered
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    last_status INTEGER,
    outcome TEXT,                       -- the server's OperationOutcome (JSON) of the last failure
    tried_count INTEGER,                -- the study as last attempted: instances, newest received_at
    tried_up_to REAL,
    delivered_count INTEGER,            -- the study as last delivered
    delivered_up_to REAL,
    delivered_at REAL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (sink, study_uid)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, sink, next_attempt_at);
"""

_COLUMNS = ("sink, study_uid, state, revision, queued_at, ended_at, last_ended_at, attempts, next_attempt_at, "
            "last_error, last_status, outcome, tried_count, tried_up_to, delivered_count, delivered_up_to, "
            "delivered_at, updated_at")


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One (sink, study) row."""

    sink: str
    study_uid: str
    state: str
    revision: int
    queued_at: float | None
    ended_at: float | None
    last_ended_at: float | None
    attempts: int
    next_attempt_at: float
    last_error: str | None
    last_status: int | None
    outcome: str | None
    tried_count: int | None
    tried_up_to: float | None
    delivered_count: int | None
    delivered_up_to: float | None
    delivered_at: float | None
    updated_at: float


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: attempt n waits between half and all of min(cap, initial·2ⁿ⁻¹)."""

    initial: float = 1.0
    cap: float = 300.0

    def delay(self, attempts: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (1 = the first)."""
        ceiling = min(self.cap, self.initial * 2 ** max(0, min(attempts - 1, 60)))
        delay = random.uniform(ceiling / 2, ceiling)
        if retry_after is not None:  # the server asked for more (429/503 Retry-After): honour it, within an hour
            delay = max(delay, min(retry_after, 3600.0))
        return delay


class Outbox:
    """The outbox table; safe to use from several threads (one connection, one lock)."""

    def __init__(self, path: str | Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed row survives a power cut, not only a crash (the outbox is small and rarely written).
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- submitting ------------------------------------------------------------------------

    def submit(self, sinks: Iterable[str], study_uids: Iterable[str], *, ended_at: float | None = None,
               now: float | None = None) -> None:
        """Record that the studies have to be delivered (again) to every sink, whatever their state."""
        now = time.time() if now is None else now
        pairs = [(sink, uid) for uid in dict.fromkeys(study_uids) for sink in sinks]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sink, uid in pairs:
                    self._submit(sink, uid, ended_at, now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _submit(self, sink: str, uid: str, ended_at: float | None, now: float) -> None:
        row = self._db.execute("SELECT state FROM outbox WHERE sink = ? AND study_uid = ?", (sink, uid)).fetchone()
        if row is None:
            self._db.execute(
                "INSERT INTO outbox (sink, study_uid, state, revision, queued_at, ended_at, last_ended_at, "
                "attempts, next_attempt_at, updated_at) VALUES (?, ?, 'pending', 1, ?, ?, ?, 0, ?, ?)",
                (sink, uid, now, ended_at, ended_at, now, now))
        elif row[0] == PENDING:
            # Collapse into the pending row: a newer revision, the same place in the backoff schedule.
            self._db.execute(
                "UPDATE outbox SET revision = revision + 1, ended_at = coalesce(ended_at, ?), "
                "last_ended_at = coalesce(?, last_ended_at), updated_at = ? WHERE sink = ? AND study_uid = ?",
                (ended_at, ended_at, now, sink, uid))
        else:
            self._db.execute(
                "UPDATE outbox SET state = 'pending', revision = revision + 1, queued_at = ?, ended_at = ?, "
                "last_ended_at = ?, attempts = 0, next_attempt_at = ?, updated_at = ? "
                "WHERE sink = ? AND study_uid = ?",
                (now, ended_at, ended_at, now, now, sink, uid))

    def submit_uncovered(self, sink: str, study_uid: str, count: int, up_to: float,
                         now: float | None = None, *, if_known: bool = False) -> bool:
        """Queue the study for ``sink`` unless the sink already has it as the index holds it now.

        Start-up recovery: a study delivered at this state is left alone, a pending one stays
        pending (it will be assembled afresh anyway), and a dead one stays dead while its
        content is what the sink refused (``outbox retry`` revives it). For a study without
        instances (``count`` 0, ``up_to`` 0) that means: withdrawn, or its withdrawal refused.
        ``if_known``: a sink with no row for the study is left alone (it was never given it, so
        there is nothing to withdraw). True when queued.
        """
        now = time.time() if now is None else now
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT state, delivered_count, delivered_up_to, tried_count, tried_up_to FROM outbox "
                    "WHERE sink = ? AND study_uid = ?", (sink, study_uid)).fetchone()
                covered = (if_known if row is None else (
                    row[0] == PENDING
                    or (row[0] == DELIVERED and row[1] == count and (row[2] or 0) >= up_to)
                    or (row[0] == DEAD and row[3] == count and (row[4] or 0) >= up_to)))
                if not covered:
                    self._submit(sink, study_uid, None, now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return not covered

    def retry(self, study_uid: str | None = None, sink: str | None = None, now: float | None = None) -> int:
        """Dead items back to pending and pending ones due now, with a fresh backoff; how many."""
        now = time.time() if now is None else now
        where, args = ["state IN ('pending', 'dead')"], []
        if study_uid is not None:
            where.append("study_uid = ?")
            args.append(study_uid)
        if sink is not None:
            where.append("sink = ?")
            args.append(sink)
        with self._lock:
            cursor = self._db.execute(
                "UPDATE outbox SET queued_at = CASE WHEN state = 'dead' THEN ? ELSE queued_at END, "
                "state = 'pending', revision = revision + 1, attempts = 0, next_attempt_at = ?, updated_at = ? "
                f"WHERE {' AND '.join(where)}", (now, now, now, *args))
            return cursor.rowcount

    def resume(self, sinks: Sequence[str], now: float | None = None) -> int:
        """At start: every pending item of ``sinks`` is due now (the backoff restarts, attempts are kept)."""
        now = time.time() if now is None else now
        marks = ",".join("?" * len(sinks))
        with self._lock:
            return self._db.execute(
                f"UPDATE outbox SET next_attempt_at = ? WHERE state = 'pending' AND sink IN ({marks}) "
                "AND next_attempt_at > ?", (now, *sinks, now)).rowcount

    # -- delivering ------------------------------------------------------------------------

    def next_due(self, sink: str, now: float | None = None) -> tuple[OutboxItem | None, float | None]:
        """The pending item of ``sink`` due first if it is due, else None and when the next one is."""
        now = time.time() if now is None else now
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE state = 'pending' AND sink = ? "
                "ORDER BY next_attempt_at, queued_at LIMIT 1", (sink,)).fetchone()
        if row is None:
            return None, None
        item = OutboxItem(*row)
        return (item, None) if item.next_attempt_at <= now else (None, item.next_attempt_at)

    def delivered(self, item: OutboxItem, count: int, up_to: float, now: float | None = None) -> bool:
        """The sink accepted ``item`` (the study at ``count``/``up_to``). False when a newer revision
        arrived meanwhile: the row then stays pending, due now, for that revision."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "UPDATE outbox SET state = CASE WHEN revision = ? THEN 'delivered' ELSE 'pending' END, "
                "ended_at = CASE WHEN revision = ? THEN NULL ELSE last_ended_at END, "
                "last_ended_at = CASE WHEN revision = ? THEN NULL ELSE last_ended_at END, "
                "queued_at = CASE WHEN revision = ? THEN NULL ELSE ? END, "
                "attempts = 0, next_attempt_at = ?, last_error = NULL, last_status = NULL, outcome = NULL, "
                "tried_count = ?, tried_up_to = ?, delivered_count = ?, delivered_up_to = ?, delivered_at = ?, "
                "updated_at = ? WHERE sink = ? AND study_uid = ? RETURNING state",
                (item.revision, item.revision, item.revision, item.revision, now, now, count, up_to, count, up_to,
                 now, now, item.sink, item.study_uid)).fetchall()
        return bool(rows) and rows[0][0] == DELIVERED

    def failed(self, item: OutboxItem, *, delay: float, error: str, status: int | None = None,
               outcome: str | None = None, count: int | None = None, up_to: float | None = None,
               now: float | None = None) -> int:
        """A retryable failure: try again in ``delay`` seconds, or now when a newer revision arrived meanwhile
        (new content, ``outbox retry``: it gets its own attempt, as with :meth:`delivered` and :meth:`dead`).
        Returns the attempts made so far."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "UPDATE outbox SET attempts = attempts + 1, "
                "next_attempt_at = CASE WHEN revision = ? THEN ? ELSE ? END, last_error = ?, last_status = ?, "
                "outcome = ?, tried_count = coalesce(?, tried_count), tried_up_to = coalesce(?, tried_up_to), "
                "updated_at = ? WHERE sink = ? AND study_uid = ? AND state = 'pending' RETURNING attempts",
                (item.revision, now + delay, now, error, status, outcome, count, up_to, now, item.sink,
                 item.study_uid)).fetchall()
            if not rows:  # no longer pending (e.g. delivered meanwhile by `publish`): report as it stands
                rows = self._db.execute("SELECT attempts FROM outbox WHERE sink = ? AND study_uid = ?",
                                       (item.sink, item.study_uid)).fetchall()
        return int(rows[0][0]) if rows else 0

    def dead(self, item: OutboxItem, *, error: str, status: int | None = None, outcome: str | None = None,
             count: int | None = None, up_to: float | None = None, now: float | None = None) -> bool:
        """A non-retryable failure: dead-letter the item, unless a newer revision arrived meanwhile
        (that one gets its own attempt, now). True when the item is dead."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "UPDATE outbox SET state = CASE WHEN revision = ? THEN 'dead' ELSE 'pending' END, "
                "attempts = attempts + 1, next_attempt_at = ?, last_error = ?, last_status = ?, outcome = ?, "
                "tried_count = ?, tried_up_to = ?, updated_at = ? WHERE sink = ? AND study_uid = ? RETURNING state",
                (item.revision, now, error, status, outcome, count, up_to, now, item.sink, item.study_uid)).fetchall()
        return bool(rows) and rows[0][0] == DEAD

    def record_direct(self, sink: str, study_uid: str, count: int, up_to: float, now: float | None = None) -> bool:
        """A delivery made outside the workers (``publish``) of the study at ``count``/``up_to``.

        ``publish`` runs beside the server's workers (another process), so its request may land
        on the sink after a worker's newer one. Its delivery is recorded only when nothing newer
        can be there: with no row, or a row that is not pending and records no other delivery
        at least as new. Otherwise the recorded delivery is left as it is and the study is queued
        again (a new revision, due now; an attempt in flight then does not count either), so
        the newest content is what the sink is sent last. True when recorded as delivered.
        """
        now = time.time() if now is None else now
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT state, delivered_count, delivered_up_to FROM outbox "
                                       "WHERE sink = ? AND study_uid = ?", (sink, study_uid)).fetchone()
                recorded = row is None or not (row[0] == PENDING or _not_older(row[1], row[2], count, up_to))
                if recorded:
                    self._record_direct(sink, study_uid, count, up_to, now)
                else:
                    self._requeue_now(sink, study_uid, now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return recorded

    def _record_direct(self, sink: str, study_uid: str, count: int, up_to: float, now: float) -> None:
        self._db.execute(
            "INSERT INTO outbox (sink, study_uid, state, revision, attempts, next_attempt_at, tried_count, "
            "tried_up_to, delivered_count, delivered_up_to, delivered_at, updated_at) "
            "VALUES (?, ?, 'delivered', 1, 0, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (sink, study_uid) DO UPDATE SET state = 'delivered', attempts = 0, last_error = NULL, "
            "last_status = NULL, outcome = NULL, tried_count = excluded.tried_count, "
            "tried_up_to = excluded.tried_up_to, delivered_count = excluded.delivered_count, "
            "delivered_up_to = excluded.delivered_up_to, delivered_at = excluded.delivered_at, "
            "updated_at = excluded.updated_at",
            (sink, study_uid, now, count, up_to, count, up_to, now, now))

    def _requeue_now(self, sink: str, study_uid: str, now: float) -> None:
        """A new pending revision of an existing row, due now (a pending row keeps its place and latency)."""
        self._db.execute(
            "UPDATE outbox SET revision = revision + 1, next_attempt_at = ?, updated_at = ?, "
            "queued_at = CASE WHEN state = 'pending' THEN queued_at ELSE ? END, "
            "attempts = CASE WHEN state = 'pending' THEN attempts ELSE 0 END, state = 'pending' "
            "WHERE sink = ? AND study_uid = ?", (now, now, now, sink, study_uid))

    # -- reading ---------------------------------------------------------------------------

    def fully_delivered(self, sinks: Sequence[str], study_uid: str, count: int, up_to: float) -> bool:
        """Whether every sink has delivered the study exactly as the index holds it now."""
        marks = ",".join("?" * len(sinks))
        with self._lock:
            rows = self._db.execute(
                f"SELECT state, delivered_count, delivered_up_to FROM outbox WHERE study_uid = ? "
                f"AND sink IN ({marks})", (study_uid, *sinks)).fetchall()
        return len(rows) == len(sinks) and all(
            r[0] == DELIVERED and r[1] == count and r[2] is not None and r[2] >= up_to for r in rows)

    def unknown_to(self, sink: str) -> list[str]:
        """Studies with a row for some other sink but none for ``sink``: it has never been given them.

        Every study an association touched gets a row for every sink configured then (the directory
        always among them), and rows are kept once delivered; so for a sink added to an existing data
        dir (or configured again after a while without it) these are the studies it missed.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT study_uid FROM outbox WHERE sink != ? AND study_uid NOT IN "
                "(SELECT study_uid FROM outbox WHERE sink = ?) ORDER BY study_uid", (sink, sink)).fetchall()
        return [row[0] for row in rows]

    def held(self, sinks: Sequence[str]) -> list[str]:
        """Studies some of ``sinks`` may hold content of, as far as the outbox knows: delivered with
        instances, or dead after a refused publication (an earlier delivery may be there).

        Start-up compares these with the index: one that has no stored instances any more (its last
        instance moved, and the server died before the association's end queued the old study) must
        be withdrawn. Pending rows are left out: the workers look at them anyway.
        """
        marks = ",".join("?" * len(sinks))
        with self._lock:
            rows = self._db.execute(
                f"SELECT DISTINCT study_uid FROM outbox WHERE sink IN ({marks}) AND "
                "((state = 'delivered' AND delivered_count > 0) OR (state = 'dead' AND coalesce(tried_count, 1) != 0))"
                " ORDER BY study_uid", tuple(sinks)).fetchall()
        return [row[0] for row in rows]

    def known(self, study_uid: str) -> bool:
        """Whether any sink has a row for the study (it was submitted, delivered or withdrawn once)."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM outbox WHERE study_uid = ? LIMIT 1", (study_uid,)).fetchone() \
                is not None

    def get(self, sink: str, study_uid: str) -> OutboxItem | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM outbox WHERE sink = ? AND study_uid = ?",
                                   (sink, study_uid)).fetchone()
        return OutboxItem(*row) if row else None

    def items(self, states: Iterable[str] = (PENDING, DEAD), study_uid: str | None = None) -> list[OutboxItem]:
        """Rows in the given states, oldest first."""
        states = list(states)
        where = f"state IN ({','.join('?' * len(states))})"
        args: list[Any] = list(states)
        if study_uid is not None:
            where += " AND study_uid = ?"
            args.append(study_uid)
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM outbox WHERE {where} "
                                    "ORDER BY coalesce(queued_at, updated_at), sink", args).fetchall()
        return [OutboxItem(*row) for row in rows]

    def depth(self, sinks: Sequence[str]) -> int:
        """Studies waiting for at least one of ``sinks``."""
        marks = ",".join("?" * len(sinks))
        with self._lock:
            row = self._db.execute(f"SELECT count(DISTINCT study_uid) FROM outbox WHERE state = 'pending' "
                                   f"AND sink IN ({marks})", tuple(sinks)).fetchone()
        return int(row[0])

    def oldest_age(self, sinks: Sequence[str], now: float | None = None) -> float:
        """Seconds the longest-waiting pending item has waited (0 when none)."""
        now = time.time() if now is None else now
        marks = ",".join("?" * len(sinks))
        with self._lock:
            row = self._db.execute(f"SELECT min(queued_at) FROM outbox WHERE state = 'pending' "
                                   f"AND sink IN ({marks})", tuple(sinks)).fetchone()
        return max(0.0, now - row[0]) if row and row[0] is not None else 0.0

    def dead_count(self, sinks: Sequence[str]) -> int:
        marks = ",".join("?" * len(sinks))
        with self._lock:
            row = self._db.execute(f"SELECT count(*) FROM outbox WHERE state = 'dead' AND sink IN ({marks})",
                                   tuple(sinks)).fetchone()
        return int(row[0])


def _not_older(delivered_count: int | None, delivered_up_to: float | None, count: int, up_to: float) -> bool:
    """Whether a recorded delivery differs from ``count``/``up_to`` and is not older than it (it may be newer)."""
    if delivered_up_to is None:
        return False
    return (delivered_count, delivered_up_to) != (count, up_to) and delivered_up_to >= up_to


# -- the `outbox` command ------------------------------------------------------------------------

def print_outbox(data_dir: Path) -> int:
    """Print the pending and dead items of the data dir's outbox as a table."""
    import datetime as dt

    path = Path(data_dir) / OUTBOX_FILE
    if not path.exists():
        print("outbox is empty: nothing pending or dead")
        return 0
    outbox = Outbox(path)
    try:
        items = outbox.items()
    finally:
        outbox.close()
    if not items:
        print("outbox is empty: nothing pending or dead")
        return 0

    def when(stamp: float | None) -> str:
        return dt.datetime.fromtimestamp(stamp).astimezone().isoformat(timespec="seconds") if stamp else "-"

    header = ("STATE", "SINK", "STUDY INSTANCE UID", "ATTEMPTS", "WAITING SINCE", "NEXT ATTEMPT", "LAST ERROR")
    rows = [header] + [(
        item.state, item.sink, item.study_uid, str(item.attempts), when(item.queued_at or item.updated_at),
        when(item.next_attempt_at) if item.state == PENDING else "-",
        " ".join((item.last_error or "-").split())[:300]) for item in items]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    pending = sum(item.state == PENDING for item in items)
    print(f"{pending} pending, {len(items) - pending} dead")
    return 0


def retry_outbox(data_dir: Path, study_uid: str | None = None) -> int:
    """Re-queue dead items (and make pending ones due now), of every study or of one."""
    path = Path(data_dir) / OUTBOX_FILE
    if not path.exists():
        print("outbox is empty: nothing to retry")
        return 0 if study_uid is None else 1
    outbox = Outbox(path)
    try:
        count = outbox.retry(study_uid)
    finally:
        outbox.close()
    if study_uid is not None and count == 0:
        print(f"imagingstudy-scp: nothing pending or dead for study {study_uid}", file=sys.stderr)
        return 1
    print(f"re-queued {count} publication{'s' if count != 1 else ''}"
          " (a running server delivers them now; otherwise the next start does)")
    return 0
