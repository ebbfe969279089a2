"""Issue 3, acceptance 2: how DICOM values become FHIR values, end to end (Part-10 file →
read_header → build_imaging_study), and what happens to values that cannot be mapped.

Every resource produced here is checked valid for its release (see mapping_inputs.mapped).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pydicom.data
import pytest

from mapping_inputs import (
    ALL_VERSIONS,
    FIXED_ZONE,
    R4,
    R6,
    SERIES_UID,
    SOP_UID,
    Raw,
    header,
    mapped,
    study,
    write_instance,
)
from scp.header import read_header
from scp.mapping.dicom_values import human_names, parse_person_name

# pydicom warns when it reads the deliberately invalid values written below; that is expected.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning"),
    pytest.mark.filterwarnings("ignore:Value .* is not valid for elements:UserWarning"),
    pytest.mark.filterwarnings("ignore:The number of PN components:UserWarning"),
]

# ---------------------------------------------------------------------------------------------
# person names


@pytest.mark.parametrize(("value", "display"), [
    ("Doe^John^Quincy^Dr.^Jr.", "Dr. John Quincy Doe Jr."),  # western order, all five components
    ("Doe^John", "John Doe"),
    ("Doe", "Doe"),
    ("^John", "John"),
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", "Tarou Yamada"),  # alphabetic group first
    ("=山田^太郎=やまだ^たろう", "山田 太郎"),  # else ideographic, family name first
    ("==やまだ^たろう", "やまだ たろう"),  # else phonetic
    ("Doe^John^^^", "John Doe"),  # surplus empty components
    ("Doe^John==", "John Doe"),  # surplus empty groups
])
def test_person_name_groups_to_display(tmp_path: Path, value: str, display: str) -> None:
    """Patient's, Referring Physician's, Performing Physician's and Operators' Name → the
    ``display`` of subject, referrer and performer.actor (ImagingStudy refers to people; it
    holds no HumanName)."""
    attributes = {"PatientName": value, "ReferringPhysicianName": value,
                  "PerformingPhysicianName": value, "OperatorsName": value}
    resource = study(tmp_path, attributes, write={"charset": "ISO_IR 192"})
    assert resource["subject"]["display"] == display
    assert resource["referrer"]["display"] == display
    assert [p["actor"]["display"] for p in resource["series"][0]["performer"]] == [display, display]


def test_person_name_groups_to_human_name(tmp_path: Path) -> None:
    """HumanName is used nowhere in ImagingStudy (subject, referrer and performer are references
    with a display); the decoded header value still yields one HumanName per group, for the day a
    Patient or Practitioner resource is written."""
    decoded = header(tmp_path, {"PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう"},
                     charset=["", "ISO 2022 IR 87"])
    names = human_names(parse_person_name(decoded.text("PatientName")))
    representation = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"
    assert names == [
        {"extension": [{"url": representation, "valueCode": "ABC"}], "text": "Tarou Yamada",
         "family": "Yamada", "given": ["Tarou"]},
        {"extension": [{"url": representation, "valueCode": "IDE"}], "text": "山田 太郎",
         "family": "山田", "given": ["太郎"]},
        {"extension": [{"url": representation, "valueCode": "SYL"}], "text": "やまだ たろう",
         "family": "やまだ", "given": ["たろう"]},
    ]
    resource = mapped(decoded, R6).resource
    assert "family" not in json.dumps(resource) and "given" not in json.dumps(resource)


# ---------------------------------------------------------------------------------------------
# Specific Character Set, end to end

CHARSET_CASES = [
    # (Specific Character Set, Patient's Name, Study Description, encoded bytes the file must hold,
    #  expected subject.display)
    ("ISO_IR 100", "Müller^Jürgen", "Schädel nativ", "Müller".encode("latin-1"), "Jürgen Müller"),
    ("ISO_IR 192", "Gonçalves^José", "МРТ головного мозга ☢", "МРТ".encode("utf-8"), "José Gonçalves"),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", "胸部CT",
     b"\x1b$B" + "山田".encode("iso2022_jp")[3:7], "Tarou Yamada"),
    (["ISO 2022 IR 6", "ISO 2022 IR 87"], "=山田^太郎=やまだ^たろう", "頭部MRI",
     b"\x1b$B" + "山田".encode("iso2022_jp")[3:7], "山田 太郎"),
    ("GB18030", "Wang^XiaoDong=王^小东=", "胸部 CT 平扫", "王".encode("gb18030"), "XiaoDong Wang"),
    ("GB18030", "=王^小东", "头颅", "小东".encode("gb18030"), "王 小东"),
]


@pytest.mark.parametrize(("charset", "name", "description", "encoded", "display"), CHARSET_CASES,
                         ids=lambda v: str(v) if isinstance(v, (str, list)) else None)
def test_specific_character_set_end_to_end(tmp_path: Path, charset: Any, name: str, description: str,
                                            encoded: bytes, display: str) -> None:
    """pydicom encodes the dataset in ``charset`` (the file really holds those bytes);
    read_header decodes it; the text arrives intact in every release."""
    attributes = {"PatientName": name, "StudyDescription": description, "ReferringPhysicianName": name,
                  "SeriesDescription": description, "InstitutionName": description}
    path = write_instance(tmp_path, attributes, charset=charset)
    assert encoded in path.read_bytes()
    decoded = read_header(path)
    assert decoded.text("PatientName") == name.rstrip("=")
    for version in ALL_VERSIONS:
        resource = mapped(decoded, version).resource
        assert resource["subject"]["display"] == display
        assert resource["referrer"]["display"] == display
        assert resource["description"] == description
        assert resource["series"][0]["description"] == description
        assert resource["location"]["display"] == description


def test_sequence_items_decode_with_their_own_or_the_inherited_character_set(tmp_path: Path) -> None:
    """An item with its own Specific Character Set is decoded with it; other items inherit the
    dataset's (PS3.5 7.5.3)."""
    attributes = {"RequestAttributesSequence": [
        {"SpecificCharacterSet": ["", "ISO 2022 IR 87"], "ReasonForTheRequestedProcedure": "胸部痛"},
        {"ReasonForTheRequestedProcedure": "Müdigkeit"}]}
    path = write_instance(tmp_path, attributes, charset="ISO_IR 100")
    assert "胸部痛".encode("iso2022_jp") in path.read_bytes() and b"M\xfcdigkeit" in path.read_bytes()
    resource = mapped(read_header(path), R6).resource
    assert resource["reason"] == [{"concept": {"text": "胸部痛"}}, {"concept": {"text": "Müdigkeit"}}]


@pytest.mark.parametrize(("filename", "display"), [
    ("chrGerm.dcm", "Rüdiger Äneas"),  # ISO_IR 100
    ("chrFren.dcm", "Jérôme Buc"),  # ISO_IR 100
    ("chrGreek.dcm", "Διονυσιος"),  # ISO_IR 126
    ("chrRuss.dcm", "Люкceмбypг"),  # ISO_IR 144 (the file mixes Latin letters in, as written)
    ("chrArab.dcm", "لنزار قباني"),  # ISO_IR 127
    ("chrHbrw.dcm", "דבורה שרון"),  # ISO_IR 138
    ("chrH31.dcm", "Tarou Yamada"),  # ['', 'ISO 2022 IR 87']
    ("chrH32.dcm", "ﾀﾛｳ ﾔﾏﾀﾞ"),  # ['ISO 2022 IR 13', 'ISO 2022 IR 87']: katakana alphabetic group
    ("chrI2.dcm", "Gildong Hong"),  # ['', 'ISO 2022 IR 149']
    ("chrX1.dcm", "XiaoDong Wang"),  # ISO_IR 192
    ("chrX2.dcm", "XiaoDong Wang"),  # GB18030
    ("chrJapMulti.dcm", "たろう やまだ"),  # single group in the first (alphabetic) position
    ("chrKoreanMulti.dcm", "김희중"),
])
def test_pydicom_charset_files(filename: str, display: str) -> None:
    """pydicom's charset test files (written by other toolkits) decode to the right names."""
    path = pydicom.data.get_charset_files(filename)[0]
    for version in ALL_VERSIONS:
        assert mapped(read_header(path), version).resource["subject"]["display"] == display


def test_japanese_ideographic_groups_in_the_pydicom_file() -> None:
    """chrH31.dcm: every group of the name decodes (ISO 2022 escapes per group)."""
    decoded = read_header(pydicom.data.get_charset_files("chrH31.dcm")[0])
    assert decoded.text("PatientName") == "Yamada^Tarou=山田^太郎=やまだ^たろう"


# ---------------------------------------------------------------------------------------------
# dates, times and zones
#
# The mapping reads DA + TM (+ Timezone Offset From UTC) only: no seed element maps from a DT
# attribute (series.started is Series Date + Series Time), so DT handling is covered by
# tests/test_dicom_values.py alone.


@pytest.mark.parametrize(("time", "expected"), [
    ("10", "10:00:00"),  # HH: minutes and seconds padded, FHIR needs them
    ("1015", "10:15:00"),  # HHMM
    ("101530", "10:15:30"),
    ("101530.1", "10:15:30.1"),  # fractions kept exactly as written
    ("101530.123456", "10:15:30.123456"),
    ("10:15:30", "10:15:30"),  # ACR-NEMA style
    ("235960", "23:59:60"),  # a leap second is legal in both
])
def test_partial_times_and_fractions(tmp_path: Path, time: str, expected: str) -> None:
    resource = study(tmp_path, {"StudyDate": "20240315", "StudyTime": time,
                                "SeriesDate": "20240315", "SeriesTime": time})
    assert resource["started"] == f"2024-03-15T{expected}+01:00"
    assert resource["series"][0]["started"] == f"2024-03-15T{expected}+01:00"


@pytest.mark.parametrize(("offset", "zone"), [
    ("+0530", "+05:30"), ("-0800", "-08:00"), ("+0000", "+00:00"), ("+1400", "+14:00"), ("-1200", "-12:00"),
])
def test_timezone_offset_from_utc(tmp_path: Path, offset: str, zone: str) -> None:
    """Timezone Offset From UTC (0008,0201) is the zone of Study and Series Date/Time."""
    resource = study(tmp_path, {"StudyDate": "20240315", "StudyTime": "0930", "TimezoneOffsetFromUTC": offset,
                                "SeriesDate": "20240316", "SeriesTime": "2345"})
    assert resource["started"] == f"2024-03-15T09:30:00{zone}"
    assert resource["series"][0]["started"] == f"2024-03-16T23:45:00{zone}"


@pytest.mark.parametrize(("zone", "date", "expected"), [
    (FIXED_ZONE, "20240115", "+01:00"),
    (dt.timezone.utc, "20240115", "+00:00"),
    (ZoneInfo("Europe/Berlin"), "20240115", "+01:00"),  # winter
    (ZoneInfo("Europe/Berlin"), "20240715", "+02:00"),  # summer: the offset at that date
    (ZoneInfo("America/New_York"), "20240715", "-04:00"),
    (ZoneInfo("Asia/Kolkata"), "20240715", "+05:30"),
])
def test_no_offset_uses_the_local_zone_at_that_date(tmp_path: Path, zone: dt.tzinfo, date: str,
                                                     expected: str) -> None:
    """Without (0008,0201) the zone is MappingOptions.local_zone, resolved for the date."""
    resource = study(tmp_path, {"StudyDate": date, "StudyTime": "120000"}, local_zone=zone)
    assert resource["started"] == f"{date[:4]}-{date[4:6]}-{date[6:]}T12:00:00{expected}"


def test_a_date_without_time_has_no_zone(tmp_path: Path) -> None:
    """FHIR forbids a zone on a date without a time; the offset is not even examined."""
    resource = study(tmp_path, {"StudyDate": "20240315", "TimezoneOffsetFromUTC": "+0200",
                                "SeriesDate": "2024.03.16"})
    assert resource["started"] == "2024-03-15"
    assert resource["series"][0]["started"] == "2024-03-16"  # legacy YYYY.MM.DD accepted


def test_a_time_without_a_date_is_absent(tmp_path: Path) -> None:
    resource = study(tmp_path, {"StudyTime": "101530", "SeriesTime": "101530"})
    assert "started" not in resource and "started" not in resource["series"][0]


# ---------------------------------------------------------------------------------------------
# invalid values: the element is omitted with a warning, the rest is intact and valid

GOOD = {"StudyDate": "20240315", "StudyTime": "101530", "SeriesDate": "20240315", "SeriesTime": "101600",
        "SeriesNumber": "3", "InstanceNumber": "4", "StudyDescription": "CT Thorax",
        "ReferringPhysicianName": "House^Gregory", "PatientName": "Doe^Jane", "PatientID": "P1",
        "AccessionNumber": "A1", "BodyPartExamined": "CHEST", "OperatorsName": "Roe^Rick"}


def _paths_without(resource: dict[str, Any], omitted: list[str]) -> dict[str, Any]:
    """``resource`` with the elements at ``omitted`` (dotted, lists through their first entry) removed."""
    result = json.loads(json.dumps(resource))
    for path in omitted:
        node: Any = result
        *parents, last = path.split(".")
        for part in parents:
            node = node[part]
            if isinstance(node, list):
                node = node[0]
        node.pop(last, None)
    return result


@pytest.mark.parametrize(("bad", "omitted", "warning"), [
    ({"StudyDate": Raw("20241341")}, ["started"], "started omitted: date '20241341'"),
    ({"StudyDate": Raw("20240230")}, ["started"], "started omitted: date '20240230'"),
    ({"StudyDate": Raw("15.03.2024")}, ["started"], "started omitted: date '15.03.2024'"),
    ({"StudyTime": Raw("2561")}, ["started"], "started omitted: time '2561'"),
    ({"StudyTime": Raw("10h15")}, ["started"], "started omitted: time '10h15'"),
    ({"TimezoneOffsetFromUTC": Raw("+2500")}, ["started", "series.started"], "time zone offset '+2500'"),
    ({"TimezoneOffsetFromUTC": Raw("CET")}, ["started", "series.started"], "time zone offset 'CET'"),
    ({"SeriesDate": Raw("20241399")}, ["series.started"], "started omitted: date '20241399'"),
    ({"SeriesNumber": Raw("abc")}, ["series.number"], "number omitted: integer string 'abc'"),
    ({"SeriesNumber": Raw("1.5")}, ["series.number"], "number omitted: integer string '1.5'"),
    ({"SeriesNumber": Raw("-3")}, ["series.number"], "negative"),
    ({"SeriesNumber": Raw("99999999999")}, ["series.number"], "does not fit"),
    ({"InstanceNumber": Raw("x")}, ["series.instance.number"], "number omitted: integer string 'x'"),
    ({"InstanceNumber": Raw("1\\2")}, ["series.instance.number"], "'1\\\\2'"),  # VM 2 in a VM-1 attribute
    ({"StudyDate": Raw("20240315\\20240316")}, ["started"], "20240315\\\\20240316"),
    ({"ReferringPhysicianName": Raw("a=b=c=d")}, ["referrer"], "referrer omitted"),
    ({"PatientName": Raw("a^b^c^d^e^f")}, ["subject.display"], "subject.display omitted"),
    ({"OperatorsName": Raw("a=b=c=d")}, ["series.performer"], "performer (OperatorsName) omitted"),
])
def test_invalid_value_is_omitted_with_a_warning(tmp_path: Path, bad: dict[str, Raw], omitted: list[str],
                                                 warning: str) -> None:
    good = mapped(header(tmp_path, GOOD, sop_uid=SOP_UID), R6)
    assert good.warnings == []
    for version in ALL_VERSIONS:
        result = mapped(header(tmp_path, {**GOOD, **bad}, sop_uid=SOP_UID), version)  # valid (mapped checks)
        reference = mapped(header(tmp_path, GOOD, sop_uid=SOP_UID), version).resource
        assert result.resource == _paths_without(reference, omitted), "only the invalid element goes"
        assert result.warnings, "an omitted element is always reported"
        assert all(" omitted: " in w for w in result.warnings)
        assert any(warning in w for w in result.warnings), result.warnings


def test_warnings_name_where_the_value_was(tmp_path: Path) -> None:
    result = mapped(header(tmp_path, {"SeriesNumber": Raw("abc"), "InstanceNumber": Raw("x")},
                           sop_uid=SOP_UID), R6)
    assert sorted(result.warnings) == sorted([
        f"series {SERIES_UID}: number omitted: integer string 'abc' is not a DICOM IS",
        f"instance {SOP_UID}: number omitted: integer string 'x' is not a DICOM IS",
    ])


def test_backslash_in_single_valued_text_is_kept(tmp_path: Path) -> None:
    """A backslash is the DICOM value delimiter, so read_header splits "CT\\HEAD" into two
    values; for a VM-1 text attribute the mapping rejoins them instead of failing or cutting."""
    attributes = {"StudyDescription": Raw("CT\\HEAD"), "SeriesDescription": Raw("AX\\5mm"),
                  "InstitutionName": Raw("A\\B"), "PatientID": Raw("P\\1"), "BodyPartExamined": Raw("HEAD\\NECK")}
    resource = study(tmp_path, attributes)
    assert resource["description"] == "CT\\HEAD"
    assert resource["series"][0]["description"] == "AX\\5mm"
    assert resource["location"]["display"] == "A\\B"
    assert resource["subject"]["identifier"]["value"] == "P\\1"
    assert resource["series"][0]["bodySite"] == {"concept": {"text": "HEAD\\NECK"}}


def test_whitespace_fhir_strings_cannot_hold_becomes_a_space(tmp_path: Path) -> None:
    """NBSP (0xA0 in ISO_IR 100), em space, form feed and other C0 controls are legal in DICOM
    text but fail R4's string pattern ^[ \\r\\n\\t\\S]+$ (FHIR also says strings should hold no
    character below 32 but tab, CR and LF): each becomes a plain space, in every release."""
    attributes = {"StudyDescription": "CT\u00a0Thorax", "SeriesDescription": "AX\x0c5mm",
                  "InstitutionName": "Klinik\u2003Süd", "PatientName": "Doe\u00a0Smith^John",
                  "DocumentTitle": "Befund\x01vom Montag", "StudyComments": "line 1\r\nline\t2"}
    path = write_instance(tmp_path, attributes, charset="ISO_IR 192")
    assert "CT\u00a0Thorax".encode() in path.read_bytes()
    latin1 = write_instance(tmp_path, {"StudyDescription": "CT\u00a0Thorax"}, charset="ISO_IR 100")
    assert b"CT\xa0Thorax" in latin1.read_bytes()
    for version in ALL_VERSIONS:
        assert mapped(read_header(latin1), version).resource["description"] == "CT Thorax"
        resource = mapped(read_header(path), version).resource  # valid, R4 included
        assert resource["description"] == "CT Thorax"
        assert resource["series"][0]["description"] == "AX 5mm"
        assert resource["location"]["display"] == "Klinik Süd"
        assert resource["subject"]["display"] == "John Doe Smith"
        assert resource["series"][0]["instance"][0]["title"] == "Befund vom Montag"
        assert resource["note"] == [{"text": "line 1\r\nline\t2"}]  # tab, CR and LF are kept


# ---------------------------------------------------------------------------------------------
# instances that disagree on a study-level (or series-level) value


def test_study_disagreement_latest_wins_and_warning_names_both_values(tmp_path: Path) -> None:
    first = header(tmp_path, {"StudyDescription": "CT Thorax"}, sop_uid=SOP_UID + "1")
    second = header(tmp_path, {"StudyDescription": "CT Thorax/Abdomen"}, sop_uid=SOP_UID + "2",
                    series_uid=SERIES_UID + "9")
    for version in ALL_VERSIONS:
        result = mapped([first, second], version)
        assert result.resource["description"] == "CT Thorax/Abdomen"
        [warning] = result.warnings
        assert "StudyDescription" in warning
        assert "'CT Thorax'" in warning and "'CT Thorax/Abdomen'" in warning
        assert f"SOP {SOP_UID}2" in warning
    assert mapped([second, first], R6).resource["description"] == "CT Thorax"  # order decides


@pytest.mark.parametrize("keyword", ["PatientID", "PatientName", "AccessionNumber", "ReferringPhysicianName"])
def test_phi_disagreement_is_masked_unless_log_phi(tmp_path: Path, keyword: str) -> None:
    first = header(tmp_path, {keyword: "Alpha^One"}, sop_uid=SOP_UID + "1")
    second = header(tmp_path, {keyword: "Beta^Two"}, sop_uid=SOP_UID + "2")
    masked = mapped([first, second], R6)
    [warning] = masked.warnings
    assert keyword in warning and "Alpha" not in warning and "Beta" not in warning and "***" in warning
    shown = mapped([first, second], R6, log_phi=True)
    [warning] = shown.warnings
    assert "'Alpha^One'" in warning and "'Beta^Two'" in warning
    assert masked.resource == shown.resource
    text = json.dumps(masked.resource, ensure_ascii=False)
    assert "Beta" in text and "Alpha" not in text  # the latest value is the one mapped


def test_patient_id_disagreement_latest_wins(tmp_path: Path) -> None:
    first = header(tmp_path, {"PatientID": "PID-1"}, sop_uid=SOP_UID + "1")
    second = header(tmp_path, {"PatientID": "PID-2"}, sop_uid=SOP_UID + "2")
    result = mapped([first, second], R4)
    assert result.resource["subject"]["identifier"]["value"] == "PID-2"
    assert len(result.warnings) == 1 and "PatientID" in result.warnings[0]


def test_series_disagreement_latest_wins(tmp_path: Path) -> None:
    first = header(tmp_path, {"SeriesDescription": "AX", "BodyPartExamined": "HEAD"}, sop_uid=SOP_UID + "1")
    second = header(tmp_path, {"SeriesDescription": "AX 5mm", "BodyPartExamined": "HEAD"}, sop_uid=SOP_UID + "2")
    result = mapped([first, second], R6)
    assert result.resource["series"][0]["description"] == "AX 5mm"
    [warning] = result.warnings
    assert warning.startswith(f"series {SERIES_UID}:") and "'AX'" in warning and "'AX 5mm'" in warning


def test_an_instance_without_the_value_does_not_erase_it(tmp_path: Path) -> None:
    """"Most recent" means the most recent instance that has a value: absence is not a change."""
    first = header(tmp_path, {"StudyDescription": "CT Thorax", "SeriesNumber": 2}, sop_uid=SOP_UID + "1")
    second = header(tmp_path, {}, sop_uid=SOP_UID + "2")
    result = mapped([first, second], R6)
    assert result.resource["description"] == "CT Thorax"
    assert result.resource["series"][0]["number"] == 2
    assert result.warnings == []


def test_agreeing_instances_give_no_warning(tmp_path: Path) -> None:
    headers = [header(tmp_path, GOOD, sop_uid=f"{SOP_UID}{n}") for n in range(3)]
    assert mapped(headers, R4).warnings == []
