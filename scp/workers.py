"""Receiver processes: parallel associations on several CPU cores (``workers``).

One Python process does not store faster with more parallel associations: the Python part of every store runs
under one interpreter lock (measured on 2 cores with 4 parallel `storescu`: one process ~650-740 instances/s,
no more than with one association; two processes over one data dir ~950-1,100). With ``workers = N`` the server
process starts N - 1 receiver processes that accept on the same listening sockets (inherited: the kernel hands
each connection to one process). A receiver receives and stores exactly as the server does (its own index
connection; stores of one SOP Instance UID locked across processes) and sends each association's report, with
what its counters counted, to the server over a pipe; the server logs the report and publishes its studies as it
does for its own associations. Everything else stays in the server process: start-up reconciliation, the outbox
and publication, the admin HTTP listener, and the data-dir lock, which each receiver also holds (inherited) so
that no second server starts over the data dir before the last receiver has gone.

A receiver stops, giving its open associations the stop grace, when its standard input reaches end of file (the
server closed it to stop, or the server process died) or on SIGTERM. One that dies is started again, and the
studies holding instances not yet published are queued (its open associations never reached their release).
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import orjson

import scp
from scp import logs
from scp.association import AssociationReport, Listener
from scp.index import INDEX_FILE, Index
from scp.metrics import Metrics
from scp.settings import Settings
from scp.store import TMP, Store
from scp.temp_files import spare_prefix

log = logging.getLogger("scp.workers")

SOP_LOCK_FILE = "sop.lock"  # in the data dir: the cross-process locks of stores of one SOP Instance UID
COUNTERS_EVERY = 1.0  # seconds between a receiver's counter updates to the server (also sent with each report)
_RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)  # before starting again a receiver that died (n-th time in a row)
_STOP_POLL = 0.2  # seconds between a receiver's looks at whether to stop
_READY_TIMEOUT = 60.0  # seconds a receiver may take to start accepting (imports, index)
_STABLE_AFTER = 60.0  # seconds a receiver must have run for its restarts to count from the first delay again


@dataclass(frozen=True)
class _Assignment:
    """What a receiver process is told on its standard input (pickled: it holds the settings' secrets)."""

    settings: Settings
    socket_fds: tuple[int, ...]  # listening sockets: plain, then TLS
    report_fd: int  # write end of the pipe to the server


class ReceiverFailed(RuntimeError):
    """A receiver process could not start."""


class _Receiver:
    def __init__(self, slot: int, process: subprocess.Popen[bytes]) -> None:
        self.slot = slot
        self.process = process
        self.started = time.monotonic()
        self.ready = threading.Event()  # set when it accepts associations
        self.ended = threading.Event()  # set when its pipe closed (it ended, or is ending)


class Receivers:
    """The server's receiver processes: started, relayed to the server, started again when one dies, stopped."""

    def __init__(self, settings: Settings, count: int, sockets: Sequence[socket.socket], lock_fd: int,
                 metrics: Metrics, on_report: Callable[[AssociationReport], None],
                 on_lost: Callable[[], None]) -> None:
        self._settings = settings
        self._count = count
        self._sockets = list(sockets)
        self._lock_fd = lock_fd
        self._metrics = metrics
        self._on_report = on_report
        self._on_lost = on_lost
        self._receivers: dict[int, _Receiver] = {}
        self._relays: list[threading.Thread] = []
        self._restarts: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def start(self, timeout: float = _READY_TIMEOUT) -> None:
        """Start the receivers; return once each accepts, or raise :class:`ReceiverFailed`."""
        for slot in range(self._count):
            self._spawn(slot)
        deadline = time.monotonic() + timeout
        with self._lock:
            receivers = list(self._receivers.values())
        for receiver in receivers:
            while not receiver.ready.wait(0.05):
                if receiver.ended.is_set() or time.monotonic() > deadline:
                    raise ReceiverFailed(f"receiver process {receiver.slot + 1} (pid {receiver.process.pid}) did "
                                         f"not start accepting (see the log lines above)")

    def not_running(self) -> int:
        """How many receivers are not running now (readiness)."""
        with self._lock:
            return self._count - sum(1 for r in self._receivers.values() if r.process.poll() is None)

    def stop(self, timeout: float) -> None:
        """Close each receiver's standard input (it stops as the server does), wait up to ``timeout`` seconds
        for them and their last reports, then kill what is left."""
        with self._lock:
            self._stopping.set()
            receivers = list(self._receivers.values())
        for receiver in receivers:
            _close_quietly(receiver.process.stdin)
        deadline = time.monotonic() + timeout
        joined: set[threading.Thread] = set()
        while True:  # again for a receiver started while this waited (it was told to stop at once)
            with self._lock:
                relays = [relay for relay in self._relays if relay not in joined]
                receivers = list(self._receivers.values())
            if not relays:
                break
            for relay in relays:
                relay.join(max(0.0, deadline - time.monotonic()))
                joined.add(relay)
        for receiver in receivers:
            if receiver.process.poll() is None:
                log.warning("receiver process %d did not stop in %g s: killed", receiver.process.pid, timeout)
                receiver.process.kill()
                try:
                    receiver.process.wait(5)
                except subprocess.TimeoutExpired:  # in the kernel (a hung disk): it goes when it can
                    log.error("receiver process %d still there after SIGKILL", receiver.process.pid)

    def _spawn(self, slot: int) -> None:
        read_fd, write_fd = os.pipe()
        socket_fds = tuple(s.fileno() for s in self._sockets)
        try:
            # its own process group: a terminal's Ctrl-C reaches the server only, which stops its receivers
            process = subprocess.Popen([sys.executable, "-m", "scp.workers"], stdin=subprocess.PIPE,
                                       pass_fds=(*socket_fds, self._lock_fd, write_fd), env=_child_environment(),
                                       process_group=0)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        assert process.stdin is not None
        try:
            process.stdin.write(pickle.dumps(_Assignment(self._settings, socket_fds, write_fd)))
            process.stdin.flush()
        except OSError:
            log.exception("cannot brief receiver process %d (pid %d)", slot + 1, process.pid)  # it ends: see _relay
        receiver = _Receiver(slot, process)
        relay = threading.Thread(target=self._relay, args=(receiver, read_fd), name=f"receiver-{slot}",
                                 daemon=True)
        with self._lock:
            self._receivers[slot] = receiver
            self._relays.append(relay)
            if self._stopping.is_set():  # started again while stop() was taking its list: stop it as well
                _close_quietly(process.stdin)
        relay.start()
        log.info("receiver process %d started (pid %d)", slot + 1, process.pid)

    def _relay(self, receiver: _Receiver, read_fd: int) -> None:
        """Hand the receiver's reports and counts to the server until it ends; then start another if it died."""
        with open(read_fd, "rb") as pipe:
            for line in pipe:
                self._deliver(receiver, line)
        receiver.ended.set()
        status = receiver.process.wait()
        if self._stopping.is_set():
            return
        log.error("receiver process %d (pid %d) ended with status %s: its open associations are lost to their "
                  "senders (nothing it acknowledged is); starting another", receiver.slot + 1,
                  receiver.process.pid, status)
        _remove_temp_files(Path(self._settings.data_dir) / TMP, receiver.process.pid)
        try:
            self._on_lost()
        except Exception:  # noqa: BLE001 - the next start publishes what this could not queue
            log.exception("while queueing the studies of a lost receiver process")
        if time.monotonic() - receiver.started > _STABLE_AFTER:
            self._restarts[receiver.slot] = 0
        self._start_again(receiver.slot)

    def _start_again(self, slot: int) -> None:
        """Start the slot's receiver again after the backoff; a start that fails (out of file descriptors or
        memory, say) counts as one more death and is tried again later."""
        while True:
            delay = _RESTART_DELAYS[min(self._restarts[slot], len(_RESTART_DELAYS) - 1)]
            self._restarts[slot] += 1
            if self._stopping.wait(delay):
                return
            try:
                self._spawn(slot)
                return
            except Exception:  # noqa: BLE001 - /readyz says it is missing meanwhile
                log.exception("cannot start receiver process %d again; trying later", slot + 1)

    def _deliver(self, receiver: _Receiver, line: bytes) -> None:
        try:
            message = orjson.loads(line)
        except orjson.JSONDecodeError:
            log.warning("unreadable message from a receiver process: %r", line[:200])
            return
        if message.get("ready"):
            receiver.ready.set()
        try:
            self._metrics.add_counts(message.get("counters", {}))
            if "report" in message:
                self._on_report(_report_from(message["report"]))
        except Exception:  # noqa: BLE001 - the pipe must be read on (a full one would stall the receiver)
            log.exception("while handling a receiver process's report; its studies are published at the next "
                          "start if not before")


def _child_environment() -> dict[str, str]:
    """The server's environment, with this package importable whatever way the server was started."""
    env = dict(os.environ)
    root = str(Path(scp.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _temp_prefix(pid: int) -> str:
    """The name prefix of the temp files pynetdicom's own receive (``--stock-transport``) makes in a receiver."""
    return f"tmp-{pid}-"


def _remove_temp_files(tmp_dir: Path, pid: int) -> None:
    """A dead receiver's temp files (its spare files, the datasets it was receiving); the next start would too."""
    try:
        for pattern in (f"{spare_prefix(pid)}*", f"{_temp_prefix(pid)}*"):
            for path in tmp_dir.glob(pattern):
                path.unlink(missing_ok=True)
    except OSError as exc:  # e.g. out of file descriptors: the next start removes them
        log.warning("cannot remove the temp files of receiver pid %d: %s", pid, exc)


def _close_quietly(stream: IO[bytes] | None) -> None:
    if stream is not None:
        try:
            stream.close()
        except OSError:
            pass  # the receiver is gone already


def _report_to(report: AssociationReport) -> dict[str, Any]:
    document = asdict(report)
    document["failures"] = {str(status): count for status, count in report.failures.items()}
    return document


def _report_from(document: dict[str, Any]) -> AssociationReport:
    failures = Counter({int(status): count for status, count in document.pop("failures", {}).items()})
    return AssociationReport(**document, failures=failures)


# -- the receiver process -----------------------------------------------------------------------------------


class _ServerPipe:
    """The receiver's side of the pipe: association reports and counter increments, one JSON line each."""

    def __init__(self, fd: int, metrics: Metrics) -> None:
        self._file = open(fd, "wb")  # noqa: SIM115 - open for the process's life; buffered: whole lines
        self._metrics = metrics
        self._sent: dict[str, float] = {}
        self._lock = threading.Lock()
        self._broken = False

    def report(self, report: AssociationReport) -> None:
        self._send({"report": _report_to(report)})

    def counters(self) -> None:
        self._send({})

    def ready(self) -> None:
        self._send({"ready": True})

    def _send(self, message: dict[str, Any]) -> None:
        with self._lock:  # one line at a time, and increments counted once
            current = self._metrics.counter_values()
            increments = {key: value - self._sent.get(key, 0.0) for key, value in current.items()
                          if value != self._sent.get(key, 0.0)}
            if not increments and not message:
                return
            self._sent = current
            try:
                self._file.write(orjson.dumps({**message, "counters": increments}) + b"\n")
                self._file.flush()
            except OSError as exc:
                if not self._broken:
                    log.error("cannot reach the server process (%s): what is stored here is published at the "
                              "next start", exc)
                self._broken = True


def _stop_at_end_of_input(stream: IO[bytes], stop: list[str]) -> None:
    while stream.read(4096):
        pass
    stop.append("end of input")


def main() -> int:
    """A receiver process: read the assignment, receive and store until told to stop."""
    assignment: _Assignment = pickle.load(sys.stdin.buffer)
    settings = assignment.settings
    logs.configure(settings.log_level, settings.log_format)
    stop: list[str] = []  # why to stop; a plain list: a signal handler must not take a lock (Event.set does)
    for signum in (signal.SIGTERM, signal.SIGINT):  # from a supervisor signalling every process: stop, as asked
        signal.signal(signum, lambda number, _frame: stop.append(f"signal {number}"))
    tempfile.template = _temp_prefix(os.getpid())  # pynetdicom's own receive: removable if this process dies
    threading.Thread(target=_stop_at_end_of_input, args=(sys.stdin.buffer, stop), name="server watch",
                     daemon=True).start()

    from scp.server import ingest_for, listener_options  # noqa: PLC0415 - the server module imports this one

    metrics = Metrics()
    store = Store(settings.data_dir, fsync=settings.fsync)
    index = Index(store.data_dir / INDEX_FILE)
    ingest = ingest_for(settings, store, index, metrics, lock_file_made=True)  # one deleted since locks nothing
    server = _ServerPipe(assignment.report_fd, metrics)
    sockets = tuple(socket.socket(fileno=fd) for fd in assignment.socket_fds)
    listener = Listener(listener_options(settings, sockets=sockets), ingest, on_end=server.report)
    if not stop:  # a receiver started again as the server stops is told at once: it must not accept
        listener.start()
        server.ready()
    next_counters = time.monotonic() + COUNTERS_EVERY
    while not stop:
        time.sleep(_STOP_POLL)
        if time.monotonic() >= next_counters:
            server.counters()
            next_counters += COUNTERS_EVERY
    listener.stop()
    server.counters()
    ingest.close()
    index.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
