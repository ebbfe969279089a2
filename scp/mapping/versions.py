"""The per-version layer: what R6, R5 and R4 write differently, and nothing else.

The mapping builds one version-neutral resource (R6 element names plus the
R5-only ``procedure`` and ``series.laterality``); each function here rewrites a
copy of it for one release. See the spec README, "Differences that matter".
"""

from __future__ import annotations

import copy
from typing import Any

from scp.fhir_version import FhirVersion
from scp.mapping.terminology import ACSN, NON_ACQUISITION_MODALITIES

RFC_3986 = "urn:ietf:rfc:3986"

# Element order of each release (its StructureDefinition), so output reads like the spec.
# Unknown keys keep their relative order after the known ones.
_RESOURCE_HEAD = ("resourceType", "id", "meta", "implicitRules", "language", "text", "contained",
                  "extension", "modifierExtension")
STUDY_ORDER: dict[FhirVersion, tuple[str, ...]] = {
    FhirVersion.R6: (*_RESOURCE_HEAD, "identifier", "status", "modality", "subject", "encounter",
                     "started", "basedOn", "partOf", "referrer", "endpoint", "location", "reason",
                     "note", "description", "numberOfSeries", "numberOfInstances", "series"),
    FhirVersion.R5: (*_RESOURCE_HEAD, "identifier", "status", "modality", "subject", "encounter",
                     "started", "basedOn", "partOf", "referrer", "endpoint", "numberOfSeries",
                     "numberOfInstances", "procedure", "location", "reason", "note", "description",
                     "series"),
    FhirVersion.R4: (*_RESOURCE_HEAD, "identifier", "status", "modality", "subject", "encounter",
                     "started", "basedOn", "referrer", "interpreter", "endpoint", "numberOfSeries",
                     "numberOfInstances", "procedureReference", "procedureCode", "location",
                     "reasonCode", "reasonReference", "note", "description", "series"),
}
SERIES_ORDER = ("id", "extension", "modifierExtension", "uid", "number", "modality", "description",
                "numberOfInstances", "endpoint", "bodySite", "laterality", "specimen", "started",
                "performer", "instance")


def for_version(neutral: dict[str, Any], version: FhirVersion) -> dict[str, Any]:
    """A copy of ``neutral`` written for ``version``."""
    resource = copy.deepcopy(neutral)
    if version is FhirVersion.R6:
        resource = _r6(resource)
    elif version is FhirVersion.R5:
        resource = _r5(resource)
    else:
        resource = _r4(resource)
    if "series" in resource:
        resource["series"] = [_ordered(s, SERIES_ORDER) for s in resource["series"]]
    return _ordered(resource, STUDY_ORDER[version])


def _r6(resource: dict[str, Any]) -> dict[str, Any]:
    """R6 (ballot3): sopClass is a plain ``urn:oid:`` string; no procedure, no series.laterality."""
    resource.pop("procedure", None)
    for series in resource.get("series", []):
        series.pop("laterality", None)
    return resource


def _r5(resource: dict[str, Any]) -> dict[str, Any]:
    """R5: sopClass is a Coding in the RFC 3986 system."""
    for instance in _instances(resource):
        instance["sopClass"] = _sop_class_coding(instance["sopClass"])
    return resource


def _r4(resource: dict[str, Any]) -> dict[str, Any]:
    """R4: Codings instead of CodeableConcepts, accession as an identifier, *Code elements."""
    for instance in _instances(resource):
        instance["sopClass"] = _sop_class_coding(instance["sopClass"])
    modalities = [_coding(m) for m in resource.pop("modality", [])]
    acquisition = [m for m in modalities if m and m.get("code") not in NON_ACQUISITION_MODALITIES]
    based_on = resource.pop("basedOn", [])
    orders = [ref for ref in based_on if ref.get("identifier", {}).get("type") != ACSN]
    accessions = [ref["identifier"] for ref in based_on if ref.get("identifier", {}).get("type") == ACSN]
    procedures = [p["concept"] for p in resource.pop("procedure", []) if "concept" in p]
    reasons = [r["concept"] for r in resource.pop("reason", []) if "concept" in r]
    resource["identifier"] = resource["identifier"] + accessions
    optional = {"modality": acquisition, "basedOn": orders, "procedureCode": procedures, "reasonCode": reasons}
    resource.update({key: value for key, value in optional.items() if value})
    if "series" in resource:
        resource["series"] = [_r4_series(s) for s in resource["series"]]
    return resource


def _r4_series(series: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in series.items():
        if key in ("modality", "laterality"):
            result[key] = _coding(value) or {"extension": value.get("extension", [])}
        elif key == "bodySite":
            result[key] = _coding(value.get("concept", {}))
        else:
            result[key] = value
    return result


def _coding(concept: dict[str, Any]) -> dict[str, Any] | None:
    """The first Coding of a CodeableConcept (R4 types these elements as Coding).

    A concept with text only becomes a Coding with that text as display.
    """
    codings = concept.get("coding") or []
    if codings:
        return dict(codings[0])
    if concept.get("text"):
        return {"display": concept["text"]}
    return None


def _sop_class_coding(urn: str) -> dict[str, Any]:
    return {"system": RFC_3986, "code": urn}


def _ordered(element: dict[str, Any], order: tuple[str, ...]) -> dict[str, Any]:
    """``element`` with its keys in ``order`` (the release's element order)."""
    rank = {key: index for index, key in enumerate(order)}
    return dict(sorted(element.items(), key=lambda item: rank.get(item[0], len(order))))


def _instances(resource: dict[str, Any]) -> list[dict[str, Any]]:
    return [i for s in resource.get("series", []) for i in s.get("instance", [])]
