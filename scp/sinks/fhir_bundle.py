"""One study → one FHIR transaction Bundle: Patient, Endpoint (optional) and ImagingStudy (pure, no I/O).

* **Patient**: conditional create (``ifNoneExist: identifier=<system>|<value>``) with the identifier
  of the ImagingStudy's ``subject`` (Patient ID + issuer; for a study without Patient ID the
  mapping's ``<patient_id_system>`` + the Study Instance UID), and name, birth date and sex from
  the study's DICOM headers (the most recent non-empty value, as the mapping does). Two studies
  of one patient therefore share one Patient; a study without Patient ID has a Patient of its own.
  The search can only tell issuers apart by ``system`` (FHIR has no search on ``assigner``), so
  the mapping gives a free-text Issuer of Patient ID a system of its own
  (:func:`scp.mapping.terminology.free_text_issuer_system`): ``123`` of two issuers is two Patients.
* **Endpoint** (when the mapping wrote the contained ``#wado-rs`` Endpoint): conditional create,
  identified by its address (``identifier: urn:ietf:rfc:3986|<address>``); the contained copy
  is removed and ``ImagingStudy.endpoint`` points at the bundle entry.
* **ImagingStudy**: conditional update ``PUT ImagingStudy?identifier=urn:dicom:uid|urn:oid:<uid>``
  *without* ``id``: the server assigns the id on the first delivery and every later delivery
  matches the same resource through its Study Instance UID identifier (a new version, never a
  new resource). Sending our id instead would fail on servers that refuse update-as-create or
  that hold the study under an id they assigned.

A study that no longer has stored instances is withdrawn with a conditional delete of that same URL
(``DELETE ImagingStudy?identifier=…``, see :func:`imaging_study_url`); its Patient and Endpoint stay.

References between the entries use ``urn:uuid:`` fullUrls derived from the Study Instance UID
(uuid5), so the same study always yields the same bundle.
"""

from __future__ import annotations

import copy
import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from scp.fhir_version import FhirVersion
from scp.mapping.dicom_values import InvalidDicomValue, fhir_datetime, human_names, parse_person_name
from scp.records import InstanceHeader

DICOM_UID_SYSTEM = "urn:dicom:uid"
URL_SYSTEM = "urn:ietf:rfc:3986"
_NAMESPACE = uuid.UUID("5b0c5a8e-3a43-4c55-9d8e-6f1d3f0b8a11")  # fixed: fullUrls are stable across runs

# DICOM Patient's Sex (0010,0040) → FHIR AdministrativeGender.
_GENDER = {"M": "male", "F": "female", "O": "other"}


@dataclass
class BuiltBundle:
    """The transaction and what is worth saying about it."""

    bundle: dict[str, Any]
    requests: list[str]  # "POST Patient", ... in entry order (identifiers masked unless log_phi)
    warnings: list[str] = field(default_factory=list)


def transaction_bundle(study_uid: str, imaging_study: dict[str, Any], headers: Sequence[InstanceHeader],
                       version: FhirVersion, *, log_phi: bool = False) -> BuiltBundle:
    """The transaction that creates or updates the study's resources on a FHIR server.

    ``imaging_study`` is the validated resource of ``version``; its contained Endpoint is already
    written for that release, and the Patient elements used here (identifier, name, gender,
    birthDate) are the same in R4, R5 and R6.
    """
    study = copy.deepcopy(imaging_study)
    study.pop("id", None)
    warnings: list[str] = []
    entries: list[dict[str, Any]] = []
    requests: list[str] = []

    subject = study.get("subject") or {}
    identifier = subject.get("identifier")
    if not isinstance(identifier, dict) or not identifier.get("value"):
        raise ValueError(f"study {study_uid}: the ImagingStudy's subject has no identifier")
    patient_url = _urn(study_uid, "Patient")
    patient = patient_resource(identifier, headers, study_uid, warnings, log_phi=log_phi)
    patient_query = f"identifier={token(identifier.get('system'), identifier['value'])}"
    entries.append({"fullUrl": patient_url, "resource": patient,
                    "request": {"method": "POST", "url": "Patient", "ifNoneExist": patient_query}})
    requests.append(f"POST Patient (if none exist: {patient_query if log_phi else 'identifier=***'})")
    study["subject"] = {"reference": patient_url, **subject}

    endpoint = _take_contained_endpoint(study)
    if endpoint is not None:
        endpoint_url = _urn(study_uid, "Endpoint")
        endpoint.pop("id", None)
        endpoint["identifier"] = [{"system": URL_SYSTEM, "value": endpoint["address"]}]
        query = f"identifier={token(URL_SYSTEM, endpoint['address'])}"
        entries.append({"fullUrl": endpoint_url, "resource": endpoint,
                        "request": {"method": "POST", "url": "Endpoint", "ifNoneExist": query}})
        requests.append(f"POST Endpoint (if none exist: {query})")
        study["endpoint"] = [{"reference": endpoint_url, "type": "Endpoint"}]

    study_url = imaging_study_url(study_uid)
    entries.append({"fullUrl": _urn(study_uid, "ImagingStudy"), "resource": study,
                    "request": {"method": "PUT", "url": study_url}})
    requests.append(f"PUT {study_url}")
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    return BuiltBundle(bundle, requests, warnings)


def imaging_study_url(study_uid: str) -> str:
    """``ImagingStudy?identifier=urn:dicom:uid|urn:oid:<uid>``: how the server's resource for the study is
    addressed, by its Study Instance UID identifier (the server chose its id). The conditional update of
    :func:`transaction_bundle` and the conditional delete that withdraws the study use this same URL, so a
    withdrawal removes exactly the resource that deliveries wrote."""
    return f"ImagingStudy?identifier={token(DICOM_UID_SYSTEM, f'urn:oid:{study_uid}')}"


def patient_resource(identifier: dict[str, Any], headers: Sequence[InstanceHeader], study_uid: str,
                     warnings: list[str], *, log_phi: bool = False) -> dict[str, Any]:
    """A Patient from what the headers know: identifier, name, birth date, sex (absent stays absent)."""
    patient: dict[str, Any] = {"resourceType": "Patient", "identifier": [identifier]}
    where = f"study {study_uid}"

    def shown(value: str) -> str:
        return repr(value) if log_phi else "***"

    name_text = _latest(headers, "PatientName")
    if name_text:
        try:
            names = human_names(parse_person_name(name_text))
        except InvalidDicomValue as exc:
            names = []
            warnings.append(f"{where}: Patient's Name {shown(name_text)} left out of Patient: "
                            f"{exc if log_phi else 'invalid'}")
        if names:
            patient["name"] = names
    sex = _latest(headers, "PatientSex")
    if sex:
        gender = _GENDER.get(sex.strip().upper())
        if gender:
            patient["gender"] = gender
        else:
            warnings.append(f"{where}: Patient's Sex {sex!r} is not M, F or O; Patient.gender left out")
    birth = _latest(headers, "PatientBirthDate")
    if birth:
        try:
            date = fhir_datetime(birth, None, None, dt.timezone.utc)
        except InvalidDicomValue as exc:
            date = None
            warnings.append(f"{where}: Patient's Birth Date {shown(birth)} left out of Patient: "
                            f"{exc if log_phi else 'invalid date'}")
        if date:
            patient["birthDate"] = date
    return patient


def token(system: str | None, value: str) -> str:
    """A token search value ``system|value`` (``|value``: no system), escaped and URL-encoded."""
    text = f"{_escape(system or '')}|{_escape(value)}"
    return quote(text, safe=":/|\\.-_~")


def _escape(text: str) -> str:
    """FHIR search escaping: backslash before ``\\``, ``|``, ``,`` and ``$``."""
    for char in ("\\", "|", ",", "$"):
        text = text.replace(char, "\\" + char)
    return text


def _latest(headers: Sequence[InstanceHeader], keyword: str) -> str | None:
    """The most recent non-empty value of a single-valued text attribute (instances are oldest first)."""
    for header in reversed(headers):
        value = header.attributes.get(keyword)
        if isinstance(value, list):
            value = "\\".join(v for v in value if isinstance(v, str)) if all(isinstance(v, str) for v in value) \
                else None
        if isinstance(value, str) and value.strip(" \x00"):
            return value.rstrip(" \x00")
    return None


def _take_contained_endpoint(study: dict[str, Any]) -> dict[str, Any] | None:
    """Remove the contained ``#wado-rs`` Endpoint the study points at, and return it."""
    contained = study.get("contained") or []
    refs = {e.get("reference") for e in study.get("endpoint", []) if isinstance(e, dict)}
    for index, resource in enumerate(contained):
        if resource.get("resourceType") == "Endpoint" and f"#{resource.get('id')}" in refs:
            del contained[index]
            if not contained:
                study.pop("contained", None)
            return dict(resource)
    return None


def _urn(study_uid: str, role: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_NAMESPACE, f'{role}/{study_uid}')}"
