"""DICOM headers of one study → an ImagingStudy, as plain dicts (pure: no I/O).

The study is built once in a version-neutral shape (R6 element names, plus the
R5-only ``procedure`` and ``series.laterality``); :mod:`scp.mapping.versions`
then rewrites only what differs in R6, R5 and R4.

Study- and series-level values come from the study as a whole: instances are
given oldest first, the most recent non-empty value of an attribute wins, and
a disagreement is reported as a warning naming both values.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from scp.fhir_version import FhirVersion
from scp.mapping import terminology
from scp.mapping.body_parts import body_site
from scp.mapping.dicom_values import (
    InvalidDicomValue,
    codeable_concept,
    display_name,
    fhir_datetime,
    parse_person_name,
    text_value,
    unsigned_int,
)
from scp.mapping.versions import for_version
from scp.records import InstanceHeader

# Attributes whose values identify a person: never put in a warning unless asked.
PHI_KEYWORDS = frozenset({"PatientName", "PatientID", "PatientBirthDate", "IssuerOfPatientID",
                          "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
                          "AdmissionID", "AccessionNumber"})

STUDY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "TimezoneOffsetFromUTC",
    "AccessionNumber", "IssuerOfAccessionNumberSequence", "ReferringPhysicianName",
    "StudyDescription", "StudyComments", "InstitutionName", "InstitutionalDepartmentName",
    "AdmissionID", "IssuerOfAdmissionIDSequence", "ReasonForTheRequestedProcedure",
    "ReasonForRequestedProcedureCodeSequence", "RequestAttributesSequence", "ProcedureCodeSequence",
)
SERIES_KEYWORDS = (
    "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined", "Laterality",
    "SeriesDate", "SeriesTime", "PerformingPhysicianName", "OperatorsName",
    "SpecimenDescriptionSequence", "TimezoneOffsetFromUTC",
)

DICOM_UID_SYSTEM = "urn:dicom:uid"
UNIDENTIFIED_PATIENT_SYSTEM = "urn:imagingstudy-scp:unidentified-patient"


@dataclass(frozen=True)
class MappingOptions:
    """How to write the resource; every field has a sensible default."""

    version: FhirVersion = FhirVersion.R6
    local_zone: dt.tzinfo = field(default_factory=lambda: dt.datetime.now().astimezone().tzinfo or dt.timezone.utc)
    wado_rs_url: str | None = None
    unidentified_patient_system: str = UNIDENTIFIED_PATIENT_SYSTEM
    log_phi: bool = False


@dataclass
class Mapped:
    """The resource and what the mapping had to say about its input."""

    resource: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def build_imaging_study(instances: Sequence[InstanceHeader], options: MappingOptions | None = None) -> Mapped:
    """Map every instance of one study (oldest first) to an ImagingStudy for ``options.version``."""
    options = options or MappingOptions()
    if not instances:
        raise ValueError("a study needs at least one instance")
    study_uid = instances[-1].study_uid
    warnings: list[str] = []
    study = _latest_values(instances, STUDY_KEYWORDS, f"study {study_uid}", warnings, options.log_phi)
    series = [_series(members, options, warnings) for members in _group_series(instances)]
    resource = _study(study_uid, study, series, options, warnings)
    return Mapped(for_version(resource, options.version), warnings)


# -- study ------------------------------------------------------------------------------------

def _study(uid: str, values: dict[str, Any], series: list[dict[str, Any]], options: MappingOptions,
           warnings: list[str]) -> dict[str, Any]:
    value = _guarded(warnings, f"study {uid}")
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": uid,
        "identifier": [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}],
        "status": "available",
        "modality": _distinct([s["modality"] for s in series if "coding" in s["modality"]]),
        "subject": _subject(uid, values, options, value),
        "encounter": _encounter(values),
        "started": value("started", lambda: fhir_datetime(
            values.get("StudyDate"), values.get("StudyTime"), values.get("TimezoneOffsetFromUTC"),
            options.local_zone)),
        "basedOn": _based_on(values),
        "referrer": value("referrer", lambda: _person_reference(values.get("ReferringPhysicianName"))),
        "endpoint": [{"reference": "#wado-rs", "type": "Endpoint"}] if options.wado_rs_url else None,
        "location": _location(values),
        "reason": _reasons(values),
        "note": _notes(values),
        "description": text_value(values.get("StudyDescription")),
        "numberOfSeries": len(series),
        "numberOfInstances": sum(s["numberOfInstances"] for s in series),
        "procedure": [{"concept": c} for c in _concepts(values.get("ProcedureCodeSequence"))],
        "series": series,
    }
    if options.wado_rs_url:
        resource["contained"] = [terminology.wado_rs_endpoint(options.wado_rs_url, options.version)]
    return _pruned(resource)


def _subject(study_uid: str, values: dict[str, Any], options: MappingOptions, value: _Guard) -> dict[str, Any]:
    """A logical Patient reference: identifier from Patient ID (+ issuer), display from the name."""
    patient_id = text_value(_first(values.get("PatientID")))
    name = value("subject.display", lambda: parse_person_name(_first(values.get("PatientName"))))
    reference: dict[str, Any] = {"type": "Patient"}
    if patient_id:
        reference["identifier"] = _pruned({"value": patient_id, **terminology.issuer_of_patient_id(
            text_value(values.get("IssuerOfPatientID")), values.get("IssuerOfPatientIDQualifiersSequence"))})
    else:
        reference["identifier"] = {"system": options.unidentified_patient_system, "value": study_uid}
    if name is not None:
        reference["display"] = display_name(name)
    return _pruned(reference)


def _encounter(values: dict[str, Any]) -> dict[str, Any] | None:
    admission = text_value(values.get("AdmissionID"))
    if not admission:
        return None
    identifier = {"value": admission, **terminology.issuer_from_sequence(values.get("IssuerOfAdmissionIDSequence"))}
    return {"type": "Encounter", "identifier": _pruned(identifier)}


def _based_on(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Accession Number (with its issuer) → ServiceRequest reference; also those of Request Attributes."""
    references: list[dict[str, Any]] = []
    seen: set[str] = set()
    candidates = [(values.get("AccessionNumber"), values.get("IssuerOfAccessionNumberSequence"))]
    for item in _items(values.get("RequestAttributesSequence")):
        candidates.append((item.get("AccessionNumber"), item.get("IssuerOfAccessionNumberSequence")))
    for accession, issuer in candidates:
        number = text_value(_first(accession))
        if not number or number in seen:
            continue
        seen.add(number)
        identifier = {"type": terminology.ACSN, "value": number, **terminology.issuer_from_sequence(issuer)}
        references.append({"type": "ServiceRequest", "identifier": _pruned(identifier)})
    return references


def _location(values: dict[str, Any]) -> dict[str, Any] | None:
    parts = [text_value(values.get("InstitutionalDepartmentName")), text_value(values.get("InstitutionName"))]
    display = ", ".join(p for p in parts if p)
    return {"type": "Location", "display": display} if display else None


def _reasons(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Reason for the Requested Procedure: coded items and free text, at study level and per request."""
    sources = [values] + _items(values.get("RequestAttributesSequence"))
    reasons: list[dict[str, Any]] = []
    for source in sources:
        for concept in _concepts(source.get("ReasonForRequestedProcedureCodeSequence")):
            reasons.append({"concept": concept})
        text = text_value(_first(source.get("ReasonForTheRequestedProcedure")))
        if text:
            reasons.append({"concept": {"text": text}})
    return _distinct(reasons)


def _notes(values: dict[str, Any]) -> list[dict[str, Any]]:
    comment = text_value(values.get("StudyComments"))
    return [{"text": comment}] if comment else []


# -- series -----------------------------------------------------------------------------------

def _group_series(instances: Sequence[InstanceHeader]) -> list[list[InstanceHeader]]:
    """Instances grouped by series, series ordered by Series Number then UID."""
    groups: dict[str, list[InstanceHeader]] = {}
    for header in instances:
        groups.setdefault(header.series_uid, []).append(header)
    return sorted(groups.values(), key=lambda members: (_sort_number(members[-1].text("SeriesNumber")),
                                                        members[-1].series_uid))


def _series(members: list[InstanceHeader], options: MappingOptions, warnings: list[str]) -> dict[str, Any]:
    uid = members[-1].series_uid
    where = f"series {uid}"
    values = _latest_values(members, SERIES_KEYWORDS, where, warnings, options.log_phi)
    value = _guarded(warnings, where)
    instances = [_instance(h, warnings) for h in _unique_instances(members)]
    body_part = text_value(values.get("BodyPartExamined"))
    return _pruned({
        "uid": uid,
        "number": value("number", lambda: unsigned_int(values.get("SeriesNumber"))),
        "modality": terminology.modality(text_value(values.get("Modality"))),
        "description": text_value(values.get("SeriesDescription")),
        "numberOfInstances": len(instances),
        "bodySite": {"concept": body_site(body_part)} if body_part else None,
        "laterality": terminology.laterality(text_value(values.get("Laterality"))
                                             or _common_image_laterality(members)),
        "specimen": _specimens(values.get("SpecimenDescriptionSequence")),
        "started": value("started", lambda: fhir_datetime(
            values.get("SeriesDate"), values.get("SeriesTime"), values.get("TimezoneOffsetFromUTC"),
            options.local_zone)),
        "performer": _performers(values, value),
        "instance": instances,
    }, keep={"numberOfInstances"})


def _unique_instances(members: list[InstanceHeader]) -> list[InstanceHeader]:
    """One entry per SOP Instance UID (the latest wins), ordered by Instance Number then UID."""
    latest = {h.sop_uid: h for h in members}
    return sorted(latest.values(), key=lambda h: (_sort_number(h.text("InstanceNumber")), h.sop_uid))


def _common_image_laterality(members: list[InstanceHeader]) -> str | None:
    """Image Laterality when every instance of the series that has one agrees."""
    values = {v for h in members if (v := text_value(h.text("ImageLaterality")))}
    return values.pop() if len(values) == 1 else None


def _specimens(items: Any) -> list[dict[str, Any]]:
    specimens = []
    for item in _items(items):
        identifier = text_value(_first(item.get("SpecimenIdentifier")))
        if identifier:
            ref: dict[str, Any] = {"type": "Specimen", "identifier": _pruned(
                {"value": identifier, **terminology.issuer_from_sequence(item.get("IssuerOfTheSpecimenIdentifierSequence"))})}
            description = text_value(_first(item.get("SpecimenShortDescription")))
            if description:
                ref["display"] = description
            specimens.append(ref)
    return specimens


def _performers(values: dict[str, Any], value: _Guard) -> list[dict[str, Any]]:
    performers = []
    for keyword, function in (("PerformingPhysicianName", terminology.PERFORMER),
                              ("OperatorsName", terminology.SECONDARY_PERFORMER)):
        for text in _as_list(values.get(keyword)):
            actor = value(f"performer ({keyword})", lambda: _person_reference(text))
            if actor:
                performers.append({"function": function, "actor": actor})
    return performers


# -- instance ---------------------------------------------------------------------------------

def _instance(header: InstanceHeader, warnings: list[str]) -> dict[str, Any]:
    value = _guarded(warnings, f"instance {header.sop_uid}")
    return _pruned({
        "uid": header.sop_uid,
        "sopClass": f"urn:oid:{header.sop_class_uid}",
        "number": value("number", lambda: unsigned_int(header.text("InstanceNumber"))),
        "title": _title(header),
    })


def _title(header: InstanceHeader) -> str | None:
    """First present of Document Title, Concept Name Code Meaning, Content Label, Image Type."""
    concept = header.items("ConceptNameCodeSequence")
    meaning = text_value(_first(concept[0].get("CodeMeaning"))) if concept else None
    image_type = "\\".join(header.texts("ImageType")) or None
    for candidate in (header.text("DocumentTitle"), meaning, header.text("ContentLabel"), image_type):
        text = text_value(candidate)
        if text:
            return text
    return None


# -- helpers ----------------------------------------------------------------------------------

def _latest_values(instances: Sequence[InstanceHeader], keywords: Iterable[str], where: str,
                   warnings: list[str], log_phi: bool) -> dict[str, Any]:
    """The most recent non-empty value of each keyword, warning when instances disagree."""
    values: dict[str, Any] = {}
    for header in instances:
        for keyword in keywords:
            new = header.attributes.get(keyword)
            if new in (None, "", []):
                continue
            old = values.get(keyword)
            if old is not None and old != new:
                shown = (old, new) if log_phi or keyword not in PHI_KEYWORDS else ("***", "***")
                warnings.append(f"{where}: instances disagree on {keyword}: {shown[0]!r} (earlier) vs "
                                f"{shown[1]!r} (SOP {header.sop_uid}, latest); the latest wins")
            values[keyword] = new
    return values


_Guard = Callable[[str, Callable[[], Any]], Any]


def _guarded(warnings: list[str], where: str) -> _Guard:
    """Run a value conversion; an invalid DICOM value omits the element with a warning."""
    def convert(element: str, produce: Callable[[], Any]) -> Any:
        try:
            return produce()
        except InvalidDicomValue as exc:
            warnings.append(f"{where}: {element} omitted: {exc}")
            return None
    return convert


def _person_reference(text: Any) -> dict[str, Any] | None:
    """A Practitioner known only by name: a display-only reference (raises InvalidDicomValue)."""
    name = parse_person_name(_first(text))
    display = display_name(name) if name else None
    return {"type": "Practitioner", "display": display} if display else None


def _concepts(items: Any) -> list[dict[str, Any]]:
    concepts = []
    for item in _items(items):
        concept = codeable_concept([item])
        if concept:
            concepts.append(concept)
    return concepts


def _items(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _first(value: Any) -> Any:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else [value]


def _sort_number(text: str | None) -> tuple[int, float]:
    try:
        return (0, float(str(text).strip()))
    except (TypeError, ValueError):
        return (1, 0.0)


def _distinct(items: list[Any]) -> list[Any]:
    result: list[Any] = []
    for item in items:
        if item not in result:
            result.append(item)
    return result


def _pruned(data: dict[str, Any], keep: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """Drop absent elements: None, "" and empty lists/dicts never reach FHIR."""
    return {k: v for k, v in data.items() if k in keep or v not in (None, "", [], {})}
