"""Issue 3, acceptance 1: every element of the R6 seed element set, from the DICOM attribute(s) it
comes from, through a real Part-10 file, read_header and build_imaging_study.

Each :class:`Case` names the element, the DICOM attribute(s) it is mapped from, the attributes
written into the dataset, and the R6 value the element must have. Every case is also mapped for
R5 and R4, and every output of every case is validated for its release. Elements that the SCP
never writes are in :data:`NO_DICOM_SOURCE`, with the reason; a test checks that each seed
element is in exactly one of the two places.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mapping_inputs import (
    ALL_VERSIONS,
    BASIC_TEXT_SR,
    CT_IMAGE_STORAGE,
    DCM,
    GRAYSCALE_PR,
    KEY_OBJECT_SELECTION,
    MR_IMAGE_STORAGE,
    R4,
    R5,
    R6,
    SERIES_UID,
    SNOMED,
    SOP_UID,
    STUDY_UID,
    assert_valid,
    header,
    mapped,
    study,
)
from scp.mapping import terminology

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ACSN = {"coding": [{"system": V2_0203, "code": "ACSN"}]}
PRF = {"coding": [{"system": PARTICIPATION, "code": "PRF", "display": "performer"}]}
SPRF = {"coding": [{"system": PARTICIPATION, "code": "SPRF", "display": "secondary performer"}]}
CT = {"coding": [{"system": DCM, "code": "CT", "display": "Computed Tomography"}]}
MR = {"coding": [{"system": DCM, "code": "MR", "display": "Magnetic Resonance"}]}

SPEC = Path("/work/shared/spec")

# The R6 seed element set (spec README, "R6 element set"), as paths below ImagingStudy.
SEED_ELEMENTS: tuple[str, ...] = (
    "identifier", "status", "modality", "subject", "encounter", "started", "basedOn", "partOf",
    "referrer", "endpoint", "location", "reason", "note", "description", "numberOfSeries",
    "numberOfInstances", "series",
    "series.uid", "series.number", "series.modality", "series.description",
    "series.numberOfInstances", "series.endpoint", "series.bodySite", "series.specimen",
    "series.started", "series.performer", "series.performer.function", "series.performer.actor",
    "series.instance",
    "series.instance.uid", "series.instance.sopClass", "series.instance.number",
    "series.instance.title",
)

# Seed elements the SCP never writes, and why (for the README).
NO_DICOM_SOURCE: dict[str, str] = {
    "partOf": (
        "Reference(Procedure): the FHIR Procedure this study is part of is a record of the "
        "ordering/scheduling side, whose id the modality never sees. A stored instance carries no "
        "identifier of it (Referenced Performed Procedure Step Sequence (0008,1111) names an MPPS "
        "SOP instance, not a FHIR Procedure), and HL7's DICOM mapping gives partOf no source."
    ),
    "series.endpoint": (
        "DICOM instances carry no network address of their series (Retrieve URL (0008,1190) "
        "belongs to query responses, not to stored composite instances), and the one configured "
        "WADO-RS base URL is written at study level, which FHIR says applies to every series "
        "unless a series overrides it; a per-series copy would add nothing."
    ),
}

# Seed elements that are written, but not from a DICOM attribute (for the README).
NOT_FROM_DICOM: dict[str, str] = {
    "status": "always `available`: the resource is only published once instances are stored",
    "numberOfSeries": "counted from the received series (Number of Study Related Series "
                      "(0020,1206) exists only in query responses)",
    "numberOfInstances": "counted from the received instances ((0020,1208) is a query attribute)",
    "series.numberOfInstances": "counted per series ((0020,1209) is a query attribute)",
    "endpoint": "configuration: `--wado-rs-url` becomes a contained Endpoint `#wado-rs`",
}


@dataclass(frozen=True)
class Case:
    """One seed element mapped from a dataset that carries its DICOM source."""

    element: str  # path below ImagingStudy, e.g. "series.instance.title"
    dicom: str  # the DICOM attribute(s) it comes from
    attributes: Mapping[str, Any]  # written into the dataset (keyword → pydicom value)
    expected: Any  # the R6 value of the element (after ``extract``)
    id: str = ""
    write: Mapping[str, Any] = field(default_factory=dict)  # write_instance keywords
    options: Mapping[str, Any] = field(default_factory=dict)  # MappingOptions keywords
    instances: int = 1  # how many instances (same attributes, distinct SOP UIDs) to send
    extract: Callable[[Any], Any] | None = None

    @property
    def name(self) -> str:
        return f"{self.element}[{self.id}]" if self.id else self.element


def element_value(resource: dict[str, Any], path: str) -> Any:
    """The value at ``path`` ("series.instance.uid"), taking the first entry of each list on the way."""
    node: Any = resource
    parts = path.split(".")
    for index, part in enumerate(parts):
        node = node.get(part) if isinstance(node, dict) else None
        if index < len(parts) - 1 and isinstance(node, list):
            node = node[0] if node else None
    return node


ISSUER_ISO = [{"LocalNamespaceEntityID": "HOSP", "UniversalEntityID": "1.2.3.4.5", "UniversalEntityIDType": "ISO"}]
REASON_CODE = [{"CodeValue": "233604007", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Pneumonia"}]

CASES: tuple[Case, ...] = (
    # -- study ---------------------------------------------------------------------------------
    Case("identifier", "Study Instance UID (0020,000D)",
         {"AccessionNumber": "ACC-1", "StudyID": "S1"},
         [{"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"}]),
    Case("status", "none: fixed `available` once instances are stored", {}, "available"),
    Case("modality", "Modality (0008,0060) of each series, DCM system", {}, [CT]),
    Case("subject", "Patient ID (0010,0020) + Issuer of Patient ID (0010,0021) + Issuer of Patient "
         "ID Qualifiers Sequence (0010,0024) > Universal Entity ID/Type, Patient's Name (0010,0010)",
         {"PatientID": "PID-7", "IssuerOfPatientID": "HOSP",
          "IssuerOfPatientIDQualifiersSequence": [{"UniversalEntityID": "1.2.3.4.5",
                                                   "UniversalEntityIDType": "ISO"}],
          "PatientName": "Doe^Jane", "PatientBirthDate": "19700101", "PatientSex": "F"},
         {"type": "Patient", "identifier": {"value": "PID-7", "system": "urn:oid:1.2.3.4.5",
                                            "assigner": {"display": "HOSP"}},
          "display": "Jane Doe"}, id="identified"),
    Case("subject", "Patient ID (0010,0020) + a free-text Issuer of Patient ID (0010,0021): a system derived "
         "from the issuer (a FHIR server tells patients of two issuers apart only by system)",
         {"PatientID": "PID-7", "IssuerOfPatientID": "HOSP A", "PatientName": "Doe^Jane"},
         {"type": "Patient", "identifier": {"value": "PID-7",
                                            "system": "urn:imagingstudy-scp:issuer-of-patient-id:HOSP%20A",
                                            "assigner": {"display": "HOSP A"}},
          "display": "Jane Doe"}, id="free-text-issuer"),
    Case("subject", "no Patient ID (0010,0020): the study, in the unidentified-patient system",
         {"PatientName": "Doe^John"},
         {"type": "Patient", "identifier": {"system": "urn:imagingstudy-scp:unidentified-patient",
                                            "value": STUDY_UID}, "display": "John Doe"},
         id="unidentified"),
    Case("encounter", "Admission ID (0038,0010) + Issuer of Admission ID Sequence (0038,0014)",
         {"AdmissionID": "ADM-9", "IssuerOfAdmissionIDSequence": ISSUER_ISO},
         {"type": "Encounter", "identifier": {"value": "ADM-9", "system": "urn:oid:1.2.3.4.5",
                                              "assigner": {"display": "HOSP"}}}),
    Case("started", "Study Date (0008,0020) + Study Time (0008,0030) + Timezone Offset From UTC (0008,0201)",
         {"StudyDate": "20240315", "StudyTime": "101530.25", "TimezoneOffsetFromUTC": "+0200"},
         "2024-03-15T10:15:30.25+02:00"),
    Case("started", "Study Date (0008,0020) only", {"StudyDate": "20240315"}, "2024-03-15",
         id="date-only"),
    Case("basedOn", "Accession Number (0008,0050) + Issuer of Accession Number Sequence (0008,0051)",
         {"AccessionNumber": "ACC-1", "IssuerOfAccessionNumberSequence": ISSUER_ISO},
         [{"type": "ServiceRequest", "identifier": {"type": ACSN, "value": "ACC-1",
                                                    "system": "urn:oid:1.2.3.4.5",
                                                    "assigner": {"display": "HOSP"}}}]),
    Case("basedOn", "Request Attributes Sequence (0040,0275) > Accession Number (0008,0050)",
         {"AccessionNumber": "ACC-1",
          "RequestAttributesSequence": [{"AccessionNumber": "ACC-1", "RequestedProcedureID": "RP1"},
                                        {"AccessionNumber": "ACC-2", "RequestedProcedureID": "RP2"}]},
         [{"type": "ServiceRequest", "identifier": {"type": ACSN, "value": "ACC-1"}},
          {"type": "ServiceRequest", "identifier": {"type": ACSN, "value": "ACC-2"}}],
         id="request-attributes"),
    Case("referrer", "Referring Physician's Name (0008,0090)",
         {"ReferringPhysicianName": "House^Gregory^^Dr."},
         {"type": "Practitioner", "display": "Dr. Gregory House"}),
    Case("endpoint", "none: configuration --wado-rs-url (a contained Endpoint)", {},
         [{"reference": "#wado-rs", "type": "Endpoint"}],
         options={"wado_rs_url": "https://pacs.example.org/dicomweb/"}),
    Case("location", "Institutional Department Name (0008,1040) + Institution Name (0008,0080)",
         {"InstitutionalDepartmentName": "Radiology", "InstitutionName": "General Hospital"},
         {"type": "Location", "display": "Radiology, General Hospital"}),
    Case("location", "Institution Name (0008,0080) only", {"InstitutionName": "General Hospital"},
         {"type": "Location", "display": "General Hospital"}, id="institution"),
    Case("reason", "Reason for the Requested Procedure (0040,1002) + Reason for Requested Procedure "
         "Code Sequence (0040,100A)",
         {"ReasonForTheRequestedProcedure": "suspected pneumonia",
          "ReasonForRequestedProcedureCodeSequence": REASON_CODE},
         [{"concept": {"coding": [{"system": SNOMED, "code": "233604007", "display": "Pneumonia"}],
                       "text": "suspected pneumonia"}}]),
    Case("reason", "Request Attributes Sequence (0040,0275) > (0040,1002) / (0040,100A)",
         {"RequestAttributesSequence": [
             {"ReasonForTheRequestedProcedure": "fever"},
             {"ReasonForRequestedProcedureCodeSequence": REASON_CODE}]},
         [{"concept": {"text": "fever"}},
          {"concept": {"coding": [{"system": SNOMED, "code": "233604007", "display": "Pneumonia"}]}}],
         id="request-attributes"),
    Case("note", "Study Comments (0032,4000)", {"StudyComments": "Patient moved; repeat series 3."},
         [{"text": "Patient moved; repeat series 3."}]),
    Case("description", "Study Description (0008,1030)", {"StudyDescription": "CT Thorax"}, "CT Thorax"),
    Case("numberOfSeries", "none: counted from the received series", {}, 1),
    Case("numberOfInstances", "none: counted from the received instances", {}, 3, instances=3),
    Case("series", "Series Instance UID (0020,000E): one entry per series", {}, [SERIES_UID],
         extract=lambda series: [s["uid"] for s in series]),
    # -- series --------------------------------------------------------------------------------
    Case("series.uid", "Series Instance UID (0020,000E)", {}, SERIES_UID),
    Case("series.number", "Series Number (0020,0011)", {"SeriesNumber": 7}, 7),
    Case("series.modality", "Modality (0008,0060), DCM system", {}, MR,
         write={"modality": "MR", "sop_class": MR_IMAGE_STORAGE}),
    Case("series.modality", "Modality (0008,0060) absent: data-absent-reason, no made-up code", {},
         {"extension": [{"url": terminology.DATA_ABSENT_REASON, "valueCode": "unknown"}]},
         write={"modality": None}, id="absent"),
    Case("series.description", "Series Description (0008,103E)", {"SeriesDescription": "Axial 5mm"},
         "Axial 5mm"),
    Case("series.numberOfInstances", "none: counted per series", {}, 2, instances=2),
    Case("series.bodySite", "Body Part Examined (0018,0015) → SNOMED CT (PS3.16 Annex L)",
         {"BodyPartExamined": "CHEST"},
         {"concept": {"coding": [{"system": SNOMED, "code": "816094009", "display": "Chest"}],
                      "text": "CHEST"}}),
    Case("series.bodySite", "Body Part Examined (0018,0015), a term Annex L does not list",
         {"BodyPartExamined": "LEFTTOE"}, {"concept": {"text": "LEFTTOE"}}, id="unknown-term"),
    Case("series.specimen", "Specimen Description Sequence (0040,0560) > Specimen Identifier "
         "(0040,0551) + Issuer of the Specimen Identifier Sequence (0040,0562) + Specimen Short "
         "Description (0040,0600)",
         {"SpecimenDescriptionSequence": [
             {"SpecimenIdentifier": "S-1", "SpecimenUID": "1.2.3.9",
              "IssuerOfTheSpecimenIdentifierSequence": ISSUER_ISO,
              "SpecimenShortDescription": "Liver biopsy"},
             {"SpecimenIdentifier": "S-2", "SpecimenUID": "1.2.3.10"}]},
         [{"type": "Specimen", "identifier": {"value": "S-1", "system": "urn:oid:1.2.3.4.5",
                                              "assigner": {"display": "HOSP"}},
           "display": "Liver biopsy"},
          {"type": "Specimen", "identifier": {"value": "S-2"}}]),
    Case("series.started", "Series Date (0008,0021) + Series Time (0008,0031) + Timezone Offset "
         "From UTC (0008,0201)",
         {"SeriesDate": "20240315", "SeriesTime": "1016", "TimezoneOffsetFromUTC": "-0500"},
         "2024-03-15T10:16:00-05:00"),
    Case("series.performer", "Performing Physician's Name (0008,1050) → PRF, Operators' Name "
         "(0008,1070) → SPRF; one performer per name",
         {"PerformingPhysicianName": ["Smith^John", "Jones^Ann"], "OperatorsName": "Roe^Rick"},
         [{"function": PRF, "actor": {"type": "Practitioner", "display": "John Smith"}},
          {"function": PRF, "actor": {"type": "Practitioner", "display": "Ann Jones"}},
          {"function": SPRF, "actor": {"type": "Practitioner", "display": "Rick Roe"}}]),
    Case("series.performer.function", "Performing Physician's Name (0008,1050) → PRF",
         {"PerformingPhysicianName": "Smith^John"}, PRF),
    Case("series.performer.function", "Operators' Name (0008,1070) → SPRF",
         {"OperatorsName": "Roe^Rick"}, SPRF, id="operator"),
    Case("series.performer.actor", "Performing Physician's Name (0008,1050), a display-only reference",
         {"PerformingPhysicianName": "Smith^John^^Dr.^MD"},
         {"type": "Practitioner", "display": "Dr. John Smith MD"}),
    Case("series.instance", "SOP Instance UID (0008,0018): one entry per instance, by Instance Number",
         {}, [SOP_UID], write={"sop_uid": SOP_UID}, extract=lambda instances: [i["uid"] for i in instances]),
    # -- instance ------------------------------------------------------------------------------
    Case("series.instance.uid", "SOP Instance UID (0008,0018)", {}, SOP_UID, write={"sop_uid": SOP_UID}),
    Case("series.instance.sopClass", "SOP Class UID (0008,0016) as urn:oid:", {},
         f"urn:oid:{CT_IMAGE_STORAGE}"),
    Case("series.instance.number", "Instance Number (0020,0013)", {"InstanceNumber": "12"}, 12),
    Case("series.instance.title", "Document Title (0042,0010), first of the four",
         {"DocumentTitle": "Discharge summary", "ContentLabel": "LABEL",
          "ImageType": ["ORIGINAL", "PRIMARY"],
          "ConceptNameCodeSequence": [{"CodeValue": "18748-4", "CodingSchemeDesignator": "LN",
                                       "CodeMeaning": "Diagnostic imaging study"}]},
         "Discharge summary", id="document-title"),
    Case("series.instance.title", "Concept Name Code Sequence (0040,A043) > Code Meaning (0008,0104)",
         {"ContentLabel": "LABEL", "ImageType": ["ORIGINAL", "PRIMARY"],
          "ConceptNameCodeSequence": [{"CodeValue": "18748-4", "CodingSchemeDesignator": "LN",
                                       "CodeMeaning": "Diagnostic imaging study"}]},
         "Diagnostic imaging study", id="concept-name", write={"sop_class": BASIC_TEXT_SR, "modality": "SR"}),
    Case("series.instance.title", "Content Label (0070,0080)",
         {"ContentLabel": "LUNG_NODULES", "ImageType": ["DERIVED", "PRIMARY"]},
         "LUNG_NODULES", id="content-label", write={"sop_class": GRAYSCALE_PR, "modality": "PR"}),
    Case("series.instance.title", "Image Type (0008,0008), values joined with a backslash",
         {"ImageType": ["DERIVED", "SECONDARY", "", "MPR"]}, "DERIVED\\SECONDARY\\\\MPR", id="image-type"),
)


def _write_case(tmp_path: Path, case: Case) -> list[Any]:
    headers = []
    for index in range(case.instances):
        write = dict(case.write)
        if case.instances > 1:
            write["sop_uid"] = f"{SERIES_UID}.{index + 1}"
        headers.append(header(tmp_path, case.attributes, **write))
    return headers


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_element_from_dicom(tmp_path: Path, case: Case) -> None:
    """The element has the expected R6 value; R6, R5 and R4 outputs are all valid."""
    headers = _write_case(tmp_path, case)
    outputs = {version: mapped(headers, version, **case.options) for version in ALL_VERSIONS}
    for version, result in outputs.items():
        assert result.warnings == [], f"{version}: {result.warnings}"
    value = element_value(outputs[R6].resource, case.element)
    if case.extract is not None and value is not None:
        value = case.extract(value)
    assert value == case.expected, f"{case.element} from {case.dicom}"


def test_every_seed_element_is_tested_or_listed() -> None:
    tested = {case.element for case in CASES}
    listed = set(NO_DICOM_SOURCE)
    assert tested & listed == set(), "an element is both tested and listed as having no source"
    assert tested | listed == set(SEED_ELEMENTS), (
        f"untested and unlisted: {sorted(set(SEED_ELEMENTS) - tested - listed)}; "
        f"not seed elements: {sorted((tested | listed) - set(SEED_ELEMENTS))}")
    assert set(NOT_FROM_DICOM) <= tested, "every element written without a DICOM source is still tested"


def test_seed_elements_exist_in_the_vendored_r6_schema() -> None:
    """The seed element names are R6's (no typo hides an untested element)."""
    import scp

    vendored = Path(scp.__file__).parent / "data" / "schemas" / "ImagingStudy.R6.schema.json"
    definitions = json.loads(vendored.read_text())["definitions"]
    owners = {"": "ImagingStudy", "series": "ImagingStudy_Series",
              "series.performer": "ImagingStudy_Performer", "series.instance": "ImagingStudy_Instance"}
    for path in SEED_ELEMENTS:
        owner, _, name = path.rpartition(".")
        assert name in definitions[owners[owner]]["properties"], path


def test_absent_dicom_values_are_absent_in_fhir(tmp_path: Path) -> None:
    """A dataset with nothing but its UIDs and Modality: only the computed elements appear."""
    resource = study(tmp_path, {}, write={"sop_uid": SOP_UID})
    assert resource == {
        "resourceType": "ImagingStudy",
        "id": STUDY_UID,
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"}],
        "status": "available",
        "modality": [CT],
        "subject": {"type": "Patient", "identifier": {"system": "urn:imagingstudy-scp:unidentified-patient",
                                                      "value": STUDY_UID}},
        "numberOfSeries": 1,
        "numberOfInstances": 1,
        "series": [{"uid": SERIES_UID, "modality": CT, "numberOfInstances": 1,
                    "instance": [{"uid": SOP_UID, "sopClass": f"urn:oid:{CT_IMAGE_STORAGE}"}]}],
    }


def test_blank_values_are_absent(tmp_path: Path) -> None:
    """Empty or padding-only values (Type 2 attributes sent empty) never become "" in FHIR."""
    blank = {"StudyDescription": "", "SeriesDescription": " ", "PatientName": "^^^^",
             "ReferringPhysicianName": "", "AccessionNumber": "", "InstitutionName": "  ",
             "StudyDate": "", "StudyTime": "", "SeriesNumber": "", "InstanceNumber": "",
             "BodyPartExamined": "", "OperatorsName": "", "StudyComments": "   "}
    resource = study(tmp_path, blank, write={"sop_uid": SOP_UID})
    assert resource == study(tmp_path, {}, write={"sop_uid": SOP_UID})


def test_series_and_instance_order_and_study_modality(tmp_path: Path) -> None:
    """Series by Series Number, instances by Instance Number; study modality = distinct series
    modalities in series order; counts are what was received."""
    files = [
        ({"SeriesNumber": 2, "InstanceNumber": 2}, {"series_uid": SERIES_UID + "0.2", "modality": "MR",
                                                    "sop_class": MR_IMAGE_STORAGE}),
        ({"SeriesNumber": 2, "InstanceNumber": 1}, {"series_uid": SERIES_UID + "0.2", "modality": "MR",
                                                    "sop_class": MR_IMAGE_STORAGE}),
        ({"SeriesNumber": 10, "InstanceNumber": 1}, {"series_uid": SERIES_UID + "0.10"}),
        ({"SeriesNumber": 1, "InstanceNumber": 1}, {"series_uid": SERIES_UID + "0.1"}),
    ]
    headers = [header(tmp_path, attributes, **write) for attributes, write in files]
    resource = mapped(headers, R6).resource
    assert [s["number"] for s in resource["series"]] == [1, 2, 10]
    assert [i["number"] for i in resource["series"][1]["instance"]] == [1, 2]
    assert resource["modality"] == [CT, MR]
    assert (resource["numberOfSeries"], resource["numberOfInstances"]) == (3, 4)
    assert [s["numberOfInstances"] for s in resource["series"]] == [1, 2, 1]


def test_a_resent_instance_counts_once(tmp_path: Path) -> None:
    """The same SOP Instance UID twice is one instance; the later header wins."""
    first = header(tmp_path, {"InstanceNumber": "1"}, sop_uid=SOP_UID)
    again = header(tmp_path, {"InstanceNumber": "5"}, sop_uid=SOP_UID)
    resource = mapped([first, again], R6).resource
    assert resource["numberOfInstances"] == 1
    assert resource["series"][0]["instance"] == [{"uid": SOP_UID, "sopClass": f"urn:oid:{CT_IMAGE_STORAGE}",
                                                  "number": 5}]


# ---------------------------------------------------------------------------------------------
# per-version differences

FULL = {
    "AccessionNumber": "ACC-1", "IssuerOfAccessionNumberSequence": ISSUER_ISO,
    "ProcedureCodeSequence": [{"CodeValue": "RPID16", "CodingSchemeDesignator": "RADLEX",
                               "CodeMeaning": "CT Chest"}],
    "ReasonForTheRequestedProcedure": "suspected pneumonia",
    "ReasonForRequestedProcedureCodeSequence": REASON_CODE,
    "BodyPartExamined": "CHEST", "Laterality": "R", "SeriesNumber": 1, "InstanceNumber": 1,
}
PROCEDURE = {"coding": [{"system": "http://radlex.org", "code": "RPID16", "display": "CT Chest"}]}
REASON = {"coding": [{"system": SNOMED, "code": "233604007", "display": "Pneumonia"}],
          "text": "suspected pneumonia"}
RIGHT = {"system": SNOMED, "code": "24028007", "display": "Right"}
CHEST = {"system": SNOMED, "code": "816094009", "display": "Chest"}


def test_r6_sop_class_is_an_oid_and_there_is_no_procedure_or_laterality(tmp_path: Path) -> None:
    resource = study(tmp_path, FULL, R6)
    assert resource["series"][0]["instance"][0]["sopClass"] == f"urn:oid:{CT_IMAGE_STORAGE}"
    assert "procedure" not in resource
    assert "laterality" not in resource["series"][0]
    assert resource["reason"] == [{"concept": REASON}]
    assert resource["series"][0]["bodySite"] == {"concept": {"coding": [CHEST], "text": "CHEST"}}
    assert resource["basedOn"][0]["identifier"]["value"] == "ACC-1"
    assert len(resource["identifier"]) == 1


def test_r5_sop_class_coding_procedure_and_laterality(tmp_path: Path) -> None:
    resource = study(tmp_path, FULL, R5)
    series = resource["series"][0]
    assert series["instance"][0]["sopClass"] == {"system": "urn:ietf:rfc:3986",
                                                 "code": f"urn:oid:{CT_IMAGE_STORAGE}"}
    assert resource["procedure"] == [{"concept": PROCEDURE}]
    assert series["laterality"] == {"coding": [RIGHT]}
    assert resource["reason"] == [{"concept": REASON}]
    assert series["bodySite"] == {"concept": {"coding": [CHEST], "text": "CHEST"}}
    assert resource["basedOn"] == [{"type": "ServiceRequest", "identifier": {
        "type": ACSN, "value": "ACC-1", "system": "urn:oid:1.2.3.4.5", "assigner": {"display": "HOSP"}}}]


@pytest.mark.parametrize(("laterality", "image_lateralities", "expected"), [
    ("L", ["R", "R"], {"system": SNOMED, "code": "7771000", "display": "Left"}),  # Laterality wins
    (None, ["B", "B"], {"system": SNOMED, "code": "51440002", "display": "Right and left"}),
    (None, ["L", "R"], None),  # instances disagree: no laterality rather than a guess
    (None, ["U"], None),  # unpaired: no laterality
])
def test_r5_laterality_from_laterality_or_image_laterality(tmp_path: Path, laterality: str | None,
                                                            image_lateralities: list[str],
                                                            expected: dict[str, str] | None) -> None:
    """series.laterality: Laterality (0020,0060), else Image Laterality (0020,0062) when all agree."""
    headers = []
    for value in image_lateralities:
        attributes = {"ImageLaterality": value, **({"Laterality": laterality} if laterality else {})}
        headers.append(header(tmp_path, attributes))
    result = mapped(headers, R5)
    assert result.resource["series"][0].get("laterality") == ({"coding": [expected]} if expected else None)


def test_r4_codings_identifier_procedure_code_and_reason_code(tmp_path: Path) -> None:
    resource = study(tmp_path, FULL, R4)
    series = resource["series"][0]
    assert resource["modality"] == [CT["coding"][0]]
    assert series["modality"] == CT["coding"][0]
    assert series["bodySite"] == CHEST
    assert series["laterality"] == RIGHT
    assert series["instance"][0]["sopClass"] == {"system": "urn:ietf:rfc:3986",
                                                 "code": f"urn:oid:{CT_IMAGE_STORAGE}"}
    assert resource["identifier"] == [
        {"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"},
        {"type": ACSN, "value": "ACC-1", "system": "urn:oid:1.2.3.4.5", "assigner": {"display": "HOSP"}},
    ]
    assert "basedOn" not in resource
    assert resource["procedureCode"] == [PROCEDURE]
    assert resource["reasonCode"] == [REASON]
    assert "procedure" not in resource and "reason" not in resource
    assert list(resource) == ["resourceType", "id", "identifier", "status", "modality", "subject",
                              "numberOfSeries", "numberOfInstances", "procedureCode", "reasonCode", "series"]


def test_r4_body_site_of_an_unknown_term_is_a_coding_with_the_term_as_display(tmp_path: Path) -> None:
    """R4 bodySite is a Coding, which has no text: the term Annex L does not code is kept as the
    Coding's display (no system, no code: nothing is made up), and is valid R4."""
    resource = study(tmp_path, {"BodyPartExamined": "LEFTTOE"}, R4)
    assert resource["series"][0]["bodySite"] == {"display": "LEFTTOE"}


def test_r4_study_modality_holds_only_acquisition_modalities(tmp_path: Path) -> None:
    """SR, KO and PR series stay series (with their Coding) but leave the R4 study-level list,
    whose order is that of the series; R6 and R5 list all of them."""
    series = [("CT", CT_IMAGE_STORAGE, 1), ("SR", BASIC_TEXT_SR, 2), ("KO", KEY_OBJECT_SELECTION, 3),
              ("PR", GRAYSCALE_PR, 4), ("MR", MR_IMAGE_STORAGE, 5)]
    headers = [header(tmp_path, {"SeriesNumber": number}, series_uid=f"{SERIES_UID}0.{number}",
                      modality=modality, sop_class=sop_class)
               for modality, sop_class, number in series]
    r4 = mapped(headers, R4).resource
    assert [m["code"] for m in r4["modality"]] == ["CT", "MR"]
    assert [s["modality"]["code"] for s in r4["series"]] == ["CT", "SR", "KO", "PR", "MR"]
    for version in (R6, R5):
        resource = mapped(headers, version).resource
        assert [m["coding"][0]["code"] for m in resource["modality"]] == ["CT", "SR", "KO", "PR", "MR"]


def test_modality_displays_and_non_acquisition_set_follow_ps3_16() -> None:
    """Coding.display is the DCM Code Meaning of CID 33, and R4's exclusions are CID 32 (+ ANN):
    checked against the concept tables pydicom generates from the DICOM standard."""
    concept_tables = pytest.importorskip("pydicom.sr._concepts_dict")
    cid_tables = pytest.importorskip("pydicom.sr._cid_dict")
    dcm = concept_tables.concepts["DCM"]

    def codes(cid: int) -> dict[str, str]:
        return {code: meaning for name in cid_tables.cid_concepts[cid]["DCM"]
                for code, (meaning, _) in dcm[name].items()}

    assert terminology.MODALITY_MEANINGS == codes(33)
    assert terminology.NON_ACQUISITION_MODALITIES == set(codes(32)) | {"ANN"}
    assert not terminology.NON_ACQUISITION_MODALITIES & set(codes(29))


def test_a_name_repeated_in_one_attribute_is_one_performer(tmp_path: Path) -> None:
    resource = study(tmp_path, {"PerformingPhysicianName": ["Smith^John", "Smith^John"],
                                "OperatorsName": ["Smith^John"]})
    assert resource["series"][0]["performer"] == [
        {"function": PRF, "actor": {"type": "Practitioner", "display": "John Smith"}},
        {"function": SPRF, "actor": {"type": "Practitioner", "display": "John Smith"}},
    ]


def test_r4_study_of_non_acquisition_objects_only_has_no_modality(tmp_path: Path) -> None:
    resource = study(tmp_path, {}, R4, write={"modality": "SR", "sop_class": BASIC_TEXT_SR})
    assert "modality" not in resource
    assert resource["series"][0]["modality"]["code"] == "SR"


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_element_order_is_the_release_order(tmp_path: Path, version: Any) -> None:
    """Output keys follow the release's StructureDefinition, so the JSON reads like the spec."""
    attributes = {**FULL, "StudyDescription": "d", "StudyDate": "20240101",
                  "ReferringPhysicianName": "A^B", "InstitutionName": "I", "StudyComments": "c",
                  "AdmissionID": "ADM", "PatientID": "P", "OperatorsName": "O^P", "SeriesDate": "20240101"}
    resource = study(tmp_path, attributes, version, wado_rs_url="https://pacs/wado")
    definition = _definition_order(version)
    if definition is None:
        pytest.skip("the spec definitions are not available")
    keys = [key for key in resource if key != "resourceType"]
    assert keys == sorted(keys, key=definition["study"].index)
    series = list(resource["series"][0])
    assert series == sorted(series, key=definition["series"].index)


def _definition_order(version: Any) -> dict[str, list[str]] | None:
    path = SPEC / "definitions" / f"ImagingStudy-{version}.json"
    if not path.exists():
        return None
    definition = json.loads(path.read_text())
    elements = (definition.get("snapshot") or definition["differential"])["element"]
    paths = [e["path"] for e in elements]
    study_keys = ["id", "meta", "implicitRules", "language", "text", "contained", "extension",
                  "modifierExtension"] if version is R6 else []
    study_keys += [p.split(".")[1] for p in paths if p.count(".") == 1]
    series = [p.split(".")[2] for p in paths if p.startswith("ImagingStudy.series.") and p.count(".") == 2]
    if version is R6:
        # the R6 source lists series' own elements only; the seed page drops procedure/laterality
        series = ["id", "extension", "modifierExtension", *series]
    return {"study": study_keys, "series": series}


# ---------------------------------------------------------------------------------------------
# endpoint


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_wado_rs_url_becomes_a_contained_endpoint(tmp_path: Path, version: Any) -> None:
    """--wado-rs-url → endpoint [#wado-rs] + a contained Endpoint (dicom-wado-rs, address without
    the trailing slash), shaped for the release and valid against its official Endpoint schema."""
    resource = study(tmp_path, {}, version, wado_rs_url="https://pacs.example.org/dicomweb//")
    assert resource["endpoint"] == [{"reference": "#wado-rs", "type": "Endpoint"}]
    [endpoint] = resource["contained"]
    assert endpoint["resourceType"] == "Endpoint" and endpoint["id"] == "wado-rs"
    assert endpoint["address"] == "https://pacs.example.org/dicomweb"
    assert endpoint["status"] == "active"
    wado = {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type", "code": "dicom-wado-rs"}
    if version is R4:
        assert endpoint["connectionType"] == wado
        assert endpoint["payloadType"] and endpoint["payloadMimeType"] == ["application/dicom"]
    else:
        assert endpoint["connectionType"] == [{"coding": [wado]}]
        assert endpoint["payload"][0]["mimeType"] == ["application/dicom"]
    _assert_official_endpoint(endpoint, version)


def test_no_wado_rs_url_no_endpoint(tmp_path: Path) -> None:
    resource = study(tmp_path, {}, R6)
    assert "endpoint" not in resource and "contained" not in resource


def _assert_official_endpoint(endpoint: dict[str, Any], version: Any) -> None:
    """Validate against the full official HL7 schema (the vendored one does not check contained)."""
    import gzip

    from jsonschema import Draft6Validator

    sources = {R4: "fhir.schema.R4-4.0.1.json.gz", R5: "fhir.schema.R5-5.0.0.json.gz",
               R6: "fhir.schema.R6-cibuild-2025-08-08.json.gz"}
    path = SPEC / "schemas" / sources[version]
    if not path.exists():
        return  # the spec folder is a test-time convenience, not a dependency
    schema = json.loads(gzip.decompress(path.read_bytes()))
    validator = Draft6Validator({"$ref": "#/definitions/Endpoint", "definitions": schema["definitions"]})
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(endpoint)]
    assert errors == [], errors
    if version is R4:  # R4 Endpoint.payloadType is 1..*; the schema leaves that to the model
        assert endpoint.get("payloadType")
    assert_valid({"resourceType": "ImagingStudy", "id": "x", "status": "available",
                  "subject": {"display": "x"}, "contained": [endpoint],
                  "endpoint": [{"reference": "#wado-rs"}]}, version)
