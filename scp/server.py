"""Wires the steps together: listener → ingest (store + index) → publisher → sinks."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from pathlib import Path

from scp import logs
from scp.admin_http import AdminServer
from scp.ae_policy import AEPolicy, CallingAE
from scp.association import AssociationReport, Listener, ListenerOptions
from scp.fhir_version import FhirVersion
from scp.index import INDEX_FILE, Index
from scp.ingest import Ingest
from scp.mapping.imaging_study import MappingOptions
from scp.metrics import Metrics
from scp.outbox import Backoff
from scp.publish import Publisher
from scp.reconcile import reconcile
from scp.settings import Settings
from scp.sinks.base import Sink
from scp.sinks.directory import DirectorySink
from scp.sinks.fhir_server import fhir_sinks
from scp.store import DataDirLock, Store
from scp.tls import server_context
from scp.validation import prepare
from scp.workers import SOP_LOCK_FILE, Receivers

log = logging.getLogger("scp.server")

_RECEIVER_STOP_MARGIN = 5.0  # seconds beyond the stop grace for receiver processes to abort, report and exit


class Server:
    """One imagingstudy-scp instance over one data dir."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.store = Store(settings.data_dir, fsync=settings.fsync)
        self._data_dir_lock = DataDirLock(self.store.data_dir)
        self.index = Index(self.store.data_dir / INDEX_FILE)
        self.publisher = publisher_for(settings, self.index, self.metrics)
        self.metrics.track_queue(self.publisher.depth, self.publisher.oldest_age)
        self.ingest = ingest_for(settings, self.store, self.index, self.metrics)
        self.listener = Listener(listener_options(settings), self.ingest, on_end=self._association_ended)
        self.receivers: Receivers | None = None  # the other receiving processes, with workers > 1
        self.admin: AdminServer | None = None
        if settings.http_port is not None:
            self.admin = AdminServer(settings.http_host, settings.http_port, self.metrics,
                                     [self._store_writable, self._index_open, self._disk_above_threshold,
                                      self._receivers_running])
        self._stopped = threading.Event()

    @property
    def port(self) -> int:
        return self.listener.port

    def start(self) -> None:
        """Take the data dir (:class:`DataDirInUse` when another server holds it), recover from any earlier
        stop, then accept associations."""
        self._data_dir_lock.acquire()
        try:
            self._start()
        except BaseException:
            self._abandon_start()
            raise

    def _abandon_start(self) -> None:
        """A start that failed half-way (a port in use, say): stop what it started, and only then let the data
        dir go, so that no worker of this server still delivers its outbox beside the next one."""
        for step in (self._stop_receiving, self.publisher.stop, self.index.close, self.ingest.close):
            try:
                step()
            except Exception:  # noqa: BLE001 - the start's own error is what the caller must see
                log.exception("while abandoning a failed start")
        self._data_dir_lock.release()

    def _start(self) -> None:
        removed = self.store.clean_tmp() + sum(sink.clean_leftovers() for sink in self.publisher.sinks
                                                if isinstance(sink, DirectorySink))
        if removed:
            log.info("removed %d temp files left by an earlier stop", removed)
        changed = reconcile(self.store, self.index)
        versions = {self.settings.directory_fhir_version(), self.settings.fhir_version} - {None}
        threading.Thread(target=_prepare_validation, args=(versions,), name="prepare-validation",
                         daemon=True).start()
        self.publisher.start()
        backlog = sorted(set(changed) | set(self.index.unpublished_studies()))
        if backlog:
            log.info("publishing %d studies not published before the last stop", len(backlog))
            self.publisher.resume(backlog, changed=changed)  # per sink: only what it has not delivered
        self.listener.start()
        if self.settings.workers > 1:
            assert self._data_dir_lock.fd is not None
            self.receivers = Receivers(self.settings, self.settings.workers - 1, self.listener.listening_sockets(),
                                       self._data_dir_lock.fd, self.metrics, on_report=self._association_ended,
                                       on_lost=self._publish_unpublished)
            self.receivers.start()
        if self.admin is not None:
            self.admin.start()

    def stop(self) -> None:
        """Stop accepting; let open associations end (a few seconds' grace, then an abort: see
        :meth:`Listener.stop`); then finish queued publications and close the index.

        In that order: a C-STORE answered during the grace is answered against an open index, and every
        association's studies are submitted before the publisher stops (what it cannot deliver in time
        stays in the outbox, and anything not even submitted is found unpublished at the next start)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.admin is not None:
            self.admin.stop()
        self._stop_receiving()
        self.publisher.stop()
        self.index.close()
        self.ingest.close()
        self._data_dir_lock.release()

    def _stop_receiving(self) -> None:
        """Stop this process's listener and the receiver processes, side by side (each gives its open
        associations the stop grace); their last reports reach the publisher before it stops."""
        stopper = None
        if self.receivers is not None:
            stopper = threading.Thread(target=self.receivers.stop,
                                       args=(self.settings.stop_grace + _RECEIVER_STOP_MARGIN,),
                                       name="stop receivers")
            stopper.start()
        self.listener.stop()
        if stopper is not None:
            stopper.join()

    def _publish_unpublished(self) -> None:
        """A receiver process died: queue what it acknowledged on associations that never reached their end,
        and withdraw a study it left empty (its last instance moved to another study)."""
        self.publisher.resume(self.index.unpublished_studies())
        self.publisher.withdraw_emptied()

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

    def _receivers_running(self) -> str | None:
        missing = self.receivers.not_running() if self.receivers is not None else 0
        return f"{missing} receiver process(es) not running" if missing else None

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
                   failures=failures, pid=report.pid)
        if report.studies:
            self.publisher.submit(report.studies, ended_at=report.ended)



def _prepare_validation(versions: set[FhirVersion | None]) -> None:
    """Compile validators in the background: the first study after start is published without the wait."""
    for version in versions:
        if version is not None:
            prepare(version)


def listener_options(settings: Settings, sockets: tuple[socket.socket, ...] = ()) -> ListenerOptions:
    """The DICOM listener of one receiving process as the settings describe it: address, AE policy, limits, TLS.

    With receiver processes (``workers``) each takes its share of ``max_associations`` and accepts without
    waiting; ``sockets`` are the listening sockets a receiver process inherited.
    """
    policy = AEPolicy(
        our_aet=settings.aet,
        accept_any_called_aet=settings.accept_any_called_aet,
        calling=tuple(CallingAE(entry.aet, tuple(ipaddress.ip_network(h, strict=False) for h in entry.hosts))
                      for entry in settings.calling_aets),
    )
    tls_context = None
    if settings.tls_port is not None:
        assert settings.tls_cert is not None and settings.tls_key is not None  # checked by Settings
        tls_context = server_context(settings.tls_cert, settings.tls_key, settings.tls_ca,
                                     require_client_cert=settings.tls_require_client_cert)
    return ListenerOptions(
        host=settings.host, port=settings.port, aet=settings.aet, policy=policy,
        maximum_pdu_size=settings.max_pdu_size,
        maximum_associations=-(-settings.max_associations // settings.workers),  # rounded up
        network_timeout=settings.network_timeout, acse_timeout=settings.acse_timeout,
        dimse_timeout=settings.dimse_timeout, tls_port=settings.tls_port, tls_context=tls_context,
        event_driven=settings.event_driven_transport, stop_grace=settings.stop_grace,
        shared_accept=settings.workers > 1, sockets=sockets,
    )


def ingest_for(settings: Settings, store: Store, index: Index, metrics: Metrics, *,
               lock_file_made: bool = False) -> Ingest:
    """The storing step as the settings describe it, in the server or a receiver process (``lock_file_made``:
    the server made ``sop.lock`` already; a receiver must not make another)."""
    shared_lock = str(store.data_dir / SOP_LOCK_FILE) if settings.workers > 1 else None
    return Ingest(store, index, metrics, min_free_bytes=settings.min_free_disk_mb * 2**20,
                  max_instance_bytes=settings.max_instance_size_mb * 2**20,
                  duplicate_policy=settings.duplicate_policy, shared_lock_file=shared_lock,
                  create_lock_file=not lock_file_made)


def mapping_options(settings: Settings) -> MappingOptions:
    """How the settings ask for ImagingStudy resources to be written."""
    return MappingOptions(version=settings.directory_fhir_version(), local_zone=settings.local_zone(),
                          wado_rs_url=settings.wado_rs_url, log_phi=settings.log_phi,
                          unidentified_patient_system=settings.patient_id_system)


def publisher_for(settings: Settings, index: Index, metrics: Metrics | None = None) -> Publisher:
    """The publisher with every sink the settings configure (the server's and the admin CLI's)."""
    fhir_dir = Path(settings.data_dir).resolve() / "fhir"
    sinks: list[Sink] = [DirectorySink(fhir_dir, fsync=settings.fsync)]
    sinks += fhir_sinks(settings)  # one per --fhir-url
    return Publisher(index, sinks, mapping_options(settings), fhir_dir / "rejected", metrics,
                     backoff=Backoff(settings.outbox_initial_delay, settings.outbox_max_delay), fsync=settings.fsync)
