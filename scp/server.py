"""Wires the steps together: listener → ingest (store + index) → publisher → sinks."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from scp import logs
from scp.admin_http import AdminServer
from scp.association import AssociationReport, Listener, ListenerOptions
from scp.index import INDEX_FILE, Index
from scp.ingest import Ingest
from scp.mapping.imaging_study import MappingOptions
from scp.metrics import Metrics
from scp.publish import Publisher
from scp.reconcile import reconcile
from scp.settings import Settings
from scp.sinks.base import Sink
from scp.sinks.directory import DirectorySink
from scp.store import Store

log = logging.getLogger("scp.server")


class Server:
    """One imagingstudy-scp instance over one data dir."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.store = Store(settings.data_dir, fsync=settings.fsync)
        self.index = Index(self.store.data_dir / INDEX_FILE)
        self.publisher = publisher_for(settings, self.index, self.metrics)
        self.metrics.track_queue(self.publisher.depth, self.publisher.oldest_age)
        self.ingest = Ingest(self.store, self.index, self.metrics, min_free_bytes=settings.min_free_disk_mb * 2**20,
                             duplicate_policy=settings.duplicate_policy)
        self.listener = Listener(
            ListenerOptions(host=settings.host, port=settings.port, aet=settings.aet,
                            maximum_pdu_size=settings.max_pdu_size),
            self.ingest,
            on_end=self._association_ended,
        )
        self.admin: AdminServer | None = None
        if settings.http_port is not None:
            self.admin = AdminServer(settings.http_host, settings.http_port, self.metrics,
                                     [self._store_writable, self._index_open, self._disk_above_threshold])
        self._stopped = threading.Event()

    @property
    def port(self) -> int:
        return self.listener.port

    def start(self) -> None:
        """Recover from any earlier stop, then accept associations."""
        removed = self.store.clean_tmp()
        if removed:
            log.info("removed %d temp files left by an earlier stop", removed)
        changed = reconcile(self.store, self.index)
        self.publisher.start()
        backlog = sorted(set(changed) | set(self.index.unpublished_studies()))
        if backlog:
            log.info("publishing %d studies not published before the last stop", len(backlog))
            self.publisher.submit(backlog)
        self.listener.start()
        if self.admin is not None:
            self.admin.start()

    def stop(self) -> None:
        """Stop accepting, finish queued publications, close the index."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.admin is not None:
            self.admin.stop()
        self.listener.stop()
        self.publisher.stop()
        self.index.close()

    def wait(self) -> None:
        self._stopped.wait()

    def __enter__(self) -> "Server":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- readiness checks (None = fine, else what is wrong) ----------------------------------

    def _store_writable(self) -> str | None:
        probe = self.store.tmp_dir / f".ready-{threading.get_ident()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            return f"store not writable: {exc}"
        return None

    def _index_open(self) -> str | None:
        try:
            self.index.ping()
        except Exception as exc:  # any failure means not ready
            return f"index not usable: {exc}"
        return None

    def _disk_above_threshold(self) -> str | None:
        free, minimum = self.store.free_bytes(), self.settings.min_free_disk_mb * 2**20
        return f"free disk {free // 2**20} MB is below {self.settings.min_free_disk_mb} MB" if free < minimum else None

    def _association_ended(self, report: AssociationReport) -> None:
        failures = {f"0x{status:04X}": count for status, count in sorted(report.failures.items())}
        shown = ",".join(f"{s}:{n}" for s, n in failures.items()) or "none"
        logs.event(log, logging.INFO, "association",
                   f"association {report.association_id} {report.how} calling={report.calling_aet} "
                   f"called={report.called_aet} peer={report.peer} instances={report.instances} "
                   f"bytes={report.bytes} seconds={report.seconds:.3f} studies={len(report.studies)} "
                   f"failures={shown}",
                   association_id=report.association_id, how=report.how, calling_aet=report.calling_aet,
                   called_aet=report.called_aet, peer=report.peer, instances=report.instances,
                   bytes=report.bytes, seconds=round(report.seconds, 6), studies=len(report.studies),
                   failures=failures)
        if report.studies:
            self.publisher.submit(report.studies, ended_at=report.ended)



def mapping_options(settings: Settings) -> MappingOptions:
    """How the settings ask for ImagingStudy resources to be written."""
    return MappingOptions(version=settings.fhir_version, local_zone=settings.local_zone(),
                          wado_rs_url=settings.wado_rs_url, log_phi=settings.log_phi)


def publisher_for(settings: Settings, index: Index, metrics: Metrics | None = None) -> Publisher:
    """The publisher with every sink the settings configure (the server's and the admin CLI's)."""
    fhir_dir = Path(settings.data_dir).resolve() / "fhir"
    sinks: list[Sink] = [DirectorySink(fhir_dir, fsync=settings.fsync)]
    return Publisher(index, sinks, mapping_options(settings), fhir_dir / "rejected", metrics)
