"""The transaction Bundle of one study, as pure data (no server)."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from scp.fhir_version import FhirVersion
from scp.mapping.imaging_study import MappingOptions, build_imaging_study
from scp.records import InstanceHeader
from scp.sinks.fhir_bundle import imaging_study_url, token, transaction_bundle
from scp.validation import imaging_study_problems

STUDY = "1.2.826.0.1.3680043.8.498.1"


def header(sop: str, **attributes: Any) -> InstanceHeader:
    base = {"PatientName": "Doe^Jane", "PatientID": "PID,1|x", "PatientBirthDate": "19700101", "PatientSex": "F",
            "Modality": "CT", "StudyDate": "20240315"}
    return InstanceHeader(STUDY, STUDY + ".1", sop, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                          {**base, **attributes})


def bundle_of(headers: list[InstanceHeader], version: FhirVersion = FhirVersion.R4, **options: Any) -> Any:
    resource = build_imaging_study(headers, MappingOptions(version=version, **options)).resource
    return transaction_bundle(STUDY, resource, headers, version)


def test_entries_requests_and_references() -> None:
    built = bundle_of([header(STUDY + ".1.1")], wado_rs_url="https://pacs.example/dicom-web/")
    patient, endpoint, study = built.bundle["entry"]
    assert built.bundle["type"] == "transaction"
    assert patient["request"] == {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=|PID\\%2C1\\|x"}
    assert dict(parse_qsl(patient["request"]["ifNoneExist"])) == {"identifier": "|PID\\,1\\|x"}
    assert patient["resource"] == {"resourceType": "Patient", "identifier": [{"value": "PID,1|x"}],
                                   "name": [{"family": "Doe", "given": ["Jane"], "text": "Jane Doe"}],
                                   "gender": "female", "birthDate": "1970-01-01"}
    assert endpoint["request"]["ifNoneExist"] == "identifier=urn:ietf:rfc:3986|https://pacs.example/dicom-web"
    assert endpoint["resource"]["identifier"] == [{"system": "urn:ietf:rfc:3986",
                                                   "value": "https://pacs.example/dicom-web"}]
    assert "id" not in endpoint["resource"]
    assert study["request"] == {"method": "PUT",
                                "url": f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{STUDY}"}
    resource = study["resource"]
    assert "id" not in resource and "contained" not in resource
    assert resource["subject"]["reference"] == patient["fullUrl"]
    assert resource["subject"]["identifier"] == {"value": "PID,1|x"}  # the logical reference is kept too
    assert resource["endpoint"] == [{"reference": endpoint["fullUrl"], "type": "Endpoint"}]
    assert len({e["fullUrl"] for e in built.bundle["entry"]}) == 3
    assert all(e["fullUrl"].startswith("urn:uuid:") for e in built.bundle["entry"])
    assert bundle_of([header(STUDY + ".1.1")], wado_rs_url="https://pacs.example/dicom-web/").bundle == built.bundle
    assert "PID" not in " ".join(built.requests)  # the log shows no patient identifier


def test_a_study_without_patient_id() -> None:
    headers = [header(STUDY + ".1.1", PatientID="", PatientSex="X", PatientBirthDate="19701341")]
    built = bundle_of(headers, unidentified_patient_system="urn:oid:1.2.3")
    patient = built.bundle["entry"][0]
    assert patient["resource"]["identifier"] == [{"system": "urn:oid:1.2.3", "value": STUDY}]
    assert patient["request"]["ifNoneExist"] == f"identifier=urn:oid:1.2.3|{STUDY}"
    assert "gender" not in patient["resource"] and "birthDate" not in patient["resource"]
    assert len(built.warnings) == 2 and "19701341" not in " ".join(built.warnings)  # no PHI in warnings


def test_the_latest_values_win_and_tokens_are_encoded() -> None:
    built = bundle_of([header(STUDY + ".1.1"), header(STUDY + ".1.2", PatientName="Roe^Richard", PatientSex="M")])
    patient = built.bundle["entry"][0]["resource"]
    assert patient["name"][0]["family"] == "Roe" and patient["gender"] == "male"
    assert token("http://x.org/ids", "A B&C$") == "http://x.org/ids|A%20B%26C\\%24"


def test_free_text_issuers_are_told_apart_by_the_patient_search() -> None:
    """Report bug 1: ``identifier=|123`` matched the Patient of any issuer; each issuer now has its own system."""
    def patient_entry(**attributes: Any) -> Any:
        return bundle_of([header(STUDY + ".1.1", PatientID="123", **attributes)]).bundle["entry"][0]

    a, a_again = patient_entry(IssuerOfPatientID="HOSPITAL_A"), patient_entry(IssuerOfPatientID="HOSPITAL_A")
    b, none = patient_entry(IssuerOfPatientID="HOSPITAL_B"), patient_entry()
    assert a["request"]["ifNoneExist"] == "identifier=urn:imagingstudy-scp:issuer-of-patient-id:HOSPITAL_A|123"
    assert a["resource"]["identifier"] == [{"value": "123", "system": "urn:imagingstudy-scp:issuer-of-patient-id:"
                                            "HOSPITAL_A", "assigner": {"display": "HOSPITAL_A"}}]
    assert a["request"] == a_again["request"]  # the same patient finds its Patient again
    assert len({a["request"]["ifNoneExist"], b["request"]["ifNoneExist"], none["request"]["ifNoneExist"]}) == 3
    assert none["request"]["ifNoneExist"] == "identifier=|123"  # no issuer: as before
    odd = patient_entry(IssuerOfPatientID="St. Mary's|East, $1")["request"]["ifNoneExist"]
    system = dict(parse_qsl(odd))["identifier"].rsplit("|", 1)[0]
    assert system == "urn:imagingstudy-scp:issuer-of-patient-id:St.%20Mary%27s%7CEast%2C%20%241"


def test_a_free_text_issuer_system_is_valid_in_every_release() -> None:
    headers = [header(STUDY + ".1.1", PatientID="123", IssuerOfPatientID="Klinikum Süd | Ost")]
    for version in FhirVersion:
        resource = build_imaging_study(headers, MappingOptions(version=version)).resource
        assert imaging_study_problems(resource, version) == []
        assert resource["subject"]["identifier"]["system"].startswith("urn:imagingstudy-scp:issuer-of-patient-id:")


def test_a_withdrawal_addresses_the_resource_the_bundle_updates() -> None:
    """The conditional delete that withdraws a study must match exactly what the conditional update wrote."""
    study = bundle_of([header(STUDY + ".1.1")]).bundle["entry"][-1]
    assert study["request"] == {"method": "PUT", "url": imaging_study_url(STUDY)}
    kind, query = imaging_study_url(STUDY).split("?")
    assert kind == "ImagingStudy" and parse_qsl(query) == [("identifier", f"urn:dicom:uid|urn:oid:{STUDY}")]
