"""Real Part-10 files for tests: a generated multi-series study and pydicom's bundled instances."""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pydicom.data
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from scp.header import HeaderError, read_header

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root, for generated test UIDs


@dataclass(frozen=True)
class GeneratedStudy:
    study_uid: str
    files: list[Path]
    series_uids: list[str]


def make_instance(path: Path, *, study_uid: str, series_uid: str, sop_uid: str,
                  sop_class: str = CT_IMAGE_STORAGE, modality: str = "CT", series_number: int = 1,
                  instance_number: int = 1, rows: int = 8, columns: int = 8,
                  extra: dict[str, object] | None = None) -> Path:
    """Write one small but complete image instance (Explicit VR Little Endian) to ``path``."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = "20240315"
    ds.StudyTime = "101530"
    ds.AccessionNumber = "ACC-42"
    ds.ReferringPhysicianName = "House^Gregory^^Dr."
    ds.StudyDescription = "Generated study"
    ds.StudyID = "1"
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.SeriesDescription = f"Series {series_number}"
    ds.InstanceNumber = instance_number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = bytes((instance_number + i) % 256 for i in range(rows * columns * 2))
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_study(folder: Path, *, series: Iterable[tuple[str, int]] = (("CT", 20), ("CT", 20), ("MR", 20)),
               study_uid: str | None = None, seed: str | None = None) -> GeneratedStudy:
    """A study of several series (modality, instance count); deterministic when ``seed`` is given."""
    study_uid = study_uid or generate_uid(UID_ROOT, [seed, "study"] if seed else None)
    files: list[Path] = []
    series_uids: list[str] = []
    for number, (modality, count) in enumerate(series, start=1):
        series_uid = generate_uid(UID_ROOT, [study_uid, str(number)] if seed else None)
        series_uids.append(series_uid)
        sop_class = MR_IMAGE_STORAGE if modality == "MR" else CT_IMAGE_STORAGE
        for i in range(1, count + 1):
            sop_uid = generate_uid(UID_ROOT, [series_uid, str(i)] if seed else None)
            files.append(make_instance(folder / f"s{number}" / f"{i:04d}.dcm", study_uid=study_uid,
                                       series_uid=series_uid, sop_uid=sop_uid, sop_class=sop_class,
                                       modality=modality, series_number=number, instance_number=i))
    return GeneratedStudy(study_uid, files, series_uids)


@functools.cache
def pydicom_storage_files() -> list[Path]:
    """pydicom's bundled test files that are storage instances.

    That is: Part-10 files with valid identifying UIDs that are complete and whose
    SOP Class/Instance UIDs DCMTK can read (dcmdump parses them to the end; the
    deliberately truncated or mis-encoded ones are left out).
    """
    folder = Path(os.path.dirname(pydicom.data.get_testdata_file("CT_small.dcm")))
    files = []
    for path in sorted(folder.glob("*.dcm")):
        try:
            read_header(path)
        except HeaderError:
            continue
        dump = subprocess.run(["dcmdump", "-q", "+P", "0008,0016", "+P", "0008,0018", str(path)],
                              capture_output=True, text=True)
        if dump.returncode != 0 or dump.stdout.count(" UI ") < 2:
            continue
        files.append(path)
    return list(files)


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part-10 file, without preamble and file meta."""
    with open(path, "rb") as handle:
        pydicom.filereader.read_preamble(handle, False)
        pydicom.filereader._read_file_meta_info(handle)
        return handle.read()
