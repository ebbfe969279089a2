"""Conversions from raw DICOM header strings to FHIR primitive and data-type values.

Every function here is pure: it takes the *strings* pydicom decoded from the dataset (already
converted from the Specific Character Set) and returns plain Python values shaped like FHIR JSON.
Nothing reads files, clocks or environment: the only context is the ``local_zone`` a caller passes,
so the same input always yields the same output.

Error policy: a value that is present but cannot be a valid FHIR value raises
:class:`InvalidDicomValue`; the caller omits that FHIR element and logs a warning. An absent or
blank value returns ``None`` (or an empty list), because DICOM "absent" must become FHIR "absent",
never a made-up default.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "InvalidDicomValue",
    "NameGroup",
    "PersonName",
    "codeable_concept",
    "codes_from_sequence",
    "coding_system",
    "display_name",
    "fhir_datetime",
    "fhir_datetime_from_dt",
    "human_names",
    "integer",
    "parse_person_name",
    "text_value",
    "unsigned_int",
]


class InvalidDicomValue(ValueError):
    """A DICOM value is present but malformed; the message names the value and the reason."""


# --------------------------------------------------------------------------------------------
# padding

# DICOM pads values to an even length with a space (text VRs) or NUL (UI); some writers also
# leave NULs or spaces inside fixed-length fields. Only these characters count as padding.
_PADDING = " \x00"


def _clean(text: str | None) -> str | None:
    """Strip DICOM padding on both sides; blank means absent (``None``).

    Used for VRs whose leading spaces are insignificant (DA, TM, DT, IS, CS, PN).
    """
    if text is None:
        return None
    value = text.strip(_PADDING + "\t\r\n")
    return value or None


def text_value(text: str | None) -> str | None:
    """A DICOM text value (LO, SH, ST, LT, UT) as a FHIR string, or ``None`` when blank.

    Only *trailing* padding is removed: PS3.5 says leading spaces are significant in ST, LT and UT,
    so a description that starts with an indent keeps it. A value of nothing but spaces/NULs is
    absent, because FHIR forbids empty strings.
    """
    if text is None:
        return None
    value = text.rstrip(_PADDING)
    return value if value.strip() else None


# --------------------------------------------------------------------------------------------
# dates, times and time zones

_DA = re.compile(r"(\d{4})(\d{2})(\d{2})")
_DA_LEGACY = re.compile(r"(\d{4})\.(\d{2})\.(\d{2})")  # ACR-NEMA style "YYYY.MM.DD"
_TM = re.compile(r"(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?")
_TM_LEGACY = re.compile(r"(\d{2})(?::(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?)?")  # "HH:MM:SS.frac"
_OFFSET = re.compile(r"([+-])(\d{2})(\d{2})")
_DT = re.compile(
    r"(?P<year>\d{4})(?P<month>\d{2})?(?P<day>\d{2})?(?P<hour>\d{2})?(?P<minute>\d{2})?"
    r"(?P<second>\d{2})?(?:\.(?P<fraction>\d{1,6}))?(?P<zone>[+-]\d{4})?"
)

# PS3.3 C.12.1.1.8: Timezone Offset From UTC ranges from -1200 to +1400.
_MIN_OFFSET = _dt.timedelta(hours=-12)
_MAX_OFFSET = _dt.timedelta(hours=14)


@dataclass(frozen=True)
class _Time:
    """A parsed DICOM time; ``second`` may be 60 (a leap second is legal in TM and in FHIR)."""

    hour: int
    minute: int
    second: int
    fraction: str  # the digits after the decimal point, as given; "" when none

    def fhir(self) -> str:
        """``hh:mm:ss[.f]``: FHIR needs all three fields once there is a time, so pad with 00."""
        text = f"{self.hour:02d}:{self.minute:02d}:{self.second:02d}"
        return f"{text}.{self.fraction}" if self.fraction else text


def _parse_date(text: str) -> _dt.date:
    """DA ``YYYYMMDD`` (or legacy ``YYYY.MM.DD``) as a calendar-checked date."""
    match = _DA.fullmatch(text) or _DA_LEGACY.fullmatch(text)
    if match is None:
        raise InvalidDicomValue(f"date {text!r} is not a DICOM DA (YYYYMMDD)")
    year, month, day = (int(part) for part in match.groups())
    try:
        return _dt.date(year, month, day)
    except ValueError as exc:  # month 13, 31 February, year 0000, ...
        raise InvalidDicomValue(f"date {text!r} is not a calendar date: {exc}") from None


def _make_time(text: str, hour: str, minute: str | None, second: str | None, fraction: str | None) -> _Time:
    """Range-check the fields of a TM/DT time; missing minutes/seconds are 0."""
    value = _Time(int(hour), int(minute or 0), int(second or 0), fraction or "")
    if value.hour > 23 or value.minute > 59 or value.second > 60:
        raise InvalidDicomValue(f"time {text!r} is out of range (hours 00-23, minutes 00-59, seconds 00-60)")
    return value


def _parse_time(text: str) -> _Time:
    """TM ``HH[MM[SS[.F{1,6}]]]`` or the legacy ``HH:MM:SS.frac`` form."""
    match = _TM.fullmatch(text) or _TM_LEGACY.fullmatch(text)
    if match is None:
        raise InvalidDicomValue(f"time {text!r} is not a DICOM TM (HHMMSS.FFFFFF)")
    return _make_time(text, *match.groups())


def _parse_offset(text: str) -> _dt.timedelta:
    """An ``&ZZXX`` offset (Timezone Offset From UTC, or a DT suffix) as a timedelta."""
    match = _OFFSET.fullmatch(text)
    if match is None:
        raise InvalidDicomValue(f"time zone offset {text!r} is not of the form +HHMM or -HHMM")
    sign, hours, minutes = match.groups()
    if int(minutes) > 59:
        raise InvalidDicomValue(f"time zone offset {text!r} has more than 59 minutes")
    delta = _dt.timedelta(hours=int(hours), minutes=int(minutes))
    delta = -delta if sign == "-" else delta
    if not _MIN_OFFSET <= delta <= _MAX_OFFSET:
        raise InvalidDicomValue(f"time zone offset {text!r} is outside -1200..+1400")
    return delta


def _format_offset(delta: _dt.timedelta) -> str:
    """``+hh:mm`` / ``-hh:mm``, the only offset form FHIR accepts besides ``Z``.

    Offsets are always written numerically (``+00:00`` rather than ``Z``) so output does not
    change form with the zone. Historical local-mean-time offsets carry seconds, which FHIR cannot
    express; they are rounded to the nearest minute.
    """
    minutes = round(delta.total_seconds() / 60)
    sign = "-" if minutes < 0 else "+"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{minutes:02d}"


def _zone_for(date: _dt.date, time: _Time, offset: str | None, local_zone: _dt.tzinfo) -> str:
    """The zone suffix for a local date+time: the dataset's offset if any, else ``local_zone``.

    ``local_zone`` is asked for its offset *at that instant*, so a ``zoneinfo.ZoneInfo`` gives the
    summer or winter offset as the date requires. For a wall time inside a DST transition the
    zone's ``fold=0`` answer is used (the offset in force before the change); the tie cannot be
    broken from DICOM data.
    """
    if offset is not None:
        return _format_offset(_parse_offset(offset))
    wall = _dt.datetime(date.year, date.month, date.day, time.hour, time.minute, min(time.second, 59))
    delta = local_zone.utcoffset(wall.replace(tzinfo=local_zone))
    if delta is None:
        raise InvalidDicomValue(f"local time zone {local_zone!r} gives no UTC offset for {wall.isoformat()}")
    return _format_offset(delta)


def fhir_datetime(
    date: str | None,
    time: str | None,
    offset: str | None,
    local_zone: _dt.tzinfo,
) -> str | None:
    """DA + optional TM + optional Timezone Offset From UTC (0008,0201) → FHIR ``dateTime``.

    * no date → ``None``: a time alone does not make a dateTime;
    * date only → ``YYYY-MM-DD`` (FHIR forbids a zone on a date without a time);
    * date + time → ``YYYY-MM-DDThh:mm:ss[.f]±hh:mm``. A partial TM (``HH`` or ``HHMM``) is padded
      with ``00`` because FHIR needs seconds once there is a time; fractional seconds are kept
      exactly as written (1-6 digits, FHIR allows up to 9). FHIR also requires a zone once there is
      a time: the dataset's ``offset`` when given, else ``local_zone`` resolved for that date/time.

    The offset is only examined when there is a time to attach it to, so a bad offset never costs a
    valid date-only value. Raises :class:`InvalidDicomValue` for a malformed or impossible date,
    time or offset.
    """
    date_text = _clean(date)
    if date_text is None:
        return None
    day = _parse_date(date_text)
    time_text = _clean(time)
    if time_text is None:
        return day.isoformat()
    clock = _parse_time(time_text)
    zone = _zone_for(day, clock, _clean(offset), local_zone)
    return f"{day.isoformat()}T{clock.fhir()}{zone}"


def fhir_datetime_from_dt(dt: str | None, offset: str | None, local_zone: _dt.tzinfo) -> str | None:
    """DICOM DT ``YYYY[MM[DD[HH[MM[SS[.F]]]]]][&ZZXX]`` → FHIR ``dateTime`` of the same precision.

    ``YYYY``, ``YYYY-MM`` and ``YYYY-MM-DD`` are valid FHIR dateTimes and are kept as such (without
    a zone, which FHIR only allows with a time). Once an hour is present, minutes and seconds are
    padded with ``00`` and a zone is always added: the DT's own suffix, else ``offset`` (Timezone
    Offset From UTC), else ``local_zone`` at that instant.
    """
    text = _clean(dt)
    if text is None:
        return None
    match = _DT.fullmatch(text)
    if match is None:
        raise InvalidDicomValue(f"date-time {text!r} is not a DICOM DT (YYYYMMDDHHMMSS.FFFFFF&ZZXX)")
    parts = match.groupdict()
    if parts["fraction"] is not None and parts["second"] is None:
        raise InvalidDicomValue(f"date-time {text!r} has a fraction without seconds")
    zone = parts["zone"]
    if zone is not None:
        _parse_offset(zone)  # validate even when the precision drops it
    year = int(parts["year"])
    if parts["month"] is None:
        if year < 1:
            raise InvalidDicomValue(f"date-time {text!r} has year 0000")
        return f"{year:04d}"
    if parts["day"] is None:
        month = int(parts["month"])
        if year < 1 or not 1 <= month <= 12:
            raise InvalidDicomValue(f"date-time {text!r} has no valid year and month")
        return f"{year:04d}-{month:02d}"
    day = _parse_date(f"{parts['year']}{parts['month']}{parts['day']}")
    if parts["hour"] is None:
        return day.isoformat()
    clock = _make_time(text, parts["hour"], parts["minute"], parts["second"], parts["fraction"])
    zone_text = _zone_for(day, clock, zone if zone is not None else _clean(offset), local_zone)
    return f"{day.isoformat()}T{clock.fhir()}{zone_text}"


# --------------------------------------------------------------------------------------------
# integers

_IS = re.compile(r"[+-]?\d+")
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def integer(text: str | None) -> int | None:
    """IS (signed, ``[+-]digits`` with padding) → FHIR ``integer`` (32-bit); blank → ``None``.

    Decimal forms such as ``"1.0"`` are rejected: IS has no fraction, and guessing would hide a
    broken writer.
    """
    value = _clean(text)
    if value is None:
        return None
    if _IS.fullmatch(value) is None:
        raise InvalidDicomValue(f"integer string {value!r} is not a DICOM IS")
    number = int(value)
    if not _INT32_MIN <= number <= _INT32_MAX:
        raise InvalidDicomValue(f"integer string {value!r} does not fit a FHIR integer")
    return number


def unsigned_int(text: str | None) -> int | None:
    """IS → FHIR ``unsignedInt`` (0..2147483647); negative values raise, blank → ``None``.

    Used for Series Number and Instance Number: DICOM lets them be signed, FHIR does not.
    """
    number = integer(text)
    if number is not None and number < 0:
        raise InvalidDicomValue(f"integer string {text!r} is negative; FHIR unsignedInt cannot hold it")
    return number


# --------------------------------------------------------------------------------------------
# person names

_REPRESENTATION_URL = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"


@dataclass(frozen=True)
class NameGroup:
    """One PN component group (PS3.5 6.2.1): family^given^middle^prefix^suffix, blanks as None."""

    family: str | None = None
    given: str | None = None
    middle: str | None = None
    prefix: str | None = None
    suffix: str | None = None

    def western_text(self) -> str | None:
        """``prefix given middle family suffix``: the reading order of an alphabetic name."""
        return _join(self.prefix, self.given, self.middle, self.family, self.suffix)

    def family_first_text(self) -> str | None:
        """``prefix family given middle suffix``: ideographic and phonetic groups are used for
        Japanese, Chinese and Korean names, which are read family name first."""
        return _join(self.prefix, self.family, self.given, self.middle, self.suffix)


@dataclass(frozen=True)
class PersonName:
    """A PN value: up to three representations of the same name (PS3.5 6.2.1.2)."""

    alphabetic: NameGroup | None = None
    ideographic: NameGroup | None = None
    phonetic: NameGroup | None = None


def _join(*parts: str | None) -> str | None:
    text = " ".join(part for part in parts if part)
    return text or None


def _drop_blank_tail(parts: list[str], limit: int) -> list[str]:
    """Drop surplus trailing delimiters (``"DOE^JOHN^^^^^"``): sloppy writers add them, and they
    carry no data. Surplus parts with content stay, so the caller can reject them."""
    while len(parts) > limit and not _clean(parts[-1]):
        parts = parts[:-1]
    return parts


def _parse_group(text: str, whole: str) -> NameGroup | None:
    components = _drop_blank_tail(text.split("^"), 5)
    if len(components) > 5:
        raise InvalidDicomValue(f"person name {whole!r} has more than 5 components in a group")
    values = [_clean(part) for part in components] + [None] * (5 - len(components))
    group = NameGroup(*values)
    return group if any(values) else None


def parse_person_name(text: str | None) -> PersonName | None:
    """Split a PN into its alphabetic, ideographic and phonetic groups and their 5 components.

    Padding around the value and around each component is removed, and an all-blank group
    (e.g. ``"^^^^"``) is ``None``. Blank input, or a name whose groups are all blank, is ``None``.
    Surplus *empty* groups or components (trailing ``=`` / ``^``) are ignored; more than three
    groups or five components with content is malformed and raises :class:`InvalidDicomValue`.
    """
    value = _clean(text)
    if value is None:
        return None
    groups = _drop_blank_tail(value.split("="), 3)
    if len(groups) > 3:
        raise InvalidDicomValue(f"person name {value!r} has more than 3 component groups")
    parsed = [_parse_group(group, value) for group in groups] + [None] * (3 - len(groups))
    name = PersonName(*parsed)
    return name if any(parsed) else None


def _representation(code: str) -> dict[str, str]:
    return {"url": _REPRESENTATION_URL, "valueCode": code}


def _human_name(group: NameGroup, text: str | None, representation: str | None) -> dict[str, Any]:
    name: dict[str, Any] = {}
    if representation is not None:
        name["extension"] = [_representation(representation)]
    if text:
        name["text"] = text
    if group.family:
        name["family"] = group.family
    given = [part for part in (group.given, group.middle) if part]
    if given:
        name["given"] = given
    if group.prefix:
        name["prefix"] = [group.prefix]
    if group.suffix:
        name["suffix"] = [group.suffix]
    return name


def human_names(pn: PersonName | None) -> list[dict[str, Any]]:
    """FHIR ``HumanName`` dicts, one per non-empty group, alphabetic first.

    * ``given`` holds the given name then the middle name(s), each DICOM component as one item
      (a component such as ``"Mary Ann"`` is not split: DICOM does not say where names divide);
    * ``prefix`` / ``suffix`` are one-item lists; empty components produce no key at all;
    * ``text`` is the readable form: western order for the alphabetic group, family name first
      for ideographic and phonetic groups (see :meth:`NameGroup.family_first_text`);
    * ideographic and phonetic names carry the ``iso21090-EN-representation`` extension with
      ``IDE`` / ``SYL``; the alphabetic one carries ``ABC`` only when another representation is
      present, since a lone name needs no qualifier.
    """
    if pn is None:
        return []
    several = sum(group is not None for group in (pn.alphabetic, pn.ideographic, pn.phonetic)) > 1
    names: list[dict[str, Any]] = []
    if pn.alphabetic is not None:
        names.append(_human_name(pn.alphabetic, pn.alphabetic.western_text(), "ABC" if several else None))
    if pn.ideographic is not None:
        names.append(_human_name(pn.ideographic, pn.ideographic.family_first_text(), "IDE"))
    if pn.phonetic is not None:
        names.append(_human_name(pn.phonetic, pn.phonetic.family_first_text(), "SYL"))
    return names


def display_name(pn: PersonName | None) -> str | None:
    """Readable text for ``Reference.display``: the alphabetic name in western order
    (``prefix given middle family suffix``), else the ideographic, else the phonetic name
    (family name first). The alphabetic group comes first because it is the one every reader
    of the FHIR resource can be expected to read."""
    if pn is None:
        return None
    if pn.alphabetic is not None:
        return pn.alphabetic.western_text()
    for group in (pn.ideographic, pn.phonetic):
        if group is not None:
            return group.family_first_text()
    return None


# --------------------------------------------------------------------------------------------
# coded values

#: Coding Scheme Designators (PS3.16 Table 8-1) whose FHIR system URI is well established.
#: Anything else gets no ``system`` rather than an invented one.
CODING_SYSTEMS: Mapping[str, str] = {
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "SCT": "http://snomed.info/sct",
    "LN": "http://loinc.org",
    "UCUM": "http://unitsofmeasure.org",
    "RADLEX": "http://radlex.org",
    "ICD10": "http://hl7.org/fhir/sid/icd-10",
    "I10": "http://hl7.org/fhir/sid/icd-10",
    "I9C": "http://hl7.org/fhir/sid/icd-9-cm",
}

_SNOMED_CT_ID = re.compile(r"\d{6,18}")  # SCTIDs are 6-18 digits; legacy SNOMED RT ids are "T-D3000"
_URI_SYSTEM = "urn:ietf:rfc:3986"


def coding_system(designator: str | None, code: str, scheme_uids: Mapping[str, str] | None = None) -> str | None:
    """The FHIR ``system`` for a DICOM Coding Scheme Designator, or ``None`` when unknown.

    * ``SRT`` (SNOMED as DICOM labelled it before 2019) maps to SNOMED CT only when the code is an
      SCTID (digits); legacy SNOMED RT ids such as ``T-D3000`` are not SNOMED CT codes, so they get
      no system rather than a wrong one;
    * a private (``99…``) or any other designator gets ``urn:oid:<uid>`` when the dataset's Coding
      Scheme Identification Sequence (0008,0110) gave its Coding Scheme UID (pass that as
      ``scheme_uids``, designator → UID); otherwise no system: the designator alone is only
      meaningful inside one dataset.
    """
    if not designator:
        return None
    if designator in CODING_SYSTEMS:
        return CODING_SYSTEMS[designator]
    if designator == "SRT" and _SNOMED_CT_ID.fullmatch(code):
        return CODING_SYSTEMS["SCT"]
    uid = (scheme_uids or {}).get(designator)
    return f"urn:oid:{uid}" if uid else None


def _item_text(item: Mapping[str, Any], key: str) -> str | None:
    value = item.get(key)
    return _clean(value) if isinstance(value, str) else None


def _coding(item: Mapping[str, Any], scheme_uids: Mapping[str, str] | None) -> dict[str, str] | None:
    """One code sequence item → a Coding, or ``None`` when the item has no code at all."""
    code = _item_text(item, "CodeValue") or _item_text(item, "LongCodeValue")
    designator = _item_text(item, "CodingSchemeDesignator")
    coding: dict[str, str] = {}
    if code is not None:
        system = coding_system(designator, code, scheme_uids)
        if system is not None:
            coding["system"] = system
            version = _item_text(item, "CodingSchemeVersion")
            if version is not None:
                coding["version"] = version
        coding["code"] = code
    else:
        # A URN Code Value is its own global identifier; FHIR's convention for a URI used as a
        # code is the system urn:ietf:rfc:3986.
        urn = _item_text(item, "URNCodeValue")
        if urn is None:
            return None
        coding["system"] = _URI_SYSTEM
        coding["code"] = urn
    meaning = _item_text(item, "CodeMeaning")
    if meaning is not None:
        coding["display"] = meaning
    return coding


def codes_from_sequence(
    items: Iterable[Mapping[str, Any]] | None,
    scheme_uids: Mapping[str, str] | None = None,
) -> list[dict[str, str]]:
    """Code sequence items (dicts keyed by DICOM keyword) → FHIR ``Coding`` dicts.

    The code is Code Value, else Long Code Value, else URN Code Value; items with none are skipped,
    as are exact duplicates. ``version`` (Coding Scheme Version) is only kept alongside a known
    ``system``, since a version of an unnamed system means nothing. ``display`` is the Code Meaning.
    """
    codings: list[dict[str, str]] = []
    for item in items or ():
        coding = _coding(item, scheme_uids)
        if coding is not None and coding not in codings:
            codings.append(coding)
    return codings


def codeable_concept(
    items: Iterable[Mapping[str, Any]] | None,
    text: str | None = None,
    scheme_uids: Mapping[str, str] | None = None,
) -> dict[str, Any] | None:
    """A FHIR ``CodeableConcept`` from code sequence items plus optional free text.

    ``text`` is the accompanying DICOM free-text value (e.g. Reason for the Requested Procedure);
    it is not synthesised from code meanings, so ``text`` only appears when DICOM had one.
    ``None`` when there is neither a code nor text.
    """
    concept: dict[str, Any] = {}
    codings = codes_from_sequence(items, scheme_uids)
    if codings:
        concept["coding"] = codings
    label = text_value(text)
    if label is not None:
        concept["text"] = label
    return concept or None
