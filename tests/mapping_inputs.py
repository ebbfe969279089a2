"""Inputs for the mapping tests: Part-10 files written with pydicom and read back with read_header.

Every mapping test goes through the same path as a received instance: a dataset is encoded as a
Part-10 file (in its Specific Character Set), :func:`scp.header.read_header` reads it back, and
:func:`scp.mapping.imaging_study.build_imaging_study` maps the headers. Nothing is hand-built as
an InstanceHeader, so a header-reading fault shows up here too.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from scp.fhir_version import FhirVersion
from scp.header import read_header
from scp.mapping.imaging_study import Mapped, MappingOptions, build_imaging_study
from scp.records import InstanceHeader
from scp.validation import imaging_study_problems

R4, R5, R6 = FhirVersion.R4, FhirVersion.R5, FhirVersion.R6
ALL_VERSIONS = (R6, R5, R4)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
GRAYSCALE_PR = "1.2.840.10008.5.1.4.1.1.11.1"

UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root, for test UIDs
STUDY_UID = UID_ROOT + "1000"
SERIES_UID = UID_ROOT + "1000.1"
SOP_UID = UID_ROOT + "1000.1.1"

# The zone every test passes as MappingOptions.local_zone unless it tests zones: fixed, so no
# output depends on the machine the tests run on.
FIXED_ZONE = dt.timezone(dt.timedelta(hours=1), "UTC+01:00")

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"


class Raw:
    """A value written as these exact bytes, bypassing pydicom's value checks (invalid input)."""

    def __init__(self, data: bytes | str) -> None:
        self.data = data.encode("ascii") if isinstance(data, str) else data
        if len(self.data) % 2:
            self.data += b" "


_counter = itertools.count(1)


def write_instance(folder: Path, attributes: Mapping[str, Any] | None = None, *,
                   study_uid: str = STUDY_UID, series_uid: str = SERIES_UID,
                   sop_uid: str | None = None, sop_class: str = CT_IMAGE_STORAGE,
                   charset: str | list[str] | None = None, modality: str | None = "CT",
                   name: str | None = None) -> Path:
    """Write a Part-10 file holding the identity UIDs, ``modality`` and ``attributes``.

    ``attributes`` maps DICOM keywords to values as pydicom takes them; a list of dicts is a
    sequence (items may nest), a :class:`Raw` is written byte for byte. ``charset`` is the
    Specific Character Set; pydicom encodes every text value with it.
    """
    number = next(_counter)
    sop_uid = sop_uid or f"{series_uid}.{number}"
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    if modality is not None:
        ds.Modality = modality
    _fill(ds, attributes or {})
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path = folder / (name or f"instance-{number:05d}.dcm")
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _fill(ds: Dataset, attributes: Mapping[str, Any]) -> None:
    for keyword, value in attributes.items():
        if isinstance(value, Raw):
            tag = tag_for_keyword(keyword)
            ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(value.data), value.data, 0, False, True)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            items = []
            for fields in value:
                item = Dataset()
                _fill(item, fields)
                items.append(item)
            setattr(ds, keyword, DicomSequence(items))
        else:
            setattr(ds, keyword, value)


def header(folder: Path, attributes: Mapping[str, Any] | None = None, **kwargs: Any) -> InstanceHeader:
    """:func:`write_instance` then :func:`scp.header.read_header` of the file written."""
    return read_header(write_instance(folder, attributes, **kwargs))


def options(version: FhirVersion = R6, **kwargs: Any) -> MappingOptions:
    """MappingOptions pinned to :data:`FIXED_ZONE` unless a zone is given."""
    kwargs.setdefault("local_zone", FIXED_ZONE)
    return MappingOptions(version=version, **kwargs)


def problems(resource: dict[str, Any], version: FhirVersion) -> list[str]:
    return imaging_study_problems(resource, version)


def assert_valid(resource: dict[str, Any], version: FhirVersion) -> None:
    """JSON Schema + fhir.resources model + invariants + status set of ``version``."""
    found = imaging_study_problems(resource, version)
    assert found == [], f"invalid {version} output:\n" + "\n".join(found)


def mapped(headers: InstanceHeader | Sequence[InstanceHeader], version: FhirVersion = R6,
           **kwargs: Any) -> Mapped:
    """Map ``headers`` for ``version`` and check the result is valid for it."""
    if isinstance(headers, InstanceHeader):
        headers = [headers]
    result = build_imaging_study(list(headers), options(version, **kwargs))
    assert_valid(result.resource, version)
    return result


def study(folder: Path, attributes: Mapping[str, Any] | None = None, version: FhirVersion = R6,
          *, write: Mapping[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """One instance with ``attributes`` mapped for ``version`` (valid, and without warnings)."""
    result = mapped(header(folder, attributes, **(write or {})), version, **kwargs)
    assert result.warnings == [], result.warnings
    return result.resource
