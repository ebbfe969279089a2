"""Receiver processes (``--workers``): parallel associations received by several processes over one data dir.

Real processes throughout: the server started with `serve --workers 2`, pynetdicom associations held open so that
both processes receive some, real SIGKILLs of a receiver and of the server process.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import ssl
import subprocess
import sys
import textwrap
import time
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

import scp.store
from conftest import RunningSCP, free_port, wait_for
from dicom_factory import make_instance
from scp.header import read_header
from scp.ingest import _SopLocks
from scp.server import listener_options
from scp.settings import load_settings
from scp.store import Store
from scu import associate, store

STUDY = "1.2.3.700"


def instances(folder: Path, count: int, tag: int) -> list[Path]:
    """``count`` instances, each in its own study ``1.2.3.700.<tag>.<n>``."""
    folder.mkdir(parents=True, exist_ok=True)
    return [make_instance(folder / f"{tag}-{n}.dcm", study_uid=f"{STUDY}.{tag}.{n}",
                          series_uid=f"{STUDY}.{tag}.{n}.1", sop_uid=f"{STUDY}.{tag}.{n}.1.1") for n in range(count)]


def start_with_receivers(scp_factory: Callable[..., RunningSCP], *args: str) -> tuple[RunningSCP, int]:
    """A server with one receiver process; returns it and the receiver's pid, once both accept."""
    server = scp_factory("--workers", "2", "--log-format", "json", *args)
    wait_for(lambda: "serving" in server.log(), what="the server and its receiver to accept")
    return server, receiver_pid(server)


def receiver_pid(server: RunningSCP, nth: int = 1) -> int:
    pids = re.findall(r"receiver process 1 started \(pid (\d+)\)", server.log())
    assert len(pids) >= nth, server.log()
    return int(pids[nth - 1])


def sockets_of(pid: int) -> int:
    """How many sockets the process holds (each accepted association adds one)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


def associations_on_both(port: int, files: list[Path], receiver: int,
                         tls: ssl.SSLContext | None = None) -> tuple[list[Any], list[Any]]:
    """Associations held open until the receiver process has at least one; (on the receiver, on the server)."""
    on_receiver: list[Any] = []
    on_server: list[Any] = []
    for _ in range(30):
        before = sockets_of(receiver)
        assoc = associate(port, files[:1], tls=tls)
        time.sleep(0.05)
        (on_receiver if sockets_of(receiver) > before else on_server).append(assoc)
        if on_receiver and on_server:
            return on_receiver, on_server
    pytest.fail(f"30 associations, none shared: {len(on_receiver)} on the receiver, {len(on_server)} on the server")


def association_records(server: RunningSCP) -> list[dict[str, Any]]:
    records = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            record = orjson.loads(line)
            if record.get("event") == "association":
                records.append(record)
    return records


def test_associations_on_both_processes_are_stored_counted_and_published(
        scp_factory: Callable[..., RunningSCP], tmp_path: Path) -> None:
    http_port = free_port()
    server, receiver = start_with_receivers(scp_factory, "--http-port", str(http_port))
    files = instances(tmp_path / "src", 6, 1)
    on_receiver, on_server = associations_on_both(server.port, files, receiver)
    associations = on_receiver + on_server
    for number, path in enumerate(files):
        assert store(associations[number % len(associations)], path) == 0x0000
    for assoc in associations:
        assoc.release()

    for path in files:
        header = read_header(path)
        study = server.wait_for_study(header.study_uid, instances=1)
        assert study["series"][0]["instance"][0]["uid"] == header.sop_uid
    records = association_records(server)
    assert {record["pid"] for record in records} == {server.process.pid, receiver}  # type: ignore[union-attr]
    assert sum(record["instances"] for record in records) == len(files)

    def stored_counter() -> float | None:
        text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5).read().decode()
        match = re.search(r"^imagingstudy_scp_instances_stored_total (\S+)$", text, re.M)
        return float(match.group(1)) if match and float(match.group(1)) == len(files) else None

    assert wait_for(stored_counter, 10, what="the receiver's counts in the server's metrics") == len(files)
    assert urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=5).status == 200

    assert server.stop() == 0
    wait_for(lambda: not Path(f"/proc/{receiver}").exists(), 10, what="the receiver process to end with the server")


def test_tls_associations_are_received_by_both_processes(scp_factory: Callable[..., RunningSCP], pki: Path,
                                                         tmp_path: Path) -> None:
    tls_port = free_port()
    server, receiver = start_with_receivers(scp_factory, "--tls-port", str(tls_port), "--tls-cert",
                                            str(pki / "server.pem"), "--tls-key", str(pki / "server.key"))
    files = instances(tmp_path / "src", 2, 4)
    on_receiver, on_server = associations_on_both(tls_port, files, receiver,
                                                  tls=ssl.create_default_context(cafile=str(pki / "ca.pem")))
    assert store(on_receiver[0], files[0]) == 0x0000
    assert store(on_server[0], files[1]) == 0x0000
    for assoc in on_receiver + on_server:
        assoc.release()
    for path in files:
        server.wait_for_study(read_header(path).study_uid, instances=1)


def test_a_receiver_that_dies_is_replaced_and_what_it_acknowledged_is_published(
        scp_factory: Callable[..., RunningSCP], tmp_path: Path) -> None:
    server, receiver = start_with_receivers(scp_factory)
    files = instances(tmp_path / "src", 2, 2)
    on_receiver, on_server = associations_on_both(server.port, files, receiver)
    assert store(on_receiver[0], files[0]) == 0x0000  # acknowledged, its association never released

    os.kill(receiver, signal.SIGKILL)
    study = server.wait_for_study(read_header(files[0]).study_uid, instances=1)  # published all the same
    assert study["numberOfInstances"] == 1
    replacement = wait_for(lambda: len(re.findall(r"receiver process 1 started", server.log())) == 2
                           and receiver_pid(server, 2), what="a new receiver process")
    assert replacement != receiver and "ended with status -9" in server.log()
    assert not list((server.data_dir / "tmp").glob(f"spare-{receiver}-*"))  # its spare files removed

    assert store(on_server[0], files[1]) == 0x0000  # the server's own associations carry on
    for assoc in on_server:
        assoc.release()
    server.wait_for_study(read_header(files[1]).study_uid, instances=1)


def test_a_study_left_empty_by_a_move_on_a_receiver_that_dies_is_withdrawn(
        scp_factory: Callable[..., RunningSCP], tmp_path: Path) -> None:
    """The association that moved an instance never ends, so it never queues the emptied study: without the
    withdrawal at the receiver's death one instance stayed published in two studies until the next start."""
    server, receiver = start_with_receivers(scp_factory)
    sop = f"{STUDY}.9.9"
    (tmp_path / "src").mkdir()
    old = make_instance(tmp_path / "src" / "old.dcm", study_uid=f"{STUDY}.1", series_uid=f"{STUDY}.1.1",
                        sop_uid=sop)
    new = make_instance(tmp_path / "src" / "new.dcm", study_uid=f"{STUDY}.2", series_uid=f"{STUDY}.2.1",
                        sop_uid=sop)
    first = associate(server.port, [old])
    assert store(first, old) == 0x0000
    first.release()
    server.wait_for_study(f"{STUDY}.1", instances=1)
    on_receiver, on_server = associations_on_both(server.port, [new], receiver)
    assert store(on_receiver[0], new) == 0x0000  # moved to the other study, on the receiver

    os.kill(receiver, signal.SIGKILL)
    server.wait_for_study(f"{STUDY}.2", instances=1)
    wait_for(lambda: not server.study_path(f"{STUDY}.1").exists(), 15, what="the emptied study withdrawn")
    for assoc in on_server:
        assoc.release()


def test_a_receiver_that_cannot_be_started_again_at_once_is_started_later(
        scp_factory: Callable[..., RunningSCP]) -> None:
    """Out of file descriptors when a receiver dies: its first restart fails; it is tried again (it was not)."""
    server, receiver = start_with_receivers(scp_factory)
    assert server.process is not None
    pid = server.process.pid
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    open_fds = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    lowest_free = next(n for n in range(len(open_fds) + 1) if n not in open_fds)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, limits[1]))  # no new descriptor at all
    try:
        os.kill(receiver, signal.SIGKILL)
        wait_for(lambda: "cannot start receiver process 1 again" in server.log(), 15, what="a failed restart")
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
    wait_for(lambda: len(re.findall(r"receiver process 1 started", server.log())) == 2, 30,
             what="the receiver started again")
    echo = associate(server.port)
    echo.release()


def test_killing_the_server_process_ends_its_receivers_and_the_next_start_publishes_their_studies(
        scp_factory: Callable[..., RunningSCP], tmp_path: Path) -> None:
    server, receiver = start_with_receivers(scp_factory, "--outbox-initial-delay", "60")
    files = instances(tmp_path / "src", 1, 3)
    on_receiver, on_server = associations_on_both(server.port, files, receiver)
    assert store(on_receiver[0], files[0]) == 0x0000
    server.kill()  # SIGKILL: no stop, no publication

    wait_for(lambda: not Path(f"/proc/{receiver}").exists() or _zombie(receiver), 15,
             what="the orphaned receiver to stop")
    restarted = RunningSCP(server.data_dir).start()
    try:
        study = restarted.wait_for_study(read_header(files[0]).study_uid, instances=1)
        assert study["numberOfInstances"] == 1
    finally:
        assert restarted.stop() == 0


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm to every process"])
def test_a_stop_while_the_receivers_start_stops_the_server_cleanly(tmp_path: Path, how: str) -> None:
    """A terminal's Ctrl-C goes to the whole foreground process group, and systemd's stop sends SIGTERM to every
    process of the service. Either killed receivers still starting, and the server exited 1 saying a receiver
    did not start. Receivers now have their own process group, and a start that fails because a stop was asked
    ends as a stop: status 0."""
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "scp", "serve", "--host", "127.0.0.1", "--port", "0",
                                   "--data-dir", str(tmp_path / "data"), "--workers", "2"],
                                  stdout=log, stderr=subprocess.STDOUT, process_group=0)
    try:
        wait_for(lambda: "receiver process 1 started" in log_path.read_text(), 30, what="the receiver to start")
        if how == "ctrl-c":
            os.killpg(server.pid, signal.SIGINT)  # as a terminal does: to the group
        else:
            os.kill(server.pid, signal.SIGTERM)
            os.kill(int(re.findall(r"receiver process 1 started \(pid (\d+)\)", log_path.read_text())[0]),
                    signal.SIGTERM)
        assert server.wait(30) == 0, log_path.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    text = log_path.read_text()
    receiver = int(re.findall(r"receiver process 1 started \(pid (\d+)\)", text)[0])
    wait_for(lambda: not Path(f"/proc/{receiver}").exists() or _zombie(receiver), 15, what="the receiver to end")
    assert "Traceback" not in text and "KeyboardInterrupt" not in text


def test_stores_of_one_sop_instance_are_serialised_across_processes(tmp_path: Path) -> None:
    lock_file = tmp_path / "sop.lock"
    locks = _SopLocks(shared_file=lock_file)
    other_sop = next(f"1.2.3.{n}" for n in range(1000)
                     if zlib.crc32(f"1.2.3.{n}".encode()) % 256 != zlib.crc32(b"1.2.3.1") % 256)
    probe = textwrap.dedent(f"""
        import sys, time
        from scp.ingest import _SopLocks
        locks = _SopLocks(shared_file={str(lock_file)!r})
        for sop in sys.argv[1:]:
            with locks(sop):
                print(f"{{sop}} {{time.monotonic()!r}}", flush=True)  # when it got the stripe (one clock for all)
    """)
    with locks("1.2.3.1"):
        child = subprocess.Popen([sys.executable, "-c", probe, other_sop, "1.2.3.1"], stdout=subprocess.PIPE,
                                 text=True)
        assert child.stdout is not None
        other_line = child.stdout.readline()  # another stripe: not held up
        time.sleep(0.5)
        releasing_at = time.monotonic()
    same_line = child.stdout.readline()
    child.wait(10)
    locks.close()
    assert float(other_line.split()[1]) < releasing_at, other_line
    assert float(same_line.split()[1]) >= releasing_at, same_line  # waited for this process's store of it


def test_two_processes_each_holding_one_stripe_and_waiting_for_the_others_both_go_on(tmp_path: Path) -> None:
    """No thread holds two stripes, so there is no deadlock; process-owned record locks made the kernel say
    there was one (EDEADLK: the store answered 0x0110). Each process holds one stripe in one thread for a while
    and asks for the other's in a second thread."""
    lock_file = tmp_path / "sop.lock"
    first = "1.2.3.1"
    second = next(f"1.2.3.{n}" for n in range(2, 1000)
                  if zlib.crc32(f"1.2.3.{n}".encode()) % 256 != zlib.crc32(first.encode()) % 256)
    probe = textwrap.dedent(f"""
        import sys, threading, time
        from scp.ingest import _SopLocks
        locks = _SopLocks(shared_file={str(lock_file)!r})
        mine, other, delay, start_at = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
        time.sleep(max(0.0, start_at - time.time()))  # both processes imported and ready: start together
        def hold():
            with locks(mine):
                time.sleep(1.5)
        def ask():
            time.sleep(delay)
            started = time.monotonic()
            with locks(other):
                print(f"waited {{time.monotonic() - started:.2f}}", flush=True)
        threads = [threading.Thread(target=hold), threading.Thread(target=ask)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    """)
    start_at = str(time.time() + 5)  # both imported by then, even on a loaded machine
    children = [subprocess.Popen([sys.executable, "-c", probe, mine, other, delay, start_at],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for mine, other, delay in ((first, second, "0.3"), (second, first, "0.6"))]
    outputs = [child.communicate(timeout=30) for child in children]
    for (out, err), child in zip(outputs, children):
        assert child.returncode == 0 and out.startswith("waited"), err
        assert float(out.split()[1]) >= 0.5  # and it did wait for the other process's stripe


def test_a_directory_made_by_another_process_is_made_durable_before_a_file_in_it_counts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    durable = Store(tmp_path / "durable", fsync=True)
    source = make_instance(tmp_path / "one.dcm", study_uid=STUDY, series_uid=f"{STUDY}.1", sop_uid=f"{STUDY}.1.1")
    header = read_header(source)
    series_dir = durable.studies_dir / STUDY / f"{STUDY}.1"
    series_dir.mkdir(parents=True)  # as another receiver process leaves it: made, parents maybe not fsync'ed yet
    fsynced: list[Path] = []
    real_fsync_dir = scp.store.fsync_dir
    monkeypatch.setattr(scp.store, "fsync_dir", lambda d: (fsynced.append(Path(d)), real_fsync_dir(d))[1])

    temp = durable.tmp_dir / "one.part"
    temp.write_bytes(source.read_bytes())
    durable.commit(temp, header)
    assert {durable.studies_dir, durable.studies_dir / STUDY, series_dir} <= set(fsynced)

    fsynced.clear()
    temp.write_bytes(source.read_bytes())
    durable.commit(temp, header)  # known durable now: only the file's own directory
    assert fsynced == [series_dir]

    for _ in range(3):  # removed and made again elsewhere (a retention job, a restore); ext4 reuses the inodes
        shutil.rmtree(durable.studies_dir / STUDY)
        series_dir.mkdir(parents=True)
        fsynced.clear()
        temp.write_bytes(source.read_bytes())
        durable.commit(temp, header)
        assert {durable.studies_dir, durable.studies_dir / STUDY, series_dir} <= set(fsynced)


def test_max_associations_are_admitted_in_all_across_the_processes(scp_factory: Callable[..., RunningSCP],
                                                                    tmp_path: Path) -> None:
    """A process with no association to spare lets one with room accept: the limit holds for the whole server,
    not for whichever process the kernel woke first (with more than 10 open each, both waited alike before
    accepting, and refusals came at the 23rd or 24th of 24)."""
    server, _receiver = start_with_receivers(scp_factory, "--max-associations", "24")
    files = instances(tmp_path / "src", 1, 5)
    held: list[Any] = []
    try:
        for _ in range(24):
            held.append(associate(server.port, files))  # fails the test if refused

        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(Verification)
        one_more = ae.associate("127.0.0.1", server.port, ae_title="IMAGINGSTUDY")
        assert one_more.is_rejected  # the limit is still the limit
    finally:
        for assoc in held:
            assoc.release()


def test_each_process_admits_its_share_of_max_associations() -> None:
    assert listener_options(load_settings({"max_associations": 5, "workers": 2})).maximum_associations == 3
    assert listener_options(load_settings({"max_associations": 5})).maximum_associations == 5
