"""Adaptations of pynetdicom's private transport internals, in one place and for one version.

pynetdicom's two per-association threads poll: the association reactor sleeps 1 ms between looks at its
message queue, and the DUL reactor sleeps 1 ms whenever a loop found nothing to do. Every C-STORE waits on
both (request in, response out), which caps a single association at a few hundred instances per second
whatever the CPU does. Here both loops wait on events instead:

- the association thread sleeps on a :class:`threading.Event` set whenever a DIMSE message, an ACSE
  primitive or the end of the DUL thread needs it;
- the DUL thread sleeps in ``select`` on its socket and on a wake-up pipe written whenever the association
  thread queues something to send.

Both keep pynetdicom's own state machine, message decoding and service classes; only the waiting changes.
Idle associations stay cheap (a wake-up every 50 ms to check timers). The adaptation applies only to the
pynetdicom versions in :data:`ADAPTED_FOR`; any other version runs stock pynetdicom (and the tests in
``tests/test_transport.py`` fail loudly, so the pin is revisited rather than silently ignored).
"""

from __future__ import annotations

import logging
import os
import queue
import select
import ssl
import threading
from collections.abc import Callable
from typing import Any

import pynetdicom
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
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
        self._wake_association = wake_association
        self.to_provider_queue = _NotifyingQueue(self._wake)
        self.to_user_queue = _NotifyingQueue(wake_association)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the reactor is awake anyway
        except OSError:
            pass  # closed at the end of the reactor

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def run_reactor(self) -> None:
        try:
            self._loop()
        finally:
            self._wake_association()  # the association reactor checks `dul.is_alive()`
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass

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
            self.state_machine.do_action(event)

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
        """Send an A-ABORT past the state machine and stop both reactors (as pynetdicom does on a fault)."""
        abort = A_ABORT_RQ()
        abort.source = 0x02
        abort.reason_diagnostic = 0x00
        try:
            self.socket.send(abort.encode())  # type: ignore[union-attr]
        except Exception:
            pass
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
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

    def _finished(self) -> bool:
        """Release, abort, a dead DUL or the network timeout end the reactor (pynetdicom's own checks)."""
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            self.is_released = True
            self.is_established = False
            pynetdicom.evt.trigger(self, pynetdicom.evt.EVT_RELEASED, {})
            self.kill()
            return True
        if self.acse.is_aborted():
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            pynetdicom.evt.trigger(self, pynetdicom.evt.EVT_ABORTED, {})
            self.kill()
            return True
        if not self.dul.is_alive():
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
    return assoc


class EventDrivenRequestHandler(RequestHandler):
    """pynetdicom's request handler, creating event-driven associations when the version is known."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        return _make_event_driven(assoc) if adapted() else assoc
