"""Issue 3, acceptance 3: golden ImagingStudy files for real inputs, in R6, R5 and R4.

Each input is read with read_header and mapped with MappingOptions.local_zone pinned to
:data:`mapping_inputs.FIXED_ZONE` (UTC+01:00), so no golden depends on the machine. The result is
validated for its release, then compared field by field with
``tests/data/golden/<name>.<R6|R5|R4>.json``; a mismatch lists every differing path.

Regenerate with ``UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_mapping_golden.py`` and
then review the diff: the review is what makes a golden file worth anything.

Review (done by hand for every golden file, R6, R5 and R4, against ``dcmdump`` of the input and
the spec README's mapping table). Checked in every file: id and the urn:dicom:uid identifier =
(0020,000D); series.uid = (0020,000E); instance.uid = (0008,0018); sopClass = (0008,0016) as
``urn:oid:`` (R6 string, R5/R4 Coding in urn:ietf:rfc:3986); number = (0020,0011)/(0020,0013);
started = (0008,0020)+(0008,0030) and (0008,0021)+(0008,0031) with (0008,0201) when present,
else +01:00; subject.identifier.value = (0010,0020) and subject.display = (0010,0010) in
"given family" order; no element whose DICOM attribute is absent or empty; counts = what was
sent; modality displays are PS3.16 CID 33 Code Meanings; R4 has Codings, the accession as an ACSN
identifier and no CID 32 (non-acquisition: SR, KO, PR, RT*, OT...) code in the study-level modality;
R6 has no procedure or series.laterality, and differs from R5 only in sopClass (checked with a
sorted-key diff of the R6/R5 and R5/R4 files). What is particular to each input is in
:data:`GOLDENS`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom.data
import pytest

from dicom_factory import make_study
from mapping_inputs import ALL_VERSIONS, FIXED_ZONE, UID_ROOT, assert_valid, write_instance
from scp.fhir_version import FhirVersion
from scp.header import read_header
from scp.mapping.imaging_study import MappingOptions, build_imaging_study

GOLDEN_DIR = Path(__file__).parent / "data" / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def _pydicom_file(name: str) -> Callable[[Path], list[Path]]:
    def files(_: Path) -> list[Path]:
        return [Path(pydicom.data.get_testdata_file(name))]
    return files


def _charset_file(name: str) -> Callable[[Path], list[Path]]:
    def files(_: Path) -> list[Path]:
        return [Path(pydicom.data.get_charset_files(name)[0])]
    return files


def _generated_study(folder: Path) -> list[Path]:
    """tests/dicom_factory.make_study with a fixed seed: a CT series of 3 and an MR series of 2."""
    return make_study(folder, series=(("CT", 3), ("MR", 2)), seed="issue-3-golden").files


# A constructed study, in ISO_IR 100, that carries every element the pydicom files lack.
CONSTRUCTED_UID = UID_ROOT + "3.1"
ISSUER = [{"LocalNamespaceEntityID": "RIS", "UniversalEntityID": "1.2.276.0.99.2", "UniversalEntityIDType": "ISO"}]
CONSTRUCTED_STUDY = {
    "PatientName": "Müller^Jürgen^^Dr.", "PatientID": "PAT-0042", "IssuerOfPatientID": "KLINIKUM",
    "IssuerOfPatientIDQualifiersSequence": [{"UniversalEntityID": "1.2.276.0.99.1", "UniversalEntityIDType": "ISO"}],
    "PatientBirthDate": "19610704", "PatientSex": "M",
    "StudyDate": "20240315", "StudyTime": "081500.5", "TimezoneOffsetFromUTC": "+0100",
    "AccessionNumber": "ACC-2024-0815", "IssuerOfAccessionNumberSequence": ISSUER,
    "ReferringPhysicianName": "Schäfer^Anna^^Dr. med.", "StudyDescription": "Thorax-CT, Hand links, Biopsie",
    "StudyComments": "Patient nüchtern", "InstitutionName": "Klinikum Süd",
    "InstitutionalDepartmentName": "Radiologie", "AdmissionID": "FALL-77",
    "IssuerOfAdmissionIDSequence": [{"LocalNamespaceEntityID": "KIS"}],
    "ReasonForTheRequestedProcedure": "V.a. Lungenembolie",
    "ReasonForRequestedProcedureCodeSequence": [{"CodeValue": "59282003", "CodingSchemeDesignator": "SCT",
                                                 "CodeMeaning": "Pulmonary embolism"}],
    "ProcedureCodeSequence": [{"CodeValue": "24627-2", "CodingSchemeDesignator": "LN", "CodeMeaning": "CT Chest"}],
}
CONSTRUCTED_SERIES: list[tuple[str, str, dict[str, Any], list[dict[str, Any]]]] = [
    # (modality, SOP Class UID, series attributes, per-instance attributes)
    ("CT", "1.2.840.10008.5.1.4.1.1.2",
     {"SeriesNumber": 1, "SeriesDescription": "Thorax nativ", "BodyPartExamined": "CHEST",
      "SeriesDate": "20240315", "SeriesTime": "081612", "PerformingPhysicianName": ["Weiß^Peter", "Nørgaard^Søren"],
      "OperatorsName": "Groß^Lena"},
     [{"InstanceNumber": 2, "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]},
      {"InstanceNumber": 1, "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}]),
    ("DX", "1.2.840.10008.5.1.4.1.1.1.1",
     {"SeriesNumber": 2, "SeriesDescription": "Hand links", "BodyPartExamined": "HAND", "Laterality": "L",
      "SeriesDate": "20240315", "SeriesTime": "0830"},
     [{"InstanceNumber": 1, "ImageType": ["ORIGINAL", "PRIMARY"]}]),
    ("SM", "1.2.840.10008.5.1.4.1.1.77.1.6",
     {"SeriesNumber": 3, "SeriesDescription": "Biopsie", "SpecimenDescriptionSequence": [
         {"SpecimenIdentifier": "PAT-BX-1", "SpecimenUID": UID_ROOT + "3.9",
          "IssuerOfTheSpecimenIdentifierSequence": [{"LocalNamespaceEntityID": "PATHO"}],
          "SpecimenShortDescription": "Stanzbiopsie Lunge"}]},
     [{"InstanceNumber": 1, "ImageType": ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]}]),
    ("SR", "1.2.840.10008.5.1.4.1.1.88.22",
     {"SeriesNumber": 4, "SeriesDescription": "Befund"},
     [{"InstanceNumber": 1, "ConceptNameCodeSequence": [{"CodeValue": "18748-4", "CodingSchemeDesignator": "LN",
                                                         "CodeMeaning": "Diagnostic imaging study"}]}]),
]


def _constructed_study(folder: Path) -> list[Path]:
    files = []
    for number, (modality, sop_class, series, instances) in enumerate(CONSTRUCTED_SERIES, start=1):
        series_uid = f"{CONSTRUCTED_UID}.{number}"
        for index, instance in enumerate(instances, start=1):
            files.append(write_instance(folder, {**CONSTRUCTED_STUDY, **series, **instance},
                                        study_uid=CONSTRUCTED_UID, series_uid=series_uid,
                                        sop_uid=f"{series_uid}.{index}", sop_class=sop_class,
                                        modality=modality, charset="ISO_IR 100"))
    return files


@dataclass(frozen=True)
class Golden:
    name: str
    files: Callable[[Path], list[Path]]
    reviewed: str  # what the hand review checked beyond the common list in the module docstring
    options: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


GOLDENS = (
    Golden("ct_small", _pydicom_file("CT_small.dcm"),
           "pydicom CT_small.dcm (ISO_IR 100). started 2004-01-19T07:27:30-05:00 from 20040119/072730 "
           "and (0008,0201) -0500; series.started 1997-04-30T11:27:49-05:00 (the file's Series Date "
           "really is 1997); location = Institution Name 'JFK IMAGING CENTER'; description 'e+1' as "
           "written; empty Accession Number, Referring Physician and Laterality give nothing; "
           "title = Image Type ORIGINAL\\PRIMARY\\AXIAL; the Other Patient IDs in nested sequences "
           "do not replace (0010,0020) 1CT1."),
    Golden("mr_small", _pydicom_file("MR_small.dcm"),
           "pydicom MR_small.dcm (no Specific Character Set). started 2004-08-26T18:50:59-04:00; no "
           "series.started (Series Date/Time empty); Operators' Name '----' is kept as written, as an "
           "SPRF performer (the file's placeholder, not ours); location 'TOSHIBA'; title "
           "DERIVED\\SECONDARY\\OTHER; no description (0008,1030 absent)."),
    Golden("rtplan", _pydicom_file("rtplan.dcm"),
           "pydicom rtplan.dcm (Implicit VR). Modality RTPLAN: in R6/R5 study modality, not in R4 "
           "(non-acquisition), so the R4 file has no study-level modality; started "
           "2003-07-16T15:35:57+01:00 (no (0008,0201): the pinned zone); display 'pre First mid "
           "Last' from Last^First^mid^pre (prefix first, middle after given); location 'Radiation "
           "Therap, Here' (department then institution, both truncated in the file); operator "
           "'operator' as SPRF; series number 2; no instance number (absent) and no title (no "
           "Image Type, label or concept name at top level)."),
    Golden("test_sr", _pydicom_file("test-SR.dcm"),
           "pydicom test-SR.dcm (Comprehensive SR). title 'Diagnosis' = top-level Concept Name Code "
           "Sequence > Code Meaning (nested content items' names are not used); empty Study "
           "Date/Time → no started; empty Patient ID → subject in the unidentified-patient system "
           "with the Study UID, display 'S R Test'; SR ('Structured Report Document') not in R4 "
           "study modality; description and series description as written."),
    Golden("rtdose_multiframe", _pydicom_file("rtdose.dcm"),
           "pydicom rtdose.dcm: a multi-frame RT Dose (Number of Frames 15) is one instance; empty "
           "Instance Number → no instance.number; started 2003-08-05T11:57:47+01:00 (no (0008,0201), "
           "so the pinned zone); RTDOSE not in R4 study modality."),
    Golden("overlay_mr_request", _pydicom_file("examples_overlay.dcm"),
           "pydicom examples_overlay.dcm (Siemens MR, ISO_IR 100). basedOn = Accession Number "
           "8000000000330109 as ACSN (R4: identifier[1]); the Request Attributes Sequence item holds "
           "no accession or reason, so nothing more; note = Study Comments 'Precision V'; bodySite "
           "ABDOMEN → SCT 818981001 'Abdomen' (R4 Coding without the text); started with fraction "
           "13:26:45.921000, series 14:24:51.281000; title keeps Image Type's empty fifth value "
           "(CSA MPR\\\\CSAPARALLEL); study description 'abdomen^liver' as written."),
    Golden("chr_h31_japanese", _charset_file("chrH31.dcm"),
           "pydicom chrH31.dcm, ['', 'ISO 2022 IR 87']: Patient's Name Yamada^Tarou=山田^太郎=やまだ^たろう "
           "→ display 'Tarou Yamada' (alphabetic group first); Referring Physician '^^^^' → no "
           "referrer; OT ('Other', CID 32) is in R6/R5 study modality but not in R4's; no dates "
           "in the file → no started; (0008,0201) -0400 is read but unused without a time."),
    Golden("generated_ct_mr", _generated_study,
           "dicom_factory.make_study(seed='issue-3-golden'): a CT series of 3 and an MR series of 2, "
           "ordered by Series Number; study modality [CT, MR] in all versions; counts 2/5 and 3/2; "
           "basedOn ACC-42; referrer 'Dr. Gregory House' from House^Gregory^^Dr.; started "
           "2024-03-15T10:15:30+01:00 (pinned zone); endpoint #wado-rs with the contained Endpoint "
           "at https://pacs.example.org/dicomweb (trailing slash dropped), R4 shape in R4.",
           options={"wado_rs_url": "https://pacs.example.org/dicomweb/"}),
    Golden("constructed_latin1", _constructed_study,
           "built here in ISO_IR 100 (umlauts, ß, ø in names and text): subject with Issuer of Patient "
           "ID KLINIKUM as assigner and the qualifiers' ISO UID as system; encounter from Admission "
           "ID FALL-77 (assigner KIS); basedOn ACC-2024-0815 with system urn:oid:1.2.276.0.99.2 and "
           "assigner RIS; reason = SCT 59282003 + text 'V.a. Lungenembolie' in one concept (R4 "
           "reasonCode); procedure LN 24627-2 (R5 procedure, R4 procedureCode, absent in R6); "
           "started 08:15:00.5+01:00; CT performers Weiß (PRF), Nørgaard (PRF), Groß (SPRF); CT "
           "instances ordered 1 (LOCALIZER), 2 (AXIAL); DX bodySite HAND → SCT 85562004, laterality "
           "L → SCT 7771000 Left (R5/R4 only); SM specimen PAT-BX-1 with assigner PATHO and display; "
           "SR title 'Diagnostic imaging study'; R4 study modality [CT, DX, SM] without SR."),
)


@pytest.mark.parametrize("version", ALL_VERSIONS)
@pytest.mark.parametrize("golden", GOLDENS, ids=lambda golden: golden.name)
def test_golden(tmp_path: Path, golden: Golden, version: FhirVersion) -> None:
    """The mapping of each input equals its reviewed golden file, field by field (see GOLDENS)."""
    headers = [read_header(path) for path in golden.files(tmp_path)]
    result = build_imaging_study(headers, MappingOptions(version=version, local_zone=FIXED_ZONE, **golden.options))
    assert_valid(result.resource, version)
    assert list(result.warnings) == list(golden.warnings)
    path = GOLDEN_DIR / f"{golden.name}.{version}.json"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.resource, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    assert path.exists(), f"no golden file {path.name}: run with UPDATE_GOLDEN=1, then review it"
    expected = json.loads(path.read_text(encoding="utf-8"))
    assert_valid(expected, version)
    differences = list(diff(expected, result.resource))
    assert not differences, f"{path.name} differs from the mapping:\n" + "\n".join(differences)


def test_every_golden_input_has_all_three_files() -> None:
    names = {f"{golden.name}.{version}.json" for golden in GOLDENS for version in ALL_VERSIONS}
    present = {path.name for path in GOLDEN_DIR.glob("*.json")}
    assert names <= present, f"missing: {sorted(names - present)}"
    assert present <= names, f"stale golden files: {sorted(present - names)}"


def diff(expected: Any, actual: Any, path: str = "ImagingStudy") -> Any:
    """Yield one readable line per difference between two JSON values."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        for key in expected:
            if key not in actual:
                yield f"{path}.{key}: missing (expected {_short(expected[key])})"
            else:
                yield from diff(expected[key], actual[key], f"{path}.{key}")
        for key in actual:
            if key not in expected:
                yield f"{path}.{key}: unexpected {_short(actual[key])}"
        if list(expected) != list(actual) and expected.keys() == actual.keys():
            yield f"{path}: key order {list(actual)} (expected {list(expected)})"
    elif isinstance(expected, list) and isinstance(actual, list):
        for index, (left, right) in enumerate(zip(expected, actual)):
            yield from diff(left, right, f"{path}[{index}]")
        for index in range(len(actual), len(expected)):
            yield f"{path}[{index}]: missing (expected {_short(expected[index])})"
        for index in range(len(expected), len(actual)):
            yield f"{path}[{index}]: unexpected {_short(actual[index])}"
    elif expected != actual or type(expected) is not type(actual):
        yield f"{path}: expected {_short(expected)}, got {_short(actual)}"


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def test_diff_is_readable() -> None:
    expected = {"a": 1, "b": [{"c": "x"}, 2], "d": True}
    actual = {"a": 2, "b": [{"c": "y"}], "e": None}
    assert list(diff(expected, actual)) == [
        "ImagingStudy.a: expected 1, got 2",
        'ImagingStudy.b[0].c: expected "x", got "y"',
        "ImagingStudy.b[1]: missing (expected 2)",
        "ImagingStudy.d: missing (expected true)",
        "ImagingStudy.e: unexpected null",
    ]
