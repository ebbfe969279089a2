"""The DICOM network edge: the only module that touches pynetdicom.

Accepts every storage SOP class (unknown and private ones too, through
pynetdicom's unrestricted storage service) with whatever transfer syntax the
sender proposes first, plus Verification. Each C-STORE is received in chunks
into a temp file in the store's tmp dir (same filesystem), handed to
:class:`~scp.ingest.Ingest`, and answered only once the instance is durable and
indexed. With the event-driven transport (the default) the listener is the
transport's :class:`~scp.transport.StoreHandler`: it hands out the spare temp
files and stores each request on the thread that read it; with
``--stock-transport`` the same storing runs as pynetdicom's EVT_C_STORE handler.
When an association ends — released, aborted or dropped — its report (with the
studies it touched) goes to ``on_end`` on the association's thread; that
callback must only enqueue work.

Stopping stops accepting, gives open associations :attr:`ListenerOptions.stop_grace` seconds to end on
their own (a sender finishing its study and releasing), then aborts the rest; only then may the caller
stop publishing and close the index, so that every C-STORE answered was answered against an open index
and every association's report reached ``on_end``.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import socketserver
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from scp.ae_policy import AEPolicy
from scp.ingest import (CANNOT_UNDERSTAND, PROCESSING_FAILURE, Ingest, Rejected, error_comment,
                        receive_failure_status)
from scp.metrics import Metrics
from scp.records import Provenance
from scp.temp_files import SpareFiles, TempFile
from scp.transport import EventDrivenRequestHandler, StoreRequest, abort_association, open_associations
from scp.uids import InvalidUID, check_uid

log = logging.getLogger("scp.association")

STOP_GRACE = 5.0  # seconds open associations get to end on their own when the server stops
_BUSY_ACCEPT_DELAY = 0.002  # seconds per open association before accepting on a shared socket
_FULL_ACCEPT_DELAY = 0.1  # ... and when this process has no association to spare
_ABORT_WAIT = 3.0  # seconds aborted associations get to wind down (their reports to reach on_end)

# Process-wide pynetdicom switches (a server process has one store):
_config.STORE_RECV_CHUNKED_DATASET = True  # datasets go to a temp file, never decoded in memory
_config.UNRESTRICTED_STORAGE_SERVICE = True  # unknown/private SOP classes are storage too
_config.LOG_HANDLER_LEVEL = "none"  # pynetdicom's per-message debug handlers cost time
logging.getLogger("pynetdicom").setLevel(logging.WARNING)


@dataclass
class AssociationReport:
    """What one association did, for the log line and for publication."""

    association_id: str
    calling_aet: str
    called_aet: str
    peer: str
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    how: str = "open"  # released | aborted | closed
    instances: int = 0
    bytes: int = 0
    failures: Counter[int] = field(default_factory=Counter)
    studies: list[str] = field(default_factory=list)  # in first-touched order
    pid: int = field(default_factory=os.getpid)  # the process that received it (several with ``workers``)

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def touch(self, studies: tuple[str, ...]) -> None:
        for study in studies:
            if study not in self.studies:
                self.studies.append(study)


@dataclass(frozen=True)
class ListenerOptions:
    host: str
    port: int
    aet: str
    policy: AEPolicy | None = None  # None: any calling AE, called AE must be ours
    maximum_pdu_size: int = 131072
    maximum_associations: int = 32
    network_timeout: float | None = 60
    acse_timeout: float = 30
    dimse_timeout: float | None = 60
    tls_port: int | None = None
    tls_context: ssl.SSLContext | None = None
    event_driven: bool = True  # scp.transport's adaptation (applied only to the pynetdicom it was written for)
    stop_grace: float = STOP_GRACE  # on stop: seconds before open associations are aborted
    # Receiver processes (scp.workers): other processes accept on the same listening sockets, so accepting
    # never waits (a connection another process took must not block this accept loop). ``sockets``: the
    # listening sockets to accept on instead of binding (plain, then TLS), inherited from the server.
    shared_accept: bool = False
    sockets: tuple[socket.socket, ...] = ()


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server, adapted in two ways.

    - Nagle is off on every accepted socket: DICOM is request/response, and a
      small C-STORE response waiting for a delayed ACK caps a sender at tens of
      instances per second.
    - With TLS, the handshake happens on the association's own thread (first
      read), not in the accept loop, so a slow or silent client cannot stall
      every other connection.
    - Every accepted socket times out after the network timeout: ``accept()``
      makes it blocking whatever the listening socket's timeout, and a peer
      that stops in the middle of a PDU or of the TLS handshake would hold its
      thread, connection and association slot for ever (both transports).
    """

    daemon_threads = True

    def get_request(self) -> tuple[Any, Any]:
        client, address = self.socket.accept()  # type: ignore[union-attr]
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        client.settimeout(self.ae.network_timeout)  # kept by the TLS wrapper; None (no limit) when so configured
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def shutdown(self) -> None:
        """Stop accepting and close the listening socket (the server was made, not registered, by the AE)."""
        socketserver.TCPServer.shutdown(self)
        self.server_close()


def _server_class(adopted: socket.socket | None, shared_accept: bool) -> type[_Server]:
    """:class:`_Server`, or one that accepts on ``adopted`` (bound and listening already) instead of binding,
    and without waiting when other processes accept on the same socket."""
    if adopted is None and not shared_accept:
        return _Server

    class _SharedServer(_Server):
        def get_request(self) -> tuple[Any, Any]:
            """Every process sharing the socket is woken for a connection and the first to accept takes it:
            one with associations open waits a little first, so an idle process takes it (balance)."""
            busy = len(self.active_associations)
            if busy >= self.ae.maximum_associations:
                time.sleep(_FULL_ACCEPT_DELAY)  # it would reject: let one with room take it
            elif busy:
                time.sleep(min(busy, 10) * _BUSY_ACCEPT_DELAY)
            return super().get_request()

        def server_bind(self) -> None:
            if adopted is None:
                super().server_bind()
            else:
                self.socket.close()
                self.socket = adopted
                self.server_address = adopted.getsockname()
            self.socket.setblocking(False)  # another process may take the connection this one was woken for

        def server_activate(self) -> None:
            if adopted is None:
                super().server_activate()

    return _SharedServer


class Listener:
    """The running Storage SCP: one AE, a plain listener and optionally a TLS one beside it."""

    def __init__(self, options: ListenerOptions, ingest: Ingest,
                 on_end: Callable[[AssociationReport], None]) -> None:
        self.options = options
        self._policy = options.policy or AEPolicy(options.aet)
        self._ingest = ingest
        self._metrics: Metrics = ingest.metrics
        self._on_end = on_end
        self._reports: dict[Any, AssociationReport] = {}
        self._ending = 0  # reports on their way to on_end (see _end)
        self._lock = threading.Lock()
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        # pynetdicom creates its chunked-receive temp files in tempfile's default dir (process-wide;
        # restored on stop so an embedding process gets its own back).
        self._previous_tempdir = tempfile.tempdir
        tempfile.tempdir = str(ingest.store.tmp_dir)
        self._spare_files = SpareFiles(ingest.store.tmp_dir, writeback=ingest.store.durable)
        self._ae = self._make_ae()

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.options.aet)
        ae.maximum_pdu_size = self.options.maximum_pdu_size
        ae.network_timeout = self.options.network_timeout
        ae.acse_timeout = self.options.acse_timeout
        ae.dimse_timeout = self.options.dimse_timeout
        ae.maximum_associations = self.options.maximum_associations
        ae.require_called_aet = False  # the AE policy decides, with a log line per refusal
        ae.add_supported_context(Verification)
        return ae

    @property
    def port(self) -> int:
        """The bound plain port (useful when started on port 0)."""
        return int(self._servers[0].server_address[1])

    @property
    def tls_port(self) -> int | None:
        return int(self._servers[1].server_address[1]) if len(self._servers) > 1 else None

    def start(self) -> None:
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_C_ECHO, self._on_c_echo),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        if self.options.event_driven:
            self._spare_files.start()
        adopted = list(self.options.sockets) + [None, None]
        self._serve(self.options.port, None, handlers, adopted[0])
        log.info("listening on %s:%d as %s", self.options.host, self.port, self.options.aet)
        if self.options.tls_port is not None:
            self._serve(self.options.tls_port, self.options.tls_context, handlers, adopted[1])
            log.info("listening with TLS on %s:%d as %s", self.options.host, self.tls_port, self.options.aet)

    def listening_sockets(self) -> list[socket.socket]:
        """The listening sockets (plain, then TLS), for receiver processes to accept on too."""
        return [server.socket for server in self._servers]

    def _serve(self, port: int, context: ssl.SSLContext | None, handlers: list[Any],
               adopted: socket.socket | None) -> None:
        extra = {"request_handler": EventDrivenRequestHandler} if self.options.event_driven else {}
        server = self._ae.make_server((self.options.host, port), evt_handlers=handlers,
                                      server_class=_server_class(adopted, self.options.shared_accept),
                                      ssl_context=context, **extra)
        server.store_handler = self  # type: ignore[attr-defined]  # see scp.transport.StoreHandler
        thread = threading.Thread(target=server.serve_forever, name=f"dicom-{server.server_address[1]}",
                                  daemon=True)
        self._servers.append(server)
        self._threads.append(thread)
        thread.start()

    def stop(self) -> None:
        """Stop accepting, end the open associations (see the module's docstring), release the temp files."""
        for server in self._servers:
            server.shutdown()
        for thread in self._threads:
            thread.join(10)
        self._servers, self._threads = [], []
        self._end_associations()
        self._spare_files.close()
        if tempfile.tempdir == str(self._ingest.store.tmp_dir):
            tempfile.tempdir = self._previous_tempdir

    def _end_associations(self) -> None:
        """Wait up to ``stop_grace`` seconds for open associations to end, then abort the rest and wait a little
        for them to wind down. One stuck beyond that (e.g. a store on a hung disk) is left behind with a
        warning: whatever it acknowledged is in the index, and published at the next start."""
        grace = self.options.stop_grace
        if not self._wait_until_idle(grace):
            return
        remaining = open_associations(self._ae)
        log.warning("stopping: aborting %d association(s) still open after %g s", len(remaining), grace)
        for assoc in remaining:
            threading.Thread(target=abort_association, args=(assoc,), name=f"abort {assoc.name}",
                             daemon=True).start()
        if self._wait_until_idle(_ABORT_WAIT):
            log.warning("stopping with %d association(s) still running", len(open_associations(self._ae)))

    def _wait_until_idle(self, seconds: float) -> bool:
        """Wait until no association is open and no report is on its way to ``on_end``; True if time ran out."""
        deadline = time.monotonic() + seconds
        while open_associations(self._ae) or self._ending:
            if time.monotonic() >= deadline:
                return True
            time.sleep(0.05)
        return False

    # -- event handlers (run on each association's thread) --------------------------------

    def _report(self, assoc: Any) -> AssociationReport:
        with self._lock:
            report = self._reports.get(assoc)
            if report is None:
                report = AssociationReport(
                    association_id=uuid.uuid4().hex[:12],
                    calling_aet=str(assoc.requestor.ae_title).strip(),
                    called_aet=_called_aet(assoc),
                    peer=f"{assoc.requestor.address}:{assoc.requestor.port}",
                )
                self._reports[assoc] = report
            return report

    def _on_requested(self, event: evt.Event) -> None:
        """Apply the AE policy before negotiation; a refusal is an A-ASSOCIATE-RJ (permanent, service-user)."""
        assoc = event.assoc
        request = assoc.requestor.primitive
        calling, called = str(request.calling_ae_title).strip(), str(request.called_ae_title).strip()
        refusal = self._policy.check(calling, called, str(assoc.requestor.address))
        if refusal is None:
            return
        self._metrics.associations.labels(outcome="rejected").inc()
        log.warning("association rejected (%s): calling=%s called=%s peer=%s:%s", refusal.message, calling,
                    called, assoc.requestor.address, assoc.requestor.port)
        assoc.acse.send_reject(0x01, 0x01, int(refusal.reason))
        assoc.kill()

    def _on_accepted(self, event: evt.Event) -> None:
        self._metrics.associations.labels(outcome="accepted").inc()
        self._report(event.assoc)

    def _on_rejected(self, event: evt.Event) -> None:
        """pynetdicom's own rejections (e.g. too many associations: transient, local limit exceeded)."""
        self._metrics.associations.labels(outcome="rejected").inc()
        requestor = event.assoc.requestor
        log.warning("association rejected by the protocol layer (e.g. association limit): calling=%s "
                    "called=%s peer=%s:%s", str(requestor.ae_title).strip(), _called_aet(event.assoc),
                    requestor.address, requestor.port)

    def _on_c_echo(self, event: evt.Event) -> int:
        return 0x0000

    def _on_c_store(self, event: evt.Event) -> int | Dataset:
        """A C-STORE through pynetdicom's storage service class (``--stock-transport``)."""
        request = event.request
        path = event.dataset_path
        received = StoreRequest(
            message_id=request.MessageID, sop_class_uid=str(request.AffectedSOPClassUID or ""),
            sop_instance_uid=str(request.AffectedSOPInstanceUID or ""), path=path, size=path.stat().st_size,
            head=b"",
        )
        status, comment = self.store(event.assoc, received)
        if status == 0x0000:
            return status
        answer = Dataset()
        answer.Status = status
        answer.ErrorComment = comment
        return answer

    # -- scp.transport.StoreHandler: C-STOREs on the event-driven transport, on the DUL thread --

    def temp_file(self) -> TempFile:
        return self._spare_files.take()

    def store(self, assoc: Any, request: StoreRequest) -> tuple[int, str | None]:
        """Store one received instance; the status and error comment to answer with (never raises)."""
        report = self._report(assoc)
        if request.refusal is not None:  # the transport found the request unusable; nothing was written
            return self._failure(report, CANNOT_UNDERSTAND, request.refusal, request)
        provenance = Provenance(
            calling_aet=report.calling_aet, called_aet=report.called_aet, peer=report.peer,
            association_id=report.association_id, received_at=time.time(),
        )
        if request.receive_error is not None:
            error = request.receive_error
            return self._failure(report, receive_failure_status(error),
                                 f"cannot receive: {error.strerror or error}", request)
        if request.transfer_syntax is not None:
            try:
                check_uid(request.transfer_syntax, "Transfer Syntax UID")
            except InvalidUID as exc:
                return self._failure(report, CANNOT_UNDERSTAND, str(exc), request)
        try:
            accepted = self._ingest.accept(
                request.path, sop_instance_uid=request.sop_instance_uid or None,
                sop_class_uid=request.sop_class_uid or None, provenance=provenance,
                head=request.head, fd=request.fd, size=request.size,
            )
        except Rejected as exc:
            return self._failure(report, exc.status, exc.comment, request)
        except Exception as exc:  # a bug or an unexpected I/O error: the sender must not see success
            log.exception("C-STORE of %s failed", request.sop_instance_uid)
            return self._failure(report, PROCESSING_FAILURE, f"internal error: {type(exc).__name__}", request)
        report.instances += 1
        report.bytes += accepted.instance.size
        report.touch(accepted.touched_studies)
        return 0x0000, None

    def _failure(self, report: AssociationReport, status: int, comment: str,
                 request: StoreRequest) -> tuple[int, str]:
        report.failures[status] += 1
        self._metrics.store_failures.labels(status=f"0x{status:04X}").inc()
        log.warning("C-STORE rejected 0x%04X (%s) from %s %s: %s", status, report.calling_aet, report.peer,
                    request.sop_instance_uid, comment)
        return status, error_comment(comment)

    def _on_released(self, event: evt.Event) -> None:
        self._end(event.assoc, "released")

    def _on_aborted(self, event: evt.Event) -> None:
        self._end(event.assoc, "aborted")

    def _on_closed(self, event: evt.Event) -> None:
        assoc = event.assoc
        self._end(assoc, "released" if assoc.is_released else "aborted" if assoc.is_aborted else "closed")

    def _end(self, assoc: Any, how: str) -> None:
        """Report an association exactly once, however it ended."""
        with self._lock:
            report = self._reports.pop(assoc, None)
            if report is None:
                return
            self._ending += 1  # a stopping listener waits for it (its studies must be submitted)
        try:
            report.ended = time.monotonic()
            report.how = how
            self._on_end(report)
        finally:
            with self._lock:
                self._ending -= 1


def _called_aet(assoc: Any) -> str:
    """The AE title the peer asked for (ours when it matches; anything when called-AE checks are off)."""
    primitive = getattr(assoc.requestor, "primitive", None)
    called = getattr(primitive, "called_ae_title", None) or assoc.acceptor.ae_title
    return str(called).strip()
