"""Issue 4: publishing to a real FHIR server (sekmet-fhir, R4, strict validation unless said otherwise).

Each test starts its own FHIR server(s) and SCP(s) on 127.0.0.1 and free ports; all stop by themselves.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pydicom
import pytest

from conftest import RunningSCP, storescu, wait_for
from dicom_factory import make_instance, make_study
from fhir_server import FhirServer
from scp.fhir_version import FhirVersion
from scp.index import Index
from scp.mapping.imaging_study import MappingOptions, build_imaging_study
from scp.sinks.fhir_bundle import transaction_bundle

DICOM_UID = "urn:dicom:uid"


@pytest.fixture
def fhir_factory(tmp_path: Path) -> Iterator[Callable[..., FhirServer]]:
    """Start FHIR servers (``start=False`` to only configure one); all are stopped after the test."""
    made: list[FhirServer] = []

    def make(name: str = "fhir", *, start: bool = True, **options: Any) -> FhirServer:
        server = FhirServer(tmp_path / name, **options)
        made.append(server)
        return server.start() if start else server

    yield make
    for server in made:
        server.stop()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scp", *args], capture_output=True, text=True, timeout=60)


def studies_with_uid(fhir: FhirServer, study_uid: str) -> list[dict[str, Any]]:
    return fhir.search("ImagingStudy", identifier=f"{DICOM_UID}|urn:oid:{study_uid}")


def wait_for_imaging_study(fhir: FhirServer, study_uid: str, *, version: str | None = None,
                           instances: int | None = None, timeout: float = 30) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        matches = studies_with_uid(fhir, study_uid)
        assert len(matches) <= 1, f"{len(matches)} ImagingStudy resources for one study"
        if not matches:
            return None
        study = matches[0]
        if version is not None and study["meta"]["versionId"] != version:
            return None
        if instances is not None and study.get("numberOfInstances") != instances:
            return None
        return study
    return wait_for(found, timeout, interval=0.2, what=f"ImagingStudy {study_uid} on the FHIR server")


def records(server: RunningSCP, **match: Any) -> list[dict[str, Any]]:
    """The JSON log records of the SCP that have every field of ``match``."""
    found = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            record = orjson.loads(line)
            if all(record.get(k) == v for k, v in match.items()):
                found.append(record)
    return found


def outbox_rows(data_dir: Path) -> list[list[str]]:
    listing = cli("outbox", "--data-dir", str(data_dir))
    assert listing.returncode == 0, listing.stderr
    return [line.split() for line in listing.stdout.splitlines()[1:-1]] if "STATE" in listing.stdout else []


# -- acceptance 1 ---------------------------------------------------------------------------------

def test_a_study_becomes_one_patient_and_one_imaging_study(scp_factory, fhir_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fhir = fhir_factory()  # strict R4 validation
    server = scp_factory("--fhir-url", fhir.base_url, "--wado-rs-url", "http://127.0.0.1:1/dicomweb",
                         "--log-format", "json")
    study = make_study(tmp_path / "a", series=(("CT", 3), ("MR", 2)), seed="fhir-one")
    storescu(server.port, study.files)

    imaging = wait_for_imaging_study(fhir, study.study_uid, instances=5)
    assert imaging["numberOfSeries"] == 2
    assert imaging["series"][0]["instance"][0]["sopClass"]["system"] == "urn:ietf:rfc:3986"  # R4, from /metadata
    patients = fhir.search("Patient", identifier="PID-0001")
    assert len(patients) == 1
    patient = patients[0]
    assert patient["name"][0]["family"] == "Doe" and patient["name"][0]["given"] == ["Jane"]
    assert patient["birthDate"] == "1970-01-01" and patient["gender"] == "female"
    assert imaging["subject"]["reference"] == f"Patient/{patient['id']}"
    assert [s["id"] for s in fhir.search("ImagingStudy", patient=f"Patient/{patient['id']}")] == [imaging["id"]]
    assert [s["id"] for s in fhir.search("ImagingStudy", subject=f"Patient/{patient['id']}")] == [imaging["id"]]
    endpoints = fhir.all("Endpoint")
    assert len(endpoints) == 1 and endpoints[0]["address"] == "http://127.0.0.1:1/dicomweb"
    assert imaging["endpoint"] == [{"reference": f"Endpoint/{endpoints[0]['id']}", "type": "Endpoint"}]
    assert "contained" not in imaging

    # The directory sink still writes its own release (R6 unless --fhir-version says otherwise).
    local = server.wait_for_study(study.study_uid, instances=5)
    assert local["series"][0]["instance"][0]["sopClass"].startswith("urn:oid:")

    # The log says what was sent and what the server answered, per study and sink.
    delivered = wait_for(lambda: records(server, event="publication", sink=f"fhir:{fhir.base_url}",
                                         result="delivered"), what="the FHIR publication record")
    record = delivered[-1]
    assert record["study_uid"] == study.study_uid and isinstance(record["latency"], float)
    assert record["status"] == 200 and record["version"] == "R4"
    assert record["sent"][0].startswith("POST Patient") and "PID-0001" not in str(record["sent"])  # no PHI
    assert record["sent"][-1] == f"PUT ImagingStudy?identifier={DICOM_UID}|urn:oid:{study.study_uid}"
    answered = {e["resource"]: e for e in record["entries"]}
    assert answered[f"ImagingStudy/{imaging['id']}"]["version"] == "1"
    assert answered[f"Patient/{patient['id']}"]["status"].startswith("201")
    assert outbox_rows(server.data_dir) == []


# -- acceptance 2 ---------------------------------------------------------------------------------

def test_sending_again_updates_and_a_second_study_shares_the_patient(scp_factory, fhir_factory,
                                                                    tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fhir = fhir_factory()
    server = scp_factory("--fhir-url", fhir.base_url, "--wado-rs-url", "http://127.0.0.1:1/dicomweb")
    first = make_study(tmp_path / "a", series=(("CT", 2),), seed="fhir-again-1")
    second = make_study(tmp_path / "b", series=(("MR", 3),), seed="fhir-again-2")

    storescu(server.port, first.files)
    v1 = wait_for_imaging_study(fhir, first.study_uid, version="1")
    storescu(server.port, first.files)  # the same study again
    v2 = wait_for_imaging_study(fhir, first.study_uid, version="2")
    assert v2["id"] == v1["id"]
    storescu(server.port, second.files)  # another study of the same patient
    other = wait_for_imaging_study(fhir, second.study_uid, instances=3)

    patients = fhir.all("Patient")
    assert len(patients) == 1
    assert v2["subject"]["reference"] == other["subject"]["reference"] == f"Patient/{patients[0]['id']}"
    assert sorted(s["id"] for s in fhir.all("ImagingStudy")) == sorted([v1["id"], other["id"]])
    assert len(fhir.all("Endpoint")) == 1
    assert [h["meta"]["versionId"] for h in fhir.history("ImagingStudy", v1["id"])] in (["2", "1"], ["1", "2"])
    assert patients[0]["meta"]["versionId"] == "1"  # created once, never rewritten

    # `publish` delivers now to every sink the configuration names (here: the environment, a JSON list).
    env = {**os.environ, "IMAGINGSTUDY_SCP_FHIR_URL": orjson.dumps([fhir.base_url]).decode()}
    published = subprocess.run([sys.executable, "-m", "scp", "publish", first.study_uid, "--data-dir",
                                str(server.data_dir)], capture_output=True, text=True, timeout=60, env=env)
    assert published.returncode == 0, published.stderr
    assert published.stdout.strip() == f"published {first.study_uid} to directory, fhir:{fhir.base_url}"
    assert studies_with_uid(fhir, first.study_uid)[0]["meta"]["versionId"] == "3"
    assert len(fhir.all("ImagingStudy")) == 2 and len(fhir.all("Patient")) == 1


# -- acceptance 3 ---------------------------------------------------------------------------------

def test_delivery_survives_a_server_outage_and_a_kill_9(scp_factory, fhir_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fhir = fhir_factory(start=False)  # down when the study arrives
    args = ("--fhir-url", fhir.base_url, "--outbox-initial-delay", "0.5", "--outbox-max-delay", "2",
            "--log-format", "json")
    server = scp_factory(*args)
    first = make_study(tmp_path / "a", series=(("CT", 3),), seed="fhir-outage-1")
    storescu(server.port, first.files)
    arrived = time.monotonic()
    server.wait_for_study(first.study_uid, instances=3)  # the directory sink does not wait for the server
    wait_for(lambda: len(records(server, event="publication", result="retry")) >= 2, what="failed attempts")
    rows = outbox_rows(server.data_dir)
    assert [(r[0], r[1], r[2]) for r in rows] == [("pending", f"fhir:{fhir.base_url}", first.study_uid)]

    time.sleep(max(0.0, arrived + 30 - time.monotonic()))  # the server is down for 30 s after the study arrived
    fhir.start()
    wait_for_imaging_study(fhir, first.study_uid, instances=3, timeout=15)  # no action needed
    wait_for(lambda: outbox_rows(server.data_dir) == [], what="an empty outbox")

    # Publications pending when the SCP dies hard: the next start delivers them.
    fhir.stop()
    second = make_study(tmp_path / "b", series=(("MR", 2),), seed="fhir-outage-2")
    storescu(server.port, second.files + first.files[:1])
    server.wait_for_study(second.study_uid, instances=2)
    wait_for(lambda: len(outbox_rows(server.data_dir)) == 2, what="two pending publications")
    server.kill()
    fhir.start()
    time.sleep(1)
    assert studies_with_uid(fhir, second.study_uid) == []  # nobody delivered it while the SCP was dead
    server.start()
    wait_for_imaging_study(fhir, second.study_uid, instances=2, timeout=20)
    wait_for_imaging_study(fhir, first.study_uid, version="2", timeout=20)
    wait_for(lambda: outbox_rows(server.data_dir) == [], what="an empty outbox")

    assert len(fhir.all("Patient")) == 1
    assert len(fhir.all("ImagingStudy")) == 2
    for uid in (first.study_uid, second.study_uid):
        assert len(studies_with_uid(fhir, uid)) == 1


# -- acceptance 4 ---------------------------------------------------------------------------------

def test_a_refused_payload_is_dead_lettered_and_retried_after_the_fix(scp_factory, fhir_factory,
                                                                      tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fhir = fhir_factory()  # R4, strict: refuses an R6 ImagingStudy
    sink = f"fhir:{fhir.base_url}"
    server = scp_factory("--fhir-url", fhir.base_url, "--fhir-version", "R6", "--log-format", "json")
    study = make_study(tmp_path / "a", series=(("CT", 2),), seed="fhir-dead")
    storescu(server.port, study.files)

    dead = wait_for(lambda: records(server, event="publication", sink=sink, result="dead"), what="a dead letter")
    assert dead[0]["status"] == 400
    outcome = dead[0]["outcome"]
    assert outcome["resourceType"] == "OperationOutcome"
    assert any(i["severity"] == "error" for i in outcome["issue"])
    assert "OperationOutcome" in dead[0]["message"]
    rows = outbox_rows(server.data_dir)
    assert [(r[0], r[1], r[2]) for r in rows] == [("dead", sink, study.study_uid)]
    assert studies_with_uid(fhir, study.study_uid) == [] and fhir.all("Patient") == []

    # The fix: the server's own release (no --fhir-version). A restart alone does not resend.
    server.stop()
    server.args = ("--fhir-url", fhir.base_url, "--log-format", "json")
    server.start()
    time.sleep(2)
    assert [r[0] for r in outbox_rows(server.data_dir)] == ["dead"]
    assert studies_with_uid(fhir, study.study_uid) == []

    retried = cli("outbox", "retry", study.study_uid, "--data-dir", str(server.data_dir))
    assert retried.returncode == 0, retried.stderr
    assert "re-queued 1 publication" in retried.stdout
    imaging = wait_for_imaging_study(fhir, study.study_uid, instances=2, timeout=15)
    assert imaging["series"][0]["instance"][0]["sopClass"]["system"] == "urn:ietf:rfc:3986"
    wait_for(lambda: outbox_rows(server.data_dir) == [], what="an empty outbox")
    assert records(server, event="publication", sink=sink, result="delivered")[-1]["version"] == "R4"


# -- acceptance 5 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [FhirVersion.R5, FhirVersion.R6])
def test_r5_and_r6_payloads_are_stored_as_sent(scp_factory, fhir_factory, tmp_path: Path,
                                               version: FhirVersion) -> None:  # type: ignore[no-untyped-def]
    fhir = fhir_factory(validation="off")  # sekmet validates R4 only
    server = scp_factory("--fhir-url", fhir.base_url, "--fhir-version", str(version),
                         "--wado-rs-url", "http://127.0.0.1:1/dicomweb")
    study = make_study(tmp_path / "a", series=(("CT", 2), ("MR", 1)), seed=f"fhir-{version}")
    storescu(server.port, study.files)
    stored = wait_for_imaging_study(fhir, study.study_uid, instances=3)

    # What the SCP sent, rebuilt from its index exactly as the sink builds it.
    index = Index(server.data_dir / "index.sqlite3")
    try:
        instances = index.study_instances(study.study_uid)
    finally:
        index.close()
    mapped = build_imaging_study([i.header for i in instances], MappingOptions(
        version=version, wado_rs_url="http://127.0.0.1:1/dicomweb"))
    sent = {e["resource"]["resourceType"]: e["resource"]
            for e in transaction_bundle(study.study_uid, mapped.resource, [i.header for i in instances],
                                        version).bundle["entry"]}
    patient = fhir.all("Patient")[0]
    endpoint = fhir.all("Endpoint")[0]
    assert without_server_elements(patient) == sent["Patient"]
    assert without_server_elements(endpoint) == sent["Endpoint"]
    expected = dict(sent["ImagingStudy"])
    expected["subject"] = {**expected["subject"], "reference": f"Patient/{patient['id']}"}
    expected["endpoint"] = [{"reference": f"Endpoint/{endpoint['id']}", "type": "Endpoint"}]
    assert without_server_elements(stored) == expected
    if version is FhirVersion.R6:
        assert stored["series"][0]["instance"][0]["sopClass"].startswith("urn:oid:")
    else:
        assert stored["series"][0]["instance"][0]["sopClass"]["system"] == "urn:ietf:rfc:3986"


def without_server_elements(resource: dict[str, Any]) -> dict[str, Any]:
    """A resource without what the server adds (id, meta)."""
    return {k: v for k, v in resource.items() if k not in ("id", "meta")}


# -- a study without Patient ID -------------------------------------------------------------------

def test_a_study_without_patient_id_gets_a_patient_of_its_own(scp_factory, fhir_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fhir = fhir_factory()
    system = "urn:oid:1.2.3.999.1"
    server = scp_factory("--fhir-url", fhir.base_url, "--patient-id-system", system)
    anonymous = []
    for name in ("x", "y"):
        study = make_study(tmp_path / name, series=(("CT", 1),), seed=f"fhir-anon-{name}")
        for path in study.files:
            ds = pydicom.dcmread(path)
            del ds.PatientID
            ds.save_as(path)
        anonymous.append(study)
        storescu(server.port, study.files)
    for study in anonymous:
        imaging = wait_for_imaging_study(fhir, study.study_uid)
        patients = fhir.search("Patient", identifier=f"{system}|{study.study_uid}")
        assert len(patients) == 1
        assert imaging["subject"]["reference"] == f"Patient/{patients[0]['id']}"
        assert patients[0]["name"][0]["family"] == "Doe"
    assert len(fhir.all("Patient")) == 2  # unknown identity: one Patient per study, never merged


# -- one Patient ID, several issuers (report bug 1) -----------------------------------------------

def _with_patient(study: Any, patient_id: str, issuer: str | None, name: str) -> Any:
    for path in study.files:
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.PatientName = patient_id, name
        if issuer is None:
            ds.pop("IssuerOfPatientID", None)
        else:
            ds.IssuerOfPatientID = issuer
        ds.save_as(path)
    return study


def test_one_patient_id_from_two_issuers_is_two_patients(scp_factory, fhir_factory,
                                                         tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Patient ID 123 from HOSPITAL_A and from HOSPITAL_B are two people; a second study of A's is A's."""
    fhir = fhir_factory()  # strict R4
    server = scp_factory("--fhir-url", fhir.base_url)
    cases = (("a", "HOSPITAL_A", "Alpha^Ann"), ("b", "HOSPITAL_B", "Beta^Bob"), ("a2", "HOSPITAL_A", "Alpha^Ann"),
             ("none", None, "Nobody^Nemo"))
    subjects = {}
    for tag, issuer, name in cases:
        study = _with_patient(make_study(tmp_path / tag, series=(("CT", 1),), seed=f"issuer-{tag}"), "123", issuer,
                              name)
        storescu(server.port, study.files)
        subjects[tag] = wait_for_imaging_study(fhir, study.study_uid)["subject"]["reference"]

    patients = {f"Patient/{p['id']}": p for p in fhir.all("Patient")}
    assert len(patients) == 3
    assert subjects["a"] == subjects["a2"] and len({subjects["a"], subjects["b"], subjects["none"]}) == 3
    for tag, issuer, name in cases:
        patient = patients[subjects[tag]]
        assert patient["name"][0]["family"] == name.split("^")[0]
        assert patient["identifier"][0].get("assigner", {}).get("display") == issuer
    assert "system" not in patients[subjects["none"]]["identifier"][0]  # no issuer: as before


# -- a FHIR server added to an existing data dir (report bug 3) ----------------------------------

def test_a_fhir_server_added_later_receives_the_studies_stored_before(
        scp_factory, fhir_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fhir = fhir_factory()
    server = scp_factory()  # the directory only
    study = make_study(tmp_path / "a", series=(("CT", 2),), seed="fhir-added-later")
    storescu(server.port, study.files)
    server.wait_for_study(study.study_uid, instances=2)
    server.stop()

    server.args = ("--fhir-url", fhir.base_url)
    server.start()
    imaging = wait_for_imaging_study(fhir, study.study_uid, instances=2, timeout=15)
    assert imaging["meta"]["versionId"] == "1"
    wait_for(lambda: outbox_rows(server.data_dir) == [], what="an empty outbox")
    server.stop()
    server.start()  # delivered once: a later start does not send it again
    time.sleep(1.5)
    assert studies_with_uid(fhir, study.study_uid)[0]["meta"]["versionId"] == "1"


# -- an instance moved to another study (store review, bug 6) -------------------------------------

def test_a_study_whose_last_instance_moved_is_withdrawn_everywhere(  # type: ignore[no-untyped-def]
        scp_factory, fhir_factory, tmp_path: Path) -> None:
    """X is sent in study A, then again (same SOP Instance UID) in study B: A's ImagingStudy goes, from the
    directory and from the FHIR server, and B's lists X; a restart withdraws nothing again."""
    fhir = fhir_factory()
    sink = f"fhir:{fhir.base_url}"
    server = scp_factory("--fhir-url", fhir.base_url, "--log-format", "json")
    old, new, sop = "1.2.3.300", "1.2.3.301", "1.2.3.300.1.1"
    first = make_instance(tmp_path / "a.dcm", study_uid=old, series_uid=f"{old}.1", sop_uid=sop)
    moved = make_instance(tmp_path / "b.dcm", study_uid=new, series_uid=f"{new}.1", sop_uid=sop)

    storescu(server.port, [first])
    wait_for_imaging_study(fhir, old, instances=1)
    server.wait_for_study(old, instances=1)
    storescu(server.port, [moved])
    on_server = wait_for_imaging_study(fhir, new, instances=1)
    assert on_server["series"][0]["instance"][0]["uid"] == sop
    assert server.wait_for_study(new, instances=1)["series"][0]["instance"][0]["uid"] == sop
    wait_for(lambda: studies_with_uid(fhir, old) == [], what="study A gone from the FHIR server")
    wait_for(lambda: not server.study_path(old).exists(), what="study A's file gone from the directory")

    withdrawn = wait_for(lambda: len(found := records(server, event="publication", result="withdrawn")) == 2
                         and found, what="two withdrawal records")
    assert sorted(r["sink"] for r in withdrawn) == ["directory", sink]
    assert all(r["study_uid"] == old for r in withdrawn)
    by_sink = {r["sink"]: r for r in withdrawn}
    assert by_sink[sink]["status"] in (200, 204)
    assert by_sink[sink]["sent"] == [f"DELETE ImagingStudy?identifier={DICOM_UID}|urn:oid:{old}"]
    assert len(fhir.all("Patient")) == 1  # the Patient stays (B's subject)
    wait_for(lambda: outbox_rows(server.data_dir) == [], what="an empty outbox")

    server.stop()
    server.start()
    time.sleep(1.5)  # a worker poll
    assert len(records(server, event="publication", result="withdrawn")) == 2  # not withdrawn again
    assert len(studies_with_uid(fhir, new)) == 1 and studies_with_uid(fhir, old) == []
    assert server.read_study(new) is not None and not server.study_path(old).exists()
