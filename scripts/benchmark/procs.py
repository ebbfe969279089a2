"""Processes for the benchmark: the two receivers, the storescu senders and a /proc memory sampler.

Linux only (reads /proc). Nothing here imports the server: ``imagingstudy-scp`` is run by its command line.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

AET = "IMAGINGSTUDY"
CALLING_AET = "BENCHSCU"
PAGE = os.sysconf("SC_PAGE_SIZE")

# DCMTK waits ~40 ms per PDU on loopback (Nagle + delayed ACK) unless told to set TCP_NODELAY.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


class BenchError(RuntimeError):
    """A run that cannot give a trustworthy figure (server died, sender failed, data not intact)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def is_listening(port: int) -> bool:
    """True when some socket listens on ``port`` (read from /proc/net/tcp*, no connection is made)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


# --- memory --------------------------------------------------------------------------------------------------

def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int, children: bool = False) -> float:
    """CPU seconds (user + system) of a process, plus those of its reaped children when ``children``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # after the comm: state ppid ... utime(11) stime(12) cutime(13) cstime(14), counted from state = 0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICK


def system_cpu() -> tuple[float, float]:
    """(busy, iowait) core-seconds of the whole machine since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / TICK, iowait / TICK


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` value of /proc/<pid>/status (VmHWM, VmRSS), in bytes; 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeSampler:
    """Samples the summed RSS of a process and all its descendants (a forking storescp) every ``interval``.

    ``peak`` is the largest sum seen, and at least the largest VmHWM of any one member (exact for a
    single-process server, whose VmHWM is its true peak).
    """

    def __init__(self, root: int, interval: float = 0.02) -> None:
        self.root = root
        self.interval = interval
        self.peak_sum = 0
        self.peak_hwm = 0
        self.max_members = 1
        self.members_seen: set[int] = {root}
        self._ppids: dict[int, int | None] = {}
        self._sched: dict[tuple[int, int], tuple[int, int]] = {}  # (pid, tid) -> (ns on a CPU, ns runnable)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> "TreeSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.sample()
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        return max(self.peak_sum, self.peak_hwm)

    def tree(self) -> set[int]:
        alive = {int(name) for name in os.listdir("/proc") if name.isdigit()}
        for gone in set(self._ppids) - alive:
            del self._ppids[gone]  # a reused pid is looked at again
        for pid in alive - set(self._ppids):
            self._ppids[pid] = _ppid(pid)
        children: dict[int, list[int]] = {}
        for pid, ppid in self._ppids.items():
            if ppid is not None:
                children.setdefault(ppid, []).append(pid)
        members, todo = set(), [self.root]
        while todo:
            pid = todo.pop()
            if pid in members:
                continue
            members.add(pid)
            todo.extend(children.get(pid, ()))
        return members & alive

    def sample(self) -> None:
        members = self.tree()
        self.members_seen |= members
        self.max_members = max(self.max_members, len(members))
        self.peak_sum = max(self.peak_sum, sum(_rss(pid) for pid in members))
        for pid in members:
            self.peak_hwm = max(self.peak_hwm, status_kb(pid, "VmHWM"))
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                try:
                    running, waiting = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[:2]
                except (OSError, ValueError):
                    continue
                self._sched[(pid, int(tid))] = (int(running), int(waiting))

    def sched_seconds(self) -> tuple[float, float]:
        """(seconds on a CPU, seconds runnable but waiting for a CPU) of every thread seen in the tree so far.

        From /proc/<pid>/task/<tid>/schedstat at each sample: a thread that ends between two samples loses at
        most one interval.
        """
        running = sum(v[0] for v in self._sched.values())
        waiting = sum(v[1] for v in self._sched.values())
        return running / 1e9, waiting / 1e9

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


# --- receivers -----------------------------------------------------------------------------------------------

@dataclass
class Receiver:
    """One receiving server process over its own output directory."""

    name: str
    label: str
    data_dir: Path
    log_path: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    sampler: TreeSampler | None = None
    idle_rss: int = 0
    started_at: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)

    def command(self, parallel: int) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def ready(self) -> bool:
        return is_listening(self.port)

    def start(self, parallel: int, timeout: float = 60) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command(parallel), stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env(), start_new_session=True)
        self.started_at = time.monotonic()
        deadline = self.started_at + timeout
        while not self.ready():
            if self.process.poll() is not None:
                raise BenchError(f"{self.label} exited with {self.process.returncode} before listening:\n"
                                 f"{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise BenchError(f"{self.label} not listening on {self.port} after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.02)
        self.idle_rss = status_kb(self.process.pid, "VmRSS")
        self.sampler = TreeSampler(self.process.pid).start()

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the receiver's process tree (reaped children included)."""
        assert self.process is not None and self.sampler is not None
        root = self.process.pid
        members = self.sampler.tree() - {root}
        return process_cpu(root, children=True) + sum(process_cpu(pid, children=True) for pid in members)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, wait; returns the peak RSS of the process tree in bytes."""
        assert self.process is not None and self.sampler is not None
        self.sampler.sample()
        hwm = status_kb(self.process.pid, "VmHWM")
        self.sampler.stop()
        leftovers = self.sampler.tree() - {self.process.pid}
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in leftovers:  # forked children of our own receiver still running: end them by pid
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        return max(self.sampler.peak, hwm)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.sampler is not None:
            self.sampler.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stored_files(self) -> list[Path]:
        raise NotImplementedError


class Dcmtk(Receiver):
    """DCMTK ``storescp``: page cache only (no fsync), ``--fork`` for parallel associations."""

    def __init__(self, *args: object, extra_args: list[str] = [], **kwargs: object) -> None:  # noqa: B006
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.extra_args = list(extra_args)

    def command(self, parallel: int) -> list[str]:
        return ["storescp", "-aet", AET, "-od", str(self.data_dir), "+xa", *self.extra_args,
                *(["--fork"] if parallel > 1 else []), str(self.port)]

    def env(self) -> dict[str, str]:
        return dict(DCMTK_ENV)

    def stored_files(self) -> list[Path]:
        return sorted(p for p in self.data_dir.rglob("*") if p.is_file())


PUBLISHED = re.compile(r"published study=(?P<study>\S+) sink=\S+ series=\d+ instances=(?P<instances>\d+) "
                       r"version=\S+(?: latency=(?P<latency>[\d.]+)s)?")
PUBLISH_FAILED = re.compile(r"(?:publishing study (\S+) failed|ImagingStudy for study (\S+) is invalid|"
                            r"publication of study[= ](\S+) to (?:sink=)?\S+ (?:refused|raised))")
ASSOCIATION = re.compile(r"association (?P<id>\S+) (?P<how>\S+) .*? instances=(?P<instances>\d+) "
                         r"bytes=(?P<bytes>\d+) seconds=(?P<seconds>[\d.]+)")


class Ours(Receiver):
    """``imagingstudy-scp serve`` (fsync on unless ``extra_args`` says otherwise)."""

    def __init__(self, *args: object, executable: Path, extra_args: list[str], profile: Path | None = None,
                 **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.executable = executable
        self.extra_args = extra_args
        self.profile = profile

    def command(self, parallel: int) -> list[str]:
        prefix = [str(self.executable)]
        if self.profile is not None:  # the same entry point, run under cProfile by scripts/benchmark/profile_ours.py
            prefix = [str(self.executable.parent / "python"), str(Path(__file__).with_name("profile_ours.py")),
                      str(self.profile)]
        return [*prefix, "serve", "--host", "127.0.0.1", "--port", str(self.port), "--aet", AET,
                "--data-dir", str(self.data_dir), *self.extra_args]

    def ready(self) -> bool:
        """Once the server says it serves: with ``--workers`` its receiver processes accept by then too."""
        return re.search(rf"serving \S+ on 127\.0\.0\.1:{self.port}\b", self.log_text()) is not None

    def stored_files(self) -> list[Path]:
        return sorted((self.data_dir / "studies").rglob("*.dcm"))

    def publications(self) -> list[tuple[str, int, float | None]]:
        """(study, instances, latency) of every ``published`` log line so far."""
        return [(m["study"], int(m["instances"]), float(m["latency"]) if m["latency"] else None)
                for m in PUBLISHED.finditer(self.log_text())]

    def publish_failures(self) -> list[str]:
        """Studies whose publication the server logged as failed or rejected."""
        return [next(g for g in m.groups() if g) for m in PUBLISH_FAILED.finditer(self.log_text())]

    def associations(self) -> list[dict[str, object]]:
        return [{"how": m["how"], "instances": int(m["instances"]), "bytes": int(m["bytes"]),
                 "seconds": float(m["seconds"])} for m in ASSOCIATION.finditer(self.log_text())]


# --- senders -------------------------------------------------------------------------------------------------

def storescu_command(port: int, inputs: list[Path]) -> list[str]:
    return ["storescu", "-aet", CALLING_AET, "-aec", AET, "-xe", "-R", "127.0.0.1", str(port),
            "+sd", "+r", *map(str, inputs)]


def send(port: int, shares: list[list[Path]], log_dir: Path, tag: str, timeout: float,
         receiver: Receiver) -> tuple[float, list[float]]:
    """Run one storescu per share in parallel; (wall seconds until the last exits, each one's seconds)."""
    procs: list[subprocess.Popen[bytes]] = []
    ended: list[float] = [0.0] * len(shares)

    def waiter(k: int) -> None:
        procs[k].wait()
        ended[k] = time.perf_counter()

    threads = []
    started = time.perf_counter()
    for k, share in enumerate(shares):
        with open(log_dir / f"{tag}-storescu{k}.log", "wb") as log:
            procs.append(subprocess.Popen(storescu_command(port, share), stdout=log, stderr=subprocess.STDOUT,
                                          env=DCMTK_ENV))
        threads.append(threading.Thread(target=waiter, args=(k,), daemon=True))
        threads[-1].start()
    deadline = started + timeout
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.25)
                if thread.is_alive():
                    if time.perf_counter() > deadline:
                        raise BenchError(f"storescu still running after {timeout}s")
                    if not receiver.alive():
                        raise BenchError(f"{receiver.label} died while receiving:\n{receiver.log_tail()}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = [(k, p.returncode) for k, p in enumerate(procs) if p.returncode != 0]
    if failed:
        details = "; ".join(f"storescu{k} exited {rc}: "
                            + (log_dir / f"{tag}-storescu{k}.log").read_text(errors="replace")[-2000:]
                            for k, rc in failed)
        raise BenchError(details)
    return max(ended) - started, [e - started for e in ended]
