"""Validation of ImagingStudy resources for the FHIR release they are written for.

Why this exists: the SCP publishes what it builds, and a consumer that rejects a resource
(or, worse, silently misreads one) is hard to debug from the far end. So every ImagingStudy
is checked before it leaves, with problems phrased by element path so that a log line
points straight at the faulty element.

Stages, in order (a later stage only adds problems at element paths no earlier stage
already reported, so the same fault is not told three times):

1. Dedicated checks written here: ``resourceType``, ``id``, required primitives, ``status``
   in the release's value set, dateTime syntax and time zones, unsignedInt values, and the
   ImagingStudy invariants (see ``INVARIANTS``).
2. The release's official JSON Schema (draft-06), vendored as
   ``scp/data/schemas/ImagingStudy.<release>.schema.json`` by ``scripts/vendor-schemas``.
3. For R5 and R4 only: the fhir.resources pydantic model (R5: ``fhir.resources.imagingstudy``;
   R4: ``fhir.resources.R4B.imagingstudy``, whose ImagingStudy has exactly R4's elements).
   There is no R6 model.

Speed: a large study has 10,000+ instances and jsonschema walks them at ~50 µs each. The
schema is therefore first run through a yes/no validator that ``fastjsonschema`` compiles from
it into Python code (once per release, on first use); only when that says "invalid" does
jsonschema's ``Draft6Validator`` run, and it alone words the problems. The two read the
vendored schemas alike (``tests/test_validation.py`` compares them) except in two corners:
fastjsonschema reads a pattern's ``$`` as ``\\Z``, so a string ending in a newline can fail
it and pass jsonschema (which then runs and finds nothing: slower, same output); and it takes
a Python tuple for a JSON array where jsonschema wants a list (resources here are plain JSON
values: the mapper builds lists, and orjson would write a tuple as an array anyway).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import marshal
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from types import CodeType
from typing import Any

import fastjsonschema
import orjson
from jsonschema import Draft6Validator
from jsonschema.exceptions import ValidationError as SchemaValidationError

from scp.fhir_version import FhirVersion

__all__ = [
    "INVARIANTS",
    "InvalidImagingStudy",
    "STATUS_CODES",
    "check_imaging_study",
    "imaging_study_problems",
]

log = logging.getLogger("scp.validation")

# (element path, what is wrong with it); rendered as "path: text".
Problem = tuple[str, str]

ROOT = "ImagingStudy"
DICOM_UID_SYSTEM = "urn:dicom:uid"
MAX_PROBLEMS_PER_STAGE = 50  # a 10k-instance study with one systematic fault stays readable

_COMMON_STATUS = ("registered", "available", "cancelled", "entered-in-error", "unknown")
STATUS_CODES: dict[FhirVersion, tuple[str, ...]] = {
    FhirVersion.R4: _COMMON_STATUS,
    FhirVersion.R5: _COMMON_STATUS,
    FhirVersion.R6: (*_COMMON_STATUS, "inactive"),
}

# The ImagingStudy invariants the project honours (spec README, "Invariants to honour").
# They are named by what they say, not by an ist-N key: neither the seed page (6.0.0-ballot3,
# whose constraint cells are cut off) nor the R6 definition (which has no constraints) gives
# the ist-N numbering, so a number here could not be checked against the project's sources.
INVARIANTS: dict[str, str] = {
    "study-uid": "if series are present, identifier holds exactly one Study Instance UID "
    f"(system {DICOM_UID_SYSTEM})",
    "series-count": "numberOfSeries equals the number of series",
    "instance-count": "numberOfInstances equals the number of series.instance",
    "series-instance-count": "series.numberOfInstances equals the number of its instances",
    "instance-sum": "numberOfInstances equals the sum of series.numberOfInstances",
}

_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_URN_OID = re.compile(r"urn:oid:[0-2](\.(0|[1-9][0-9]*))+")
# FHIR dateTime (the R4 regex, which alone enforces "a time needs a zone"; the R5/R6 schema
# regex makes the zone optional and relies on prose for the rule). Fractions as in R5.
_DATE_TIME = re.compile(
    r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
    r"(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])"
    r"(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]{1,9})?"
    r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00)))?)?)?"
)
_TIME_ZONE_SUFFIX = re.compile(r"(Z|[+-]\d\d:\d\d)$")
_UNSIGNED_INT_MAX = 2**31 - 1

# Backbone definitions of the schemas, shown as the element paths they stand for.
_BACKBONE_NAMES = {
    "ImagingStudy_Series": "ImagingStudy.series",
    "ImagingStudy_Instance": "ImagingStudy.series.instance",
    "ImagingStudy_Performer": "ImagingStudy.series.performer",
}


class InvalidImagingStudy(ValueError):
    """An ImagingStudy that must not be published; ``problems`` says why, one per entry."""

    def __init__(self, problems: Sequence[str], version: FhirVersion | str | None = None) -> None:
        self.problems: list[str] = list(problems)
        self.version = FhirVersion(version) if version is not None else None
        release = f" for FHIR {self.version}" if self.version else ""
        shown = "; ".join(self.problems[:3])
        more = f" (and {len(self.problems) - 3} more)" if len(self.problems) > 3 else ""
        super().__init__(f"invalid ImagingStudy{release}: {shown}{more}")


def check_imaging_study(resource: dict[str, Any], version: FhirVersion) -> None:
    """Raise ``InvalidImagingStudy`` unless ``resource`` is a valid ImagingStudy for ``version``."""
    problems = imaging_study_problems(resource, version)
    if problems:
        raise InvalidImagingStudy(problems, version)


def prepare(version: FhirVersion) -> None:
    """Compile the schema check and import the model of ``version`` now (about a second), so that the
    first publication after start does not pay for it. Safe to call from any thread, more than once."""
    _fast_schema_check(version)
    if version is not FhirVersion.R6:
        _model_class(version)


def imaging_study_problems(resource: dict[str, Any], version: FhirVersion) -> list[str]:
    """All problems of ``resource`` as an ImagingStudy of ``version``; empty when it is valid.

    Each entry is ``"<element path>: <what is wrong>"``, e.g.
    ``"ImagingStudy.series[0].instance[3].sopClass: wrong type: ..."``.
    """
    version = FhirVersion(version)
    if not isinstance(resource, dict):
        return [f"{ROOT}: not a JSON object (got {_json_type(resource)})"]

    stages: list[list[Problem]] = [
        _capped(_dedicated_problems(resource, version), "dedicated"),
        _capped(_schema_problems(resource, version), "JSON Schema"),
        _capped(_model_problems(resource, version), "fhir.resources model"),
    ]
    reported: set[str] = set()
    out: dict[str, None] = {}  # ordered, de-duplicated
    for stage in stages:
        fresh = [(path, text) for path, text in stage if path not in reported]
        reported.update(path for path, _ in fresh)
        out.update((f"{path}: {text}", None) for path, text in fresh)
    return list(out)


# ---------------------------------------------------------------------------------------------
# stage 1: dedicated checks


def _dedicated_problems(resource: dict[str, Any], version: FhirVersion) -> Iterator[Problem]:
    """The checks JSON Schema cannot express (or words badly), cheapest first."""
    yield from _check_resource_type(resource)
    yield from _check_id(resource)
    yield from _check_status(resource, version)
    yield from _check_date_times(resource)
    yield from _check_series_and_instances(resource, version)
    yield from _check_dicom_uid_identifiers(resource)
    yield from _check_invariants(resource)


def _check_resource_type(resource: dict[str, Any]) -> Iterator[Problem]:
    """A consumer dispatches on resourceType; anything else is not an ImagingStudy at all."""
    value = resource.get("resourceType")
    if value != ROOT:
        yield f"{ROOT}.resourceType", f"must be {ROOT!r}, got {value!r}"


def _check_id(resource: dict[str, Any]) -> Iterator[Problem]:
    """The id becomes part of the resource URL, so it must be a FHIR id (1-64 of [A-Za-z0-9-.])."""
    if "id" in resource:
        value = resource["id"]
        if not (isinstance(value, str) and _FHIR_ID.fullmatch(value)):
            yield f"{ROOT}.id", f"{value!r} is not a valid FHIR id (1-64 characters of A-Z a-z 0-9 - .)"


def _check_status(resource: dict[str, Any], version: FhirVersion) -> Iterator[Problem]:
    """status is 1..1 with a required binding; R5/R6 schemas leave it a bare code, so check here."""
    path = f"{ROOT}.status"
    if "status" not in resource:
        yield path, "missing (required, cardinality 1..1)"
        return
    value = resource["status"]
    allowed = STATUS_CODES[version]
    if value not in allowed:
        hint = " ('inactive' exists only from R6 on)" if value == "inactive" else ""
        yield path, (
            f"{value!r} is not in the FHIR {version} ImagingStudy status value set "
            f"({' | '.join(allowed)}){hint}"
        )


def _check_date_times(resource: dict[str, Any]) -> Iterator[Problem]:
    """FHIR: a dateTime with a time SHALL carry a zone; local times are ambiguous across sites."""
    yield from _check_date_time(f"{ROOT}.started", resource, "started")
    for index, series in _indexed_dicts(resource.get("series")):
        yield from _check_date_time(f"{ROOT}.series[{index}].started", series, "started")
    for index, note in _indexed_dicts(resource.get("note")):
        yield from _check_date_time(f"{ROOT}.note[{index}].time", note, "time")


def _check_date_time(path: str, holder: dict[str, Any], key: str) -> Iterator[Problem]:
    """One dateTime element, if present."""
    if key not in holder:
        return
    value = holder[key]
    if not isinstance(value, str):
        yield path, f"must be a dateTime string, got {_json_type(value)}"
    elif not _DATE_TIME.fullmatch(value):
        if "T" in value and not _TIME_ZONE_SUFFIX.search(value):
            yield path, f"{value!r} has a time but no time zone (FHIR requires one, e.g. +01:00 or Z)"
        else:
            yield path, f"{value!r} is not a valid FHIR dateTime"


def _check_series_and_instances(resource: dict[str, Any], version: FhirVersion) -> Iterator[Problem]:
    """unsignedInt values and 1..1 primitives, which the schemas cannot require.

    The schemas type unsignedInt as any JSON number (their pattern applies to strings only),
    and leave 1..1 primitives (uid, R6 sopClass) optional because ``_uid`` could stand in.
    This is the one loop over all instances, so it is kept tight.
    """
    yield from _check_unsigned_int(f"{ROOT}.numberOfSeries", resource, "numberOfSeries")
    yield from _check_unsigned_int(f"{ROOT}.numberOfInstances", resource, "numberOfInstances")
    sop_class_required = version is FhirVersion.R6
    for s, series in _indexed_dicts(resource.get("series")):
        prefix = f"{ROOT}.series[{s}]"
        if "uid" not in series:
            yield f"{prefix}.uid", "missing (required, cardinality 1..1)"
        yield from _check_unsigned_int(f"{prefix}.number", series, "number")
        yield from _check_unsigned_int(f"{prefix}.numberOfInstances", series, "numberOfInstances")
        for i, instance in _indexed_dicts(series.get("instance")):
            if "uid" not in instance:
                yield f"{prefix}.instance[{i}].uid", "missing (required, cardinality 1..1)"
            if sop_class_required and "sopClass" not in instance:
                yield f"{prefix}.instance[{i}].sopClass", "missing (required, cardinality 1..1)"
            if "number" in instance and _unsigned_int(instance["number"]) is None:
                yield f"{prefix}.instance[{i}].number", _not_unsigned_int(instance["number"])


def _check_unsigned_int(path: str, holder: dict[str, Any], key: str) -> Iterator[Problem]:
    """One unsignedInt element, if present: a JSON integer in 0..2^31-1."""
    if key in holder and _unsigned_int(holder[key]) is None:
        yield path, _not_unsigned_int(holder[key])


def _not_unsigned_int(value: Any) -> str:
    """What is wrong with a value that should be an unsignedInt."""
    return f"must be an unsignedInt (JSON integer 0..{_UNSIGNED_INT_MAX}), got {value!r}"


def _check_dicom_uid_identifiers(resource: dict[str, Any]) -> Iterator[Problem]:
    """A urn:dicom:uid identifier carries the UID as ``urn:oid:<uid>``, as FHIR prescribes."""
    for index, identifier in _indexed_dicts(resource.get("identifier")):
        if identifier.get("system") == DICOM_UID_SYSTEM:
            value = identifier.get("value")
            if not (isinstance(value, str) and _URN_OID.fullmatch(value)):
                yield (
                    f"{ROOT}.identifier[{index}].value",
                    f"{value!r} is not a DICOM UID of the form urn:oid:<uid> (system {DICOM_UID_SYSTEM})",
                )


def _check_invariants(resource: dict[str, Any]) -> Iterator[Problem]:
    """The ImagingStudy invariants of ``INVARIANTS``.

    A count is compared only where the list it counts is present and non-empty, as in HL7's
    FHIRPath for these rules (``numberOfInstances.empty() or instance.empty() or ...``): the
    definitions allow counts for series/instances that the resource does not list.
    """
    series_list = resource.get("series")
    if not isinstance(series_list, list) or not series_list:
        return
    yield from _invariant_study_uid(resource)
    number_of_series = _unsigned_int(resource.get("numberOfSeries"))
    if number_of_series is not None and number_of_series != len(series_list):
        yield _invariant(
            f"{ROOT}.numberOfSeries", "series-count",
            f"is {number_of_series} but the resource lists {_count(len(series_list), 'series', 'series')}",
        )
    series = [entry for _, entry in _indexed_dicts(series_list)]
    yield from _invariant_series_instance_counts(series_list)
    number_of_instances = _unsigned_int(resource.get("numberOfInstances"))
    if number_of_instances is None:
        return
    instance_lists = [entry.get("instance") for entry in series]
    if all(isinstance(lst, list) and lst for lst in instance_lists) and len(series) == len(series_list):
        total = sum(len(lst) for lst in instance_lists)
        if total != number_of_instances:
            yield _invariant(
                f"{ROOT}.numberOfInstances", "instance-count",
                f"is {number_of_instances} but the series hold {_count(total, 'instance')}",
            )
    counts = [_unsigned_int(entry.get("numberOfInstances")) for entry in series]
    if all(count is not None for count in counts) and len(series) == len(series_list):
        total = sum(counts)  # type: ignore[arg-type]
        if total != number_of_instances:
            yield _invariant(
                f"{ROOT}.numberOfInstances", "instance-sum",
                f"is {number_of_instances} but series.numberOfInstances add up to {total}",
            )


def _invariant_study_uid(resource: dict[str, Any]) -> Iterator[Problem]:
    """Exactly one Study Instance UID identifier once series are present."""
    if not isinstance(resource.get("identifier", []), list):
        return  # a non-array identifier is the schema's to report, in its own words
    uids = [entry for _, entry in _indexed_dicts(resource.get("identifier"))
            if entry.get("system") == DICOM_UID_SYSTEM]
    if len(uids) != 1:
        found = "no identifier has" if not uids else f"{len(uids)} identifiers have"
        yield _invariant(f"{ROOT}.identifier", "study-uid", f"{found} system {DICOM_UID_SYSTEM}")


def _invariant_series_instance_counts(series_list: list[Any]) -> Iterator[Problem]:
    """Each series' numberOfInstances against the instances it lists."""
    for index, series in _indexed_dicts(series_list):
        count = _unsigned_int(series.get("numberOfInstances"))
        instances = series.get("instance")
        if count is not None and isinstance(instances, list) and instances and count != len(instances):
            yield _invariant(
                f"{ROOT}.series[{index}].numberOfInstances", "series-instance-count",
                f"is {count} but the series holds {_count(len(instances), 'instance')}",
            )


def _invariant(path: str, key: str, detail: str) -> Problem:
    """A broken invariant, worded with its name and what it demands."""
    return path, f"{detail} (invariant {key}: {INVARIANTS[key]})"


# ---------------------------------------------------------------------------------------------
# stage 2: JSON Schema


def _schema_problems(resource: dict[str, Any], version: FhirVersion) -> Iterator[Problem]:
    """Problems jsonschema finds; skipped when the compiled fast check says the schema holds."""
    fast = _fast_schema_check(version)
    if fast is not None and fast(resource):
        return
    validator = _schema_validator(version)
    for error in validator.iter_errors(resource):
        yield from _describe_schema_error(error, validator.schema, version)


def _describe_schema_error(
    error: SchemaValidationError, root: dict[str, Any], version: FhirVersion
) -> Iterator[Problem]:
    """Turn a jsonschema error into element-path problems that name the FHIR type involved."""
    path = _element_path(error.absolute_path)
    keyword = error.validator
    fhir_type = _fhir_type_of(root, error.relative_schema_path)
    if keyword == "additionalProperties" and isinstance(error.instance, dict):
        known = error.schema.get("properties", {})
        owner = fhir_type or "this element"
        for name in error.instance:
            if name not in known:
                yield f"{path}.{name}", f"unknown element ({owner} has no {name!r} in FHIR {version})"
    elif keyword == "required" and isinstance(error.instance, dict):
        for name in error.validator_value:
            if name not in error.instance:
                yield f"{path}.{name}", "missing (required element)"
    elif keyword == "type":
        expected = " or ".join(_as_list(error.validator_value))
        what = f"FHIR {fhir_type} (JSON {expected})" if fhir_type else f"JSON {expected}"
        yield path, f"wrong type: expected {what}, got {_json_type(error.instance)}"
    elif keyword == "pattern":
        what = f"FHIR {fhir_type}" if fhir_type else f"value (pattern {error.validator_value!r})"
        yield path, f"{error.instance!r} is not a valid {what}"
    elif keyword in ("enum", "const"):
        allowed = " | ".join(map(str, _as_list(error.validator_value)))
        yield path, f"{error.instance!r} is not allowed here (expected {allowed})"
    else:
        yield path, error.message


def _fhir_type_of(root: dict[str, Any], schema_path: Iterable[Any]) -> str | None:
    """The definition the failing keyword sits in, if it sits directly in one (e.g. ``oid``).

    jsonschema's schema path steps through ``$ref`` silently, so walk it through the schema,
    following each ``$ref`` (draft-06 ignores a ``$ref``'s siblings, so that is exact).
    """
    keys = list(schema_path)
    node: Any = root
    for key in keys[:-1]:
        node, _ = _follow_refs(root, node)
        node = node[key]
    _, name = _follow_refs(root, node)
    if name is None:
        return None
    return _BACKBONE_NAMES.get(name, name)


def _follow_refs(root: dict[str, Any], node: Any) -> tuple[Any, str | None]:
    """The schema ``node`` stands for after its ``$ref``s, and the last definition name followed."""
    name = None
    while isinstance(node, dict) and "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        node = root["definitions"][name]
    return node, name


@functools.cache
def _schema(version: FhirVersion) -> dict[str, Any]:
    """The vendored schema of ``version``, from the package data (never from ../shared)."""
    path = resources.files("scp") / "data" / "schemas" / f"ImagingStudy.{version.value}.schema.json"
    schema = orjson.loads(path.read_bytes())
    declared = schema.get("$schema", "")
    if "draft-06" not in declared:  # both validators pick their rules from this
        raise RuntimeError(f"vendored {version} schema declares {declared!r}, expected draft-06")
    return schema


@functools.cache
def _schema_validator(version: FhirVersion) -> Draft6Validator:
    """The jsonschema validator of ``version``; the FHIR schemas declare draft-06."""
    return Draft6Validator(_schema(version))  # no format checker: FHIR schemas rely on patterns


@functools.cache
def _fast_schema_check(version: FhirVersion) -> Callable[[Any], bool] | None:
    """Whether a resource satisfies ``version``'s schema, by fastjsonschema; compiled on first use.

    The generated code's bytecode comes from a cache (:func:`_validator_code`). Options:
    ``use_default=False`` (never write schema defaults into the resource), ``use_formats=False``
    (like the Draft6Validator, which has no format checker). ``detailed_exceptions`` stays on:
    fastjsonschema 2.22 cannot compile ``const`` without it, and it costs only on failure.
    None if the schema does not compile; jsonschema then does all the work, only slower.
    """
    try:
        namespace: dict[str, Any] = {}
        exec(_validator_code(version), namespace)  # noqa: S102 (code generated from our vendored schema)
        validate = namespace["validate"]
    except Exception:  # a bad pattern (re.error), a definition or a generator fault: not fatal
        log.warning("FHIR %s schema: no fast path, jsonschema alone validates", version, exc_info=True)
        return None

    def check(resource: Any) -> bool:
        try:
            validate(resource)
        except fastjsonschema.JsonSchemaValueException:
            return False
        return True

    return check


_COMPILE_CHILD = (
    "import marshal, os, sys\n"
    "code = compile(sys.stdin.buffer.read().decode(), '<imagingstudy-validator>', 'exec')\n"
    "target = sys.argv[1]; temp = f'{target}.{os.getpid()}.tmp'\n"
    "open(temp, 'wb').write(marshal.dumps(code)); os.replace(temp, target)\n"
)


def _validator_code(version: FhirVersion) -> CodeType:
    """The bytecode of fastjsonschema's generated validator for ``version``, from a cache when possible.

    fastjsonschema generates about 1.7 MB of Python for the ImagingStudy schema; compiling that keeps
    about 90 MiB of a process's peak memory for good, while loading the compiled bytecode costs about
    3 MiB. So the bytecode is compiled once, in a short-lived child process, into the user's cache
    directory (keyed by the generated source and the Python version), and loaded from there; when the
    cache cannot be written the code is compiled here, as before.
    """
    source = fastjsonschema.compile_to_code(_schema(version), use_default=False, use_formats=False)
    key = hashlib.sha256(f"{sys.version}\0{source}".encode()).hexdigest()[:20]
    cache = _cache_dir() / f"ImagingStudy.{version.value}.{key}.marshal"
    for attempt in range(2):
        try:
            return marshal.loads(cache.read_bytes())  # type: ignore[no-any-return]
        except (OSError, ValueError, EOFError, TypeError):
            if attempt == 0 and not _compile_in_child(source, cache):
                break
    return compile(source, "<imagingstudy-validator>", "exec")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imagingstudy-scp"


def _compile_in_child(source: str, target: Path) -> bool:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", _COMPILE_CHILD, str(target)], input=source.encode(),
                       check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# stage 3: fhir.resources models


def _model_problems(resource: dict[str, Any], version: FhirVersion) -> Iterator[Problem]:
    """What the release's fhir.resources model rejects (R5, R4 via R4B; nothing for R6)."""
    model = _model_class(version)
    if model is None:
        return
    label = "fhir.resources R4B model" if version is FhirVersion.R4 else "fhir.resources R5 model"
    try:
        model.model_validate(resource)
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        errors = getattr(exc, "errors", None)
        if not callable(errors):
            yield ROOT, f"{exc} ({label})"
            return
        for error in errors():
            yield _element_path(error.get("loc", ())), f"{error.get('msg', 'invalid')} ({label})"


@functools.cache
def _model_class(version: FhirVersion) -> Any:
    """The pydantic ImagingStudy model for ``version``, imported on first use (it is slow to import)."""
    if version is FhirVersion.R5:
        from fhir.resources.imagingstudy import ImagingStudy  # default package is R5

        return ImagingStudy
    if version is FhirVersion.R4:
        from fhir.resources.R4B.imagingstudy import ImagingStudy  # R4B's elements == R4's

        return ImagingStudy
    return None


# ---------------------------------------------------------------------------------------------
# helpers


def _indexed_dicts(value: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, entry) for the object entries of a JSON array; anything else yields nothing.

    Shapes that are wrong (a non-list, a non-object entry) are the schema's to report.
    """
    if isinstance(value, list):
        for index, entry in enumerate(value):
            if isinstance(entry, dict):
                yield index, entry


def _unsigned_int(value: Any) -> int | None:
    """``value`` if it is a valid FHIR unsignedInt, else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _UNSIGNED_INT_MAX:
        return value
    return None


def _count(number: int, singular: str, plural: str | None = None) -> str:
    """``3 instances`` / ``1 instance``, for messages."""
    return f"{number} {singular if number == 1 else (plural or singular + 's')}"


def _element_path(parts: Iterable[Any]) -> str:
    """``("series", 0, "uid")`` -> ``"ImagingStudy.series[0].uid"``."""
    out = [ROOT]
    for part in parts:
        out.append(f"[{part}]" if isinstance(part, int) else f".{part}")
    return "".join(out)


def _json_type(value: Any) -> str:
    """The JSON name of a Python value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _as_list(value: Any) -> list[Any]:
    """A keyword argument that may be a single value or a list, as a list."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _capped(problems: Iterable[Problem], stage: str) -> list[Problem]:
    """At most ``MAX_PROBLEMS_PER_STAGE`` problems of a stage, plus a line saying how many were cut."""
    kept: list[Problem] = []
    dropped = 0
    for problem in problems:
        if len(kept) < MAX_PROBLEMS_PER_STAGE:
            kept.append(problem)
        else:
            dropped += 1
    if dropped:
        kept.append((ROOT, f"... and {dropped} more problems from the {stage} checks"))
    return kept
