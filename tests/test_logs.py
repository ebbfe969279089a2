"""Issue 7, acceptance 3: JSON logs parse line by line, carry the association and publication records,
and hold no patient name unless --log-phi is set."""

from __future__ import annotations

from pathlib import Path

import orjson
import pydicom

from conftest import storescu, wait_for
from dicom_factory import make_study


def json_records(text: str) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


def study_with_disagreeing_names(folder: Path) -> tuple[str, list[Path]]:
    """A study whose last instance renames the patient: the mapping warns about it."""
    study = make_study(folder, series=(("CT", 3),), seed="phi")
    last = pydicom.dcmread(study.files[-1])
    last.PatientName = "Roe^Richard"
    last.save_as(study.files[-1])
    return study.study_uid, study.files


def test_json_logs_have_association_and_publication_records_without_phi(scp_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = scp_factory("--log-format", "json")
    study_uid, files = study_with_disagreeing_names(tmp_path / "g")
    storescu(server.port, files, aet="CT_SCANNER")
    server.wait_for_study(study_uid, instances=3)
    wait_for(lambda: '"publication"' in server.log(), what="publication record")
    records = json_records(server.log())  # every line is one JSON object
    association = [r for r in records if r.get("event") == "association" and r["instances"] == 3]
    assert len(association) == 1
    assert association[0]["calling_aet"] == "CT_SCANNER"
    assert association[0]["called_aet"] == "IMAGINGSTUDY"
    assert association[0]["how"] == "released"
    assert association[0]["bytes"] > 0 and association[0]["failures"] == {}
    publication = [r for r in records if r.get("event") == "publication"]
    assert publication and publication[-1]["study_uid"] == study_uid
    assert publication[-1]["sink"] == "directory" and publication[-1]["result"] == "delivered"
    assert isinstance(publication[-1]["latency"], float)
    assert any("disagree on PatientName" in str(r["message"]) for r in records)
    text = server.log()
    for phi in ("Doe", "Jane", "Roe", "Richard", "PID-0001"):
        assert phi not in text, f"{phi!r} leaked into the log"


def test_log_phi_allows_patient_values(scp_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = scp_factory("--log-format", "json", "--log-phi")
    study_uid, files = study_with_disagreeing_names(tmp_path / "g")
    storescu(server.port, files)
    server.wait_for_study(study_uid, instances=3)
    wait_for(lambda: "Roe^Richard" in server.log(), what="the PatientName warning with values")
