"""Behaviour of the DICOM → FHIR value conversions in scp.mapping.dicom_values."""

from __future__ import annotations

import re
from datetime import timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from fhir.resources.codeableconcept import CodeableConcept
from fhir.resources.humanname import HumanName

from scp.mapping.dicom_values import (
    InvalidDicomValue,
    NameGroup,
    PersonName,
    codeable_concept,
    codes_from_sequence,
    display_name,
    fhir_datetime,
    fhir_datetime_from_dt,
    human_names,
    integer,
    parse_person_name,
    text_value,
    unsigned_int,
)

PARIS = ZoneInfo("Europe/Paris")
UTC = timezone.utc

# The dateTime pattern of the official FHIR R5 JSON schema.
FHIR_DATETIME = re.compile(
    r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])"
    r"(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]{1,9})?)?)?"
    r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00)?)?)?"
)
# FHIR's own rule on top of the pattern: a time needs a zone, a date alone has none.
WITH_TIME = re.compile(r".*T\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")


def assert_fhir_datetime(value: str) -> None:
    assert FHIR_DATETIME.fullmatch(value), value
    if "T" in value:
        assert WITH_TIME.fullmatch(value), f"{value} has a time but no zone"
    else:
        assert not re.search(r"[+Z]|\d-\d\d:", value[10:]), f"{value} has a zone without a time"


def assert_no_empty_values(value: Any) -> None:
    """FHIR forbids "" and [] and {}: walk the structure and check none is emitted."""
    if isinstance(value, dict):
        assert value, "empty object"
        for item in value.values():
            assert_no_empty_values(item)
    elif isinstance(value, list):
        assert value, "empty list"
        for item in value:
            assert_no_empty_values(item)
    elif isinstance(value, str):
        assert value.strip(), "empty string"


# ------------------------------------------------------------------------------------------
# fhir_datetime


@pytest.mark.parametrize(
    ("time", "expected"),
    [
        ("10", "2024-12-31T10:00:00+01:00"),
        ("1015", "2024-12-31T10:15:00+01:00"),
        ("101530", "2024-12-31T10:15:30+01:00"),
        ("101530.25", "2024-12-31T10:15:30.25+01:00"),
        ("101530.123456", "2024-12-31T10:15:30.123456+01:00"),
        ("101530.000000", "2024-12-31T10:15:30.000000+01:00"),
        ("10:15", "2024-12-31T10:15:00+01:00"),
        ("10:15:30", "2024-12-31T10:15:30+01:00"),
        ("10:15:30.5", "2024-12-31T10:15:30.5+01:00"),
        ("235960", "2024-12-31T23:59:60+01:00"),  # leap second: legal in TM and in FHIR
    ],
)
def test_partial_and_fractional_times_are_padded_and_kept(time: str, expected: str) -> None:
    result = fhir_datetime("20241231", time, None, PARIS)
    assert result == expected
    assert_fhir_datetime(result)


def test_date_alone_has_no_zone() -> None:
    assert fhir_datetime("20241231", None, "+0900", PARIS) == "2024-12-31"
    assert fhir_datetime("20241231", "   ", None, PARIS) == "2024-12-31"


def test_legacy_date_with_dots() -> None:
    assert fhir_datetime("2024.12.31", "101530", "+0100", UTC) == "2024-12-31T10:15:30+01:00"


def test_dataset_offset_wins_over_local_zone() -> None:
    assert fhir_datetime("20240715", "101530", "+0900", PARIS) == "2024-07-15T10:15:30+09:00"
    assert fhir_datetime("20240715", "101530", "-0530", PARIS) == "2024-07-15T10:15:30-05:30"
    assert fhir_datetime("20240715", "101530", "+0000", PARIS) == "2024-07-15T10:15:30+00:00"
    assert fhir_datetime("20240715", "101530", "+1400 ", PARIS) == "2024-07-15T10:15:30+14:00"


def test_local_zone_is_resolved_for_the_date_winter_vs_summer() -> None:
    assert fhir_datetime("20240115", "120000", None, PARIS) == "2024-01-15T12:00:00+01:00"
    assert fhir_datetime("20240715", "120000", None, PARIS) == "2024-07-15T12:00:00+02:00"
    # the switch to summer time in 2024 was on 31 March at 02:00 local time
    assert fhir_datetime("20240331", "015959", None, PARIS) == "2024-03-31T01:59:59+01:00"
    assert fhir_datetime("20240331", "030000", None, PARIS) == "2024-03-31T03:00:00+02:00"


def test_wall_times_inside_a_dst_transition_use_the_earlier_offset() -> None:
    # 02:30 does not exist on 31 March (gap) and exists twice on 27 October (fold)
    assert fhir_datetime("20240331", "023000", None, PARIS) == "2024-03-31T02:30:00+01:00"
    assert fhir_datetime("20241027", "023000", None, PARIS) == "2024-10-27T02:30:00+02:00"


def test_fixed_offset_local_zones() -> None:
    assert fhir_datetime("20240715", "0800", None, UTC) == "2024-07-15T08:00:00+00:00"
    india = timezone(timedelta(hours=5, minutes=30))
    assert fhir_datetime("20240715", "0800", None, india) == "2024-07-15T08:00:00+05:30"
    assert fhir_datetime("20240715", "0800", None, ZoneInfo("America/New_York")) == "2024-07-15T08:00:00-04:00"


def test_dicom_padding_is_stripped() -> None:
    assert fhir_datetime("20241231 ", "101530\x00", " +0100", PARIS) == "2024-12-31T10:15:30+01:00"
    assert fhir_datetime("20241231\x00", "1015 ", None, PARIS) == "2024-12-31T10:15:00+01:00"


@pytest.mark.parametrize("date", [None, "", "   ", "\x00\x00"])
def test_no_date_means_no_datetime_even_with_a_time(date: str | None) -> None:
    assert fhir_datetime(date, "101530", "+0100", PARIS) is None


@pytest.mark.parametrize(
    "date",
    ["20241341", "20240230", "2024022", "202402301", "2024-02-03", "2024O101", "abcdefgh", "00000101",
     "20240101-20240131", "2024.2.3"],
)
def test_invalid_dates_raise(date: str) -> None:
    with pytest.raises(InvalidDicomValue, match=re.escape(date)):
        fhir_datetime(date, "101530", None, PARIS)


@pytest.mark.parametrize(
    "time", ["25", "2400", "1061", "106161", "1", "101", "10153", "101530.1234567", "10:1530", "1015:30", "ab",
             "101530.", "10h15"],
)
def test_invalid_times_raise(time: str) -> None:
    with pytest.raises(InvalidDicomValue, match=re.escape(time)):
        fhir_datetime("20241231", time, None, PARIS)


@pytest.mark.parametrize("offset", ["0100", "+01:00", "+1500", "-1300", "+0160", "+100", "UTC", "+01000"])
def test_invalid_offsets_raise_when_a_time_needs_them(offset: str) -> None:
    with pytest.raises(InvalidDicomValue, match=re.escape(offset)):
        fhir_datetime("20241231", "101530", offset, PARIS)


def test_invalid_offset_does_not_cost_a_date_only_value() -> None:
    assert fhir_datetime("20241231", None, "garbage", PARIS) == "2024-12-31"


def test_invalid_dicom_value_is_a_value_error() -> None:
    assert issubclass(InvalidDicomValue, ValueError)


# ------------------------------------------------------------------------------------------
# fhir_datetime_from_dt


@pytest.mark.parametrize(
    ("dt", "offset", "expected"),
    [
        ("2024", None, "2024"),
        ("202412", None, "2024-12"),
        ("20241231", None, "2024-12-31"),
        ("20241231+0900", None, "2024-12-31"),  # a zone without a time is dropped
        ("2024123110", None, "2024-12-31T10:00:00+01:00"),
        ("202412311015", None, "2024-12-31T10:15:00+01:00"),
        ("20241231101530", None, "2024-12-31T10:15:30+01:00"),
        ("20241231101530.25", None, "2024-12-31T10:15:30.25+01:00"),
        ("20241231101530.123456-0500", None, "2024-12-31T10:15:30.123456-05:00"),
        ("20240715101530", None, "2024-07-15T10:15:30+02:00"),  # summer: local zone per date
        ("20240715101530", "+0900", "2024-07-15T10:15:30+09:00"),  # Timezone Offset From UTC
        ("20240715101530+0000", "+0900", "2024-07-15T10:15:30+00:00"),  # the DT's own suffix wins
        ("20241231101530.5+0100 ", None, "2024-12-31T10:15:30.5+01:00"),
    ],
)
def test_dt_precision_and_zone(dt: str, offset: str | None, expected: str) -> None:
    result = fhir_datetime_from_dt(dt, offset, PARIS)
    assert result == expected
    assert_fhir_datetime(result)


@pytest.mark.parametrize("dt", [None, "", "  ", "\x00"])
def test_blank_dt_is_absent(dt: str | None) -> None:
    assert fhir_datetime_from_dt(dt, None, PARIS) is None


@pytest.mark.parametrize(
    "dt",
    ["0000", "202413", "20241232", "2024123", "20241231106", "2024123125", "202412311060", "20241231101561",
     "202412311015.5", "20241231101530+1500", "20241231101530+01", "2024-12-31T10:15:30", "x2024"],
)
def test_invalid_dt_raises(dt: str) -> None:
    with pytest.raises(InvalidDicomValue):
        fhir_datetime_from_dt(dt, None, PARIS)


# ------------------------------------------------------------------------------------------
# integers


@pytest.mark.parametrize(("text", "expected"), [("  12 ", 12), ("0", 0), ("+5", 5), ("007", 7), ("2147483647", 2147483647)])
def test_unsigned_int(text: str, expected: int) -> None:
    assert unsigned_int(text) == expected


@pytest.mark.parametrize("text", [None, "", "   ", "\x00"])
def test_blank_integers_are_absent(text: str | None) -> None:
    assert unsigned_int(text) is None
    assert integer(text) is None


@pytest.mark.parametrize("text", ["-1", "abc", "1.5", "1.0", "1e3", "12 3", "2147483648", "--1"])
def test_unsigned_int_rejects(text: str) -> None:
    with pytest.raises(InvalidDicomValue):
        unsigned_int(text)


def test_signed_integer() -> None:
    assert integer(" -3 ") == -3
    assert integer("-2147483648") == -2147483648
    with pytest.raises(InvalidDicomValue):
        integer("-2147483649")


# ------------------------------------------------------------------------------------------
# person names

REPRESENTATION = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"


def test_parse_three_groups() -> None:
    pn = parse_person_name("Yamada^Tarou=山田^太郎=やまだ^たろう")
    assert pn == PersonName(
        alphabetic=NameGroup(family="Yamada", given="Tarou"),
        ideographic=NameGroup(family="山田", given="太郎"),
        phonetic=NameGroup(family="やまだ", given="たろう"),
    )


def test_human_names_for_three_groups() -> None:
    names = human_names(parse_person_name("Yamada^Tarou=山田^太郎=やまだ^たろう"))
    assert names == [
        {"extension": [{"url": REPRESENTATION, "valueCode": "ABC"}], "text": "Tarou Yamada",
         "family": "Yamada", "given": ["Tarou"]},
        {"extension": [{"url": REPRESENTATION, "valueCode": "IDE"}], "text": "山田 太郎",
         "family": "山田", "given": ["太郎"]},
        {"extension": [{"url": REPRESENTATION, "valueCode": "SYL"}], "text": "やまだ たろう",
         "family": "やまだ", "given": ["たろう"]},
    ]
    for name in names:
        HumanName.model_validate(name)
        assert_no_empty_values(name)


def test_prefix_suffix_and_middle_names() -> None:
    pn = parse_person_name("Adams^John Robert^Quincy^Rev.^B.A. M.Div.")
    assert pn is not None and pn.ideographic is None and pn.phonetic is None
    [name] = human_names(pn)
    assert name == {
        "text": "Rev. John Robert Quincy Adams B.A. M.Div.",
        "family": "Adams",
        "given": ["John Robert", "Quincy"],
        "prefix": ["Rev."],
        "suffix": ["B.A. M.Div."],
    }
    HumanName.model_validate(name)
    assert display_name(pn) == "Rev. John Robert Quincy Adams B.A. M.Div."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Smith^^^^", {"text": "Smith", "family": "Smith"}),
        ("^John", {"text": "John", "given": ["John"]}),
        ("Smith^^Paul", {"text": "Paul Smith", "family": "Smith", "given": ["Paul"]}),
        ("Smith ^ John ^^^", {"text": "John Smith", "family": "Smith", "given": ["John"]}),
        ("^^^Dr", {"text": "Dr", "prefix": ["Dr"]}),
        ("Smith^John  ", {"text": "John Smith", "family": "Smith", "given": ["John"]}),
        ("Smith^John=^^^^=", {"text": "John Smith", "family": "Smith", "given": ["John"]}),
    ],
)
def test_empty_components_are_omitted(text: str, expected: dict[str, Any]) -> None:
    names = human_names(parse_person_name(text))
    assert names == [expected]
    assert_no_empty_values(names)


def test_ideographic_only_name() -> None:
    pn = parse_person_name("=山田^太郎")
    assert pn == PersonName(ideographic=NameGroup(family="山田", given="太郎"))
    assert human_names(pn) == [
        {"extension": [{"url": REPRESENTATION, "valueCode": "IDE"}], "text": "山田 太郎",
         "family": "山田", "given": ["太郎"]}
    ]
    assert display_name(pn) == "山田 太郎"


def test_display_name_falls_back_to_phonetic() -> None:
    assert display_name(parse_person_name("==やまだ^たろう")) == "やまだ たろう"


def test_display_name_prefers_alphabetic() -> None:
    assert display_name(parse_person_name("Yamada^Tarou=山田^太郎=やまだ^たろう")) == "Tarou Yamada"


@pytest.mark.parametrize("text", [None, "", "   ", "^^^^", "==", "^^^^=^^^^=^^^^", "\x00"])
def test_blank_names_are_absent(text: str | None) -> None:
    pn = parse_person_name(text)
    assert pn is None
    assert human_names(pn) == []
    assert display_name(pn) is None


def test_surplus_empty_delimiters_are_tolerated() -> None:
    assert parse_person_name("DOE^JOHN^^^^^^") == PersonName(alphabetic=NameGroup(family="DOE", given="JOHN"))
    assert parse_person_name("DOE^JOHN===") == PersonName(alphabetic=NameGroup(family="DOE", given="JOHN"))


@pytest.mark.parametrize("text", ["a=b=c=d", "a^b^c^d^e^f", "a^^^^^f"])
def test_malformed_names_raise(text: str) -> None:
    with pytest.raises(InvalidDicomValue):
        parse_person_name(text)


# ------------------------------------------------------------------------------------------
# text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("CT CHEST ", "CT CHEST"),
        ("  indented finding\x00", "  indented finding"),  # LT/ST/UT keep leading spaces
        ("line one\r\nline two  ", "line one\r\nline two"),
        ("   ", None),
        ("\x00", None),
        ("", None),
        (None, None),
    ],
)
def test_text_value(text: str | None, expected: str | None) -> None:
    assert text_value(text) == expected


# ------------------------------------------------------------------------------------------
# coded values


def item(value: str | None, designator: str | None, meaning: str | None = None, **extra: str) -> dict[str, str]:
    result = {"CodeValue": value, "CodingSchemeDesignator": designator, "CodeMeaning": meaning, **extra}
    return {key: val for key, val in result.items() if val is not None}


@pytest.mark.parametrize(
    ("designator", "code", "system"),
    [
        ("DCM", "113014", "http://dicom.nema.org/resources/ontology/DCM"),
        ("SCT", "76752008", "http://snomed.info/sct"),
        ("SRT", "76752008", "http://snomed.info/sct"),
        ("LN", "18748-4", "http://loinc.org"),
        ("UCUM", "mm", "http://unitsofmeasure.org"),
        ("RADLEX", "RID10312", "http://radlex.org"),
        ("ICD10", "C50.9", "http://hl7.org/fhir/sid/icd-10"),
        ("I10", "C50.9", "http://hl7.org/fhir/sid/icd-10"),
    ],
)
def test_known_coding_schemes(designator: str, code: str, system: str) -> None:
    assert codes_from_sequence([item(code, designator, "Meaning")]) == [
        {"system": system, "code": code, "display": "Meaning"}
    ]


def test_unknown_and_legacy_designators_get_no_system() -> None:
    codings = codes_from_sequence([
        item("T-D3000", "SRT", "Chest"),  # SNOMED RT id: not an SCTID
        item("ACME-1", "99ACME", "Private thing"),
        item("X", "NOSUCH", "Whatever"),
    ])
    assert codings == [
        {"code": "T-D3000", "display": "Chest"},
        {"code": "ACME-1", "display": "Private thing"},
        {"code": "X", "display": "Whatever"},
    ]


def test_private_designator_with_a_known_scheme_uid() -> None:
    codings = codes_from_sequence([item("ACME-1", "99ACME", "Private thing")], scheme_uids={"99ACME": "1.2.3.4"})
    assert codings == [{"system": "urn:oid:1.2.3.4", "code": "ACME-1", "display": "Private thing"}]


def test_version_only_with_a_system() -> None:
    codings = codes_from_sequence([
        item("113014", "DCM", "Study", CodingSchemeVersion="01"),
        item("A", "99X", "A", CodingSchemeVersion="1.0"),
    ])
    assert codings == [
        {"system": "http://dicom.nema.org/resources/ontology/DCM", "version": "01", "code": "113014", "display": "Study"},
        {"code": "A", "display": "A"},
    ]


def test_long_and_urn_code_values() -> None:
    long_code = "A" * 80
    codings = codes_from_sequence([
        {"LongCodeValue": long_code, "CodingSchemeDesignator": "99LONG", "CodeMeaning": "Long"},
        {"URNCodeValue": "http://example.org/codes/42", "CodeMeaning": "Forty-two"},
    ])
    assert codings == [
        {"code": long_code, "display": "Long"},
        {"system": "urn:ietf:rfc:3986", "code": "http://example.org/codes/42", "display": "Forty-two"},
    ]


def test_items_without_code_and_duplicates_are_dropped_padding_stripped() -> None:
    codings = codes_from_sequence([
        {"CodingSchemeDesignator": "DCM", "CodeMeaning": "no code"},
        item("113014 ", "DCM ", "Study "),
        item("113014", "DCM", "Study"),
        item("113015", "DCM", "   "),
    ])
    assert codings == [
        {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "113014", "display": "Study"},
        {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "113015"},
    ]
    assert_no_empty_values(codings)


def test_empty_sequences() -> None:
    assert codes_from_sequence(None) == []
    assert codes_from_sequence([]) == []


def test_codeable_concept() -> None:
    concept = codeable_concept([item("76752008", "SCT", "Breast")], "Lump in left breast ")
    assert concept == {
        "coding": [{"system": "http://snomed.info/sct", "code": "76752008", "display": "Breast"}],
        "text": "Lump in left breast",
    }
    CodeableConcept.model_validate(concept)
    assert codeable_concept(None, "free text only") == {"text": "free text only"}
    assert codeable_concept([item("1", "DCM")]) == {
        "coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "1"}]
    }
    assert codeable_concept(None, "  ") is None
    assert codeable_concept([], None) is None
