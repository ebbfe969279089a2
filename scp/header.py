"""Read the header attributes the ImagingStudy mapping needs from a stored Part-10 file.

Only the listed tags are read (pydicom seeks past everything else and stops
before the pixel data), so the cost does not grow with the size of an instance.
Values are returned as decoded DICOM strings; nothing here interprets them.

pydicom's reader costs hundreds of microseconds per instance, so :func:`read_header`
first tries a fast path (:func:`_fast_header`): :mod:`scp.header_fast` reads the
same raw elements pydicom would from the file's first bytes, and the same value
conversion as below is applied to them. It covers Implicit and Explicit VR Little
Endian (encapsulated transfer syntaxes included) with no, ISO_IR 6, ISO_IR 100 or
ISO_IR 192 Specific Character Set; whenever it is not certain to give pydicom's
answer (big endian, deflate, other character sets, unusual or malformed encoding,
an invalid UID) it gives up and pydicom reads the file, as it always did.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import MutableSequence
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.valuerep import AMBIGUOUS_VR
from pydicom.values import convert_PN

from scp import header_fast
from scp.header_fast import CHARSET, PIXEL_REPRESENTATION, Fallback
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
NEEDED_TAGS = frozenset(int(t) for t in _TAGS)  # type: ignore[arg-type]

_SINGLE_TEXT_VRS = {"ST", "LT", "UT"}  # backslash is text here, not a value separator
_CHARSET_TEXT_VRS = {"SH", "LO", "UC"}
_SKIPPED_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SS", "US", "SL", "UL", "SV", "UV",
                "FL", "FD", "AT"}


class HeaderError(ValueError):
    """The dataset's header cannot be read or lacks a valid identity (UIDs)."""


def read_header(path: str | os.PathLike[str] | BinaryIO, head: bytes | bytearray = b"",
                size: int | None = None) -> InstanceHeader:
    """Read the identity and mapping attributes of the Part-10 file at ``path``.

    ``head``, when given with the file's ``size``, holds the file's first bytes as the
    receiver wrote them: the fast path then reads the file itself only when the header
    runs past them. Raises :class:`HeaderError` with a message fit for a DIMSE
    Error Comment when the file does not parse or a UID is missing or invalid.
    """
    header = _fast_header(path, head, size)
    if header is not None:
        return header
    return _pydicom_header(path)


def _pydicom_header(path: str | os.PathLike[str] | BinaryIO) -> InstanceHeader:
    """:func:`read_header` through pydicom's reader: the reference the fast path must match."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
        meta_ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        encodings = _encodings(ds)
        identity = {k: _text_of(ds, tag_for_keyword(k)) for k in _IDENTITY_KEYWORDS}
        attributes = _plain_attributes(ds, encodings)
    except HeaderError:
        raise
    except (InvalidDicomError, ValueError, KeyError, EOFError, OSError, TypeError,
            AttributeError, IndexError, NotImplementedError, LookupError, struct.error,
            BytesLengthException, zlib.error, RecursionError) as exc:
        # struct.error: an element header cut short; BytesLengthException: a value pydicom
        # converts (Specific Character Set, Pixel Representation) of the wrong length; zlib.error:
        # a damaged deflated dataset; RecursionError: sequences nested absurdly deep.
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
    """A UID's text; a multi-valued one (a backslash in a UI value) stays whole and fails check_uid."""
    value = _plain_value(ds, tag, ["iso8859"])
    if isinstance(value, list):  # several values: kept joined, so that check_uid refuses them
        return "\\".join(str(v) for v in value) if value else None
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


# -- the fast path ------------------------------------------------------------------------------
#
# The same conversion as _plain_value/_sequence_items/_decode_text above, applied to the raw
# elements scp.header_fast reads: (VR or None, value bytes or None, implicit VR?) tuples, and
# lists of items (dicts) for undefined-length sequences (which pydicom parses while reading).
# Whatever the fast path is not sure about raises Fallback, and pydicom reads the file.

FAST_PATH_COUNTS = {"fast": 0, "fallback": 0}  # instances read each way, for tests and profiling

_HEADER_TAGS = tuple((keyword, int(tag_for_keyword(keyword)), str(dictionary_VR(keyword)))  # type: ignore[arg-type]
                     for keyword in HEADER_KEYWORDS)
# VRs whose value is text for _decode_text (not a sequence, not skipped, not ambiguous).
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
                       "UI", "UR", "UT"})
_IDENTITY_TAGS = tuple(int(tag_for_keyword(k)) for k in _IDENTITY_KEYWORDS)  # type: ignore[arg-type]
_VR_FROM_DICTIONARY = ("UN", "OB or OW", "US or SS")  # as _vr_of
_AMBIGUOUS_VRS = frozenset(str(vr) for vr in AMBIGUOUS_VR)
_ISO8859 = ["iso8859"]
# The Specific Character Sets of the fast path (single-byte ASCII/Latin-1, UTF-8), stripped.
_FAST_CHARSETS = {term: convert_encodings([term]) for term in ("", "ISO_IR 6", "ISO_IR 100", "ISO_IR 192")}
_KEYWORDS: dict[int, str] = {}
_DICTIONARY_VRS: dict[int, str] = {}


def _fast_header(path: str | os.PathLike[str] | BinaryIO, head: bytes | bytearray = b"",
                 size: int | None = None) -> InstanceHeader | None:
    """The header of the file at ``path`` read without pydicom's reader, or None to use pydicom.

    When it returns a header, it is the one :func:`_pydicom_header` would return.
    """
    try:
        header = _fast_header_or_raise(path, head, size)
    except Exception:  # noqa: BLE001 - Fallback, InvalidUID, OSError, malformed data: pydicom decides
        FAST_PATH_COUNTS["fallback"] += 1
        return None
    FAST_PATH_COUNTS["fast"] += 1
    return header


def _fast_header_or_raise(path: str | os.PathLike[str] | BinaryIO, head: bytes | bytearray = b"",
                          size: int | None = None) -> InstanceHeader:
    """:func:`_fast_header`, raising (mostly :class:`Fallback`) where it returns None."""
    if not isinstance(path, (str, os.PathLike)):
        raise Fallback("not a path")
    name = os.fspath(path)
    if not isinstance(name, str):
        raise Fallback("not a str path")
    if not header_fast.config_is_default():
        raise Fallback("pydicom reading configuration changed")
    transfer_syntax, elements = header_fast.read_file(name, NEEDED_TAGS, head, size)
    charset = elements.get(CHARSET)
    encodings = _ISO8859 if charset is None else _fast_encodings(charset)
    study, series, sop, sop_class = (_fast_text(elements, tag) for tag in _IDENTITY_TAGS)
    attributes: dict[str, PlainValue] = {}
    for keyword, tag, dictionary_vr in _HEADER_TAGS:
        elem = elements.get(tag)
        if elem is None:
            continue
        if elem.__class__ is tuple and elem[1]:  # the common case, inlined: a non-empty text value
            file_vr = elem[0]
            vr = file_vr if file_vr and file_vr not in _VR_FROM_DICTIONARY else dictionary_vr
            value = (_fast_decode(elem[1], vr, encodings) if vr in _TEXT_VRS
                     else _fast_plain(elem, tag, encodings, None))
        else:
            value = _fast_plain(elem, tag, encodings, None)
        if value is not None:  # never "" or [] here
            attributes[keyword] = value  # type: ignore[assignment]
    return InstanceHeader(
        study_uid=check_uid(study, "Study Instance UID"),
        series_uid=check_uid(series, "Series Instance UID"),
        sop_uid=check_uid(sop, "SOP Instance UID"),
        sop_class_uid=check_uid(sop_class, "SOP Class UID"),
        transfer_syntax_uid=check_uid(transfer_syntax, "Transfer Syntax UID"),
        attributes=attributes,
    )


def _fast_encodings(elem: Any) -> list[str]:
    """As :func:`_encodings`, for the character sets of the fast path only."""
    if isinstance(elem, list):
        raise Fallback("Specific Character Set is a sequence")
    value = elem[1]
    if not value:
        return _ISO8859
    # ASCII without NUL or backslash: pydicom's converted value (top level) and the raw value
    # (in items) then strip to the same single term.
    if not value.isascii() or b"\\" in value or b"\0" in value:
        raise Fallback("Specific Character Set outside the fast path")
    encodings = _FAST_CHARSETS.get(value.decode("ascii").strip())
    if encodings is None:
        raise Fallback("Specific Character Set outside the fast path")
    return encodings


def _fast_text(elements: dict[int, Any], tag: int) -> str | None:
    """As :func:`_text_of`."""
    elem = elements.get(tag)
    if elem is None:
        return None
    value = _fast_plain(elem, tag, _ISO8859, None)
    if isinstance(value, list):  # several values: kept joined, so that check_uid refuses them
        return "\\".join(str(v) for v in value) if value else None
    return value


def _fast_plain(elem: Any, tag: int, encodings: list[str], container: dict[int, Any] | None) -> Any:
    """As :func:`_plain_value`, for one raw element of ``container`` (None: the top level)."""
    if isinstance(elem, list):  # an undefined-length sequence, parsed while reading
        return _fast_items(elem, encodings)
    file_vr, value, implicit = elem
    vr = file_vr if file_vr and file_vr not in _VR_FROM_DICTIONARY else _dictionary_vr(tag)
    if vr == "SQ":
        # pydicom converts the value now (ds[tag]), and first looks at the Pixel Representation
        # of the dataset holding it (Dataset._set_pixel_representation).
        if file_vr == "UN":
            raise Fallback("sequence encoded as UN")
        if container is not None and PIXEL_REPRESENTATION in container:
            pixel_representation = container[PIXEL_REPRESENTATION]
            if (isinstance(pixel_representation, list) or pixel_representation[0] not in (None, "US")
                    or len(pixel_representation[1] or b"") not in (0, 2)):
                raise Fallback("unusual Pixel Representation next to a sequence")
        if not value:
            return None
        return _fast_items(header_fast.read_sequence_value(value, implicit), encodings)
    if vr in _SKIPPED_VRS:
        return None
    if value is None:  # zero length, pydicom converts it: empty
        if vr in _AMBIGUOUS_VRS:
            raise Fallback("empty value of an ambiguous VR")  # pydicom would try to resolve it
        return None
    return _fast_decode(value, vr, encodings)


def _fast_items(items: list[dict[int, Any]], encodings: list[str]) -> list[dict[str, Any]] | None:
    """As :func:`_sequence_items`."""
    result: list[dict[str, Any]] = []
    for elements in items:
        plain: dict[str, Any] = {}
        charset = elements.get(CHARSET)
        item_encodings = encodings if charset is None else _fast_encodings(charset)
        for elem_tag, elem in elements.items():
            keyword = _keyword(elem_tag)
            if not keyword or keyword == "SpecificCharacterSet":
                continue
            value = _fast_plain(elem, elem_tag, item_encodings, elements)
            if value is not None:  # never "" or [] here
                plain[keyword] = value
        result.append(plain)
    return result or None


_TEXT_KIND = {"PN": 1, "ST": 2, "LT": 2, "UT": 2, "SH": 3, "LO": 3, "UC": 3}  # as _decode_text


def _fast_decode(raw: bytes, vr: str, encodings: list[str]) -> PlainValue | None:
    """Exactly :func:`_decode_text`, without pydicom's objects in the common cases.

    Without an escape character, pydicom's ``decode_bytes`` is ``raw.decode(encodings[0])``;
    a PN value is then split on backslashes and each ``str(PersonName)`` is the value with
    trailing ``=`` (empty component groups) removed. Values with escape sequences or bytes the
    encoding cannot decode go through :func:`_decode_text` itself.
    """
    kind = _TEXT_KIND.get(vr, 0)
    if kind:
        if b"\x1b" in raw:
            return _decode_text(raw, vr, encodings)
        try:
            text = (raw.rstrip(b"\x00 ") if kind == 1 else raw).decode(encodings[0])
        except (UnicodeError, LookupError):
            return _decode_text(raw, vr, encodings)  # pydicom warns and replaces
        if kind == 2:
            return text.rstrip("\x00 ") or None
        if kind == 1:
            if "\\" not in text:
                return text.rstrip("=").rstrip("\x00 ") or None
            return _one_or_many([v.rstrip("=").rstrip("\x00 ") for v in text.split("\\")])
    else:
        text = raw.decode("ascii", "replace")
    if "\\" not in text:
        return text.strip("\x00 ") or None
    return _one_or_many([v.strip("\x00 ") for v in text.split("\\")])


def _keyword(tag: int) -> str:
    keyword = _KEYWORDS.get(tag)
    if keyword is None:
        keyword = _KEYWORDS[tag] = keyword_for_tag(tag)
    return keyword


def _dictionary_vr(tag: int) -> str:
    """The VR :func:`_vr_of` falls back to."""
    vr = _DICTIONARY_VRS.get(tag)
    if vr is None:
        try:
            vr = str(dictionary_VR(tag))
        except KeyError:
            vr = "UN"
        _DICTIONARY_VRS[tag] = vr
    return vr
