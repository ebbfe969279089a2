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
import re
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
    resource = _plain_text(_study(study_uid, study, series, options, warnings))
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
            _single(values.get("StudyDate")), _single(values.get("StudyTime")),
            _single(values.get("TimezoneOffsetFromUTC")), options.local_zone)),
        "basedOn": _based_on(values),
        "referrer": value("referrer", lambda: _person_reference(values.get("ReferringPhysicianName"))),
        "endpoint": [{"reference": "#wado-rs", "type": "Endpoint"}] if options.wado_rs_url else None,
        "location": _location(values),
        "reason": _reasons(values),
        "note": _notes(values),
        "description": _text(values, "StudyDescription"),
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
    patient_id = _text(values, "PatientID")
    name = value("subject.display", lambda: parse_person_name(_first(values.get("PatientName"))))
    reference: dict[str, Any] = {"type": "Patient"}
    if patient_id:
        reference["identifier"] = _identifier(patient_id, terminology.issuer_of_patient_id(
            _text(values, "IssuerOfPatientID"), values.get("IssuerOfPatientIDQualifiersSequence")))
    else:
        reference["identifier"] = {"system": options.unidentified_patient_system, "value": study_uid}
    if name is not None:
        reference["display"] = display_name(name)
    return _pruned(reference)


def _encounter(values: dict[str, Any]) -> dict[str, Any] | None:
    admission = _text(values, "AdmissionID")
    if not admission:
        return None
    issuer = terminology.issuer_from_sequence(values.get("IssuerOfAdmissionIDSequence"))
    return {"type": "Encounter", "identifier": _identifier(admission, issuer)}


def _based_on(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Accession Number (with its issuer) → ServiceRequest reference; also those of Request Attributes."""
    references: list[dict[str, Any]] = []
    seen: set[str] = set()
    candidates = [(values.get("AccessionNumber"), values.get("IssuerOfAccessionNumberSequence"))]
    for item in _items(values.get("RequestAttributesSequence")):
        candidates.append((item.get("AccessionNumber"), item.get("IssuerOfAccessionNumberSequence")))
    for accession, issuer in candidates:
        number = text_value(_single(accession))
        if not number or number in seen:
            continue
        seen.add(number)
        identifier = _identifier(number, terminology.issuer_from_sequence(issuer), terminology.ACSN)
        references.append({"type": "ServiceRequest", "identifier": identifier})
    return references


def _location(values: dict[str, Any]) -> dict[str, Any] | None:
    parts = [_text(values, "InstitutionalDepartmentName"), _text(values, "InstitutionName")]
    display = ", ".join(p for p in parts if p)
    return {"type": "Location", "display": display} if display else None


def _reasons(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Reason for the Requested Procedure, at study level and per request (Request Attributes).

    The free text (0040,1002) and the coded reason (0040,100A) of one request describe the same
    reason, so a single code and the text make one CodeableConcept (coding + text). Several codes
    are several reasons (one concept each: codings of one concept must mean the same thing), and
    the text then stands as a reason of its own.
    """
    sources = [values] + _items(values.get("RequestAttributesSequence"))
    reasons: list[dict[str, Any]] = []
    for source in sources:
        concepts = _concepts(source.get("ReasonForRequestedProcedureCodeSequence"))
        text = _text(source, "ReasonForTheRequestedProcedure")
        if text and len(concepts) == 1:
            concepts[0] = {**concepts[0], "text": text}
        elif text:
            concepts.append({"text": text})
        reasons.extend({"concept": concept} for concept in concepts)
    return _distinct(reasons)


def _notes(values: dict[str, Any]) -> list[dict[str, Any]]:
    comment = _text(values, "StudyComments")
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
    body_part = _text(values, "BodyPartExamined")
    return _pruned({
        "uid": uid,
        "number": value("number", lambda: unsigned_int(_single(values.get("SeriesNumber")))),
        "modality": terminology.modality(_text(values, "Modality")),
        "description": _text(values, "SeriesDescription"),
        "numberOfInstances": len(instances),
        "bodySite": {"concept": body_site(body_part)} if body_part else None,
        "laterality": terminology.laterality(_text(values, "Laterality")
                                             or _common_image_laterality(members)),
        "specimen": _specimens(values.get("SpecimenDescriptionSequence")),
        "started": value("started", lambda: fhir_datetime(
            _single(values.get("SeriesDate")), _single(values.get("SeriesTime")),
            _single(values.get("TimezoneOffsetFromUTC")), options.local_zone)),
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
        identifier = _text(item, "SpecimenIdentifier")
        if identifier:
            issuer = terminology.issuer_from_sequence(item.get("IssuerOfTheSpecimenIdentifierSequence"))
            ref: dict[str, Any] = {"type": "Specimen", "identifier": _identifier(identifier, issuer)}
            description = _text(item, "SpecimenShortDescription")
            if description:
                ref["display"] = description
            specimens.append(ref)
    return specimens


def _performers(values: dict[str, Any], value: _Guard) -> list[dict[str, Any]]:
    """One performer per name (PN values are multi-valued): Performing Physician's Name → PRF,
    Operators' Name → SPRF. A name repeated within one attribute is listed once."""
    performers: list[dict[str, Any]] = []
    for keyword, function in (("PerformingPhysicianName", terminology.PERFORMER),
                              ("OperatorsName", terminology.SECONDARY_PERFORMER)):
        for text in _as_list(values.get(keyword)):
            actor = value(f"performer ({keyword})", lambda: _person_reference(text))
            if actor:
                performers.append({"function": function, "actor": actor})
    return _distinct(performers)


# -- instance ---------------------------------------------------------------------------------

def _instance(header: InstanceHeader, warnings: list[str]) -> dict[str, Any]:
    value = _guarded(warnings, f"instance {header.sop_uid}")
    return _pruned({
        "uid": header.sop_uid,
        "sopClass": f"urn:oid:{header.sop_class_uid}",
        "number": value("number", lambda: unsigned_int(_single(header.attributes.get("InstanceNumber")))),
        "title": _plain_text(_title(header)),
    })


def _title(header: InstanceHeader) -> str | None:
    """First present of Document Title, Concept Name Code Meaning, Content Label, Image Type."""
    concept = header.items("ConceptNameCodeSequence")
    meaning = _text(concept[0], "CodeMeaning") if concept else None
    # Image Type's values are positional (value 3 may be empty while value 4 is not): keep the
    # inner empty values, drop only trailing ones.
    image_type = "\\".join(header.texts("ImageType")).rstrip("\\") or None
    for candidate in (_single(header.attributes.get("DocumentTitle")), meaning,
                      _single(header.attributes.get("ContentLabel")), image_type):
        text = text_value(candidate)
        if text:
            return text
    return None


# -- helpers ----------------------------------------------------------------------------------

# Characters a FHIR string must not hold: C0 controls other than tab, CR and LF (FHIR datatypes:
# "SHOULD not contain Unicode character points below 32" except those three), and whitespace other
# than space/tab/CR/LF, which the R4 string pattern ^[ \r\n\t\S]+$ rejects (ECMAScript \s takes in
# NBSP, U+2000-U+200A, U+3000, BOM...). NBSP is an ordinary character of ISO_IR 100 text.
_NOT_FHIR_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x85\xa0\u1680\u2000-\u200a"
                            r"\u2028\u2029\u202f\u205f\u3000\ufeff]")


def _plain_text(value: Any) -> Any:
    """``value`` with every string's non-FHIR characters (see above) replaced by a space.

    Instances are skipped: they are the bulk of a large study, and their only free text, the
    title, is cleaned when it is made (see :func:`_instance`).
    """
    if isinstance(value, str):
        return _NOT_FHIR_TEXT.sub(" ", value) if _NOT_FHIR_TEXT.search(value) else value
    if isinstance(value, dict):
        return {key: item if key == "instance" else _plain_text(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain_text(item) for item in value]
    return value


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


def _identifier(value: str, issuer: dict[str, Any], kind: dict[str, Any] | None = None) -> dict[str, Any]:
    """An Identifier (type, system, value, assigner: FHIR's element order) from a value and its issuer."""
    return _pruned({"type": kind, "system": issuer.get("system"), "value": value,
                    "assigner": issuer.get("assigner")})


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


def _single(value: Any) -> str | None:
    """A single-valued (VM 1) attribute as the one string DICOM wrote.

    The header splits text at backslashes, the DICOM value delimiter. A VM-1 attribute that
    holds one anyway (a Study Description "CT\\HEAD", as some writers produce) is joined back as
    written: text keeps all of its content, and a date or number becomes invalid, so it is
    reported and omitted instead of silently cut to its first part. A sequence where text was
    expected is absent.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return "\\".join(value)
    return None


def _text(values: dict[str, Any], keyword: str) -> str | None:
    """A single-valued text attribute as a FHIR string (trailing padding stripped), or None."""
    return text_value(_single(values.get(keyword)))


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
