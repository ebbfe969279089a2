"""Read the header attributes the ImagingStudy mapping needs from a stored Part-10 file.

Only the listed tags are read (pydicom seeks past everything else and stops
before the pixel data), so the cost does not grow with the size of an instance.
Values are returned as decoded DICOM strings; nothing here interprets them.
"""

from __future__ import annotations

import os
from collections.abc import MutableSequence
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.values import convert_PN

from scp.records import InstanceHeader, PlainValue
from scp.uids import InvalidUID, check_uid

# Every attribute the mapping reads (see README "DICOM → FHIR mapping").
HEADER_KEYWORDS: tuple[str, ...] = (
    # patient
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthDate", "PatientSex",
    # study
    "StudyDate", "StudyTime", "TimezoneOffsetFromUTC", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "ReferringPhysicianName", "StudyDescription", "StudyID",
    "StudyComments", "InstitutionName", "InstitutionalDepartmentName",
    "AdmissionID", "IssuerOfAdmissionIDSequence",
    "ReasonForTheRequestedProcedure", "ReasonForRequestedProcedureCodeSequence",
    "RequestAttributesSequence", "RequestedProcedureID", "ProcedureCodeSequence",
    # series
    "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined", "Laterality",
    "ImageLaterality", "SeriesDate", "SeriesTime", "PerformingPhysicianName", "OperatorsName",
    "SpecimenDescriptionSequence",
    # instance
    "InstanceNumber", "DocumentTitle", "ConceptNameCodeSequence", "ContentLabel", "ImageType",
    "NumberOfFrames",
)
_IDENTITY_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
_TAGS = [tag_for_keyword(k) for k in HEADER_KEYWORDS + _IDENTITY_KEYWORDS + ("SpecificCharacterSet",)]

_SINGLE_TEXT_VRS = {"ST", "LT", "UT"}  # backslash is text here, not a value separator
_CHARSET_TEXT_VRS = {"SH", "LO", "UC"}
_SKIPPED_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SS", "US", "SL", "UL", "SV", "UV",
                "FL", "FD", "AT"}


class HeaderError(ValueError):
    """The dataset's header cannot be read or lacks a valid identity (UIDs)."""


def read_header(path: str | os.PathLike[str] | BinaryIO) -> InstanceHeader:
    """Read the identity and mapping attributes of the Part-10 file at ``path``.

    Raises :class:`HeaderError` with a message fit for a DIMSE Error Comment
    when the file does not parse or a UID is missing or invalid.
    """
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
        meta_ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        encodings = _encodings(ds)
        identity = {k: _text_of(ds, tag_for_keyword(k)) for k in _IDENTITY_KEYWORDS}
        attributes = _plain_attributes(ds, encodings)
    except HeaderError:
        raise
    except (InvalidDicomError, ValueError, KeyError, EOFError, OSError, TypeError,
            AttributeError, IndexError, NotImplementedError, LookupError) as exc:
        raise HeaderError(f"dataset cannot be parsed: {exc}") from exc
    try:
        return InstanceHeader(
            study_uid=check_uid(identity["StudyInstanceUID"], "Study Instance UID"),
            series_uid=check_uid(identity["SeriesInstanceUID"], "Series Instance UID"),
            sop_uid=check_uid(identity["SOPInstanceUID"], "SOP Instance UID"),
            sop_class_uid=check_uid(identity["SOPClassUID"], "SOP Class UID"),
            transfer_syntax_uid=check_uid(meta_ts, "Transfer Syntax UID"),
            attributes=attributes,
        )
    except InvalidUID as exc:
        raise HeaderError(str(exc)) from exc


def _encodings(ds: Dataset) -> list[str]:
    raw = ds.get_item(0x00080005)
    if raw is None or not raw.value:
        return ["iso8859"]
    value = raw.value if isinstance(raw.value, (bytes, str)) else "\\".join(raw.value)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    terms = [t.strip() for t in value.split("\\")]
    return convert_encodings(terms or [""])


def _text_of(ds: Dataset, tag: int) -> str | None:
    value = _plain_value(ds, tag, ["iso8859"])
    if isinstance(value, list):
        return str(value[0]) if value else None
    return value


def _plain_attributes(ds: Dataset, encodings: list[str]) -> dict[str, PlainValue]:
    result: dict[str, PlainValue] = {}
    for keyword in HEADER_KEYWORDS:
        value = _plain_value(ds, tag_for_keyword(keyword), encodings)
        if value not in (None, "", []):
            result[keyword] = value
    return result


def _plain_value(ds: Dataset, tag: int, encodings: list[str]) -> PlainValue | None:
    """The decoded value of ``tag`` in ``ds`` as plain data, None when absent or empty."""
    elem = ds.get_item(tag)
    if elem is None:
        return None
    vr = _vr_of(elem, tag)
    if vr == "SQ":
        return _sequence_items(ds[tag].value, encodings)
    if vr in _SKIPPED_VRS:
        return None
    raw = elem.value if isinstance(elem, RawDataElement) else None
    if raw is None:
        return _from_converted(ds[tag].value)
    return _decode_text(raw, vr, encodings)


def _vr_of(elem: Any, tag: int) -> str:
    vr = getattr(elem, "VR", None)
    if vr and vr not in ("UN", "OB or OW", "US or SS"):
        return str(vr)
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


def _decode_text(raw: bytes, vr: str, encodings: list[str]) -> PlainValue | None:
    if vr == "PN":
        names = convert_PN(raw, encodings)
        values = [str(n) for n in names] if isinstance(names, MutableSequence) else [str(names)]
        return _one_or_many([v.rstrip("\x00 ") for v in values])
    if vr in _SINGLE_TEXT_VRS:
        text = decode_bytes(raw, encodings, set()).rstrip("\x00 ")
        return text or None
    if vr in _CHARSET_TEXT_VRS:
        text = decode_bytes(raw, encodings, {0x5C})
    else:
        text = raw.decode("ascii", "replace")
    return _one_or_many([v.strip("\x00 ") for v in text.split("\\")])


def _one_or_many(values: list[str]) -> PlainValue | None:
    if not any(values):
        return None
    return values[0] if len(values) == 1 else values


def _from_converted(value: Any) -> PlainValue | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return _one_or_many([str(v) for v in value])
    text = str(value).strip("\x00 ")
    return text or None


def _sequence_items(items: Any, encodings: list[str]) -> list[dict[str, Any]] | None:
    result: list[dict[str, Any]] = []
    for item in items:
        plain: dict[str, Any] = {}
        item_encodings = _encodings(item) if item.get_item(0x00080005) is not None else encodings
        for elem_tag in list(item.keys()):
            keyword = keyword_for_tag(elem_tag)
            if not keyword or keyword == "SpecificCharacterSet":
                continue
            value = _plain_value(item, elem_tag, item_encodings)
            if value not in (None, "", []):
                plain[keyword] = value
        result.append(plain)
    return result or None
