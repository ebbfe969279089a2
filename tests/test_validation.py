"""Behaviour of scp.validation: what passes as an ImagingStudy of each FHIR release, and what is
reported (by element path) when something does not."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft6Validator

from scp import validation
from scp.fhir_version import FhirVersion
from scp.validation import (
    STATUS_CODES,
    InvalidImagingStudy,
    check_imaging_study,
    imaging_study_problems,
)

EXAMPLES = Path(__file__).parent / "data" / "fhir-examples"
SCHEMAS = Path(validation.__file__).parent / "data" / "schemas"

DCM = "http://dicom.nema.org/resources/ontology/DCM"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ZONED = "2024-03-01T09:30:00+01:00"

R4, R5, R6 = FhirVersion.R4, FhirVersion.R5, FhirVersion.R6
ALL_VERSIONS = (R6, R5, R4)


# ---------------------------------------------------------------------------------------------
# resources


def _modality(version: FhirVersion, code: str = "CT") -> dict[str, Any]:
    """R4 modality is a Coding; R5/R6 a CodeableConcept."""
    coding = {"system": DCM, "code": code}
    return coding if version is R4 else {"coding": [coding]}


def _sop_class(version: FhirVersion, uid: str = CT_IMAGE_STORAGE) -> Any:
    """R6 sopClass is an oid (plain urn:oid: string); R5/R4 a Coding."""
    if version is R6:
        return f"urn:oid:{uid}"
    return {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{uid}"}


def make_study(version: FhirVersion, series: int = 1, instances: int = 2) -> dict[str, Any]:
    """A minimal valid ImagingStudy of ``version`` with consistent counts."""
    return {
        "resourceType": "ImagingStudy",
        "id": STUDY_UID,
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"}],
        "status": "available",
        "modality": [_modality(version)],
        "subject": {"reference": "Patient/example"},
        "started": ZONED,
        "numberOfSeries": series,
        "numberOfInstances": series * instances,
        "series": [
            {
                "uid": f"{STUDY_UID}.{s + 1}",
                "number": s + 1,
                "modality": _modality(version),
                "numberOfInstances": instances,
                "started": ZONED,
                "instance": [
                    {
                        "uid": f"{STUDY_UID}.{s + 1}.{i + 1}",
                        "sopClass": _sop_class(version),
                        "number": i + 1,
                    }
                    for i in range(instances)
                ],
            }
            for s in range(series)
        ],
    }


def load_example(name: str) -> dict[str, Any]:
    """One of the official R5 examples copied into tests/data/fhir-examples."""
    return json.loads((EXAMPLES / name).read_text(encoding="utf-8"))


def changed(version: FhirVersion, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """A minimal valid study of ``version`` with ``change`` applied to it."""
    study = make_study(version)
    change(study)
    return study


def problems_at(problems: list[str], path: str) -> list[str]:
    """The problems reported for exactly the element ``path``."""
    return [problem for problem in problems if problem.startswith(f"{path}: ")]


def assert_problem(problems: list[str], path: str, *fragments: str) -> None:
    """Some problem at ``path`` mentions every one of ``fragments``."""
    at_path = problems_at(problems, path)
    assert any(all(fragment in problem for fragment in fragments) for problem in at_path), (
        f"no problem at {path} mentioning {fragments}; got: {problems}"
    )


# ---------------------------------------------------------------------------------------------
# valid resources


@pytest.mark.parametrize("name", ["ImagingStudy-example.json", "ImagingStudy-example-xr.json"])
def test_official_r5_examples_are_valid_r5(name: str) -> None:
    assert imaging_study_problems(load_example(name), R5) == []


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_minimal_resource_is_valid(version: FhirVersion) -> None:
    study = make_study(version, series=2, instances=3)
    assert imaging_study_problems(study, version) == []
    check_imaging_study(study, version)  # does not raise


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_counts_may_describe_series_the_resource_does_not_list(version: FhirVersion) -> None:
    """The definitions let numberOfSeries/numberOfInstances stand without the lists they count."""
    study = make_study(version)
    study["numberOfSeries"], study["numberOfInstances"] = 4, 40
    del study["series"]
    assert imaging_study_problems(study, version) == []


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_date_only_started_needs_no_zone(version: FhirVersion) -> None:
    for value in ("2024", "2024-03", "2024-03-01", "2024-03-01T09:30:00Z", "2024-03-01T09:30:00.123-05:00"):
        study = changed(version, lambda s: s.update(started=value))
        assert imaging_study_problems(study, version) == [], value


def test_version_may_be_given_as_text() -> None:
    assert imaging_study_problems(make_study(R6), "R6") == []  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# invariants


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_study_uid_identifier_missing(version: FhirVersion) -> None:
    study = changed(version, lambda s: s["identifier"].__setitem__(0, {"system": "urn:other", "value": "x"}))
    assert_problem(imaging_study_problems(study, version), "ImagingStudy.identifier", "study-uid",
                   "no identifier has system urn:dicom:uid")


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_study_uid_identifier_twice(version: FhirVersion) -> None:
    study = changed(version, lambda s: s["identifier"].append(
        {"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}))
    assert_problem(imaging_study_problems(study, version), "ImagingStudy.identifier", "study-uid",
                   "2 identifiers have system urn:dicom:uid")


def test_study_uid_identifier_only_required_with_series() -> None:
    study = changed(R6, lambda s: (s.pop("identifier"), s.pop("series"), s.pop("numberOfSeries"),
                                   s.pop("numberOfInstances")))
    assert imaging_study_problems(study, R6) == []


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_study_uid_value_must_be_urn_oid(version: FhirVersion) -> None:
    study = changed(version, lambda s: s["identifier"][0].update(value=STUDY_UID))
    assert_problem(imaging_study_problems(study, version), "ImagingStudy.identifier[0].value", "urn:oid:<uid>")


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_number_of_series_mismatch(version: FhirVersion) -> None:
    study = changed(version, lambda s: s.update(numberOfSeries=2))
    problems = imaging_study_problems(study, version)
    assert_problem(problems, "ImagingStudy.numberOfSeries", "series-count", "is 2 but the resource lists 1 series")
    assert len(problems) == 1, problems


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_number_of_instances_mismatch(version: FhirVersion) -> None:
    study = changed(version, lambda s: s.update(numberOfInstances=5))
    problems = imaging_study_problems(study, version)
    assert_problem(problems, "ImagingStudy.numberOfInstances", "instance-count", "is 5 but the series hold 2 instances")
    assert_problem(problems, "ImagingStudy.numberOfInstances", "instance-sum", "add up to 2")


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_series_number_of_instances_mismatch(version: FhirVersion) -> None:
    study = changed(version, lambda s: s["series"][0].update(numberOfInstances=3))
    problems = imaging_study_problems(study, version)
    assert_problem(problems, "ImagingStudy.series[0].numberOfInstances", "series-instance-count",
                   "is 3 but the series holds 2 instances")
    # the study total (2, matching the instances) no longer matches the series counts (3)
    assert_problem(problems, "ImagingStudy.numberOfInstances", "instance-sum", "is 2", "add up to 3")
    assert not [p for p in problems if "(invariant instance-count:" in p], problems


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_instance_sum_mismatch_when_instances_are_not_listed(version: FhirVersion) -> None:
    def change(study: dict[str, Any]) -> None:
        del study["series"][0]["instance"]
        study["numberOfInstances"] = 7

    problems = imaging_study_problems(changed(version, change), version)
    assert_problem(problems, "ImagingStudy.numberOfInstances", "instance-sum", "is 7", "add up to 2")


# ---------------------------------------------------------------------------------------------
# status, dateTime, id, resourceType, unsignedInt


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_status_outside_value_set(version: FhirVersion) -> None:
    study = changed(version, lambda s: s.update(status="final"))
    assert_problem(imaging_study_problems(study, version), "ImagingStudy.status", "'final'", "value set")


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_status_missing(version: FhirVersion) -> None:
    study = changed(version, lambda s: s.pop("status"))
    assert_problem(imaging_study_problems(study, version), "ImagingStudy.status", "missing")


def test_inactive_status_only_exists_in_r6() -> None:
    assert imaging_study_problems(changed(R6, lambda s: s.update(status="inactive")), R6) == []
    for version in (R5, R4):
        problems = imaging_study_problems(changed(version, lambda s: s.update(status="inactive")), version)
        assert_problem(problems, "ImagingStudy.status", "'inactive'", "only from R6 on")
        assert len(problems) == 1, problems  # not repeated by the R4 schema enum or the model


def test_status_value_sets() -> None:
    assert set(STATUS_CODES[R6]) - set(STATUS_CODES[R5]) == {"inactive"}
    assert STATUS_CODES[R4] == STATUS_CODES[R5]


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_started_time_without_zone(version: FhirVersion) -> None:
    study = changed(version, lambda s: s.update(started="2024-03-01T09:30:00"))
    problems = imaging_study_problems(study, version)
    assert_problem(problems, "ImagingStudy.started", "time but no time zone")
    assert len(problems) == 1, problems


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_series_started_time_without_zone(version: FhirVersion) -> None:
    study = changed(version, lambda s: s["series"][0].update(started="2024-03-01T09:30:00.5"))
    assert_problem(imaging_study_problems(study, version), "ImagingStudy.series[0].started", "time but no time zone")


@pytest.mark.parametrize("value", ["2024-13-01", "01.03.2024", "2024-03-01T25:00:00Z", "2024-03-01Z"])
def test_started_malformed(value: str) -> None:
    study = changed(R6, lambda s: s.update(started=value))
    assert_problem(imaging_study_problems(study, R6), "ImagingStudy.started", "not a valid FHIR dateTime")


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_bad_id(version: FhirVersion) -> None:
    study = changed(version, lambda s: s.update(id="not an id"))
    problems = imaging_study_problems(study, version)
    assert_problem(problems, "ImagingStudy.id", "not a valid FHIR id")
    assert len(problems) == 1, problems


def test_id_too_long() -> None:
    study = changed(R6, lambda s: s.update(id="1." * 40))
    assert_problem(imaging_study_problems(study, R6), "ImagingStudy.id", "not a valid FHIR id")


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_wrong_resource_type(version: FhirVersion) -> None:
    study = changed(version, lambda s: s.update(resourceType="Patient"))
    assert_problem(imaging_study_problems(study, version), "ImagingStudy.resourceType", "'Patient'")


def test_not_an_object() -> None:
    assert imaging_study_problems([], R6) == ["ImagingStudy: not a JSON object (got array)"]  # type: ignore[arg-type]


@pytest.mark.parametrize("version", ALL_VERSIONS)
@pytest.mark.parametrize("value", [-1, 1.5, "3", True, 2**31])
def test_counts_must_be_unsigned_ints(version: FhirVersion, value: Any) -> None:
    study = changed(version, lambda s: s["series"][0]["instance"][1].update(number=value))
    assert_problem(imaging_study_problems(study, version), "ImagingStudy.series[0].instance[1].number", "unsignedInt")


# ---------------------------------------------------------------------------------------------
# structure: unknown elements, wrong types, missing elements


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_unknown_element(version: FhirVersion) -> None:
    study = changed(version, lambda s: s["series"][0]["instance"][0].update(frames=3))
    problems = imaging_study_problems(study, version)
    assert_problem(problems, "ImagingStudy.series[0].instance[0].frames", "unknown element")
    assert len(problems) == 1, problems  # the R4/R5 model does not repeat it


def test_r6_has_no_procedure_or_laterality() -> None:
    """6.0.0-ballot3 dropped them; R5 has them."""

    def change(study: dict[str, Any]) -> None:
        study["procedure"] = [{"concept": {"text": "CT chest"}}]
        study["series"][0]["laterality"] = {"coding": [{"system": DCM, "code": "L"}]}

    assert imaging_study_problems(changed(R5, change), R5) == []
    problems = imaging_study_problems(changed(R6, change), R6)
    assert_problem(problems, "ImagingStudy.procedure", "unknown element")
    assert_problem(problems, "ImagingStudy.series[0].laterality", "unknown element")


def test_r6_sop_class_as_coding_is_wrong_type() -> None:
    study = changed(R6, lambda s: s["series"][0]["instance"][0].update(sopClass=_sop_class(R5)))
    assert_problem(imaging_study_problems(study, R6), "ImagingStudy.series[0].instance[0].sopClass",
                   "wrong type", "oid", "got object")


def test_r6_sop_class_must_be_urn_oid() -> None:
    study = changed(R6, lambda s: s["series"][0]["instance"][0].update(sopClass=CT_IMAGE_STORAGE))
    assert_problem(imaging_study_problems(study, R6), "ImagingStudy.series[0].instance[0].sopClass",
                   "not a valid FHIR oid")


def test_r6_sop_class_missing() -> None:
    study = changed(R6, lambda s: s["series"][0]["instance"][1].pop("sopClass"))
    assert_problem(imaging_study_problems(study, R6), "ImagingStudy.series[0].instance[1].sopClass", "missing")


@pytest.mark.parametrize("version", [R5, R4])
def test_sop_class_as_string_is_wrong_type_before_r6(version: FhirVersion) -> None:
    study = changed(version, lambda s: s["series"][0]["instance"][0].update(sopClass=_sop_class(R6)))
    assert_problem(imaging_study_problems(study, version), "ImagingStudy.series[0].instance[0].sopClass",
                   "wrong type", "Coding")


def test_r4_modality_as_codeable_concept() -> None:
    def change(study: dict[str, Any]) -> None:
        study["modality"] = [_modality(R5)]
        study["series"][0]["modality"] = _modality(R5)

    problems = imaging_study_problems(changed(R4, change), R4)
    assert_problem(problems, "ImagingStudy.modality[0].coding", "unknown element", "Coding")
    assert_problem(problems, "ImagingStudy.series[0].modality.coding", "unknown element", "Coding")


def test_r4_modality_as_string() -> None:
    """The R4 schema has no "type": "object" on Coding; the vendored one adds it."""
    study = changed(R4, lambda s: s["series"][0].update(modality="CT"))
    assert_problem(imaging_study_problems(study, R4), "ImagingStudy.series[0].modality", "wrong type", "Coding")


def test_r5_example_is_not_r6_or_r4() -> None:
    example = load_example("ImagingStudy-example-xr.json")
    r6 = imaging_study_problems(example, R6)
    assert_problem(r6, "ImagingStudy.series[0].instance[0].sopClass", "wrong type")
    assert_problem(r6, "ImagingStudy.procedure", "unknown element")
    r4 = imaging_study_problems(example, R4)
    assert_problem(r4, "ImagingStudy.reason", "unknown element")
    assert_problem(r4, "ImagingStudy.series[0].modality.coding", "unknown element")


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_missing_required_elements(version: FhirVersion) -> None:
    def change(study: dict[str, Any]) -> None:
        del study["subject"]
        del study["series"][0]["modality"]
        del study["series"][0]["uid"]
        del study["series"][0]["instance"][0]["uid"]

    problems = imaging_study_problems(changed(version, change), version)
    for path in ("ImagingStudy.subject", "ImagingStudy.series[0].modality", "ImagingStudy.series[0].uid",
                 "ImagingStudy.series[0].instance[0].uid"):
        assert_problem(problems, path, "missing")


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_wrong_shape_is_reported_not_raised(version: FhirVersion) -> None:
    def change(study: dict[str, Any]) -> None:
        study["identifier"] = {"system": "urn:dicom:uid"}
        study["series"][0]["instance"] = "none"

    problems = imaging_study_problems(changed(version, change), version)
    assert_problem(problems, "ImagingStudy.identifier", "wrong type", "array")
    assert_problem(problems, "ImagingStudy.series[0].instance", "wrong type", "array")


def test_many_problems_are_capped() -> None:
    study = make_study(R6, series=1, instances=200)
    for instance in study["series"][0]["instance"]:
        instance["sopClass"] = _sop_class(R5)
    problems = imaging_study_problems(study, R6)
    assert len(problems) == validation.MAX_PROBLEMS_PER_STAGE + 1
    assert problems[-1] == "ImagingStudy: ... and 150 more problems from the JSON Schema checks"


# ---------------------------------------------------------------------------------------------
# the exception


def test_check_raises_with_problems() -> None:
    study = changed(R5, lambda s: s.update(status="inactive", numberOfSeries=3))
    with pytest.raises(InvalidImagingStudy) as caught:
        check_imaging_study(study, R5)
    assert caught.value.problems == imaging_study_problems(study, R5)
    assert len(caught.value.problems) == 2
    assert isinstance(caught.value, ValueError)
    assert "FHIR R5" in str(caught.value) and "ImagingStudy.status" in str(caught.value)


# ---------------------------------------------------------------------------------------------
# the vendored schemas and the fast schema check


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_vendored_schema_is_draft6_and_self_contained(version: FhirVersion) -> None:
    schema = json.loads((SCHEMAS / f"ImagingStudy.{version}.schema.json").read_text(encoding="utf-8"))
    Draft6Validator.check_schema(schema)
    assert schema["$schema"] == "http://json-schema.org/draft-06/schema#"
    assert schema["$ref"] == "#/definitions/ImagingStudy"
    definitions = schema["definitions"]
    assert "ResourceList" not in definitions and "Patient" not in definitions
    refs = {ref for ref in _refs(schema)}
    assert refs <= {f"#/definitions/{name}" for name in definitions}
    assert definitions["ImagingStudy"]["properties"]["contained"]["items"]["required"] == ["resourceType"]
    # fastjsonschema names the function it generates for a $ref by the lower-cased reference,
    # so two definitions differing only in case would share one
    assert len({name.lower() for name in definitions}) == len(definitions)
    assert validation._fast_schema_check(version) is not None, "fastjsonschema did not compile it"


def test_vendored_r6_schema_matches_ballot3_element_set() -> None:
    schema = json.loads((SCHEMAS / "ImagingStudy.R6.schema.json").read_text(encoding="utf-8"))
    study = schema["definitions"]["ImagingStudy"]["properties"]
    series = schema["definitions"]["ImagingStudy_Series"]["properties"]
    assert "procedure" not in study and "laterality" not in series
    assert schema["definitions"]["ImagingStudy_Instance"]["properties"]["sopClass"] == {"$ref": "#/definitions/oid"}


def _refs(node: Any) -> set[str]:
    """Every $ref value inside ``node``."""
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        for value in node.values():
            found |= _refs(value)
        return found
    if isinstance(node, list):
        return set().union(*map(_refs, node)) if node else set()
    return set()


def _parity_cases() -> list[tuple[FhirVersion, dict[str, Any]]]:
    """Valid and invalid resources for comparing the fast check with jsonschema."""
    cases: list[tuple[FhirVersion, dict[str, Any]]] = []
    for version in ALL_VERSIONS:
        cases.append((version, make_study(version, series=2, instances=3)))
        for example in ("ImagingStudy-example.json", "ImagingStudy-example-xr.json"):
            cases.append((version, load_example(example)))
        edits: list[Callable[[dict[str, Any]], None]] = [
            lambda s: s.update(foo=1),
            lambda s: s.update(id="a b"),
            lambda s: s.update(status=3),
            lambda s: s.update(started="2024-03-01T09:30:00"),
            lambda s: s.update(numberOfSeries=-1.5),
            lambda s: s.update(numberOfSeries=True),
            lambda s: s.update(numberOfSeries="1"),
            lambda s: s.update(resourceType="Patient"),
            lambda s: s.pop("subject"),
            lambda s: s.update(subject="Patient/1"),
            lambda s: s.update(identifier={}),
            lambda s: s.update(text={"status": "generated"}),
            lambda s: s.update(contained=[{"resourceType": "Patient", "anything": [1]}]),
            lambda s: s.update(contained=[{"id": "x"}]),
            lambda s: s.update(extension=[{"url": "http://x", "valueString": "y",
                                           "extension": [{"url": "http://z", "valueInteger": 1}]}]),
            lambda s: s.update(extension=[{"url": "http://x", "valueInteger": "1"}]),
            lambda s: s["series"][0].update(modality="CT"),
            lambda s: s["series"][0].update(modality={"coding": [{"code": "CT"}]}),
            lambda s: s["series"][0].update(modality={"system": DCM, "code": "CT"}),
            lambda s: s["series"][0]["instance"][0].update(sopClass="urn:oid:1.2"),
            lambda s: s["series"][0]["instance"][0].update(sopClass={"code": "urn:oid:1.2"}),
            lambda s: s["series"][0]["instance"][0].update(uid=""),
            lambda s: s["series"][0]["instance"][0].update(title=""),
            lambda s: s["series"][0]["instance"].append(None),
            lambda s: s["series"][0].update(performer=[{"function": {"text": "x"}}]),
            lambda s: s["series"][0].update(performer=[{"actor": {"reference": "Practitioner/1"}}]),
            lambda s: s.update(status="final"),  # the R4 schema has an enum; R5/R6 a bare code
            lambda s: s.update(status=""),
            lambda s: s.update(resourceType=None),
            lambda s: s.update(numberOfSeries=1.0),  # draft-06: an integral float is an integer
            lambda s: s["series"][0]["instance"][0].update(number=None),
            lambda s: s.update(started=20240301),
            lambda s: s.update(started="2024-03-01T09:30:00Z"),
            lambda s: s.update(meta={"lastUpdated": "2024-03-01T09:30:00.123Z", "versionId": "1"}),
            lambda s: s.update(meta={"lastUpdated": "2024-03-01"}),  # an instant needs a time
            lambda s: s.update(meta={"profile": ["http://x y"]}),  # canonical: no whitespace
            lambda s: s.update(note=[{"text": "x", "authorString": "dr"}]),
            lambda s: s.update(note=[{"text": "x", "authorBoolean": True}]),
            lambda s: s.update(note=[{"text": ""}]),  # markdown: at least one character
            lambda s: s.update(_status={"extension": [{"url": "http://x", "valueCode": "y"}]}),
            lambda s: s.update(extension=[{"url": "http://x", "extension": [
                {"url": "http://y", "extension": [{"url": "http://z", "valueDecimal": 1.5}]}]}]),
            lambda s: s.update(extension=[{"url": "http://x", "extension": [
                {"url": "http://y", "extension": [{"url": "http://z", "valueUri": "a b"}]}]}]),
            lambda s: s.update(extension=[{"url": "http://x", "valueBoolean": "true"}]),
            lambda s: s["identifier"][0].update(period={"start": "2024", "end": "2024-13"}),
            lambda s: s["identifier"][0].update(use=["official"]),
            lambda s: s["series"][0]["instance"].append({"uid": "1.2", "sopClass": _sop_class(version)}),
            lambda s: s["series"][0].update(instance=[]),
            lambda s: s.update(series=[{}]),
            lambda s: s.update(series=[[]]),
        ]
        for edit in edits:
            study = make_study(version)
            edit(study)
            cases.append((version, study))
    return cases


def test_fast_schema_check_agrees_with_jsonschema() -> None:
    """The fastjsonschema check only decides whether jsonschema runs; it must never say "valid"
    where jsonschema would find something (nor the reverse, which would only cost time)."""
    cases = _parity_cases()
    verdicts = [validation._schema_validator(v).is_valid(s) for v, s in cases]
    assert sum(verdicts) >= 20 and len(verdicts) - sum(verdicts) >= 60  # valid and invalid ones
    for (version, study), expected in zip(cases, verdicts):
        fast = validation._fast_schema_check(version)
        assert fast is not None, "fastjsonschema did not compile the vendored schema"
        assert fast(study) == expected, (version, study)


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_fast_schema_check_ends_patterns_at_the_end(version: FhirVersion) -> None:
    """fastjsonschema reads a pattern's $ as \\Z, jsonschema (re.search) lets it match before a
    final newline. The fast check is the stricter one there, which only makes jsonschema run:
    the problems reported do not change."""
    study = changed(version, lambda s: s["series"][0]["instance"][0].update(uid=f"{STUDY_UID}.1.1\n"))
    assert validation._schema_validator(version).is_valid(study)
    assert validation._fast_schema_check(version)(study) is False  # type: ignore[misc]
    assert list(validation._schema_problems(study, version)) == []


def test_schema_problems_without_the_fast_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """If fastjsonschema cannot compile a schema, jsonschema alone finds the same problems."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise validation.fastjsonschema.JsonSchemaDefinitionException("refused for the test")

    study = changed(R6, lambda s: s["series"][0]["instance"][0].update(sopClass=CT_IMAGE_STORAGE))
    expected = imaging_study_problems(study, R6)
    with monkeypatch.context() as patch:
        patch.setattr(validation.fastjsonschema, "compile_to_code", refuse)
        assert validation._fast_schema_check.__wrapped__(R6) is None  # bypasses the cache
    monkeypatch.setattr(validation, "_fast_schema_check", lambda version: None)
    assert imaging_study_problems(study, R6) == expected
    assert imaging_study_problems(make_study(R6), R6) == []


# ---------------------------------------------------------------------------------------------
# size


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_10k_instance_study_is_valid(version: FhirVersion) -> None:
    study = make_study(version, series=10, instances=1000)
    imaging_study_problems(make_study(version), version)  # warm the caches
    start = time.perf_counter()
    problems = imaging_study_problems(study, version)
    elapsed = time.perf_counter() - start
    assert problems == []
    print(f"\n{version}: 10,000-instance ImagingStudy validated in {elapsed:.3f} s")


@pytest.mark.slow
@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_10k_instance_study_validates_within_a_second(version: FhirVersion) -> None:
    study = make_study(version, series=10, instances=1000)
    imaging_study_problems(study, version)  # warm the caches
    best = min(_timed(lambda: imaging_study_problems(study, version)) for _ in range(3))
    print(f"\n{version}: 10,000-instance ImagingStudy validated in {best:.3f} s (best of 3)")
    assert best < 1.0, f"{version}: {best:.3f} s"


def _timed(call: Callable[[], Any]) -> float:
    """Seconds ``call`` takes."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def test_problem_lists_do_not_share_state() -> None:
    study = make_study(R5)
    snapshot = copy.deepcopy(study)
    first = imaging_study_problems(study, R5)
    first.append("mutated")
    assert imaging_study_problems(study, R5) == []
    assert study == snapshot  # validation does not modify the resource
