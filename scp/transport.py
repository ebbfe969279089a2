"""Adaptations of pynetdicom's private transport internals, in one place and for one version.

pynetdicom's two per-association threads poll: the association reactor sleeps 1 ms between looks at its
message queue, and the DUL reactor sleeps 1 ms whenever a loop found nothing to do. Every C-STORE waits on
both (request in, response out), which caps a single association at a few hundred instances per second
whatever the CPU does. Here both loops wait on events instead:

- the association thread sleeps on a :class:`threading.Event` set whenever a DIMSE message, an ACSE
  primitive or the end of the DUL thread needs it;
- the DUL thread sleeps in ``select`` on its socket and on a wake-up pipe written whenever the association
  thread queues something to send.

Both keep pynetdicom's own state machine and service classes for everything but the data of a C-STORE.
That, the only traffic whose volume grows with the study, takes a short path on the DUL thread:

- a P-DATA-TF PDU in the data-transfer state is read into one reused buffer and its fragments go straight
  to the DIMSE provider (pynetdicom reads it 4 KB at a time, builds PDU and primitive objects and passes
  it through the state machine, which forwards it there unchanged);
- a C-STORE-RQ's command set is read without pydicom and its dataset streamed into a temp file (file meta
  written from precomputed bytes, the first bytes also kept in memory for the header read);
- with a :class:`StoreHandler` (the server's), the request is answered right there on the DUL thread and
  the C-STORE-RSP, encoded directly, is sent at once: no hand-off to the association thread and back, no
  service class, no event objects. Without one, only the waits are event-driven.

Every other message, and anything unexpected, takes pynetdicom's own path. Idle associations stay cheap
(a wake-up every 50 ms to check timers). The adaptation applies only to the pynetdicom versions in
:data:`ADAPTED_FOR`; any other version runs stock pynetdicom (and the tests in ``tests/test_transport.py``
fail loudly, so the pin is revisited rather than silently ignored).

A peer that stops in the middle of a PDU (or of the TLS handshake) must not hold a thread, a connection and
an association slot for ever: the accepted socket carries the network timeout as its socket timeout (set by
the server, :mod:`scp.association`), so a read or write that waits longer than that raises; the reactor
then aborts the association (an A-ABORT when one is established), and what was acknowledged before is
reported as usual. :func:`abort_association` ends an association from another thread (the server stopping).
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import pynetdicom
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import RequestHandler

from scp.temp_files import TempFile
from scp.uids import MAX_UID_LENGTH

log = logging.getLogger("scp.transport")

ADAPTED_FOR = ("3.0.",)
_IDLE_WAIT = 0.05  # seconds between timer checks when nothing happens
_MAX_BUFFER = 4 << 20  # the reused PDU buffer grows up to this; larger PDUs are read as they arrive


@dataclass(slots=True)
class StoreRequest:
    """A C-STORE request whose dataset has been received into a temp file (a Part-10 file).

    ``head`` holds the file's first bytes (at most :data:`HEAD_BYTES`) and ``fd`` is the file,
    still open, so that the handler neither reads nor opens it again unless it must.
    """

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    path: str | Path
    size: int
    head: bytes | bytearray
    fd: int | None = None
    receive_error: OSError | None = None  # a failed write (e.g. ENOSPC): answer with a failure status
    transfer_syntax: str | None = None  # the context's transfer syntax exactly as the peer proposed it
    # the request itself is unusable (an Affected SOP Class/Instance UID that cannot be a UID): answer 0xC000
    # with this comment; the dataset was read and dropped, nothing was written
    refusal: str | None = None


class StoreHandler(Protocol):
    """What the event-driven transport calls for C-STORE requests, on the thread that reads the socket.

    Handling the request where it was read saves two thread hand-offs per instance (to the
    association's thread and back), and pynetdicom's service class and event machinery.
    """

    def temp_file(self) -> TempFile:
        """A new empty file on the store's filesystem, open, for one dataset."""

    def store(self, assoc: Association, request: StoreRequest) -> tuple[int, str | None]:
        """Store the instance; the DIMSE status and error comment to answer with. Must not raise."""


HEAD_BYTES = 64 * 1024  # bytes of each received file kept in memory for the header read


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
        self._buffer = bytearray(1 << 17)  # one PDU at a time; grows for larger PDUs
        self._readable = False  # the last wait saw the socket readable
        self.direct = False  # P-DATA to the short path (set when the DIMSE provider is a _FastStoreDimse)
        # True while a C-STORE is being stored on this thread: the peer is waiting for us, not idle, so
        # the network timeout (checked on the association's thread) must not end the association
        self.storing = False
        # context id → transfer syntaxes as proposed, byte for byte: pynetdicom's decoding strips whitespace
        # (a UID "1.2.3\n" becomes "1.2.3"), and what the peer really sent decides whether the C-STORE is valid
        self.proposed_transfer_syntaxes: dict[int, list[str]] = {}
        self._abort_requested = False  # set from another thread (the server stopping): see abort_soon()

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

    def abort_soon(self) -> None:
        """Abort the association on this thread at its next turn: asked from another thread, which must not
        write to the socket itself (its bytes could land in the middle of a PDU this thread is sending)."""
        self._abort_requested = True
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
            if self._abort_requested:
                log.warning("ending the association: the server is stopping")
                self._end_now()
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
            if self._kill_thread:  # e.g. aborted after a network timeout: nothing queued since matters
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
        self._readable = sock is not None and sock in readable
        if self._wake_r in readable:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass

    def _is_transport_event(self) -> bool:
        """pynetdicom's check, minus its own ``select`` when the wait just said the socket is readable."""
        if self._readable and self.state_machine.current_state != "Sta13":
            self._readable = False
            self._read_pdu_data()
            return True
        self._readable = False
        return bool(super()._is_transport_event())

    # -- P-DATA-TF without pynetdicom's PDU objects and state machine -----------------------------

    def _read_pdu_data(self) -> None:
        """Read one PDU. A P-DATA-TF in the data-transfer state (Sta6), with no event waiting before it,
        goes straight to the DIMSE provider as memory views of one reused buffer; pynetdicom's own
        path (PDU objects, Evt10 through the state machine, DT-2) only forwards it there, after reading
        it 4 KB at a time. Anything else takes that path, from the bytes read here."""
        view = self._recv_exactly(6)
        if view is None:
            return
        header = bytes(view)  # the body is read into the same buffer
        pdu_type, _, length = _PDU_HEADER.unpack(header)
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            log.error("unknown PDU type 0x%02X received", pdu_type)
            self.event_queue.put("Evt19")
            return
        body = self._recv_exactly(length)
        if body is None:
            return
        if (pdu_type == 0x04 and self.direct and self.state_machine.current_state == "Sta6"
                and self.event_queue.empty()):
            self._p_data(body)
            return
        if pdu_type == 0x01:
            self.proposed_transfer_syntaxes = proposed_transfer_syntaxes(body)
        try:
            pdu, event = self._decode_pdu(bytearray(header) + body)
        except Exception:
            log.exception("unable to decode the received PDU")
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _recv_exactly(self, size: int) -> memoryview | None:
        """``size`` bytes from the socket; None (and Evt17) when the link breaks first.

        They go into the reused buffer, which grows to the largest PDU seen up to :data:`_MAX_BUFFER`;
        a larger (announced) length is read into memory only as the bytes arrive, as pynetdicom does.
        """
        sock = self.socket.socket  # type: ignore[union-attr]
        try:
            data = self._recv_large(sock, size) if size > _MAX_BUFFER else self._recv_into_buffer(sock, size)
        except TimeoutError:  # the socket's timeout: nothing came for the network timeout
            log.error("network timeout: the peer sent nothing for %s s in the middle of a PDU (or of the TLS "
                      "handshake), or did not read what we sent; ending the association", self.network_timeout)
            self._end_now()
            return None
        except OSError as exc:
            self._connection_lost("connection closed before the entire PDU was received: %s", exc)
            return None
        if len(data) < size:
            if len(data) or size != 6:  # nothing at all where a PDU would start: the peer just closed
                self._connection_lost("the received PDU is shorter than expected (%d of %d bytes)", len(data), size)
            else:
                self._connection_lost(None)
            return None
        return data

    def _connection_lost(self, why: str | None, *args: object) -> None:
        """The connection broke under a read (Evt17), unless it was shut down to end the association now
        (:func:`abort_association`): then the association is aborted, as asked, without an error logged."""
        if self._abort_requested:
            self._end_now()
            return
        if why is not None:
            log.error(why, *args)
        self.event_queue.put("Evt17")

    def _recv_into_buffer(self, sock: Any, size: int) -> memoryview:
        """Up to ``size`` bytes into the reused buffer (fewer only when the peer closed).

        Bytes arriving count as network activity: the idle timer restarts whenever more must be read, so a
        large PDU on a slow link is not taken for silence (a stalled one ends on the socket's timeout)."""
        if len(self._buffer) < size:
            self._buffer = bytearray(max(size, min(2 * len(self._buffer), _MAX_BUFFER)))
        view = memoryview(self._buffer)[:size]
        got = 0
        while got < size:
            count = sock.recv_into(view[got:], size - got)
            if not count:
                break
            got += count
            if got < size:
                self._idle_timer.restart()
        return view[:got]

    def _recv_large(self, sock: Any, size: int) -> memoryview:
        """Up to ``size`` bytes into a new buffer that grows as they arrive (fewer only when the peer closed)."""
        data = bytearray()
        while len(data) < size:
            chunk = sock.recv(min(size - len(data), _MAX_BUFFER))
            if not chunk:
                break
            data += chunk
            self._idle_timer.restart()
        return memoryview(data)

    def _p_data(self, body: memoryview) -> None:
        """Hand each presentation data value of a P-DATA-TF to the DIMSE provider."""
        dimse = self.assoc.dimse
        offset, end = 0, len(body)
        while offset < end:
            if offset + 6 > end:
                self._invalid_pdu("a presentation data value item is cut short")
                return
            length, context_id = _PDV_HEADER.unpack_from(body, offset)
            if length < 2 or offset + 4 + length > end:
                self._invalid_pdu(f"presentation data value item length {length} is invalid")
                return
            dimse._receive_fragment(context_id, body[offset + 5:offset + 4 + length])
            offset += 4 + length
            if not self.event_queue.empty():  # the fragment ended the data transfer (e.g. Evt19)
                return

    def _invalid_pdu(self, why: str) -> None:
        log.error("invalid P-DATA-TF PDU: %s", why)
        self.event_queue.put("Evt19")

    def send_now(self, data: bytes) -> None:
        """Send bytes now, on this (the DUL) thread, past the provider queue and the state machine.

        Used for C-STORE responses in Sta6 only, where the state machine would send them unchanged
        (DT-1) and stay in Sta6. Every other send still goes through the queue, on this same thread.
        """
        try:
            self.socket.socket.sendall(data)  # type: ignore[union-attr]
        except (OSError, AttributeError):
            self.event_queue.put("Evt17")

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

    def _end_now(self) -> None:
        """End this thread, with an A-ABORT when an association is established (or was, until the association
        thread's own network timeout aborted it: its A-ABORT waits in the queue this thread no longer reads).
        Before that (e.g. a TLS handshake that never finished) there is nothing to abort, and a write could wait
        on the peer again; the association thread closes the connection when its wait for the A-ASSOCIATE-RQ
        ends (ACSE timeout), or at once if it was already over."""
        if self.assoc.is_established or self.assoc.is_aborted:
            self._abort_hard()
        else:
            self._kill_thread = True


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
        if self.dul.idle_timer_expired() and not self.dul.storing:  # type: ignore[attr-defined]
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


_REQUEST_UIDS = ((0x0002, "Affected SOP Class UID"), (0x1000, "Affected SOP Instance UID"))


def request_uid_refusal(command: dict[int, bytes]) -> str | None:
    """Why a C-STORE-RQ's Affected SOP Class/Instance UID is missing or cannot be a UID at all (a byte beyond
    ASCII, more than 64 characters), or None. Such a request is refused (0xC000) before a file is taken: both
    are mandatory (PS3.7 9.1.1.1), and these could neither go into the file meta nor be echoed in the
    response. Anything subtler (letters, leading zeros) is left to the handler, which compares the request's
    UIDs with the dataset's."""
    for element, name in _REQUEST_UIDS:
        raw = command.get(element)
        if not raw or not raw.rstrip(b"\x00 "):
            return f"the request has no {name}"
        if not raw.isascii():
            return f"{name} is not a UID (a byte beyond ASCII)"
        length = len(raw.rstrip(b"\x00 "))
        if length > MAX_UID_LENGTH:
            return f"{name} is {length} characters long (at most {MAX_UID_LENGTH})"
    return None


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


_META_VERSION = _explicit((0x0002, 0x0001), b"OB", b"\x00\x01")
_META_IMPLEMENTATION = (  # the same for every file: encoded once
    _explicit((0x0002, 0x0012), b"UI", _even(str(pynetdicom.PYNETDICOM_IMPLEMENTATION_UID), b"\x00"))
    + _explicit((0x0002, 0x0013), b"SH", _even(pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION, b" ")))


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, prefix and file meta group of a Part-10 file, as pynetdicom's chunked receive writes them."""
    body = b"".join((
        _META_VERSION,
        _explicit((0x0002, 0x0002), b"UI", _even(sop_class, b"\x00")),
        _explicit((0x0002, 0x0003), b"UI", _even(sop_instance, b"\x00")),
        _explicit((0x0002, 0x0010), b"UI", _even(transfer_syntax, b"\x00")),
        _META_IMPLEMENTATION,
    ))
    return b"\x00" * 128 + b"DICM" + _explicit((0x0002, 0x0000), b"UL", struct.pack("<I", len(body))) + body


def _implicit(element: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def store_response_command(message_id: int, sop_class: str, sop_instance: str, status: int,
                           comment: str | None) -> bytes:
    """The command set of a C-STORE-RSP, encoded as pynetdicom encodes it (implicit VR little endian)."""
    parts = []
    if sop_class:
        parts.append(_implicit(0x0002, _even(sop_class, b"\x00")))
    parts.append(_implicit(0x0100, _US.pack(_C_STORE_RSP)))
    parts.append(_implicit(0x0120, _US.pack(message_id)))
    parts.append(_implicit(0x0800, _US.pack(_NO_DATASET)))
    parts.append(_implicit(0x0900, _US.pack(status)))
    if comment:
        parts.append(_implicit(0x0902, _even(comment, b" ")))
    if sop_instance:
        parts.append(_implicit(0x1000, _even(sop_instance, b"\x00")))
    body = b"".join(parts)
    return _implicit(0x0000, struct.pack("<I", len(body))) + body


_PDU_HEADER = struct.Struct(">BBL")
_PDV_HEADER = struct.Struct(">LB")


_ITEM_HEADER = struct.Struct(">BBH")


def proposed_transfer_syntaxes(body: bytes | memoryview) -> dict[int, list[str]]:
    """Context id → the transfer syntax names of an A-ASSOCIATE-RQ's presentation contexts, as sent (only
    the trailing NUL padding removed); whatever does not parse is left out, pynetdicom judges the PDU."""
    found: dict[int, list[str]] = {}
    offset, end = 68, len(body)  # after protocol version, reserved, called and calling AE, reserved
    while offset + 4 <= end:
        kind, _, length = _ITEM_HEADER.unpack_from(body, offset)
        item_end = min(offset + 4 + length, end)
        if kind == 0x20 and length >= 4:
            names = found.setdefault(body[offset + 4], [])
            sub = offset + 8
            while sub + 4 <= item_end:
                sub_kind, _, sub_length = _ITEM_HEADER.unpack_from(body, sub)
                if sub_kind == 0x40:
                    names.append(bytes(body[sub + 4:sub + 4 + sub_length]).decode("latin-1").rstrip("\x00"))
                sub += 4 + sub_length
        offset = item_end
    return found


def p_data_tf(context_id: int, fragment: bytes) -> bytes:
    """A P-DATA-TF PDU carrying one presentation data value (``fragment`` starts with its control byte)."""
    item = _PDV_HEADER.pack(len(fragment) + 1, context_id) + fragment
    return _PDU_HEADER.pack(0x04, 0, len(item)) + item


def command_pdus(context_id: int, command: bytes, max_pdu: int) -> bytes:
    """An encoded command set as P-DATA-TF PDUs no longer than the peer's maximum PDU length (0 = no limit):
    one PDU when it fits, else one command fragment per PDU, as pynetdicom fragments it (each PDV's item
    header takes 6 of the PDU's bytes)."""
    room = max_pdu - 6 if max_pdu else len(command)
    if room < 1:
        raise ValueError(f"the peer's maximum PDU length {max_pdu} leaves no room for a command fragment")
    if len(command) <= room:
        return p_data_tf(context_id, b"\x03" + command)
    starts = range(0, len(command), room)
    return b"".join(p_data_tf(context_id, (b"\x03" if start + room >= len(command) else b"\x01")
                              + command[start:start + room]) for start in starts)


class _IncomingStore:
    """A C-STORE-RQ whose dataset is being streamed into a temp file (the chunked-receive file)."""

    def __init__(self, context_id: int, command: dict[int, bytes], transfer_syntax: str,
                 temp_file: Callable[[], TempFile], transfer_syntax_as_sent: str) -> None:
        self.context_id = context_id
        self.command = command
        self.transfer_syntax_as_sent = transfer_syntax_as_sent
        self.error: OSError | None = None  # a failed write (e.g. ENOSPC): the data is dropped, not the link
        self.head = bytearray()
        self.file = TempFile("", -1)
        # a request that cannot be stored whatever its dataset: the data is read and dropped, no file taken
        self.refusal = request_uid_refusal(command)
        if self.refusal is not None:
            self._meta: bytes | None = None
            return
        # written together with the first fragment: one system call for a small instance. Made before the
        # file is taken, so that nothing is left open if it fails.
        self._meta = file_meta(_text(command.get(0x0002)) or "", _text(command.get(0x1000)) or "", transfer_syntax)
        try:
            self.file = temp_file()
        except OSError as exc:  # no file to receive into (e.g. the disk is full): drop the data, answer 0xA700
            self.error = exc

    def write(self, data: bytes | memoryview) -> None:
        """Append received bytes; after a failed write the rest of the dataset is read and dropped, so the
        association lives on and the C-STORE can be answered with a failure status."""
        if self.error is not None or self.refusal is not None:
            return
        parts = (data,) if self._meta is None else (self._meta, data)
        self._meta = None
        for part in parts:
            if len(self.head) < HEAD_BYTES:
                self.head += part[:HEAD_BYTES - len(self.head)]
        try:
            self.file.write(*parts)
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        self.discard()

    def finish(self) -> None:
        """The last fragment is in (a dataset without bytes still gets its file meta)."""
        if self._meta is not None:
            self.write(b"")
        if self.error is None and self.refusal is None:
            self.file.written()

    def request(self) -> StoreRequest:
        """The request for a :class:`StoreHandler` (after :meth:`finish`). A refused request carries no UIDs:
        they are not UIDs, and the response then leaves them out (both are optional in a C-STORE-RSP)."""
        refused = self.refusal is not None
        return StoreRequest(
            message_id=_unsigned(self.command.get(0x0110)) or 0,
            sop_class_uid="" if refused else _text(self.command.get(0x0002)) or "",
            sop_instance_uid="" if refused else _text(self.command.get(0x1000)) or "",
            path=self.file.path, size=self.file.size, head=self.head,  # the header reader copies what it keeps
            fd=self.file.fd if self.error is None and not refused else None,
            receive_error=self.error, transfer_syntax=self.transfer_syntax_as_sent, refusal=self.refusal,
        )

    def discard(self) -> None:
        """Close the file and remove it unless the handler moved it into the store."""
        try:
            self.file.close()
        except OSError:
            pass
        if self.file.path:
            try:
                os.unlink(self.file.path)
            except FileNotFoundError:  # the handler moved it into the store
                pass


class _FastStoreDimse(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider with C-STORE request/response handled without pydicom."""

    _command: bytearray
    _store: _IncomingStore | None
    _handler: StoreHandler

    def receive_primitive(self, primitive: P_DATA) -> None:
        for context_id, data in primitive.presentation_data_value_list:
            self._receive_fragment(int(context_id), data)

    def _receive_fragment(self, context_id: int, data: bytes | memoryview) -> None:
        if context_id not in self.assoc._accepted_cx:
            self._unknown_context(context_id)
            return
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
                self._serve(store)
        elif control & 1:
            self._command += memoryview(data)[1:]
            if control & 2:
                command, self._command = self._command, bytearray()
                self._command_complete(context_id, command)
        else:
            self._stock(context_id, data)  # data without a command: let pynetdicom report it

    def _unknown_context(self, context_id: int) -> None:
        """A fragment on a presentation context the association did not accept: a protocol error, since
        nothing says how to read it (PS3.8 9.3.5, 7.6). It is treated as an invalid PDU (Evt19, AA-8: an
        A-ABORT from the service provider) before anything is made for the message: pynetdicom's own path
        would open a temp file for its dataset, then fail to find the context and leave the file open."""
        log.error("P-DATA on presentation context %d, which this association did not accept: aborting", context_id)
        self._command = bytearray()
        self.dul.event_queue.put("Evt19")  # the partial dataset, if any, goes when the DUL thread ends

    def _command_complete(self, context_id: int, command: bytearray) -> None:
        elements = parse_command(command)
        context = self.assoc._accepted_cx.get(context_id)
        if (elements is None or context is None or _unsigned(elements.get(0x0100)) != _C_STORE_RQ
                or _unsigned(elements.get(0x0800)) == _NO_DATASET):
            self._stock(context_id, b"\x03" + bytes(command))
            return
        accepted = str(context.transfer_syntax[0])
        proposed = self.dul.proposed_transfer_syntaxes.get(context_id, ())  # type: ignore[attr-defined]
        as_sent = next((name for name in proposed if name.strip() == accepted), accepted)
        self._store = _IncomingStore(context_id, elements, accepted, self._handler.temp_file, as_sent)

    def _serve(self, store: _IncomingStore) -> None:
        """Answer a fully received C-STORE here and now (on the DUL thread)."""
        store.finish()
        request = store.request()
        dul = self.dul
        dul.storing = True  # type: ignore[attr-defined]
        try:
            status, comment = self._handler.store(self.assoc, request)
        finally:
            dul._idle_timer.restart()  # the wait was ours; the network timeout counts from the answer
            dul.storing = False  # type: ignore[attr-defined]
            store.discard()
        command = store_response_command(request.message_id, request.sop_class_uid, request.sop_instance_uid,
                                         status, comment)
        # fragmented here for a peer with a tiny PDU limit, not through a pynetdicom primitive: its setters
        # validate the UIDs, and a request's may well be invalid (that is why it is being refused)
        pdus = command_pdus(store.context_id, command, self.maximum_pdu_size)
        self.dul.send_now(pdus)  # type: ignore[attr-defined]

    def _stock(self, context_id: int, data: bytes | memoryview) -> None:
        pdata = P_DATA()
        pdata.presentation_data_value_list = [[context_id, bytes(data)]]  # a view's buffer is reused
        super().receive_primitive(pdata)


def _make_event_driven(assoc: Association, handler: StoreHandler | None) -> Association:
    """Turn a freshly created (not yet started) acceptor into the event-driven variant.

    With a ``handler``, C-STORE requests take the short path and are answered by it on the DUL thread;
    without one, only the waits are event-driven and every message takes pynetdicom's own path.
    """
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
    if handler is not None:
        dul.direct = True
        assoc.dimse.__class__ = _FastStoreDimse
        assoc.dimse._command = bytearray()  # type: ignore[attr-defined]
        assoc.dimse._store = None  # type: ignore[attr-defined]
        assoc.dimse._handler = handler  # type: ignore[attr-defined]
    return assoc


class EventDrivenRequestHandler(RequestHandler):
    """pynetdicom's request handler, creating event-driven associations when the version is known.

    The server's ``store_handler`` attribute (a :class:`StoreHandler`), when set, answers C-STOREs.
    """

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        if not adapted():
            return assoc
        return _make_event_driven(assoc, getattr(self.server, "store_handler", None))


# -- ending associations from another thread (the server stopping) ---------------------------------------

def open_associations(ae: pynetdicom.AE) -> list[Association]:
    """The AE's associations still holding a connection: established ones, and connections whose DUL thread
    still runs (e.g. a peer that has not finished its A-ASSOCIATE-RQ or its TLS handshake)."""
    return [assoc for assoc in ae.active_associations if assoc.is_established or assoc.dul.is_alive()]


def abort_association(assoc: Association, patience: float = 0.5) -> None:
    """End ``assoc`` now, from another thread (the server is stopping).

    Event-driven: its own DUL thread sends the A-ABORT (two threads writing one socket could interleave
    PDUs). A thread still running after ``patience`` seconds is waiting on the peer (a PDU or a TLS
    handshake left half-sent): the connection's read side is shut down under it, so that read ends at once
    and the A-ABORT can still go out; after ``patience`` more (a write the peer does not read), both sides.
    Stock pynetdicom: the same shutdowns, which its DUL sees as the connection closing (no A-ABORT), then
    its own ``kill``. Either way the association reports its end, so what it acknowledged is published.
    """
    dul = assoc.dul
    event_driven = isinstance(dul, _EventDrivenDUL)

    def running() -> bool:  # a stock DUL thread does not end by itself: it waits in Sta1 to be stopped
        return dul.is_alive() and (event_driven or dul.state_machine.current_state != "Sta1")

    if event_driven:
        dul.abort_soon()
        dul.join(patience)
    sock = getattr(dul.socket, "socket", None)
    for how in (socket.SHUT_RD, socket.SHUT_RDWR):
        if not running():
            break
        _shut_down(sock, how)
        deadline = time.monotonic() + patience
        while running() and time.monotonic() < deadline:
            time.sleep(0.01)
    if not event_driven:
        assoc.kill()


def _shut_down(sock: socket.socket | None, how: int) -> None:
    """Shut a connection down (``how``: a ``socket.SHUT_*``), so that a read or write waiting on it returns now.

    The plain socket's shutdown even for TLS: ``SSLSocket.shutdown`` would drop its TLS state first, under
    a thread that may still be using it."""
    if sock is None:
        return
    try:
        socket.socket.shutdown(sock, how)
    except OSError:
        pass  # already closed
