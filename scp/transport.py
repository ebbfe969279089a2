"""Adaptations of pynetdicom's private transport internals, in one place and for one version.

pynetdicom's two per-association threads poll: the association reactor sleeps 1 ms between looks at its
message queue, and the DUL reactor sleeps 1 ms whenever a loop found nothing to do. Every C-STORE waits on
both (request in, response out), which caps a single association at a few hundred instances per second
whatever the CPU does. Here both loops wait on events instead:

- the association thread sleeps on a :class:`threading.Event` set whenever a DIMSE message, an ACSE
  primitive or the end of the DUL thread needs it;
- the DUL thread sleeps in ``select`` on its socket and on a wake-up pipe written whenever the association
  thread queues something to send.

Both keep pynetdicom's own state machine and service classes. On top, the two messages every instance
costs are handled without pydicom (see :class:`_FastStoreDimse`): a C-STORE-RQ's command set is read and its
dataset streamed into the chunked-receive temp file directly (file meta written from precomputed bytes), and
the C-STORE-RSP is encoded directly. Every other message, and anything unexpected, takes pynetdicom's own
path. Idle associations stay cheap (a wake-up every 50 ms to check timers). The adaptation applies only to the
pynetdicom versions in :data:`ADAPTED_FOR`; any other version runs stock pynetdicom (and the tests in
``tests/test_transport.py`` fail loudly, so the pin is revisited rather than silently ignored).
"""

from __future__ import annotations

import io
import logging
import os
import queue
import select
import ssl
import struct
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import pynetdicom
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import RequestHandler

log = logging.getLogger("scp.transport")

ADAPTED_FOR = ("3.0.",)
_IDLE_WAIT = 0.05  # seconds between timer checks when nothing happens


def adapted() -> bool:
    """True when the installed pynetdicom is a version these adaptations were written for."""
    return pynetdicom.__version__.startswith(ADAPTED_FOR)


class _NotifyingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that calls ``notify`` after every put (to wake the thread that consumes it)."""

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__()
        self._notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


class _EventDrivenDUL(DULServiceProvider):
    """The DUL reactor, waiting in ``select`` (socket + wake-up pipe) instead of sleeping."""

    def __init__(self, assoc: Association, wake_association: Callable[[], None]) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # Once closed, the pipe's fd numbers can be reused by any file or socket of the process: a late
        # wake-up must never write there, so writes and the close are serialised.
        self._wake_lock = threading.Lock()
        self._wake_closed = False
        self._wake_association = wake_association
        self.to_provider_queue = _NotifyingQueue(self._wake)
        self.to_user_queue = _NotifyingQueue(wake_association)

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_closed:
                return
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass  # the pipe is full: the reactor is awake anyway

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def run_reactor(self) -> None:
        try:
            self._loop()
        finally:
            store = getattr(self.assoc.dimse, "_store", None)
            if store is not None:  # the association ended mid-dataset: no partial file stays in tmp/
                store.discard()
                self.assoc.dimse._store = None
            self._wake_association()  # the association reactor checks `dul.is_alive()`
            with self._wake_lock:
                self._wake_closed = True
                os.close(self._wake_r)
                os.close(self._wake_w)

    def _loop(self) -> None:
        self._idle_timer.start()
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if self._kill_thread:
                return
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception:
                log.exception("DUL reactor failed; aborting the association")
                self._abort_hard()
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                self._wait_for_work()
                continue
            try:
                self.state_machine.do_action(event)
            except Exception:
                log.exception("DUL state machine failed on %s; aborting the association", event)
                self._abort_hard()
                return

    def _wait_for_work(self) -> None:
        """Block until the peer sends, the association queues a primitive, or a timer may have run out."""
        if not self.to_provider_queue.empty() or not self.event_queue.empty():
            return
        sock = getattr(self.socket, "socket", None)
        waitables: list[Any] = [self._wake_r]
        if sock is not None and getattr(self.socket, "_is_connected", False):
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return  # decrypted bytes already buffered: select would not see them
            waitables.append(sock)
        try:
            readable, _, _ = select.select(waitables, [], [], _IDLE_WAIT)
        except (OSError, ValueError):
            return  # the socket went away: the next loop's checks report it
        if self._wake_r in readable:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass

    def _abort_hard(self) -> None:
        """Send an A-ABORT past the state machine and stop; the association thread then reports an abort
        (EVT_ABORTED), so what the association stored before is published."""
        abort = A_ABORT_RQ()
        abort.source = 0x02
        abort.reason_diagnostic = 0x00
        try:
            self.socket.send(abort.encode())  # type: ignore[union-attr]
        except Exception:
            pass
        self._kill_thread = True  # the association reactor sees the DUL end and reports the abort


class _EventDrivenAssociation(Association):
    """The acceptor's reactor, sleeping on an event instead of polling every millisecond."""

    _wake_event: threading.Event

    def _run_reactor(self) -> None:
        self._is_paused = False
        while not self._kill:
            self._wake_event.wait(_IDLE_WAIT)
            self._wake_event.clear()
            # pynetdicom pauses the reactor while the user sends DIMSE messages itself
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            while True:
                context_id, message = self.dimse.get_msg(block=False)
                if not message:
                    break
                self._serve_request(message, int(context_id))  # type: ignore[arg-type]
            if self._finished():
                return

    def _end_with(self, event: Any) -> None:
        self.is_released = event is pynetdicom.evt.EVT_RELEASED
        self.is_aborted = not self.is_released
        self.is_established = False
        pynetdicom.evt.trigger(self, event, {})

    def _finished(self) -> bool:
        """Release, abort, a dead DUL or the network timeout end the reactor (pynetdicom's own checks)."""
        if self.is_established and self.acse.is_release_requested():
            # Report the release before answering it: the peer closes the connection on the answer, and
            # the connection-closed event (DUL thread) must not overtake the release.
            self._end_with(pynetdicom.evt.EVT_RELEASED)
            self.acse.send_release(is_response=True)
            self.kill()
            return True
        if self.acse.is_aborted():
            self.dul.receive_pdu(wait=False)
            self._end_with(pynetdicom.evt.EVT_ABORTED)
            self.kill()
            return True
        if not self.dul.is_alive():
            if self.is_established:  # the DUL died under us: report it as the abort it is
                self._end_with(pynetdicom.evt.EVT_ABORTED)
            self.kill()
            return True
        if self.dul.idle_timer_expired():
            log.error("network timeout reached: ending the association (%s)", self.network_timeout_response)
            if self.network_timeout_response == "A-RELEASE":
                self.release()
            else:
                self.abort()
            self.kill()
            return True
        return False


# -- C-STORE without pydicom ---------------------------------------------------------------------------

_ELEMENT = struct.Struct("<HHI")  # implicit VR little endian: group, element, length
_US = struct.Struct("<H")
_C_STORE_RQ, _C_STORE_RSP, _NO_DATASET = 0x0001, 0x8001, 0x0101


def parse_command(data: bytes | bytearray) -> dict[int, bytes] | None:
    """A command set's elements (element number → raw value), or None when it is not plain group 0000."""
    elements: dict[int, bytes] = {}
    offset, end = 0, len(data)
    while offset < end:
        if offset + 8 > end:
            return None
        group, element, length = _ELEMENT.unpack_from(data, offset)
        offset += 8
        if group != 0x0000 or length == 0xFFFFFFFF or offset + length > end:
            return None
        elements[element] = bytes(data[offset:offset + length])
        offset += length
    return elements


def _text(raw: bytes | None) -> str | None:
    return raw.decode("ascii", "replace").rstrip("\x00 ") if raw is not None else None


def _unsigned(raw: bytes | None) -> int | None:
    return _US.unpack(raw)[0] if raw is not None and len(raw) == 2 else None


def _explicit(tag: tuple[int, int], vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element (file meta)."""
    if vr in (b"OB", b"UN", b"SQ", b"UT", b"UR"):
        return struct.pack("<HH2sHI", tag[0], tag[1], vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag[0], tag[1], vr, len(value)) + value


def _even(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, prefix and file meta group of a Part-10 file, as pynetdicom's chunked receive writes them."""
    body = b"".join((
        _explicit((0x0002, 0x0001), b"OB", b"\x00\x01"),
        _explicit((0x0002, 0x0002), b"UI", _even(sop_class, b"\x00")),
        _explicit((0x0002, 0x0003), b"UI", _even(sop_instance, b"\x00")),
        _explicit((0x0002, 0x0010), b"UI", _even(transfer_syntax, b"\x00")),
        _explicit((0x0002, 0x0012), b"UI", _even(str(pynetdicom.PYNETDICOM_IMPLEMENTATION_UID), b"\x00")),
        _explicit((0x0002, 0x0013), b"SH", _even(pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
    ))
    return b"\x00" * 128 + b"DICM" + _explicit((0x0002, 0x0000), b"UL", struct.pack("<I", len(body))) + body


def _implicit(element: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def store_response(primitive: C_STORE) -> bytes | None:
    """The command set of a C-STORE-RSP, or None when it carries something only pynetdicom encodes."""
    if primitive.OffendingElement is not None:
        return None
    parts = []
    if primitive.AffectedSOPClassUID:
        parts.append(_implicit(0x0002, _even(str(primitive.AffectedSOPClassUID), b"\x00")))
    parts.append(_implicit(0x0100, _US.pack(_C_STORE_RSP)))
    parts.append(_implicit(0x0120, _US.pack(int(primitive.MessageIDBeingRespondedTo))))
    parts.append(_implicit(0x0800, _US.pack(_NO_DATASET)))
    parts.append(_implicit(0x0900, _US.pack(int(primitive.Status))))
    if primitive.ErrorComment:
        parts.append(_implicit(0x0902, _even(str(primitive.ErrorComment), b" ")))
    if primitive.AffectedSOPInstanceUID:
        parts.append(_implicit(0x1000, _even(str(primitive.AffectedSOPInstanceUID), b"\x00")))
    body = b"".join(parts)
    return _implicit(0x0000, struct.pack("<I", len(body))) + body


class _IncomingStore:
    """A C-STORE-RQ whose dataset is being streamed into a temp file (the chunked-receive file)."""

    def __init__(self, context_id: int, command: dict[int, bytes], transfer_syntax: str) -> None:
        self.context_id = context_id
        self.command = command
        self.error: OSError | None = None  # a failed write (e.g. ENOSPC): the data is dropped, not the link
        fd, name = tempfile.mkstemp(suffix=".dcm")
        os.close(fd)
        self.path = Path(name)
        self.file: BinaryIO = open(name, "wb", buffering=1 << 20)  # noqa: SIM115 (closed by pynetdicom's SCP)
        self.write(file_meta(_text(command.get(0x0002)) or "", _text(command.get(0x1000)) or "",
                             transfer_syntax))

    def write(self, data: bytes | memoryview) -> None:
        """Append received bytes; after a failed write the rest of the dataset is read and dropped, so the
        association lives on and the C-STORE can be answered with a failure status."""
        if self.error is not None:
            return
        try:
            self.file.write(data)
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        try:
            self.file.close()
        except OSError:
            pass
        self.path.unlink(missing_ok=True)

    def primitive(self) -> C_STORE:
        """The C-STORE request as pynetdicom's service class expects it (dataset in ``_dataset_path``).

        After a failed write, ``_receive_error`` carries the error for the handler to answer with.
        """
        if self.error is None:
            try:
                self.file.flush()
            except OSError as exc:
                self._fail(exc)
        request = C_STORE()
        request.MessageID = _unsigned(self.command.get(0x0110))
        request.AffectedSOPClassUID = _text(self.command.get(0x0002))
        request.AffectedSOPInstanceUID = _text(self.command.get(0x1000))
        request.Priority = _unsigned(self.command.get(0x0700)) or 0
        originator = _text(self.command.get(0x1030))
        if originator:
            request.MoveOriginatorApplicationEntityTitle = originator
        originator_id = _unsigned(self.command.get(0x1031))
        if originator_id is not None:
            request.MoveOriginatorMessageID = originator_id
        request.DataSet = io.BytesIO()  # empty, as in pynetdicom's chunked receive: the data is in the file
        request._context_id = self.context_id
        request._dataset_path = self.path
        request._dataset_file = self.file  # type: ignore[assignment]
        request._receive_error = self.error  # type: ignore[attr-defined]
        return request

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


class _FastStoreDimse(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider with C-STORE request/response handled without pydicom."""

    _command: bytearray
    _store: _IncomingStore | None

    def receive_primitive(self, primitive: P_DATA) -> None:
        for context_id, data in primitive.presentation_data_value_list:
            self._receive_fragment(int(context_id), data)

    def _receive_fragment(self, context_id: int, data: bytes) -> None:
        control = data[0]
        if self.message is not None:  # a message on pynetdicom's own path
            self._stock(context_id, data)
        elif self._store is not None:  # our C-STORE's dataset
            if control & 1:
                self._store.discard()
                self._store = None
                self.dul.event_queue.put("Evt19")  # a command where data must follow: protocol error
                return
            self._store.write(memoryview(data)[1:])
            if control & 2:
                store, self._store = self._store, None
                try:
                    request = store.primitive()
                except Exception as exc:  # e.g. an Affected SOP Instance UID pynetdicom refuses (> 64 chars)
                    log.warning("invalid C-STORE request (%s): aborting the association", exc)
                    store.discard()
                    self.dul.event_queue.put("Evt19")  # unrecognised PDU parameter: A-ABORT
                    return
                self.msg_queue.put((store.context_id, request))
        elif control & 1:
            self._command += memoryview(data)[1:]
            if control & 2:
                command, self._command = self._command, bytearray()
                self._command_complete(context_id, command)
        else:
            self._stock(context_id, data)  # data without a command: let pynetdicom report it

    def _command_complete(self, context_id: int, command: bytearray) -> None:
        elements = parse_command(command)
        context = self.assoc._accepted_cx.get(context_id)
        if (elements is None or context is None or _unsigned(elements.get(0x0100)) != _C_STORE_RQ
                or _unsigned(elements.get(0x0800)) == _NO_DATASET):
            self._stock(context_id, b"\x03" + bytes(command))
            return
        self._store = _IncomingStore(context_id, elements, str(context.transfer_syntax[0]))

    def _stock(self, context_id: int, data: bytes) -> None:
        pdata = P_DATA()
        pdata.presentation_data_value_list = [[context_id, data]]
        super().receive_primitive(pdata)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None:
            command = store_response(primitive)
            limit = self.maximum_pdu_size
            if command is not None and (not limit or len(command) + 7 <= limit):
                pdata = P_DATA()
                pdata.presentation_data_value_list = [[context_id, b"\x03" + command]]
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)


def _make_event_driven(assoc: Association) -> Association:
    """Turn a freshly created (not yet started) acceptor into the event-driven variant."""
    wake = threading.Event()
    old_dul = assoc.dul
    dul = _EventDrivenDUL(assoc, wake.set)
    dul.socket = old_dul.socket
    dul.event_queue = old_dul.event_queue  # holds the connection's Evt5, queued when the socket was made
    dul._idle_timer.timeout = old_dul._idle_timer.timeout
    dul.artim_timer.timeout = old_dul.artim_timer.timeout
    assoc.__class__ = _EventDrivenAssociation
    assoc._wake_event = wake  # type: ignore[attr-defined]
    assoc.dul = dul
    assoc.dimse.msg_queue = _NotifyingQueue(wake.set)
    assoc.dimse.__class__ = _FastStoreDimse
    assoc.dimse._command = bytearray()  # type: ignore[attr-defined]
    assoc.dimse._store = None  # type: ignore[attr-defined]
    return assoc


class EventDrivenRequestHandler(RequestHandler):
    """pynetdicom's request handler, creating event-driven associations when the version is known."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        return _make_event_driven(assoc) if adapted() else assoc
