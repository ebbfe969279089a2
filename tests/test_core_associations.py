"""Issue 2, acceptance 3 and 6: studies across associations, aborts, and rejected identities."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import RunningSCP, assert_valid, storescu, temp_leftovers, wait_for
from dicom_factory import UID_ROOT, make_instance, make_study
from scu import associate, store


def test_a_study_sent_over_two_associations_is_published_whole(running_scp: RunningSCP, tmp_path: Path) -> None:
    study = make_study(tmp_path / "g", series=(("CT", 6), ("MR", 4)), seed="two-assocs")
    first, second = study.files[:5], study.files[5:]
    storescu(running_scp.port, first)
    early = running_scp.wait_for_study(study.study_uid, instances=5)
    assert early["numberOfSeries"] == 1
    storescu(running_scp.port, second)
    final = running_scp.wait_for_study(study.study_uid, instances=10)
    assert_valid(final)
    assert final["numberOfSeries"] == 2
    assert sorted(s["numberOfInstances"] for s in final["series"]) == [4, 6]


def test_one_association_with_two_studies_gives_two_resources(running_scp: RunningSCP, tmp_path: Path) -> None:
    a = make_study(tmp_path / "a", series=(("CT", 3),), seed="study-a")
    b = make_study(tmp_path / "b", series=(("MR", 2), ("MR", 2)), seed="study-b")
    storescu(running_scp.port, a.files + b.files)
    study_a = running_scp.wait_for_study(a.study_uid, instances=3)
    study_b = running_scp.wait_for_study(b.study_uid, instances=4)
    for resource in (study_a, study_b):
        assert_valid(resource)
    assert study_b["numberOfSeries"] == 2
    assert len(list((running_scp.data_dir / "fhir" / "ImagingStudy").glob("*.json"))) == 2
    assert "studies=2" in running_scp.log()


def test_an_aborted_association_publishes_what_was_acknowledged(running_scp: RunningSCP, tmp_path: Path) -> None:
    study = make_study(tmp_path / "g", series=(("CT", 8),), seed="abort")
    assoc = associate(running_scp.port, study.files)
    statuses = [store(assoc, path) for path in study.files[:5]]
    assert statuses == [0x0000] * 5
    assoc.abort()
    published = running_scp.wait_for_study(study.study_uid, instances=5)
    assert_valid(published)
    acknowledged = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in study.files[:5]}
    assert {i["uid"] for i in published["series"][0]["instance"]} == acknowledged
    assert "aborted" in running_scp.log()


def bad_instances(tmp_path: Path) -> dict[str, pydicom.Dataset]:
    """Datasets whose identifying UIDs are missing, malformed or built to escape the store."""
    study, series = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    cases = {
        "no study uid": {"StudyInstanceUID": None},
        "no series uid": {"SeriesInstanceUID": None},
        "empty series uid": {"SeriesInstanceUID": ""},
        "letters in study uid": {"StudyInstanceUID": "1.2.abc"},
        "path escape in study uid": {"StudyInstanceUID": "../../../tmp"},
        "slash in series uid": {"SeriesInstanceUID": "1.2/3.4"},
        "double dot in series uid": {"SeriesInstanceUID": "1.2..3"},
        "over-long study uid": {"StudyInstanceUID": "1." + "2" * 70},
    }
    datasets = {}
    for i, (name, change) in enumerate(cases.items()):
        path = make_instance(tmp_path / "bad" / f"{i}.dcm", study_uid=study, series_uid=series,
                             sop_uid=generate_uid(UID_ROOT))
        ds = pydicom.dcmread(path)
        for keyword, value in change.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        datasets[name] = ds
    return datasets


def test_invalid_identity_is_refused_and_the_server_keeps_serving(running_scp: RunningSCP,
                                                                 tmp_path: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UIDs we build on purpose
        bad = bad_instances(tmp_path)
        good = make_study(tmp_path / "good", series=(("CT", 2),), seed="after-bad")
        assoc = associate(running_scp.port, list(bad.values()) + good.files)
        for name, dataset in bad.items():
            status = store(assoc, dataset)
            assert status != 0x0000 and status & 0xF000 in (0xA000, 0xC000), f"{name}: 0x{status:04X}"
        assert [store(assoc, p) for p in good.files] == [0x0000, 0x0000]
        assoc.release()
    running_scp.wait_for_study(good.study_uid, instances=2)
    stored = [Path(root, f) for root, _, files in os.walk(running_scp.data_dir / "studies") for f in files]
    assert len(stored) == 2, stored
    assert all(good.study_uid in str(p) for p in stored)
    assert not (tmp_path / "tmp").exists() or not any((tmp_path / "tmp").iterdir())
    assert temp_leftovers(running_scp.data_dir) == []
    assert "failures=0xC000:8" in running_scp.log()


def test_c_store_failure_carries_an_error_comment(running_scp: RunningSCP, tmp_path: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = bad_instances(tmp_path)["path escape in study uid"]
        assoc = associate(running_scp.port, [dataset])
        answer = assoc.send_c_store(dataset)
        assoc.release()
    assert answer.Status == 0xC000
    assert "Study Instance UID" in answer.ErrorComment
    wait_for(lambda: "released" in running_scp.log(), what="association end")


@pytest.mark.parametrize("transport", [(), ("--stock-transport",)], ids=["event-driven", "stock"])
def test_a_store_slower_than_the_network_timeout_is_answered_and_published(
        scp_factory: Callable[..., RunningSCP], tmp_path: Path, transport: tuple[str, ...]) -> None:
    """The network timeout is for a silent peer, not for a C-STORE we are still storing.

    Another writer (an operator's sqlite3 session, a `reindex`) holds the index's write lock for longer
    than the network timeout: the C-STORE waits for it, is answered with success, and its study is
    published on release, not when some later association touches it.
    """
    scp = scp_factory("--network-timeout", "1", *transport)
    study = make_study(tmp_path / "g", series=(("CT", 2),), seed="slow-store")
    assoc = associate(scp.port, study.files)
    assert store(assoc, study.files[0]) == 0x0000
    blocker = sqlite3.connect(scp.data_dir / "index.sqlite3", timeout=10, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    timer = threading.Timer(2.5, blocker.rollback)
    timer.start()
    try:
        started = time.monotonic()
        assert store(assoc, study.files[1]) == 0x0000
        assert time.monotonic() - started >= 2.0  # it did wait for the lock, past the 1 s timeout
        assert assoc.is_established
        assoc.release()
    finally:
        timer.join()
        blocker.close()
    published = scp.wait_for_study(study.study_uid, instances=2)
    assert_valid(published)
    assert "network timeout" not in scp.log()
