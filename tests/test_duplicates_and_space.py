"""Duplicate SOP Instance UIDs under each policy, and the free-disk threshold (0xA700 before storing)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from conftest import RunningSCP, temp_leftovers
from dicom_factory import dataset_bytes, make_study
from scu import associate, store


def changed_copy(path: Path, folder: Path) -> Path:
    """The same SOP Instance with a different Series Description."""
    ds = pydicom.dcmread(path)
    ds.SeriesDescription = "re-sent with a change"
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / path.name
    ds.save_as(copy)
    return copy


def stored_path(server: RunningSCP, path: Path) -> Path:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return server.data_dir / "studies" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def send(server: RunningSCP, files: list[Path]) -> list[int]:
    assoc = associate(server.port, files)
    statuses = [store(assoc, p) for p in files]
    assoc.release()
    return statuses


def test_replace_is_the_default_and_counts_once(scp_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = scp_factory()
    study = make_study(tmp_path / "g", series=(("CT", 3),), seed="dup-replace")
    changed = changed_copy(study.files[0], tmp_path / "changed")
    assert send(server, study.files + [study.files[1], changed]) == [0] * 5
    resource = server.wait_for_study(study.study_uid, instances=3)
    assert resource["series"][0]["description"] == "re-sent with a change"
    assert dataset_bytes(stored_path(server, changed)) == dataset_bytes(changed)
    assert "received again (identical content" in server.log()
    assert "received again (different content" in server.log()


def test_keep_first_keeps_the_first_copy(scp_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = scp_factory("--duplicate-policy", "keep-first")
    study = make_study(tmp_path / "g", series=(("CT", 2),), seed="dup-keep")
    changed = changed_copy(study.files[0], tmp_path / "changed")
    assert send(server, study.files + [changed]) == [0, 0, 0]
    resource = server.wait_for_study(study.study_uid, instances=2)
    assert resource["series"][0]["description"] == "Series 1"
    assert dataset_bytes(stored_path(server, changed)) == dataset_bytes(study.files[0])


def test_reject_refuses_the_second_copy(scp_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = scp_factory("--duplicate-policy", "reject")
    study = make_study(tmp_path / "g", series=(("CT", 2),), seed="dup-reject")
    assert send(server, study.files + [study.files[0]]) == [0, 0, 0x0111]
    server.wait_for_study(study.study_uid, instances=2)


@pytest.mark.parametrize("policy", ["replace", "keep-first", "reject"])
def test_a_copy_whose_stored_file_is_gone_is_stored_again(scp_factory, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                          policy: str) -> None:
    server = scp_factory("--duplicate-policy", policy)
    study = make_study(tmp_path / "g", series=(("CT", 2),), seed=f"gone-{policy}")
    assert send(server, study.files) == [0, 0]
    server.wait_for_study(study.study_uid, instances=2)
    stored_path(server, study.files[0]).unlink()  # a retention job or an operator, while the server runs
    assert send(server, [study.files[0]]) == [0]
    assert dataset_bytes(stored_path(server, study.files[0])) == dataset_bytes(study.files[0])
    assert "is gone, the new copy is stored" in server.log()


def test_below_the_free_disk_threshold_nothing_is_stored(scp_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = scp_factory("--min-free-disk-mb", str(10**9))
    study = make_study(tmp_path / "g", series=(("CT", 2),), seed="no-space")
    assert send(server, study.files) == [0xA700, 0xA700]
    assert not any((server.data_dir / "studies").iterdir())
    assert temp_leftovers(server.data_dir) == []
