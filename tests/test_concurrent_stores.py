"""Stores at once: two associations storing the same SOP Instance UID (one acknowledged copy survives, and its
row describes it), and two instances of a new series (neither acknowledged before the series directory is
durable). The store and index are real; only the moment one store pauses is arranged, so that the other would
interleave with it if nothing serialised them."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import scp.store
from dicom_factory import make_instance
from scp.header import read_header
from scp.index import Index
from scp.ingest import Accepted, DuplicatePolicy, Ingest
from scp.records import Provenance
from scp.store import Store

SOP = "1.2.3.9.3"
STUDY_1, SERIES_1 = "1.2.3.400", "1.2.3.400.1"
STUDY_2, SERIES_2 = "1.2.3.401", "1.2.3.401.1"
PAUSE = 1.0  # how long the first store waits for the second inside its critical steps


def received(store: Store, source: Path) -> Path:
    """A copy of ``source`` in the store's tmp dir, as the receiver leaves a dataset there."""
    temp = store.tmp_dir / f"{source.stem}.part"
    shutil.copyfile(source, temp)
    return temp


def instance(folder: Path, name: str, study: str, series: str, patient: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return make_instance(folder / f"{name}.dcm", study_uid=study, series_uid=series, sop_uid=SOP,
                         extra={"PatientName": patient})


def race(ingest: Ingest, first: Path, second: Path, pause_before: tuple[Any, str]) -> None:
    """Store ``first`` and ``second`` on two threads, the second starting once the first has paused before
    calling ``pause_before`` (an object and its method's name), for at most :data:`PAUSE` or until the second
    is done. Both must be acknowledged."""
    first_paused, second_done = threading.Event(), threading.Event()
    results: dict[str, Any] = {}

    def wait() -> None:
        if threading.current_thread().name == "first":
            first_paused.set()
            second_done.wait(PAUSE)

    target, name = pause_before
    method = getattr(target, name)
    setattr(target, name, lambda *args: (wait(), method(*args))[1])

    def run(name: str, path: Path, started: threading.Event | None) -> None:
        if started is not None:
            started.wait(5)
        try:
            results[name] = ingest.accept(received(ingest.store, path), sop_instance_uid=SOP, sop_class_uid=None,
                                          provenance=Provenance(name, "SCP", "127.0.0.1", name, 0.0))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results[name] = exc
        finally:
            if name == "second":
                second_done.set()

    threads = [threading.Thread(target=run, args=("first", first, None), name="first"),
               threading.Thread(target=run, args=("second", second, first_paused), name="second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert all(isinstance(r, Accepted) for r in results.values()) and len(results) == 2, results


def stored_copies(store: Store) -> list[Path]:
    return sorted(store.studies_dir.rglob(f"{SOP}.dcm"))


def test_a_move_and_a_resend_at_once_leave_the_indexed_copy_on_disk(store: Store, index: Index,
                                                                       tmp_path: Path) -> None:
    ingest = Ingest(store, index)
    original = instance(tmp_path / "src", "original", STUDY_1, SERIES_1, "Doe^Jane")
    ingest.accept(received(store, original), sop_instance_uid=SOP, sop_class_uid=None,
                  provenance=Provenance("a", "SCP", "127.0.0.1", "a", 0.0))
    moved = instance(tmp_path / "src", "moved", STUDY_2, SERIES_2, "Moved^To^Two")
    resent = instance(tmp_path / "src", "resent", STUDY_1, SERIES_1, "Resent^To^One")

    race(ingest, moved, resent, pause_before=(store, "remove"))  # the copy the row replaced
    row = index.get(SOP)
    assert row is not None
    assert store.absolute(row.path).exists(), "the indexed copy was removed by the other store"
    assert stored_copies(store) == [store.absolute(row.path)]
    assert read_header(store.absolute(row.path)).attributes["PatientName"] == "Resent^To^One"  # the last one


@pytest.mark.parametrize("policy", ["replace", "keep-first"])
def test_two_copies_at_one_path_at_once_leave_a_row_that_describes_the_file(
        store: Store, index: Index, tmp_path: Path, policy: DuplicatePolicy) -> None:
    ingest = Ingest(store, index, duplicate_policy=policy)
    first = instance(tmp_path / "src", "first", STUDY_1, SERIES_1, "A^First")
    second = instance(tmp_path / "src", "second", STUDY_1, SERIES_1, "B^Second^Longer")

    race(ingest, first, second, pause_before=(index, "put"))  # writing the row
    row = index.get(SOP)
    assert row is not None and stored_copies(store) == [store.absolute(row.path)]
    on_disk = read_header(store.absolute(row.path))
    assert on_disk.attributes["PatientName"] == row.header.attributes["PatientName"]
    assert row.size == store.absolute(row.path).stat().st_size
    kept = "A^First" if policy == "keep-first" else "B^Second^Longer"
    assert on_disk.attributes["PatientName"] == kept


def test_a_file_in_a_directory_another_thread_just_made_waits_for_that_directory_to_be_durable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "durable", fsync=True)
    first_in_place, order = threading.Event(), []
    fsync_dir = scp.store.fsync_dir

    def slow_parent_fsync(directory: Any) -> None:
        if threading.current_thread().name == "maker" and Path(directory) == store.studies_dir / STUDY_1:
            first_in_place.wait(5)  # the series directory exists; its entry is not durable yet
            time.sleep(PAUSE / 2)
            order.append("series directory durable")
        fsync_dir(directory)

    monkeypatch.setattr(scp.store, "fsync_dir", slow_parent_fsync)
    (tmp_path / "src").mkdir()
    headers = {name: read_header(make_instance(tmp_path / "src" / f"{name}.dcm", study_uid=STUDY_1,
                                               series_uid=SERIES_1, sop_uid=f"{SOP}.{number}"))
               for number, name in enumerate(("one", "two"), 1)}  # two instances of one new series, at once

    def commit(name: str) -> None:
        temp = store.tmp_dir / f"{name}.part"
        temp.write_bytes(b"x")
        if name == "two":
            wait_until_made = time.monotonic() + 5
            while not (store.studies_dir / STUDY_1 / SERIES_1).is_dir() and time.monotonic() < wait_until_made:
                time.sleep(0.001)
            first_in_place.set()
        store.commit(temp, headers[name])
        order.append(f"{name} stored")

    threads = [threading.Thread(target=commit, args=("one",), name="maker"),
               threading.Thread(target=commit, args=("two",), name="other")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert order.index("series directory durable") < order.index("two stored"), order
