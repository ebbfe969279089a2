"""Issue 2, acceptance 1–2: real clients send real files; every byte and every count comes out right."""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from conftest import AET, ReferenceStorescp, RunningSCP, assert_valid, send_order, storescu
from dicom_factory import dataset_bytes, make_study, pydicom_storage_files
from scp.header import read_header
from scp.index import Index


def expected_studies(files: list[Path]) -> dict[str, dict[str, set[str]]]:
    """study → series → SOP instance UIDs, where a later file with the same SOP Instance UID wins."""
    latest: dict[str, Path] = {}
    for path in files:
        latest[read_header(path).sop_uid] = path
    studies: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for sop_uid, path in latest.items():
        header = read_header(path)
        studies[header.study_uid][header.series_uid].add(sop_uid)
    return studies


def meta_disagrees(path: Path) -> bool:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.file_meta.get("MediaStorageSOPInstanceUID") != ds.get("SOPInstanceUID")


def check_received(server: RunningSCP, sent: list[Path],
                   on_the_wire: dict[str, Path | None] | None = None) -> None:
    """Every latest file is stored byte-identical, and each study's ImagingStudy matches exactly.

    ``on_the_wire`` maps SOP Instance UIDs to files holding exactly the bytes the
    client sent (when it re-encodes; None: not comparable byte for byte, the
    caller checks it); by default the source files themselves.
    """
    latest = {read_header(p).sop_uid: p for p in sent}
    for sop_uid, source in latest.items():
        header = read_header(source)
        stored = server.data_dir / "studies" / header.study_uid / header.series_uid / f"{sop_uid}.dcm"
        assert stored.exists(), f"{source.name} not stored at {stored}"
        wire = (on_the_wire or {}).get(sop_uid, source)
        if wire is not None:
            assert dataset_bytes(stored) == dataset_bytes(wire), f"{source.name}: dataset bytes differ"
        meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == header.transfer_syntax_uid
        assert meta.MediaStorageSOPInstanceUID == sop_uid
        assert meta.MediaStorageSOPClassUID == header.sop_class_uid
    for study_uid, series in expected_studies(sent).items():
        total = sum(len(sops) for sops in series.values())
        study = server.wait_for_study(study_uid, instances=total)
        assert_valid(study)
        assert study["id"] == study_uid
        assert study["numberOfSeries"] == len(series)
        assert {s["uid"]: {i["uid"] for i in s["instance"]} for s in study["series"]} == series
        for published in study["series"]:
            assert published["numberOfInstances"] == len(series[published["uid"]])
            for instance in published["instance"]:
                source = read_header(latest[instance["uid"]])
                assert instance["sopClass"] == f"urn:oid:{source.sop_class_uid}"


def test_storescu_sends_pydicom_files_and_a_generated_study(running_scp: RunningSCP, tmp_path: Path,
                                                           reference_storescp: ReferenceStorescp) -> None:
    """What storescu sends is stored bit for bit: DCMTK's own storescp (+B) received the same bytes."""
    generated = make_study(tmp_path / "generated", seed="acceptance-1")
    files = pydicom_storage_files() + generated.files
    assert len(files) >= 110  # 59 of pydicom's files qualify with pydicom 3.0
    storescu(running_scp.port, files)
    storescu(reference_storescp.port, files)
    on_the_wire = reference_storescp.received()
    assert set(on_the_wire) == {read_header(p).sop_uid for p in files}
    check_received(running_scp, send_order(files), on_the_wire)
    study = running_scp.read_study(generated.study_uid)
    assert study is not None
    assert [s["numberOfInstances"] for s in study["series"]] == [20, 20, 20]
    assert [m["coding"][0]["code"] for m in study["modality"]] == ["CT", "MR"]
    assert "failures=none" in running_scp.log()


def test_pynetdicom_scu_stores_every_transfer_syntax_and_echo_succeeds(running_scp: RunningSCP,
                                                                        tmp_path: Path) -> None:
    files = pydicom_storage_files() + make_study(tmp_path / "g", seed="acceptance-2").files
    inconsistent = {p for p in files if meta_disagrees(p)}
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(Verification)
    contexts = sorted({(read_header(p).sop_class_uid, read_header(p).transfer_syntax_uid) for p in files})
    for sop_class, ts in contexts:
        ae.add_requested_context(sop_class, ts)
    assert len(ae.requested_contexts) <= 128
    previous = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
    try:
        assoc = ae.associate("127.0.0.1", running_scp.port, ae_title=AET)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        for path in files:
            # A file whose meta names another SOP Instance than its dataset goes as a decoded
            # dataset (pynetdicom takes the request's UIDs from the meta of a file it streams).
            status = assoc.send_c_store(pydicom.dcmread(path) if path in inconsistent else path)
            assert status.Status == 0x0000, f"{path.name}: 0x{status.Status:04X}"
        assoc.release()
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = previous
    latest = {read_header(p).sop_uid: p for p in files}
    check_received(running_scp, files, on_the_wire={u: p for u, p in latest.items() if p not in inconsistent}
                   | {u: None for u, p in latest.items() if p in inconsistent})
    for path in set(latest.values()) & inconsistent:
        header = read_header(path)
        stored = running_scp.data_dir / "studies" / header.study_uid / header.series_uid / f"{header.sop_uid}.dcm"
        assert pydicom.dcmread(stored) == pydicom.dcmread(path), f"{path.name}: stored dataset differs"


def test_echoscu_succeeds(running_scp: RunningSCP) -> None:
    import subprocess

    from conftest import dcmtk

    result = subprocess.run([dcmtk("echoscu"), "-aec", AET, "127.0.0.1", str(running_scp.port)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_index_rows_carry_header_and_provenance(running_scp: RunningSCP, tmp_path: Path) -> None:
    study = make_study(tmp_path / "g", series=(("CT", 3),), seed="provenance")
    storescu(running_scp.port, study.files, aet="MODALITY1")
    running_scp.wait_for_study(study.study_uid, instances=3)
    index = Index(running_scp.data_dir / "index.sqlite3")
    try:
        rows = index.study_instances(study.study_uid)
    finally:
        index.close()
    assert len(rows) == 3
    for row in rows:
        assert row.provenance.calling_aet == "MODALITY1"
        assert row.provenance.called_aet == AET
        assert row.provenance.peer and row.provenance.peer.startswith("127.0.0.1:")
        assert row.provenance.association_id
        assert row.size == (running_scp.data_dir / row.path).stat().st_size
        assert row.header.attributes["PatientID"] == "PID-0001"
        assert row.header.attributes["Modality"] == "CT"
    assert len({r.provenance.association_id for r in rows}) == 1


def test_a_study_directory_removed_by_hand_is_made_again(running_scp: RunningSCP, tmp_path: Path) -> None:
    """A study directory removed behind the store's back is made again for the next instance."""
    study = make_study(tmp_path / "g", series=(("CT", 4),), seed="removed-dir")
    storescu(running_scp.port, study.files[:2])
    study_dir = running_scp.data_dir / "studies" / study.study_uid
    assert len(list(study_dir.rglob("*.dcm"))) == 2
    shutil.rmtree(study_dir)
    storescu(running_scp.port, study.files[2:])  # check=True: every C-STORE answered with success
    assert len(list(study_dir.rglob("*.dcm"))) == 2
