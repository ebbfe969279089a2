"""Start-up reconciliation and reindex against files that changed behind the index: a replacement
interrupted by a crash (two copies of one instance, or a new copy whose row was never written)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dicom_factory import make_instance
from scp.header import read_header
from scp.index import Index
from scp.ingest import Ingest
from scp.reconcile import StoreLooksEmpty, reconcile, reindex
from scp.records import Provenance, StoredInstance
from scp.store import DataDirInUse, DataDirLock, Store

SOP = "1.2.3.9.7"
STUDY_1, SERIES_1 = "1.2.3.500", "1.2.3.500.1"
STUDY_2, SERIES_2 = "1.2.3.501", "1.2.3.501.1"


def receive(ingest: Ingest, source: Path, at: float) -> StoredInstance:
    """Store ``source`` as the receiver would, received at ``at`` (its file written just before)."""
    temp = ingest.store.tmp_dir / f"{source.stem}.part"
    shutil.copyfile(source, temp)
    os.utime(temp, (at - 1, at - 1))
    return ingest.accept(temp, sop_instance_uid=SOP, sop_class_uid=None,
                         provenance=Provenance("MOD", "SCP", "127.0.0.1", "a", at)).instance


def instance(folder: Path, name: str, study: str, series: str, patient: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return make_instance(folder / f"{name}.dcm", study_uid=study, series_uid=series, sop_uid=SOP,
                         extra={"PatientName": patient})


def copies(store: Store) -> list[str]:
    return sorted(str(p.relative_to(store.data_dir)) for p in store.studies_dir.rglob(f"{SOP}.dcm"))


def place_by_hand(store: Store, source: Path, relative: str, mtime: float) -> None:
    target = store.data_dir / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    os.utime(target, (mtime, mtime))


def test_a_move_interrupted_before_the_old_copy_was_removed_keeps_the_new_one(store: Store, index: Index,
                                                                              tmp_path: Path) -> None:
    ingest = Ingest(store, index)
    old = instance(tmp_path / "src", "old", STUDY_1, SERIES_1, "Old^Copy")
    old_path = receive(ingest, old, at=1_000_000).path
    new_path = receive(ingest, instance(tmp_path / "src", "new", STUDY_2, SERIES_2, "New^Copy"), at=2_000_000).path
    place_by_hand(store, old, old_path, mtime=1_000_000 - 1)  # as if the crash came before its removal

    for _ in range(3):  # and stays resolved, start after start
        assert reconcile(store, index) == []
        assert copies(store) == [new_path]
        row = index.get(SOP)
        assert row is not None and row.path == new_path and row.provenance.calling_aet == "MOD"


def test_a_move_interrupted_before_its_row_was_written_keeps_the_new_copy(store: Store, index: Index,
                                                                         tmp_path: Path) -> None:
    ingest = Ingest(store, index)
    old_path = receive(ingest, instance(tmp_path / "src", "old", STUDY_1, SERIES_1, "Old^Copy"), at=1_000_000).path
    new = instance(tmp_path / "src", "new", STUDY_2, SERIES_2, "New^Copy")
    new_path = f"studies/{STUDY_2}/{SERIES_2}/{SOP}.dcm"
    place_by_hand(store, new, new_path, mtime=2_000_000)  # renamed in, then the crash

    assert reconcile(store, index) == sorted([STUDY_1, STUDY_2])
    assert copies(store) == [new_path] and old_path not in copies(store)
    row = index.get(SOP)
    assert row is not None and row.path == new_path and row.header.attributes["PatientName"] == "New^Copy"
    assert reconcile(store, index) == []


@pytest.mark.parametrize("same_size", [False, True])
def test_a_replacement_renamed_in_before_its_row_was_written_is_indexed_again(
        store: Store, index: Index, tmp_path: Path, same_size: bool) -> None:
    ingest = Ingest(store, index)
    stored = receive(ingest, instance(tmp_path / "src", "first", STUDY_1, SERIES_1, "Old^Name"), at=1_000_000)
    corrected = "New^Name" if same_size else "Corrected^Much^Longer^Name"
    place_by_hand(store, instance(tmp_path / "src", "fixed", STUDY_1, SERIES_1, corrected), stored.path,
                  mtime=2_000_000)
    assert (store.data_dir / stored.path).stat().st_size == stored.size or not same_size

    assert reconcile(store, index) == [STUDY_1]
    row = index.get(SOP)
    assert row is not None and row.header.attributes["PatientName"] == corrected
    assert row.size == (store.data_dir / stored.path).stat().st_size
    assert reconcile(store, index) == []  # indexed as it is now: not again at the next start


def test_reindex_keeps_the_newer_of_two_copies_and_counts_rows(store: Store, index: Index, tmp_path: Path) -> None:
    ingest = Ingest(store, index)
    receive(ingest, instance(tmp_path / "src", "other", STUDY_1, SERIES_1, "Other"), at=1_000_000)  # SOP in S1
    older = instance(tmp_path / "src", "older", STUDY_2, SERIES_2, "Older^Copy")
    place_by_hand(store, older, f"studies/{STUDY_2}/{SERIES_2}/{SOP}.dcm", mtime=500_000)

    assert reindex(store, index) == 1
    assert copies(store) == [f"studies/{STUDY_1}/{SERIES_1}/{SOP}.dcm"]
    row = index.get(SOP)
    assert row is not None and read_header(store.data_dir / row.path).attributes["PatientName"] == "Other"


def test_a_reindex_in_another_process_is_seen_by_the_running_index(store: Store, index: Index,
                                                                   tmp_path: Path) -> None:
    ingest = Ingest(store, index)
    stored = receive(ingest, instance(tmp_path / "src", "first", STUDY_1, SERIES_1, "Doe^Jane"), at=1_000_000)
    assert [i.header.attributes["PatientName"] for i in index.study_instances(STUDY_1)] == ["Doe^Jane"]  # cached
    place_by_hand(store, instance(tmp_path / "src", "fixed", STUDY_1, SERIES_1, "Fix^Name"), stored.path,
                  mtime=2_000_000)
    other = Index(store.data_dir / "index.sqlite3")  # the `reindex` command's connection
    try:
        assert reindex(store, other) == 1  # same count, and the rowid starts again at 1
    finally:
        other.close()
    assert [i.header.attributes["PatientName"] for i in index.study_instances(STUDY_1)] == ["Fix^Name"]


def test_a_data_dir_is_held_by_one_process_at_a_time(store: Store) -> None:
    first, second = DataDirLock(store.data_dir), DataDirLock(store.data_dir)
    first.acquire()
    with pytest.raises(DataDirInUse, match=f"in use by process {os.getpid()}"):
        second.acquire()
    first.release()
    second.acquire()  # free again once released (or once its process died: the kernel drops a flock)
    second.release()


def test_the_study_cache_holds_no_more_instances_than_its_budget(store: Store, tmp_path: Path) -> None:
    index = Index(store.data_dir / "budget.sqlite3", cache_instances=3)
    try:
        for study in ("1.2.3.600", "1.2.3.601"):
            for number in (1, 2):
                path = make_instance(tmp_path / f"{study}.{number}.dcm", study_uid=study, series_uid=f"{study}.1",
                                     sop_uid=f"{study}.1.{number}")
                index.put(StoredInstance(read_header(path), f"studies/{path.name}", path.stat().st_size,
                                         Provenance("MOD", "SCP", "127.0.0.1", "a", 1.0)))
        for study in ("1.2.3.600", "1.2.3.601", "1.2.3.600"):
            assert [i.header.sop_uid for i in index.study_instances(study)] == [f"{study}.1.1", f"{study}.1.2"]
            assert sum(len(instances) for _, instances in index._cache.values()) <= 3  # ~3 KB each
    finally:
        index.close()


def test_a_studies_dir_without_any_indexed_file_stops_the_start_and_changes_nothing(
        store: Store, index: Index, tmp_path: Path) -> None:
    ingest = Ingest(store, index)
    stored = receive(ingest, instance(tmp_path / "src", "one", STUDY_1, SERIES_1, "Doe^Jane"), at=1_000_000)
    shutil.rmtree(store.studies_dir)  # an unmounted volume: the mount point is empty
    store.studies_dir.mkdir()
    with pytest.raises(StoreLooksEmpty, match="index lists 1: is the storage mounted"):
        reconcile(store, index)
    assert index.get(SOP) == stored  # not dropped: nothing is withdrawn from the sinks
    assert reindex(store, index) == 0  # the explicit way to accept the loss


def test_equal_times_keep_the_indexed_copy(store: Store, index: Index, tmp_path: Path) -> None:
    ingest = Ingest(store, index)
    old = instance(tmp_path / "src", "old", STUDY_1, SERIES_1, "Old^Copy")
    old_path = receive(ingest, old, at=1_000_000).path
    new_path = receive(ingest, instance(tmp_path / "src", "new", STUDY_2, SERIES_2, "New^Copy"), at=1_000_000).path
    place_by_hand(store, old, old_path, mtime=(store.data_dir / new_path).stat().st_mtime)  # one clock tick

    assert reconcile(store, index) == []
    assert copies(store) == [new_path] and index.get(SOP).path == new_path  # type: ignore[union-attr]
    place_by_hand(store, old, old_path, mtime=(store.data_dir / new_path).stat().st_mtime)
    assert reindex(store, index) == 1
    assert copies(store) == [new_path] and index.get(SOP).path == new_path  # type: ignore[union-attr]
