"""Issue 2, acceptance 5: the index survives restarts, `reindex` rebuilds it, start-up reconciles it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import RunningSCP, assert_valid, storescu
from dicom_factory import make_study
from scp.index import Index
from scp.records import StoredInstance


def snapshot(data_dir: Path) -> list[StoredInstance]:
    index = Index(data_dir / "index.sqlite3")
    try:
        return index.all_instances()
    finally:
        index.close()


def without_provenance(rows: list[StoredInstance]) -> list[tuple[object, ...]]:
    return [(r.header, r.path, r.size) for r in rows]


def reindex(data_dir: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "scp", "reindex", "--data-dir", str(data_dir)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def test_restart_keeps_the_index_and_reindex_rebuilds_it(scp_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server: RunningSCP = scp_factory()
    a = make_study(tmp_path / "a", series=(("CT", 4), ("CT", 3)), seed="index-a")
    b = make_study(tmp_path / "b", series=(("MR", 5),), seed="index-b")
    storescu(server.port, a.files, aet="MODALITY_A")
    storescu(server.port, b.files, aet="MODALITY_B")
    server.wait_for_study(a.study_uid, instances=7)
    server.wait_for_study(b.study_uid, instances=5)
    before = snapshot(server.data_dir)
    assert len(before) == 12
    assert {r.provenance.calling_aet for r in before} == {"MODALITY_A", "MODALITY_B"}

    server.stop()
    server.start()
    assert snapshot(server.data_dir) == before
    assert "not published before the last stop" not in server.log()  # nothing to redo
    server.stop()

    result = reindex(server.data_dir)
    assert result.stdout.strip() == "12"
    assert snapshot(server.data_dir) == before  # identical, provenance kept for unchanged files

    (server.data_dir / "index.sqlite3").unlink()
    for suffix in ("-wal", "-shm"):
        (server.data_dir / f"index.sqlite3{suffix}").unlink(missing_ok=True)
    reindex(server.data_dir)
    assert without_provenance(snapshot(server.data_dir)) == without_provenance(before)


def test_start_up_indexes_files_the_index_lost_and_publishes_them(scp_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server: RunningSCP = scp_factory()
    study = make_study(tmp_path / "g", series=(("CT", 6),), seed="reconcile")
    storescu(server.port, study.files)
    server.wait_for_study(study.study_uid, instances=6)
    server.stop()
    for name in ("index.sqlite3", "index.sqlite3-wal", "index.sqlite3-shm"):
        (server.data_dir / name).unlink(missing_ok=True)
    published = server.study_path(study.study_uid)
    published.unlink()
    interrupted = published.with_name(f".{published.name}.4242.139.tmp")  # a write a crash cut short
    interrupted.write_bytes(b'{"resourceType": "Imag')

    server.start()
    resource = server.wait_for_study(study.study_uid, instances=6)
    assert_valid(resource)
    assert len(snapshot(server.data_dir)) == 6
    assert "not published before the last stop" in server.log()
    assert not interrupted.exists()


def test_one_data_dir_is_served_by_one_process(scp_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server: RunningSCP = scp_factory()
    spare = [p.name for p in (server.data_dir / "tmp").iterdir()]
    assert spare  # the running server's temp files, which a second server's start-up would clean away
    for command in (["reindex"], ["serve", "--host", "127.0.0.1", "--port", "0"]):
        result = subprocess.run([sys.executable, "-m", "scp", *command, "--data-dir", str(server.data_dir)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1, result.stderr
        assert f"is in use by process {server.process.pid}" in result.stderr
    assert set(spare) <= {p.name for p in (server.data_dir / "tmp").iterdir()}  # none cleaned (the pool may grow)
    server.stop()
    reindex(server.data_dir)  # free once the server has stopped


def test_a_start_that_fails_stops_what_it_started_before_letting_the_data_dir_go(tmp_path: Path) -> None:
    import socket
    import threading

    from scp import StorageSCP

    before = set(threading.enumerate())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        failing = StorageSCP(tmp_path / "data", port=busy.getsockname()[1])
        try:
            failing.start()
        except OSError:
            pass
        else:
            raise AssertionError("the start should fail: the port is taken")
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert not [name for name in left if name.startswith(("publisher", "spare files"))], left
    with StorageSCP(tmp_path / "data") as second:  # the data dir is free again
        assert second.port
