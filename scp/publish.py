"""Assemble, validate and hand ImagingStudy resources to the sinks, off the association threads.

Studies are queued when an association ends; a single worker drains the queue,
and a study queued again while still pending is published once, with whatever
the index holds when its turn comes. A resource that fails validation is a bug:
it is logged as an error with the study UID and kept under ``rejected/``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from scp import logs
from scp.index import Index
from scp.metrics import Metrics
from scp.mapping.imaging_study import MappingOptions, build_imaging_study
from scp.sinks.base import Publication, Sink
from scp.sinks.directory import write_json_atomically
from scp.validation import imaging_study_problems

log = logging.getLogger("scp.publish")

_STOP = object()


@dataclass(frozen=True)
class Outcome:
    """What happened to one study's publication."""

    study_uid: str
    published: bool
    sinks: tuple[str, ...]
    problems: tuple[str, ...] = ()


class Publisher:
    """Turns study UIDs into published ImagingStudy resources on a worker thread."""

    def __init__(self, index: Index, sinks: Sequence[Sink], options: MappingOptions, rejected_dir: Path,
                 metrics: Metrics | None = None) -> None:
        self._index = index
        self._sinks = list(sinks)
        self._options = options
        self._rejected_dir = rejected_dir
        self._metrics = metrics or Metrics()
        self._queue: queue.Queue[object] = queue.Queue()
        # study → (association end for the latency metric, when it was queued)
        self._pending: dict[str, tuple[float | None, float]] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._busy = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        """Finish what is queued, then stop the worker."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    def submit(self, study_uids: Iterable[str], ended_at: float | None = None) -> None:
        """Queue studies for publication; ``ended_at`` (monotonic) measures release→sink latency."""
        with self._lock:
            for uid in study_uids:
                if uid in self._pending:
                    continue
                self._pending[uid] = (ended_at, time.monotonic())
                self._busy += 1
                self._queue.put(uid)

    def depth(self) -> int:
        """Studies queued or being published."""
        return self._busy

    def oldest_age(self) -> float:
        """Seconds the longest-waiting queued study has waited (0 when none)."""
        with self._lock:
            queued = [since for _, since in self._pending.values()]
        return time.monotonic() - min(queued) if queued else 0.0

    def wait_idle(self, timeout: float = 30) -> bool:
        """Block until every queued study has been handled (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def publish_now(self, study_uid: str, ended_at: float | None = None) -> Outcome:
        """Assemble, validate and deliver one study on the calling thread."""
        instances = self._index.study_instances(study_uid)
        if not instances:
            log.warning("study %s has no stored instances; nothing to publish", study_uid)
            return Outcome(study_uid, False, ())
        mapped = build_imaging_study([i.header for i in instances], self._options)
        for warning in mapped.warnings:
            log.warning("%s", warning)
        problems = imaging_study_problems(mapped.resource, self._options.version)
        if problems:
            self._reject(study_uid, mapped.resource, problems)
            return Outcome(study_uid, False, (), tuple(problems))
        publication = Publication(study_uid, self._options.version, mapped.resource, tuple(instances))
        delivered = []
        for sink in self._sinks:
            try:
                delivery = sink.publish(publication)
            except Exception:
                log.exception("publication of study %s to %s failed", study_uid, sink.name)
                self._metrics.publications.labels(sink=sink.name, result="failed").inc()
                continue
            delivered.append(sink.name)
            latency = time.monotonic() - ended_at if ended_at is not None else None
            self._metrics.publications.labels(sink=sink.name, result="delivered").inc()
            if latency is not None:
                self._metrics.publication_latency.labels(sink=sink.name).observe(latency)
            shown = f" latency={latency:.3f}s" if latency is not None else ""
            logs.event(log, logging.INFO, "publication",
                       f"published study={study_uid} sink={sink.name} series={mapped.resource['numberOfSeries']} "
                       f"instances={mapped.resource['numberOfInstances']} version={self._options.version}"
                       f"{shown} -> {delivery.detail}",
                       study_uid=study_uid, sink=sink.name, result="delivered",
                       series=mapped.resource["numberOfSeries"], instances=mapped.resource["numberOfInstances"],
                       version=str(self._options.version), latency=latency, detail=delivery.detail)
        if len(delivered) == len(self._sinks):
            self._index.record_publication(study_uid, len(instances),
                                           max(i.provenance.received_at for i in instances), time.time())
        return Outcome(study_uid, len(delivered) == len(self._sinks), tuple(delivered))

    def _reject(self, study_uid: str, resource: dict[str, object], problems: list[str]) -> None:
        path = self._rejected_dir / f"{study_uid}.json"
        write_json_atomically(path, {"problems": problems, "resource": resource})
        log.error("ImagingStudy for study %s is invalid (%s) and was not published; kept in %s: %s",
                  study_uid, self._options.version, path, "; ".join(problems))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            study_uid = str(item)
            with self._lock:
                ended_at, _ = self._pending.pop(study_uid, (None, 0.0))
            try:
                self.publish_now(study_uid, ended_at)
            except Exception:
                log.exception("publishing study %s failed", study_uid)
            finally:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()
