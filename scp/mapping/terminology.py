"""Code systems, fixed codings and identifier systems used by the mapping (pure data + small lookups)."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

from scp.fhir_version import FhirVersion

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ENDPOINT_CONNECTION_TYPE = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
DATA_ABSENT_REASON = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
# Identifier.system of a Patient ID whose issuer is free text (no OID/URI): this prefix + the issuer, %-encoded.
ISSUER_OF_PATIENT_ID_SYSTEM = "urn:imagingstudy-scp:issuer-of-patient-id:"

ACSN = {"coding": [{"system": V2_0203, "code": "ACSN"}]}
PERFORMER = {"coding": [{"system": PARTICIPATION_TYPE, "code": "PRF", "display": "performer"}]}
SECONDARY_PERFORMER = {"coding": [{"system": PARTICIPATION_TYPE, "code": "SPRF", "display": "secondary performer"}]}

# DICOM PS3.16 CID 33 "Modality": code → Code Meaning, the display of the DCM code system. Taken
# from the 2023+ editions (as shipped in pydicom 3.0.2's concept tables and in HL7's R5 expansion
# of sect_CID_33, version 2023.1.20230123): e.g. SR is "Structured Report Document" and RF
# "Radiofluoroscopy" there, no longer "SR Document" / "Radio Fluoroscopy".
MODALITY_MEANINGS = {
    "AR": "Autorefraction", "ASMT": "Content Assessment Result", "AU": "Basic Voice Audio",
    "BDUS": "Ultrasound Bone Densitometry", "BI": "Biomagnetic Imaging", "BMD": "Bone Mineral Densitometry",
    "CFM": "Confocal Microscopy", "CR": "Computed Radiography", "CT": "Computed Tomography",
    "CTPROTOCOL": "CT Protocol", "DG": "Diaphanography", "DMS": "Dermoscopy", "DOC": "Document",
    "DX": "Digital Radiography", "ECG": "Electrocardiography", "EEG": "Electroencephalography",
    "EMG": "Electromyography", "EOG": "Electrooculography", "EPS": "Cardiac Electrophysiology",
    "ES": "Endoscopy", "FID": "Spatial Fiducials", "GM": "General Microscopy", "HC": "Hard Copy",
    "HD": "Hemodynamic Waveform", "IO": "Intra-oral Radiography", "IOL": "Intraocular Lens Calculation",
    "IVOCT": "Intravascular Optical Coherence Tomography", "IVUS": "Intravascular Ultrasound",
    "KER": "Keratometry", "KO": "Key Object Selection", "LEN": "Lensometry", "LS": "Laser Scan",
    "M3D": "Model for 3D Manufacturing", "MG": "Mammography", "MR": "Magnetic Resonance",
    "NM": "Nuclear Medicine", "OAM": "Ophthalmic Axial Measurements", "OCT": "Optical Coherence Tomography",
    "OP": "Ophthalmic Photography", "OPM": "Ophthalmic Mapping", "OPT": "Ophthalmic Tomography",
    "OPTBSV": "Ophthalmic Tomography B-scan Volume Analysis", "OPTENF": "Ophthalmic Tomography En Face",
    "OPV": "Ophthalmic Visual Field", "OSS": "Optical Surface Scanner", "OT": "Other", "PA": "Photoacoustic",
    "PLAN": "Plan", "POS": "Position Sensor", "PR": "Presentation State", "PT": "Positron emission tomography",
    "PX": "Panoramic X-Ray", "REG": "Registration", "RESP": "Respiratory Waveform", "RF": "Radiofluoroscopy",
    "RG": "Radiographic imaging", "RTDOSE": "RT Dose", "RTIMAGE": "RT Image", "RTPLAN": "RT Plan",
    "RTRECORD": "RT Treatment Record", "RTSTRUCT": "RT Structure Set", "RWV": "Real World Value Map",
    "SEG": "Segmentation", "SM": "Slide Microscopy", "SMR": "Stereometric Relationship",
    "SR": "Structured Report Document", "SRF": "Subjective Refraction", "STAIN": "Automated Slide Stainer",
    "TEXTUREMAP": "Texture Map", "TG": "Thermography", "US": "Ultrasound", "VA": "Visual Acuity",
    "XA": "X-Ray Angiography", "XC": "External-camera Photography",
}

# PS3.16 CID 32 "Non-Acquisition Modality" (same source), plus ANN (Annotation, PS3.3
# C.7.3.1.1.1), which no context group lists. R4 defines ImagingStudy.modality as the series
# modalities that are acquisition modalities (CID 29), so these stay out of its study-level list;
# codes in neither group (retired or private terms) are kept, as R4's extensible binding allows.
NON_ACQUISITION_MODALITIES = frozenset({
    "ANN", "ASMT", "AU", "CTPROTOCOL", "DOC", "FID", "HC", "IOL", "KO", "M3D", "OT", "PLAN", "PR",
    "REG", "RTDOSE", "RTPLAN", "RTRECORD", "RTSTRUCT", "RWV", "SEG", "SMR", "SR", "STAIN", "TEXTUREMAP",
})

# DICOM Laterality / Image Laterality → SNOMED CT (PS3.16 CID 244 "Laterality").
LATERALITY = {
    "R": {"system": SNOMED, "code": "24028007", "display": "Right"},
    "L": {"system": SNOMED, "code": "7771000", "display": "Left"},
    "B": {"system": SNOMED, "code": "51440002", "display": "Right and left"},
}

_CODE_STRING = re.compile(r"[A-Z0-9_]+( [A-Z0-9_]+)*")  # PS3.5 CS: upper case, digits, space, underscore
_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_URI = re.compile(r"(urn:|https?://)\S+", re.IGNORECASE)


def modality(code: str | None) -> dict[str, Any]:
    """A series modality as a CodeableConcept in the DCM system.

    Modality is required in FHIR (1..1) and in DICOM (Type 1); when a dataset
    lacks it, the element says so with a data-absent-reason instead of a
    made-up code. A value that is not a DICOM Code String (lower case, control
    characters, escape sequences) is kept as text only: no code is made of it.
    """
    if not code:
        return {"extension": [{"url": DATA_ABSENT_REASON, "valueCode": "unknown"}]}
    code = code.strip()
    if not _CODE_STRING.fullmatch(code):  # not a DICOM Code String: no code is made of it, the text is kept
        return {"text": code} if code else {"extension": [{"url": DATA_ABSENT_REASON, "valueCode": "unknown"}]}
    coding = {"system": DCM, "code": code}
    if code in MODALITY_MEANINGS:
        coding["display"] = MODALITY_MEANINGS[code]
    return {"coding": [coding]}


def laterality(code: str | None) -> dict[str, Any] | None:
    coding = LATERALITY.get((code or "").strip().upper())
    return {"coding": [dict(coding)]} if coding else None


def system_for_entity(entity_id: str | None, entity_type: str | None) -> str | None:
    """A FHIR Identifier.system from a DICOM Universal Entity ID and its type (ISO, URI, UUID…)."""
    if not entity_id:
        return None
    kind = (entity_type or "").strip().upper()
    if kind == "ISO" or (not kind and _OID.fullmatch(entity_id)):
        return f"urn:oid:{entity_id}"
    if kind == "UUID":
        return entity_id if entity_id.startswith("urn:uuid:") else f"urn:uuid:{entity_id.lower()}"
    if kind in ("URI", "URL") or _URI.fullmatch(entity_id):
        return entity_id
    return None


def issuer_from_sequence(items: Any) -> dict[str, Any]:
    """Identifier.system/assigner from an HL7v2 Hierarchic Designator sequence (e.g. (0008,0051))."""
    item = _first_item(items)
    return _issuer(_entity_system(item), _text(item.get("LocalNamespaceEntityID")))


def issuer_of_patient_id(issuer: str | None, qualifiers: Any) -> dict[str, Any]:
    """Identifier.system/assigner for a Patient ID: the qualifiers' universal ID, else the issuer as an OID or
    URI, else a system derived from the issuer's text (:func:`free_text_issuer_system`); the text is the assigner.

    The system cannot stay empty when there is an issuer: a FHIR server matches a Patient by
    ``identifier=system|value`` (the bundle's conditional create) and has no search on
    ``assigner``, so ``|123`` from HOSPITAL_A and ``|123`` from HOSPITAL_B would be one patient.
    """
    system = _entity_system(_first_item(qualifiers))
    if system is None and issuer:
        system = system_for_entity(issuer, None) or free_text_issuer_system(issuer)
    return _issuer(system, issuer)


def free_text_issuer_system(issuer: str) -> str:
    """A deterministic Identifier.system for a free-text Issuer of Patient ID (0010,0021).

    The same issuer text always gives the same URI, so one patient keeps one Patient across
    studies and restarts; different texts give different URIs, so patients of different issuers
    are never merged. The text is compared exactly (case and inner spaces count: guessing that two
    spellings are one issuer could merge two patients) and %-encoded, which keeps the URI free of
    whitespace and of the characters FHIR search escapes (``|``, ``,``, ``$``, ``\\``).
    """
    return ISSUER_OF_PATIENT_ID_SYSTEM + quote(issuer, safe="")


def _first_item(items: Any) -> dict[str, Any]:
    return items[0] if isinstance(items, list) and items and isinstance(items[0], dict) else {}


def _entity_system(item: dict[str, Any]) -> str | None:
    return system_for_entity(_text(item.get("UniversalEntityID")), _text(item.get("UniversalEntityIDType")))


def _issuer(system: str | None, assigner: str | None) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if system:
        result["system"] = system
    if assigner:
        result["assigner"] = {"display": assigner}
    return result


def wado_rs_endpoint(url: str, version: FhirVersion) -> dict[str, Any]:
    """The contained Endpoint a study's ``endpoint`` points at (``#wado-rs``)."""
    connection = {"system": ENDPOINT_CONNECTION_TYPE, "code": "dicom-wado-rs"}
    endpoint: dict[str, Any] = {
        "resourceType": "Endpoint",
        "id": "wado-rs",
        "status": "active",
        "address": url.rstrip("/"),
    }
    if version is FhirVersion.R4:
        endpoint["connectionType"] = connection
        endpoint["payloadType"] = [{"text": "DICOM"}]
        endpoint["payloadMimeType"] = ["application/dicom"]
    else:
        endpoint["connectionType"] = [{"coding": [connection]}]
        endpoint["payload"] = [{"type": [{"text": "DICOM"}], "mimeType": ["application/dicom"]}]
    return endpoint


def _text(value: Any) -> str | None:
    if isinstance(value, list):
        value = value[0] if value else None
    if not isinstance(value, str):
        return None
    value = value.strip("\x00 ")
    return value or None
