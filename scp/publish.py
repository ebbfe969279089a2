"""Assemble, validate and deliver ImagingStudy resources through the durable outbox, off the association threads.

When an association ends, every study it touched is recorded in the outbox (:mod:`scp.outbox`)
for every sink; one worker thread per sink delivers what is due, so a FHIR server that is down
or slow never holds back the directory sink (nor a sender). A worker assembles a study from what
the index holds when the study's turn comes, so pending revisions of a study collapse into the
latest. A failed delivery is retried with exponential backoff and jitter for as long as it takes;
a refusal that trying again cannot cure (or a resource that fails our own validation, which is a
bug, kept under ``rejected/``) dead-letters the item until ``imagingstudy-scp outbox retry``.

A study whose turn comes when it has no stored instances any more (its last instance was re-sent
into another study, or its files were removed and start-up dropped their rows) is *withdrawn*
from the sink instead (:meth:`Sink.withdraw`), through the same item, backoff and dead letters:
otherwise the sink would keep listing those instances, possibly in two studies at once. The
outbox then records the study as delivered with 0 instances, which the start-up checks read
as "nothing to do" (:meth:`Publisher.resume`, :meth:`Publisher.withdraw_emptied`).

Sinks may want different FHIR releases (the directory the configured one, a FHIR server its
own): the ImagingStudy of each release is built and validated at most once per study content,
whichever sinks and threads ask for it (:class:`_Assembler`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from scp import logs
from scp.fhir_version import FhirVersion
from scp.index import Index
from scp.mapping.imaging_study import MappingOptions, build_imaging_study
from scp.metrics import Metrics
from scp.outbox import OUTBOX_FILE, Backoff, Outbox, OutboxItem
from scp.records import StoredInstance
from scp.sinks.base import Delivery, DeliveryError, Publication, Sink
from scp.sinks.directory import write_json_atomically
from scp.validation import imaging_study_problems

log = logging.getLogger("scp.publish")

POLL_SECONDS = 1.0  # how often an idle worker looks at the outbox (retries asked for by another process)
DRAIN_SECONDS = 10.0  # at stop, how long workers go on delivering what is due


@dataclass(frozen=True)
class Outcome:
    """What happened to one study's publication."""

    study_uid: str
    published: bool  # every sink has the study as it stands (withdrawn ones: holds nothing of it)
    sinks: tuple[str, ...]
    problems: tuple[str, ...] = ()
    withdrawn: bool = False  # the study had no stored instances: the sinks were told to drop what they held


@dataclass(frozen=True)
class _Rejected:
    """A resource that failed validation (a bug): never sent."""

    version: FhirVersion
    problems: tuple[str, ...]


class _Slot:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.value: Publication | _Rejected | None = None


class _Assembler:
    """Builds and validates one release of one study's content once, for every sink that wants it."""

    def __init__(self, options: MappingOptions, rejected_dir: Path, size: int = 8) -> None:
        self._options = options
        self._rejected_dir = rejected_dir
        self._size = size
        self._lock = threading.Lock()
        self._slots: OrderedDict[tuple[Any, ...], _Slot] = OrderedDict()
        self.builds = 0  # how many times a resource was built (tests)

    def get(self, study_uid: str, version: FhirVersion, instances: Sequence[StoredInstance]) -> Publication | _Rejected:
        key = (study_uid, version, len(instances), max(i.provenance.received_at for i in instances),
               instances[-1].header.sop_uid)
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = _Slot()
                while len(self._slots) > self._size:
                    self._slots.popitem(last=False)
            else:
                self._slots.move_to_end(key)
        with slot.lock:
            if slot.value is None:
                slot.value = self._build(study_uid, version, instances)
            return slot.value

    def _build(self, study_uid: str, version: FhirVersion,
               instances: Sequence[StoredInstance]) -> Publication | _Rejected:
        self.builds += 1
        options = dataclasses.replace(self._options, version=version)
        mapped = build_imaging_study([i.header for i in instances], options)
        for warning in mapped.warnings:
            log.warning("%s", warning)
        problems = imaging_study_problems(mapped.resource, version)
        if problems:
            path = self._rejected_dir / f"{study_uid}.json"
            write_json_atomically(path, {"version": str(version), "problems": problems, "resource": mapped.resource})
            log.error("ImagingStudy for study %s is invalid (%s) and was not published; kept in %s: %s",
                      study_uid, version, path, "; ".join(problems))
            return _Rejected(version, tuple(problems))
        return Publication(study_uid, version, mapped.resource, tuple(instances))


class Publisher:
    """Turns study UIDs into published resources: the outbox, one worker per sink, the assembler."""

    def __init__(self, index: Index, sinks: Sequence[Sink], options: MappingOptions, rejected_dir: Path,
                 metrics: Metrics | None = None, *, outbox: Outbox | None = None, backoff: Backoff | None = None,
                 fsync: bool = True) -> None:
        names = [sink.name for sink in sinks]
        if len(set(names)) != len(names):
            raise ValueError(f"two sinks share a name: {names}")
        self._index = index
        self._sinks = list(sinks)
        self._names = names
        self._options = options
        self._metrics = metrics or Metrics()
        self._outbox = outbox or Outbox(Path(index.path).parent / OUTBOX_FILE, fsync=fsync)
        self._backoff = backoff or Backoff()
        self._assembler = _Assembler(options, rejected_dir)
        self._wake = {name: threading.Event() for name in names}
        self._failing: dict[str, int] = {name: 0 for name in names}  # consecutive sink-level failures
        self._paused_until: dict[str, float] = {}
        self._stopping = threading.Event()
        self._drain_until = 0.0
        self._threads: list[threading.Thread] = []
        self._busy = 0  # attempts whose bookkeeping is not finished yet (see wait_idle)
        self._busy_lock = threading.Lock()
        dead_gauge = getattr(self._metrics, "outbox_dead", None)
        if dead_gauge is not None:
            dead_gauge.set_function(lambda: float(self._outbox.dead_count(self._names)))

    @property
    def outbox(self) -> Outbox:
        return self._outbox

    @property
    def sinks(self) -> list[Sink]:
        return list(self._sinks)

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start one worker per sink; what was pending before the last stop is due at once, and a sink
        added since gets the stored studies it has never been given (see :meth:`backfill`)."""
        self._stopping.clear()
        resumed = self._outbox.resume(self._names)
        if resumed:
            log.info("outbox: %d pending deliveries resumed", resumed)
        self.backfill()
        self.withdraw_emptied()
        for sink in self._sinks:
            thread = threading.Thread(target=self._work, args=(sink,), name=f"publisher {sink.name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 15) -> None:
        """Deliver what is due for a few seconds more, then stop the workers; the rest stays in the outbox.

        A request still in flight after ``timeout`` is abandoned: its item stays pending and is
        delivered again at the next start (harmless: every delivery is idempotent)."""
        if not self._threads:
            return
        self._drain_until = time.monotonic() + min(DRAIN_SECONDS, timeout)
        self._stopping.set()
        for event in self._wake.values():
            event.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        self._threads = []
        if alive:
            log.warning("stopping with deliveries still in flight (%s); they stay in the outbox", ", ".join(alive))
            return
        self.close()

    def close(self) -> None:
        """Release the sinks' connections and the outbox (after :meth:`stop`, or when never started)."""
        for sink in self._sinks:
            close = getattr(sink, "close", None)
            if callable(close):
                close()
        self._outbox.close()

    # -- queueing ------------------------------------------------------------------------------

    def submit(self, study_uids: Iterable[str], ended_at: float | None = None) -> None:
        """Record the studies in the outbox for every sink; ``ended_at`` (monotonic) measures release→sink latency."""
        uids = list(study_uids)
        if not uids:
            return
        wall = time.time() - (time.monotonic() - ended_at) if ended_at is not None else None
        self._outbox.submit(self._names, uids, ended_at=wall)
        self._wake_all()

    def resume(self, study_uids: Iterable[str], changed: Iterable[str] = ()) -> None:
        """Start-up: queue the studies whose stored instances some sink has not received.

        ``changed`` studies (files the index had lost or that vanished) go to every sink again;
        for the others each sink is asked only if it has not delivered the study as it stands,
        and a dead item stays dead while its content is unchanged. A study with no stored
        instances is queued, for withdrawal, only for the sinks that may still hold it: one
        withdrawn already (delivered with 0 instances) is not withdrawn again at every start.
        """
        forced = set(changed)
        queued = 0
        for uid in study_uids:
            state = self._index.study_state(uid)
            if state is None:  # nothing stored (any more): withdrawn from each sink that may hold it
                queued += self._queue_withdrawal(uid)
                continue
            if uid in forced:
                self._outbox.submit(self._names, [uid])
                queued += 1
                continue
            count, up_to = state
            queued += sum(self._outbox.submit_uncovered(name, uid, count, up_to) for name in self._names)
            if self._outbox.fully_delivered(self._names, uid, count, up_to):
                self._index.record_publication(uid, count, up_to, time.time())
        if queued:
            self._wake_all()

    def backfill(self) -> int:
        """Queue, for each sink, the stored studies the outbox has rows for but none for that sink.

        A FHIR server added to an existing data dir has no row for the studies stored before, and
        the index's single "published" mark says nothing per sink: without this it would never get
        them. Only those studies are looked at (one outbox query per sink, then one cheap count per
        candidate), so a start with nothing missing costs one query per sink. How many were queued.
        """
        queued = 0
        for name in self._names:
            missing = [uid for uid in self._outbox.unknown_to(name) if self._index.study_state(uid) is not None]
            if missing:
                self._outbox.submit([name], missing)
                log.info("outbox: %d stored studies queued for %s, which has never been given them",
                         len(missing), name)
                queued += len(missing)
        if queued:
            self._wake_all()
        return queued

    def withdraw_emptied(self) -> int:
        """Queue for withdrawal the studies some sink holds though the index has no instances of them.

        The association that moved a study's last instance elsewhere queues the old study when it
        ends; a server that dies before that never does, and the index has no row left to say the
        study was there (its "unpublished" list only knows studies with instances). The outbox
        does: this looks at every study a sink holds (one outbox query, then one cheap count per
        study). How many withdrawals were queued.
        """
        queued = 0
        for uid in self._outbox.held(self._names):
            if self._index.study_state(uid) is None:
                queued += self._queue_withdrawal(uid)
        if queued:
            log.info("outbox: %d withdrawals queued of studies left without stored instances", queued)
            self._wake_all()
        return queued

    def _queue_withdrawal(self, uid: str) -> int:
        """Queue a study without instances for every sink that may hold it (not one that was never given it,
        nor one that withdrew it or refused to); how many sinks."""
        return sum(self._outbox.submit_uncovered(name, uid, *EMPTY, if_known=True) for name in self._names)

    def depth(self) -> int:
        """Studies waiting for at least one sink."""
        return self._outbox.depth(self._names)

    def oldest_age(self) -> float:
        """Seconds the longest-waiting study has waited (0 when none)."""
        return self._outbox.oldest_age(self._names)

    def wait_idle(self, timeout: float = 30) -> bool:
        """Block until nothing is pending for any sink and no attempt is mid-way (tests, tools); False on timeout.

        An item turns delivered in the outbox a moment before the index records the study as
        published; counting attempts in progress keeps callers from looking in between.
        """
        deadline = time.monotonic() + timeout
        while self.depth() or self._busy:  # this order: depth reaches 0 only while an attempt counts as busy
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    # -- delivering now (the `publish` command) --------------------------------------------------

    def publish_now(self, study_uid: str, ended_at: float | None = None) -> Outcome:
        """Assemble, validate and deliver one study on the calling thread, to every sink.

        A sink that fails gets the study queued in the outbox, so a running server (or the
        next start) retries it. Each sink is sent the study as the index holds it when that
        sink's turn comes. This may run beside a server's workers: when one of them delivered
        or has queued the study meanwhile, what this sent may have landed after newer content,
        so the outbox queues it again instead of recording it (:meth:`Outbox.record_direct`),
        and the index is told "published" only when every sink holds the study as it stands.

        A study without stored instances that the outbox knows is withdrawn from every sink (the
        same rules: a failure is queued); one it has never heard of (a mistyped UID) is left alone.
        """
        empty = self._index.study_state(study_uid) is None
        if empty and not self._outbox.known(study_uid):
            log.warning("study %s has no stored instances and was never published; nothing to publish", study_uid)
            return Outcome(study_uid, False, ())
        wall_end = time.time() - (time.monotonic() - ended_at) if ended_at is not None else None
        delivered: list[str] = []
        problems: list[str] = []
        states: list[tuple[int, float] | None] = []  # per sink delivered to: as recorded, None when queued again
        for sink in self._sinks:
            try:
                state = self._publish_direct(sink, study_uid, wall_end)
            except Exception as exc:
                problems.append(f"{sink.name}: {exc}")
                self._metrics.publications.labels(sink=sink.name, result="failed").inc()
                log.error("publication of study %s to %s failed: %s; queued in the outbox", study_uid, sink.name, exc)
                self._outbox.submit([sink.name], [study_uid])
                continue
            delivered.append(sink.name)
            states.append(state)
        recorded = {state for state in states if state is not None}
        if len(delivered) == len(self._sinks) and None not in states and len(recorded) == 1:
            count, up_to = recorded.pop()
            if (self._index.study_state(study_uid) or EMPTY) == (count, up_to):  # nothing newer stored meanwhile
                self._index.record_publication(study_uid, count, up_to, time.time())
        self._wake_all()
        return Outcome(study_uid, len(delivered) == len(self._sinks), tuple(delivered), tuple(problems), empty)

    def _publish_direct(self, sink: Sink, study_uid: str, wall_end: float | None) -> tuple[int, float] | None:
        """Deliver the study as it stands now to one sink (raises on failure); the state recorded as
        delivered (:data:`EMPTY` for a withdrawal), or None when the outbox queued the study again
        because newer content may be there."""
        seen = time.time()
        instances = self._index.study_instances(study_uid)
        if not instances:
            return self._withdraw_direct(sink, study_uid, seen, wall_end)
        count, up_to = len(instances), max(i.provenance.received_at for i in instances)
        publication = self._publication(sink, study_uid, instances)
        if isinstance(publication, _Rejected):
            raise DeliveryError("invalid ImagingStudy: " + "; ".join(publication.problems), retryable=False)
        delivery = sink.publish(publication)
        self._delivered_event(sink, publication, delivery, wall_end)
        if self._outbox.record_direct(sink.name, study_uid, count, up_to):
            return count, up_to
        log.info("study %s: %s was given newer content of it meanwhile, or has it queued: queued again, so that "
                 "the newest content is sent last", study_uid, sink.name)
        return None

    def _withdraw_direct(self, sink: Sink, study_uid: str, seen_empty: float,
                         wall_end: float | None) -> tuple[int, float] | None:
        """Withdraw a study without instances from one sink now (raises on failure); recorded like a delivery
        made beside the workers, with the time the study was seen empty as its "newest" (see record_direct)."""
        delivery = _withdraw_from(sink, study_uid)
        self._withdrawn_event(sink, study_uid, delivery, wall_end)
        if self._outbox.record_direct(sink.name, study_uid, 0, seen_empty):
            return EMPTY
        log.info("study %s: %s was given content of it newer than this withdrawal, or has it queued: queued "
                 "again", study_uid, sink.name)
        return None

    # -- the workers -----------------------------------------------------------------------------

    def _wake_all(self) -> None:
        for event in self._wake.values():
            event.set()

    def _work(self, sink: Sink) -> None:
        """Deliver the sink's due items, oldest due first, until stopped.

        While the sink itself is failing (no answer, 5xx, 408, 429) the worker pauses the whole
        sink with the same backoff, at least as long as the server's ``Retry-After``: a server
        that is down or rate-limiting gets one attempt per delay, not one per pending study nor
        one per study that arrives meanwhile (new studies wait in the outbox for the pause to end).
        """
        wake = self._wake[sink.name]
        while True:
            if self._stopping.is_set() and time.monotonic() > self._drain_until:
                return
            wake.clear()
            paused = self._pause_left(sink.name)
            if paused > 0:
                if self._stopping.is_set():
                    return  # nothing may go to this sink before the pause ends: the outbox keeps it
                wake.wait(paused)  # a submission or stop() wakes it early: it looks again
                continue
            try:
                item, next_at = self._outbox.next_due(sink.name)
            except Exception:
                if self._stopping.is_set():
                    return
                log.exception("outbox of %s unreadable; trying again", sink.name)
                wake.wait(POLL_SECONDS)
                continue
            if item is None:
                if self._stopping.is_set():
                    return
                pause = POLL_SECONDS if next_at is None else min(POLL_SECONDS, max(0.0, next_at - time.time()))
                wake.wait(pause)
                continue
            with self._busy_lock:
                self._busy += 1
            try:
                self._attempt(sink, item)
            except Exception:  # a bug in the bookkeeping: never let it kill the worker
                log.exception("delivering study %s to %s failed unexpectedly", item.study_uid, sink.name)
                wake.wait(POLL_SECONDS)
            finally:
                with self._busy_lock:
                    self._busy -= 1

    def _pause_left(self, name: str) -> float:
        """Seconds the sink still waits out a sink-level failure (0 when it is not paused)."""
        return max(0.0, self._paused_until.get(name, 0.0) - time.time())

    def _publication(self, sink: Sink, study_uid: str,
                     instances: Sequence[StoredInstance]) -> Publication | _Rejected:
        return self._assembler.get(study_uid, self._version_for(sink), instances)

    def _version_for(self, sink: Sink) -> FhirVersion:
        """The FHIR release the sink takes: a FHIR server's own (asked of the server), else the configured one."""
        version_of = getattr(sink, "fhir_version", None)
        return version_of() if callable(version_of) else self._options.version  # type: ignore[no-any-return]

    def _attempt(self, sink: Sink, item: OutboxItem) -> None:
        uid = item.study_uid
        seen = time.time()
        instances = self._index.study_instances(uid)
        if not instances:
            self._withdraw(sink, item, seen)
            return
        count, up_to = len(instances), max(i.provenance.received_at for i in instances)
        publication: Publication | _Rejected | None = None
        try:
            version = self._version_for(sink)  # may ask the server: its failures are the sink's (below)
        except DeliveryError as exc:
            self._failed(sink, item, exc, count, up_to, None)
            return
        except Exception as exc:  # the server did not answer /metadata, say: retry, loudly at first
            if item.attempts == 0:
                log.exception("asking %s for its FHIR release raised", sink.name)
            self._failed(sink, item, DeliveryError(f"{type(exc).__name__}: {exc}", retryable=True), count, up_to, None)
            return
        try:
            publication = self._assembler.get(uid, version, instances)
        except Exception as exc:  # noqa: BLE001 - a bug in assembling this study (its data, our mapping) is this
            # item's, not the sink's: dead-lettered like a resource that fails validation, never pausing the sink;
            # only an OSError (writing rejected/ on a full disk) is worth another try
            log.exception("assembling the ImagingStudy of study %s raised", uid)
            self._failed(sink, item, DeliveryError(f"cannot assemble the ImagingStudy: {type(exc).__name__}: {exc}",
                                                   retryable=isinstance(exc, OSError)), count, up_to, None)
            return
        try:
            if isinstance(publication, _Rejected):
                raise DeliveryError(f"invalid {publication.version} ImagingStudy (kept under rejected/): "
                                    + "; ".join(publication.problems), retryable=False)
            delivery = sink.publish(publication)
        except DeliveryError as exc:
            self._failed(sink, item, exc, count, up_to, publication)
            return
        except Exception as exc:  # an unexpected failure of the sink (disk full, a bug in it): retry, loudly at first
            if item.attempts == 0:
                log.exception("publication of study %s to %s raised", uid, sink.name)
            self._failed(sink, item, DeliveryError(f"{type(exc).__name__}: {exc}", retryable=True), count, up_to,
                         publication)
            return
        now = time.time()
        self._sink_answered(sink)
        done = self._outbox.delivered(item, count, up_to, now)
        self._delivered_event(sink, publication, delivery, item.ended_at, now)
        if done and self._outbox.fully_delivered(self._names, uid, count, up_to):
            self._index.record_publication(uid, count, up_to, now)

    def _withdraw(self, sink: Sink, item: OutboxItem, seen_empty: float) -> None:
        """The study has no stored instances: have the sink drop what it holds of it, as a delivery of nothing.

        Recorded as delivered with 0 instances up to ``seen_empty``, so start-up leaves it alone and new
        instances of the study publish it again; the index is told "published as empty" once every sink
        has withdrawn it. Failures follow the publication rules (backoff, sink pause, dead letter).
        """
        uid = item.study_uid
        try:
            delivery = _withdraw_from(sink, uid)
        except DeliveryError as exc:
            self._failed(sink, item, exc, 0, seen_empty, None, action="withdrawal")
            return
        except Exception as exc:  # as for publications: retry, loudly at first
            if item.attempts == 0:
                log.exception("withdrawal of study %s from %s raised", uid, sink.name)
            self._failed(sink, item, DeliveryError(f"{type(exc).__name__}: {exc}", retryable=True), 0, seen_empty,
                         None, action="withdrawal")
            return
        now = time.time()
        self._sink_answered(sink)
        done = self._outbox.delivered(item, 0, seen_empty, now)
        self._withdrawn_event(sink, uid, delivery, item.ended_at, now)
        if done and self._outbox.fully_delivered(self._names, uid, *EMPTY) and self._index.study_state(uid) is None:
            self._index.record_publication(uid, *EMPTY, now)

    def _sink_answered(self, sink: Sink) -> None:
        """The sink works again: no more pause for it."""
        self._failing[sink.name] = 0
        self._paused_until.pop(sink.name, None)

    def _counted(self, sink: Sink, result: str, delivery: Delivery, ended_at: float | None,
                 now: float | None) -> tuple[float | None, str, dict[str, Any]]:
        """Count a delivery the sink carried out; its latency from the association's end (None when not known),
        that latency as shown in the message, and the sink's own fields for the "publication" record."""
        now = time.time() if now is None else now
        latency = max(0.0, now - ended_at) if ended_at is not None else None
        self._metrics.publications.labels(sink=sink.name, result=result).inc()
        if latency is not None:
            self._metrics.publication_latency.labels(sink=sink.name).observe(latency)
        shown = f" latency={latency:.3f}s" if latency is not None else ""
        return latency, shown, {k: v for k, v in delivery.fields.items() if k not in _EVENT_KEYS}

    def _delivered_event(self, sink: Sink, publication: Publication, delivery: Delivery, ended_at: float | None,
                         now: float | None = None) -> None:
        latency, shown, extra = self._counted(sink, "delivered", delivery, ended_at, now)
        resource = publication.resource
        logs.event(log, logging.INFO, "publication",
                   f"published study={publication.study_uid} sink={sink.name} series={resource['numberOfSeries']} "
                   f"instances={resource['numberOfInstances']} version={publication.version}{shown} -> "
                   f"{delivery.detail}",
                   study_uid=publication.study_uid, sink=sink.name, result="delivered",
                   series=resource["numberOfSeries"], instances=resource["numberOfInstances"],
                   version=str(publication.version), latency=latency, detail=delivery.detail, **extra)

    def _withdrawn_event(self, sink: Sink, study_uid: str, delivery: Delivery, ended_at: float | None,
                         now: float | None = None) -> None:
        """The "publication" record (result ``withdrawn``) and metrics of a withdrawal the sink carried out."""
        latency, shown, extra = self._counted(sink, "withdrawn", delivery, ended_at, now)
        logs.event(log, logging.INFO, "publication",
                   f"withdrew study={study_uid} sink={sink.name}: it has no stored instances any more{shown} -> "
                   f"{delivery.detail}",
                   study_uid=study_uid, sink=sink.name, result="withdrawn", series=0, instances=0,
                   latency=latency, detail=delivery.detail, **extra)

    def _failed(self, sink: Sink, item: OutboxItem, exc: DeliveryError, count: int, up_to: float,
                publication: Publication | _Rejected | None, *, action: str = "publication") -> None:
        """Record a failed attempt: retry with backoff (pausing the sink when the sink itself fails) or dead-letter.

        ``action`` ("publication" or "withdrawal") names what failed in the message and the record."""
        outcome = orjson.dumps(exc.outcome).decode() if exc.outcome is not None else None
        version = str(publication.version) if publication is not None else None
        extra = {k: v for k, v in exc.fields.items() if k not in _EVENT_KEYS}
        if exc.retryable:
            attempts = item.attempts + 1
            delay = self._backoff.delay(attempts, exc.retry_after)
            if exc.status is None or exc.status >= 500 or exc.status in (408, 429):  # the sink, not this item
                self._failing[sink.name] += 1
                pause = self._backoff.delay(self._failing[sink.name], exc.retry_after)
                self._paused_until[sink.name] = time.time() + pause
            self._outbox.failed(item, delay=delay, error=str(exc), status=exc.status, outcome=outcome, count=count,
                                up_to=up_to)
            self._metrics.publications.labels(sink=sink.name, result="failed").inc()
            logs.event(log, logging.WARNING, "publication",
                       f"{action} of study={item.study_uid} {_TO[action]} sink={sink.name} failed "
                       f"(attempt {attempts}): {exc}; next attempt in {delay:.1f}s",
                       study_uid=item.study_uid, sink=sink.name, result="retry", action=action, attempts=attempts,
                       status=exc.status, error=str(exc), retry_in=round(delay, 3), version=version,
                       outcome=exc.outcome, **extra)
            return
        dead = self._outbox.dead(item, error=str(exc), status=exc.status, outcome=outcome, count=count, up_to=up_to)
        self._metrics.publications.labels(sink=sink.name, result="dead" if dead else "failed").inc()
        said = f"; OperationOutcome: {outcome}" if outcome else ""
        logs.event(log, logging.ERROR, "publication",
                   f"{action} of study={item.study_uid} {_TO[action]} sink={sink.name} refused: {exc}{said}; "
                   + ("dead-lettered (imagingstudy-scp outbox retry re-queues it)" if dead
                      else "newer content is pending: trying that"),
                   study_uid=item.study_uid, sink=sink.name, result="dead" if dead else "retry", action=action,
                   status=exc.status, error=str(exc), version=version, outcome=exc.outcome, **extra)


def _withdraw_from(sink: Sink, study_uid: str) -> Delivery:
    """``sink.withdraw``; a sink written before withdrawals existed dead-letters the item instead of failing
    with an AttributeError, which would be retried for ever."""
    withdraw = getattr(sink, "withdraw", None)
    if not callable(withdraw):
        raise DeliveryError(f"sink {sink.name} cannot withdraw a study (it has no withdraw())", retryable=False)
    delivery: Delivery = withdraw(study_uid)
    return delivery


EMPTY = (0, 0.0)  # the index state of a study without stored instances (what a withdrawal "delivers")

# Keys of the "publication" record that a sink's own fields may not overwrite.
_EVENT_KEYS = frozenset({"study_uid", "sink", "result", "series", "instances", "version", "latency", "detail",
                         "action"})
_TO = {"publication": "to", "withdrawal": "from"}
