"""Throughput, memory and publication latency of imagingstudy-scp against DCMTK's storescp.

    scripts/bench [--quick] [--sets ct,tiny,multi,big] [--rounds N] [--assoc 1,4] [--json out.json]

For every data set (see ``scripts/benchmark/datasets.py``) and association mode, the two receivers take turns, DCMTK
first (A B A B ...), for ``--rounds`` rounds. Each run starts the receiver afresh on an empty directory under
``.bench/run/``, sends the whole set with DCMTK ``storescu`` (one process per association, ``TCP_NODELAY=1``
for DCMTK sender and receiver), and measures:

- instances/s and MB/s: instances (file bytes) divided by the wall time from starting the senders to the last
  one exiting (i.e. after its release was acknowledged);
- peak RSS of the receiver's process tree (summed over a forking storescp's children, sampled from /proc every
  20 ms, and at least the VmHWM of any one process);
- ours only: release -> ImagingStudy, the ``latency=`` the server logs for the publication that carries the
  study's final instance count (the largest over the set's studies; the table shows the median over rounds and
  the worst round), plus the wall time from the last sender exiting until every study was published with its
  final count;
- where the time goes: CPU seconds of each receiver's process tree while the senders ran (per instance and as a
  share of the wall time), the time its threads were runnable but waiting for a CPU (/proc schedstat), the
  senders' CPU, and the share of the machine busy with anything else (other processes, kernel write-back): a
  noisy neighbour shows there.

Before timing, each receiver gets one separate small warm-up instance (``--no-warmup`` to skip): one-off costs
of a fresh process, such as ours compiling its schema validator on the first publication, stay out of the
figures (ours' first-publication latency is still shown per run).

Before any figure is reported, the stored files are checked: one file per source instance, nothing else, and
the dataset bytes after the file meta equal the source's (SHA-256; ``--verify sample`` hashes a sample only).
A run that fails a check stops that set/mode and is reported as an error (exit status 1); its stored files are
kept under ``.bench/failed/``. Logs of the last invocation (servers and senders) are in ``.bench/logs/``.

Fairness: the source files are read once before a set's first run (page cache warm for both), and before
every run ``sync`` is called, so neither receiver pays for the other's write-back. A finished run's files are
set aside and deleted when the benchmark ends (see :func:`set_aside`). DCMTK never fsyncs; ours does unless
``--ours-args=--no-fsync``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python scripts/benchmark/bench.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmark.datasets import (QUICK_SETS, SETS, WARMUP, DataSet, Part10Error, dataset_digest,  # noqa: E402
                            load_or_generate, stored_sop_uid)
from benchmark.procs import BenchError, Dcmtk, Ours, Receiver, send, system_cpu  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]  # the repository (scripts/benchmark/bench.py)
BENCH_DIR = ROOT / ".bench"
TRASH_DIR = BENCH_DIR / "trash"  # finished runs' files, deleted at the end
DEFAULT_ASSOC = {"ct": [1], "tiny": [1], "multi": [4], "big": [1], "latency": [1]}
MB = 1e6


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Run:
    server: str
    round: int
    seconds: float
    sender_seconds: list[float]
    instances: int
    bytes: int
    peak_rss: int
    idle_rss: int
    startup_seconds: float
    verify_seconds: float
    stop_seconds: float
    sync_seconds: float
    publish_latency: float | None = None       # largest server-logged latency of a final publication
    publish_latencies: dict[str, float | None] = field(default_factory=dict)
    publish_wall: float | None = None          # last sender exit -> all final ImagingStudy resources seen
    associations: list[dict[str, object]] = field(default_factory=list)
    rss_members: int = 1
    warmup_publish: float | None = None  # ours: latency of the warm-up study's publication (the first one)
    receiver_cpu: float = 0.0    # CPU seconds of the receiver tree while the senders ran
    receiver_cpu_wait: float = 0.0  # seconds its threads were runnable but waiting for a CPU (contention)
    sender_cpu: float = 0.0      # CPU seconds of the storescu processes
    machine_busy: float = 0.0    # busy core-seconds of the whole machine in that window
    machine_iowait: float = 0.0  # iowait core-seconds of the whole machine in that window
    load_before: float = 0.0     # 1-minute load average when the run started

    @property
    def other_cpu(self) -> float:
        """Share of the machine's cores busy with something else than receiver and senders."""
        other = self.machine_busy - self.receiver_cpu - self.sender_cpu
        return max(0.0, other) / (self.seconds * (os.cpu_count() or 1))

    @property
    def inst_per_s(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.bytes / MB / self.seconds

    def as_json(self) -> dict[str, object]:
        out = dict(self.__dict__)
        out.update(inst_per_s=round(self.inst_per_s, 2), mb_per_s=round(self.mb_per_s, 2),
                   other_cpu=round(self.other_cpu, 3))
        return out


@dataclass
class Case:
    set_name: str
    spec_name: str
    assoc: int
    instances: int
    bytes: int
    studies: int
    runs: list[Run] = field(default_factory=list)
    error: str | None = None

    def rounds(self) -> list[tuple[Run, Run]]:
        dcmtk = {r.round: r for r in self.runs if r.server == "dcmtk"}
        ours = {r.round: r for r in self.runs if r.server == "ours"}
        return [(dcmtk[k], ours[k]) for k in sorted(dcmtk) if k in ours]

    def ratios(self) -> list[float]:
        return [o.inst_per_s / d.inst_per_s for d, o in self.rounds()]

    def summary(self) -> dict[str, object] | None:
        pairs = self.rounds()
        if not pairs:
            return None
        d = [p[0] for p in pairs]
        o = [p[1] for p in pairs]
        latencies = [r.publish_latency for r in o if r.publish_latency is not None]
        walls = [r.publish_wall for r in o if r.publish_wall is not None]
        return {
            "dcmtk_inst_per_s": statistics.median(r.inst_per_s for r in d),
            "ours_inst_per_s": statistics.median(r.inst_per_s for r in o),
            "ratio_median": statistics.median(self.ratios()),
            "ratios": self.ratios(),
            "dcmtk_mb_per_s": statistics.median(r.mb_per_s for r in d),
            "ours_mb_per_s": statistics.median(r.mb_per_s for r in o),
            "dcmtk_peak_rss": max(r.peak_rss for r in d),
            "ours_peak_rss": max(r.peak_rss for r in o),
            "dcmtk_idle_rss": max(r.idle_rss for r in d),
            "ours_idle_rss": max(r.idle_rss for r in o),
            "publish_latency_median": statistics.median(latencies) if latencies else None,
            "publish_latency_max": max(latencies) if latencies else None,
            "publish_wall_median": statistics.median(walls) if walls else None,
            "dcmtk_cpu_ms_per_inst": statistics.median(1e3 * r.receiver_cpu / r.instances for r in d),
            "ours_cpu_ms_per_inst": statistics.median(1e3 * r.receiver_cpu / r.instances for r in o),
            "ours_cpu_share": statistics.median(r.receiver_cpu / r.seconds for r in o),
            "ours_cpu_wait_share": statistics.median(r.receiver_cpu_wait / r.seconds for r in o),
            "dcmtk_cpu_wait_share": statistics.median(r.receiver_cpu_wait / r.seconds for r in d),
            "sender_cpu_ms_per_inst": statistics.median(1e3 * r.sender_cpu / r.instances for r in d + o),
            "other_cpu_max": max(r.other_cpu for r in d + o),
            "ours_iowait_share": statistics.median(r.machine_iowait / r.seconds for r in o),
        }


# --- one run -------------------------------------------------------------------------------------------------

def verify(receiver: Receiver, data: DataSet, mode: str, warmup: DataSet | None) -> None:
    """Every source instance stored exactly once with its dataset bytes intact, nothing else stored."""
    files = receiver.stored_files()
    expected = data.by_sop()
    if warmup is not None:
        expected.update(warmup.by_sop())
    if len(files) != len(expected):
        raise BenchError(f"{receiver.label}: {len(files)} files stored, {len(expected)} sent")
    if mode == "all":
        to_hash = files
    else:  # a deterministic sample: first, last and up to 48 more
        rng = random.Random(len(files))
        to_hash = sorted({files[0], files[-1], *rng.sample(files, min(48, len(files)))})
    hashed = set(to_hash)
    seen: set[str] = set()
    for path in files:
        try:
            if path in hashed:
                sop, digest, _ = dataset_digest(path)
            else:
                sop, digest = stored_sop_uid(path), None
        except (OSError, Part10Error) as exc:
            raise BenchError(f"{receiver.label}: {path} is not a readable Part-10 file: {exc}") from exc
        source = expected.get(sop)
        if source is None:
            raise BenchError(f"{receiver.label}: {path} holds SOP Instance {sop!r}, which was not sent")
        if sop in seen:
            raise BenchError(f"{receiver.label}: SOP Instance {sop} stored twice")
        seen.add(sop)
        if digest is not None and digest != source.sha256:
            raise BenchError(f"{receiver.label}: {path}: dataset bytes differ from the source {source.path}")


def wait_published(ours: Ours, data: DataSet, since: float, timeout: float) -> tuple[dict[str, float | None], float]:
    """Per study, the logged latency of the publication carrying its final count; and the wall time."""
    expected = data.studies
    if not expected:
        return {}, 0.0
    deadline = time.monotonic() + timeout
    fhir = ours.data_dir / "fhir" / "ImagingStudy"
    while True:
        final: dict[str, float | None] = {}
        for study, count, latency in ours.publications():
            if expected.get(study) == count:
                final[study] = latency
        if len(final) == len(expected):
            wall = time.perf_counter() - since
            for study, count in expected.items():  # the resource on disk agrees with the log
                published = json.loads((fhir / f"{study}.json").read_bytes())
                if published.get("numberOfInstances") != count:
                    raise BenchError(f"ImagingStudy {study}: numberOfInstances "
                                     f"{published.get('numberOfInstances')} != {count}")
            return final, wall
        if not ours.alive():
            raise BenchError(f"{ours.label} died before publishing:\n{ours.log_tail()}")
        failed = [s for s in ours.publish_failures() if s in expected]
        if failed:
            raise BenchError(f"{ours.label} failed to publish study {failed[0]}:\n{ours.log_tail()}")
        if time.monotonic() > deadline:
            missing = sorted(set(expected) - set(final))
            raise BenchError(f"{len(missing)} studies not published with their final count after {timeout}s "
                             f"(e.g. {missing[0]}):\n{ours.log_tail()}")
        time.sleep(0.005)


def run_once(server: str, data: DataSet, assoc: int, round_no: int, args: argparse.Namespace,
             log_dir: Path, warmup: DataSet | None) -> Run:
    run_dir = BENCH_DIR / "run" / server
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t_sync = time.monotonic()
    os.sync()  # nothing left for write-back from generation or the previous run
    sync_seconds = time.monotonic() - t_sync
    tag = f"{data.spec.name}-a{assoc}-r{round_no}-{server}"
    log_path = log_dir / f"{tag}.log"
    receiver: Receiver
    if server == "dcmtk":
        receiver = Dcmtk("dcmtk", "DCMTK storescp", run_dir, log_path, extra_args=shlex.split(args.dcmtk_args))
    else:
        receiver = Ours("ours", "imagingstudy-scp", run_dir, log_path, executable=args.ours,
                        extra_args=shlex.split(args.ours_args),
                        profile=log_dir / f"{tag}.prof" if args.profile else None)
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    receiver.start(assoc)
    startup = time.monotonic() - t0
    try:
        warmup_publish = None
        if warmup is not None:  # first-use costs paid before the clock starts
            send(receiver.port, warmup.shares(1), log_dir, tag + "-warmup", args.timeout, receiver)
            if isinstance(receiver, Ours):
                latencies, _ = wait_published(receiver, warmup, time.perf_counter(), args.publish_timeout)
                warmup_publish = next(iter(latencies.values()))
        assoc_before = len(receiver.associations()) if isinstance(receiver, Ours) else 0
        assert receiver.sampler is not None
        receiver.sampler.sample()
        cpu0, children0 = receiver.cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
        wait0 = receiver.sampler.sched_seconds()[1]
        busy0, iowait0 = system_cpu()
        seconds, per_sender = send(receiver.port, data.shares(assoc), log_dir, tag, args.timeout, receiver)
        sent_at = time.perf_counter()
        busy1, iowait1 = system_cpu()
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        receiver_cpu = receiver.cpu_seconds() - cpu0
        receiver.sampler.sample()
        cpu_wait = receiver.sampler.sched_seconds()[1] - wait0
        sender_cpu = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
        latencies: dict[str, float | None] = {}
        wall = None
        if isinstance(receiver, Ours):
            latencies, wall = wait_published(receiver, data, sent_at, args.publish_timeout)
        t_stop = time.monotonic()
        peak = receiver.stop()
        stop_seconds = time.monotonic() - t_stop
    except BenchError as exc:
        receiver.kill()
        raise BenchError(f"{exc}\n({keep(run_dir, tag)}, log {log_path})") from exc
    except BaseException:
        receiver.kill()
        raise
    t1 = time.monotonic()
    try:
        verify(receiver, data, args.verify, warmup)
    except BenchError as exc:
        raise BenchError(f"{exc} ({keep(run_dir, tag)}, log {log_path})") from exc
    verify_seconds = time.monotonic() - t1
    known = [v for v in latencies.values() if v is not None]
    result = Run(server, round_no, seconds, per_sender, len(data.instances), data.total_bytes, peak,
                 receiver.idle_rss, startup, verify_seconds, stop_seconds, sync_seconds,
                 publish_latency=max(known) if known else None, publish_latencies=latencies, publish_wall=wall,
                 associations=receiver.associations()[assoc_before:] if isinstance(receiver, Ours) else [],
                 rss_members=len(receiver.sampler.members_seen) if receiver.sampler else 1,
                 warmup_publish=warmup_publish, receiver_cpu=receiver_cpu, receiver_cpu_wait=cpu_wait,
                 sender_cpu=sender_cpu,
                 machine_busy=busy1 - busy0, machine_iowait=iowait1 - iowait0, load_before=load_before)
    set_aside(run_dir, tag, len(data.instances))
    return result


def set_aside(run_dir: Path, tag: str, files: int) -> None:
    """Empty a finished run's files and move them out of the way; they are deleted when the benchmark ends.

    Two effects of this 2-core VM would otherwise distort the next run. Deleting thousands of files made
    creating a file cost 0.15-0.4 ms instead of ~0.02 ms for a minute (ext4 without a journal passes over
    recently freed inodes), which hit the receiver that creates its files on the critical path (DCMTK)
    more than ours (spare files made ahead). Keeping the files with their data made each run slower than
    the last (new page-cache pages come from memory the VM has not touched yet, several times slower to
    write into than recycled pages). Truncating a file frees its blocks and cached pages but keeps its inode.
    A run of a few large files is deleted at once: its inodes do not matter.
    """
    if files < 100:
        shutil.rmtree(run_dir)
        return
    for directory, _, names in os.walk(run_dir):
        for name in names:
            os.truncate(os.path.join(directory, name), 0)
    TRASH_DIR.mkdir(parents=True, exist_ok=True)
    run_dir.rename(TRASH_DIR / tag)


def keep(run_dir: Path, tag: str) -> str:
    """Move a failed run's directory out of the way of the next run; says where it went."""
    kept = BENCH_DIR / "failed" / tag
    shutil.rmtree(kept, ignore_errors=True)
    kept.parent.mkdir(parents=True, exist_ok=True)
    if run_dir.exists():
        shutil.move(str(run_dir), str(kept))
        return f"stored files kept in {kept}"
    return "nothing stored"


def warm(data: DataSet) -> None:
    """Read every source file once so that the first receiver does not pay for the disk."""
    buffer = bytearray(1 << 20)
    for inst in data.instances:
        with open(data.files_dir / inst.path, "rb") as handle:
            while handle.readinto(buffer):
                pass


# --- report --------------------------------------------------------------------------------------------------

def fmt_rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def fmt_mb(value: int) -> str:
    return f"{value / 2**20:,.0f}"


def report(cases: list[Case], env: dict[str, object]) -> str:
    lines = [
        f"imagingstudy-scp bench — {env['mode']}, {env['rounds']} rounds, {env['cpus']} CPUs, "
        f"{env['dcmtk']}{(' ' + env['dcmtk_args']) if env['dcmtk_args'] else ''}, "
        f"ours {env['ours_args'] or '(defaults: fsync on)'}, commit {env['commit']}, "
        f"{'warm-up study first' if env['warmup'] else 'no warm-up'}"
        + (" — PROFILED (ours under cProfile: figures not comparable)" if env["profile"] else ""),
        "",
        "| set | assoc | DCMTK inst/s | ours inst/s | ratio (median of rounds) | DCMTK MB/s | ours MB/s "
        "| peak RSS DCMTK / ours (MiB) | release→ImagingStudy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        s = case.summary()
        each = case.bytes / case.instances
        size = f"{each / 1e6:,.0f} MB" if each >= 1e7 else f"{each / 1e3:,.1f} KB"
        name = f"{case.set_name} ({case.instances:,} × {size}"
        name += f", {case.studies} studies)" if case.studies > 1 else ")"
        if case.error and not s:
            lines.append(f"| {name} | {case.assoc} | error | | | | | | |")
            continue
        assert s is not None
        latency = "—"
        if s["publish_latency_median"] is not None:
            latency = f"{s['publish_latency_median']:.3f} s (worst round {s['publish_latency_max']:.3f})"
        lines.append(
            f"| {name} | {case.assoc} | {fmt_rate(s['dcmtk_inst_per_s'])} | {fmt_rate(s['ours_inst_per_s'])} "
            f"| {s['ratio_median']:.2f} | {fmt_rate(s['dcmtk_mb_per_s'])} | {fmt_rate(s['ours_mb_per_s'])} "
            f"| {fmt_mb(s['dcmtk_peak_rss'])} / {fmt_mb(s['ours_peak_rss'])} | {latency} |")
    lines += ["", "Per-round ratios ours/DCMTK (inst/s):"]
    for case in cases:
        ratios = " ".join(f"{r:.2f}" for r in case.ratios())
        lines.append(f"- {case.set_name}/{case.assoc}: {ratios or '—'}"
                     + (f"  ERROR: {case.error.splitlines()[0]}" if case.error else ""))
    lines += ["", "Where the time goes (medians over rounds; CPU of the receiver's process tree while the senders "
                  "ran; 'other CPU' = largest share of the machine's cores busy outside receiver and senders in a run: "
                  "other processes (noise) and kernel threads (write-back):", "",
              "| set | assoc | DCMTK CPU ms/inst | ours CPU ms/inst | ours CPU / wall | ours waiting for a CPU / wall "
              "| DCMTK waiting for a CPU / wall | storescu CPU ms/inst | other CPU |",
              "|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        s = case.summary()
        if s:
            lines.append(f"| {case.set_name} | {case.assoc} | {s['dcmtk_cpu_ms_per_inst']:.2f} "
                         f"| {s['ours_cpu_ms_per_inst']:.2f} | {s['ours_cpu_share']:.0%} "
                         f"| {s['ours_cpu_wait_share']:.0%} | {s['dcmtk_cpu_wait_share']:.0%} "
                         f"| {s['sender_cpu_ms_per_inst']:.2f} | {s['other_cpu_max']:.0%} |")
    lines += ["", "Per run (wall seconds of sending, receiver CPU seconds; idle → peak RSS MiB; ours: server-side "
                  "association seconds, publication latency logged / seen after the last sender exited):"]
    for case in cases:
        for d, o in case.rounds():
            assoc_s = "+".join(f"{a['seconds']:.2f}" for a in o.associations) or "?"
            lines.append(
                f"- {case.set_name}/{case.assoc} round {d.round}: DCMTK {d.seconds:.2f}s cpu {d.receiver_cpu:.2f}s "
                f"({fmt_mb(d.idle_rss)}→{fmt_mb(d.peak_rss)}, {d.rss_members} procs) | ours {o.seconds:.2f}s "
                f"cpu {o.receiver_cpu:.2f}s ({fmt_mb(o.idle_rss)}→{fmt_mb(o.peak_rss)}), assoc {assoc_s}s, "
                f"publish {o.publish_latency if o.publish_latency is not None else float('nan'):.3f}s / "
                f"{o.publish_wall if o.publish_wall is not None else float('nan'):.3f}s, "
                f"start-up {o.startup_seconds:.2f}s"
                + (f", warm-up publish {o.warmup_publish:.3f}s" if o.warmup_publish is not None else "")
                + f", load before {d.load_before:.1f}/{o.load_before:.1f}")
    big = [c for c in cases if c.set_name == "big" and c.summary()]
    for case in big:
        s = case.summary()
        assert s is not None
        lines += ["", f"Memory, big ({case.bytes / 2**20:,.0f} MiB in one instance): "
                      f"DCMTK idle {fmt_mb(s['dcmtk_idle_rss'])} → peak {fmt_mb(s['dcmtk_peak_rss'])} MiB; "
                      f"ours idle {fmt_mb(s['ours_idle_rss'])} → peak {fmt_mb(s['ours_peak_rss'])} MiB"]
    return "\n".join(lines)


def environment(args: argparse.Namespace) -> dict[str, object]:
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=10,
                                  env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"}).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    versions = {}
    for package in ("pydicom", "pynetdicom", "imagingstudy-scp"):
        try:
            from importlib.metadata import version
            versions[package] = version(package)
        except Exception:  # noqa: BLE001 - not installed in this interpreter
            versions[package] = "?"
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dcmtk = out(["storescp", "--version"]).splitlines()
    return {
        "mode": "quick" if args.quick else "full", "rounds": args.rounds, "cpus": os.cpu_count(), "cpu": cpu,
        "kernel": platform.release(), "python": platform.python_version(), "versions": versions,
        "dcmtk": dcmtk[0].strip("$ ").replace(" $", "") if dcmtk else "?",
        "commit": out(["git", "rev-parse", "--short", "HEAD"]) + (
            "+dirty" if out(["git", "status", "--porcelain", "--untracked-files=no", "--", "scp", "pyproject.toml"])
            else ""),
        "ours": str(args.ours), "ours_args": args.ours_args, "dcmtk_args": args.dcmtk_args,
        "profile": args.profile, "verify": args.verify, "warmup": not args.no_warmup,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --- main ----------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small sets (ct 60, tiny 600, multi 8x25, big 256 MiB): under a minute")
    parser.add_argument("--sets", default="ct,tiny,multi", help="comma-separated: ct,tiny,multi,big,latency")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of DCMTK then ours (default 3)")
    parser.add_argument("--assoc", default=None,
                        help="parallel associations to run every set with, e.g. 1,4 (default: ct, tiny, big 1; "
                             "multi 4)")
    parser.add_argument("--json", type=Path, default=None, help="write every measurement to this file")
    parser.add_argument("--verify", choices=["all", "sample"], default="all",
                        help="hash the dataset of every stored file (default) or of a sample (count: always all)")
    parser.add_argument("--ours", type=Path, default=ROOT / ".venv" / "bin" / "imagingstudy-scp",
                        help="the imagingstudy-scp executable")
    parser.add_argument("--ours-args", default="", help="extra arguments for 'imagingstudy-scp serve', "
                                                        "e.g. --ours-args=--no-fsync")
    parser.add_argument("--dcmtk-args", default="",
                        help="extra storescp options, e.g. --dcmtk-args='-pdu 131072' (its default max PDU is "
                             "16384; ours announces 131072) or '+B' (bit-preserving: streams to disk)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="do not send one separate small study to each receiver before timing (ours: the "
                             "first publication after start then carries one-off costs)")
    parser.add_argument("--profile", action="store_true",
                        help="run ours under cProfile (all threads): .bench/logs/<run>.prof and .prof.txt; "
                             "slows it down, so its figures are not comparable")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds the senders of one run may take (default 1800)")
    parser.add_argument("--publish-timeout", type=float, default=300,
                        help="seconds to wait for the last ImagingStudy after the senders exit (default 300)")
    args = parser.parse_args(argv)
    args.set_names = [s.strip() for s in args.sets.split(",") if s.strip()]
    for name in args.set_names:
        if name not in SETS:
            parser.error(f"unknown set {name!r} (known: {', '.join(SETS)})")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.assoc:
        try:
            args.assoc_list = [int(a) for a in args.assoc.split(",")]
        except ValueError:
            parser.error("--assoc takes comma-separated integers, e.g. 1,4")
    else:
        args.assoc_list = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            log(f"{tool} not found: install DCMTK (scripts/setup --test does)")
            return 2
    if not args.ours.exists():
        log(f"{args.ours} not found: run scripts/setup")
        return 2
    log_dir = BENCH_DIR / "logs"
    if log_dir.exists():
        shutil.rmtree(log_dir)
    log_dir.mkdir(parents=True)
    shutil.rmtree(BENCH_DIR / "run", ignore_errors=True)
    shutil.rmtree(TRASH_DIR, ignore_errors=True)  # left by an interrupted benchmark
    try:
        return run_cases(args, log_dir)
    finally:
        shutil.rmtree(TRASH_DIR, ignore_errors=True)


def run_cases(args: argparse.Namespace, log_dir: Path) -> int:
    """Every set and association count, DCMTK and ours in turns; prints the report."""
    env = environment(args)
    table = QUICK_SETS if args.quick else SETS
    cases: list[Case] = []
    started = time.monotonic()
    warmup = None if args.no_warmup else load_or_generate(WARMUP, BENCH_DIR / "data", log=log)
    for name in args.set_names:
        data = load_or_generate(table[name], BENCH_DIR / "data", log=log)
        warm(data)
        for assoc in args.assoc_list or DEFAULT_ASSOC[name]:
            case = Case(name, data.spec.name, assoc, len(data.instances), data.total_bytes, len(data.studies))
            cases.append(case)
            try:
                data.shares(assoc)
            except ValueError as exc:
                case.error = str(exc)
                log(f"skipping {name}/{assoc}: {exc}")
                continue
            try:
                for round_no in range(1, args.rounds + 1):
                    pair = []
                    for server in ("dcmtk", "ours"):
                        run = run_once(server, data, assoc, round_no, args, log_dir, warmup)
                        case.runs.append(run)
                        pair.append(run)
                    log(f"{name}/{assoc} round {round_no}: DCMTK {pair[0].inst_per_s:,.1f} inst/s, "
                        f"ours {pair[1].inst_per_s:,.1f} inst/s, ratio {pair[1].inst_per_s / pair[0].inst_per_s:.2f}"
                        + (f", published after {pair[1].publish_latency:.3f}s"
                           if pair[1].publish_latency is not None else ""))
            except BenchError as exc:
                case.error = str(exc)
                log(f"{name}/{assoc} FAILED: {exc}")
    env["seconds"] = round(time.monotonic() - started, 1)
    text = report(cases, env)
    print(text)
    if args.json:
        payload = {"environment": env, "cases": [
            {"set": c.set_name, "data": c.spec_name, "assoc": c.assoc, "instances": c.instances, "bytes": c.bytes,
             "studies": c.studies, "error": c.error, "summary": c.summary(),
             "runs": [r.as_json() for r in c.runs]} for c in cases]}
        args.json.write_text(json.dumps(payload, indent=1))
        log(f"wrote {args.json}")
    log(f"done in {env['seconds']}s")
    return 1 if any(c.error for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
