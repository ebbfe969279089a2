"""Deterministic benchmark data sets, cached under ``.bench/data/<set>/``.

Every set is a tree ``files/<study>/<series>/<instance>.dcm`` of Part-10 files in Explicit VR Little Endian
(what ``storescu -xe`` proposes first, so nothing is converted on the way) plus ``manifest.json``, which records
the set's parameters, and for every instance its UIDs, file size and the SHA-256 of the dataset bytes after the
file meta (what a receiver must store unchanged). UIDs and pixel values derive from the set name only, so a set
generated twice is byte-for-byte the same; a set whose manifest is missing, stale or whose files changed size is
generated again.

The datasets are written so that DCMTK's ``storescu`` sends them byte-for-byte as they are in the file (no group
lengths, no sequences, even-length values): the dataset bytes a receiver stores can then be compared with the
source.

Sets (full / ``--quick``):

- ``ct``    1 study, 4 series, 512x512 16-bit CT: 500 / 60 instances (~0.5 MB each)
- ``tiny``  1 study, 8 series, 64x64 16-bit CT: 5,000 / 600 instances (~9.5 KB each)
- ``multi`` 256x256 16-bit MR: 20 studies x 2 series x 25 / 8 studies x 1 series x 25 instances (~130 KB each)
- ``big``   1 multi-frame instance, 512x512 16-bit frames: 2,048 / 512 frames (1 GiB / 256 MiB of pixel
  data), written frame chunk by frame chunk, never held in memory
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

GENERATOR_VERSION = 4

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
MULTIFRAME_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"

# Root of pydicom's UID generator; the suffix is a hash of the set, study, series and instance names.
UID_PREFIX = "1.2.826.0.1.3680043.8.498."


@dataclass(frozen=True)
class SetSpec:
    """What one data set holds."""

    name: str                  # cache directory name: "ct", "ct-quick", ...
    kind: str                  # the set's family: ct, tiny, multi, big
    studies: int
    series_per_study: int
    instances_per_series: int
    rows: int
    columns: int
    modality: str
    sop_class: str
    frames: int = 1            # > 1: one multi-frame instance per series, pixel data streamed to the file
    split_level: str = "series"  # what is dealt out to parallel senders: "series" or "study" directories

    @property
    def instances(self) -> int:
        return self.studies * self.series_per_study * self.instances_per_series


SETS: dict[str, SetSpec] = {
    "ct": SetSpec("ct", "ct", 1, 4, 125, 512, 512, "CT", CT_IMAGE),
    "tiny": SetSpec("tiny", "tiny", 1, 8, 625, 64, 64, "CT", CT_IMAGE),
    "multi": SetSpec("multi", "multi", 20, 2, 25, 256, 256, "MR", MR_IMAGE, split_level="study"),
    "big": SetSpec("big", "big", 1, 1, 1, 512, 512, "OT", MULTIFRAME_WORD_SC, frames=2048, split_level="study"),
    # one large study, for the release→ImagingStudy targets (1,000 instances: --quick; 10,000: full)
    "latency": SetSpec("latency", "latency", 1, 10, 1000, 64, 64, "CT", CT_IMAGE),
}

# One small instance sent to each receiver before the timed run (first-use costs: lazy imports, caches).
WARMUP = SetSpec("warmup", "warmup", 1, 1, 1, 64, 64, "CT", CT_IMAGE)

QUICK_SETS: dict[str, SetSpec] = {
    "ct": SetSpec("ct-quick", "ct", 1, 4, 15, 512, 512, "CT", CT_IMAGE),
    "tiny": SetSpec("tiny-quick", "tiny", 1, 8, 75, 64, 64, "CT", CT_IMAGE),
    "multi": SetSpec("multi-quick", "multi", 8, 1, 25, 256, 256, "MR", MR_IMAGE, split_level="study"),
    "big": SetSpec("big-quick", "big", 1, 1, 1, 512, 512, "OT", MULTIFRAME_WORD_SC, frames=512,
                   split_level="study"),
    "latency": SetSpec("latency-quick", "latency", 1, 2, 500, 64, 64, "CT", CT_IMAGE),
}


@dataclass(frozen=True)
class Instance:
    path: str        # relative to the set's files/ directory
    study: str
    series: str
    sop: str
    size: int        # bytes of the Part-10 file
    sha256: str      # of the dataset bytes after the file meta


@dataclass
class DataSet:
    spec: SetSpec
    root: Path
    instances: list[Instance]

    @property
    def files_dir(self) -> Path:
        return self.root / "files"

    @property
    def total_bytes(self) -> int:
        return sum(i.size for i in self.instances)

    @property
    def studies(self) -> dict[str, int]:
        """Study UID -> number of instances."""
        counts: dict[str, int] = {}
        for inst in self.instances:
            counts[inst.study] = counts.get(inst.study, 0) + 1
        return counts

    def by_sop(self) -> dict[str, Instance]:
        return {i.sop: i for i in self.instances}

    def units(self) -> list[Path]:
        """The directories parallel senders share out (series or study directories), in a stable order."""
        depth = 2 if self.spec.split_level == "series" else 1
        dirs = sorted({Path(*Path(i.path).parts[:depth]) for i in self.instances})
        return [self.files_dir / d for d in dirs]

    def shares(self, parts: int) -> list[list[Path]]:
        """``units()`` dealt round-robin to ``parts`` senders (a single sender gets the whole tree)."""
        if parts <= 1:
            return [[self.files_dir]]
        units = self.units()
        if len(units) < parts:
            raise ValueError(f"set {self.spec.name} has {len(units)} {self.spec.split_level} directories, "
                             f"cannot feed {parts} parallel senders")
        return [units[k::parts] for k in range(parts)]


# --- Part-10 parsing (no pydicom: used on every received file) --------------------------------------------

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


class Part10Error(ValueError):
    pass


def parse_file_meta(head: bytes) -> tuple[int, dict[int, bytes]]:
    """Offset of the dataset after the file meta of a Part-10 file, and the meta element values by tag.

    ``head`` must hold at least the preamble and the whole file meta (group 0002, Explicit VR Little Endian).
    """
    if len(head) < 132 or head[128:132] != b"DICM":
        raise Part10Error("no DICM prefix")
    pos = 132
    values: dict[int, bytes] = {}
    while pos + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            return pos, values
        vr = head[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(head):
                break
            (length,) = struct.unpack_from("<I", head, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            start = pos + 8
        if length == 0xFFFFFFFF:
            raise Part10Error("undefined length in the file meta")
        values[(group << 16) | element] = head[start:start + length]
        pos = start + length
    if pos == len(head):  # a file with nothing but the meta
        return pos, values
    raise Part10Error("file meta longer than the bytes read")


def meta_uid(values: dict[int, bytes], tag: int) -> str:
    return values.get(tag, b"").rstrip(b"\x00 ").decode("ascii", "replace")


def stored_sop_uid(path: Path, head_size: int = 16384) -> str:
    """The Media Storage SOP Instance UID of a Part-10 file (its file meta only is read)."""
    with open(path, "rb") as handle:
        head = handle.read(head_size)
    return meta_uid(parse_file_meta(head)[1], 0x00020003)


def dataset_digest(path: Path, head_size: int = 65536) -> tuple[str, str, int]:
    """(Media Storage SOP Instance UID, SHA-256 of the dataset bytes after the file meta, file size)."""
    with open(path, "rb") as handle:
        head = handle.read(head_size)
        offset, values = parse_file_meta(head)
        digest = hashlib.sha256(head[offset:])
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        while n := handle.readinto(buffer):
            digest.update(view[:n])
        size = handle.tell()
    return meta_uid(values, 0x00020003), digest.hexdigest(), size


# --- generation --------------------------------------------------------------------------------------------

def uid(*parts: object) -> str:
    """A deterministic UID under pydicom's root from the given names."""
    digest = hashlib.sha512("/".join(map(str, parts)).encode()).digest()
    suffix = str(int.from_bytes(digest[:16], "big"))
    return (UID_PREFIX + suffix)[:64].rstrip(".")


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big")


def _series_template(spec: SetSpec, study: int, series: int) -> "object":
    """The dataset shared by a series' instances, without Pixel Data (pydicom is imported here only)."""
    from pydicom.dataset import Dataset, FileMetaDataset

    study_uid = uid("imagingstudy-scp-bench", spec.name, "study", study)
    series_uid = uid("imagingstudy-scp-bench", spec.name, "series", study, series)

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if spec.frames == 1 else ["DERIVED", "SECONDARY"]
    ds.SOPClassUID = spec.sop_class
    ds.SOPInstanceUID = ""  # set per instance
    ds.StudyDate = f"202401{(study % 28) + 1:02d}"
    ds.SeriesDate = ds.StudyDate
    ds.StudyTime = f"{8 + study % 10:02d}{(study * 7) % 60:02d}00"
    ds.SeriesTime = f"{8 + study % 10:02d}{(study * 7 + series + 1) % 60:02d}00"
    ds.AccessionNumber = f"BENCH{study:05d}"
    ds.Modality = spec.modality
    ds.Manufacturer = "imagingstudy-scp bench"
    ds.ReferringPhysicianName = "Referrer^Bench"
    ds.StudyDescription = f"Bench {spec.kind} study {study}"
    ds.SeriesDescription = f"Bench {spec.kind} series {series}"
    ds.PatientName = f"Bench^Patient{study:03d}"
    ds.PatientID = f"BENCH-{spec.kind.upper()}-{study:04d}"
    ds.IssuerOfPatientID = "BENCH"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    if spec.modality == "CT":
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = "1.25"
        ds.KVP = "120"
    elif spec.modality == "MR":
        ds.BodyPartExamined = "HEAD"
        ds.SliceThickness = "3"
        ds.MagneticFieldStrength = "3"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"{study + 1}"
    ds.SeriesNumber = series + 1
    ds.InstanceNumber = 1  # set per instance
    if spec.frames == 1:
        ds.ImagePositionPatient = ["-250", "-250", "0"]  # set per instance
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = uid("imagingstudy-scp-bench", spec.name, "for", study)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if spec.frames > 1:
        ds.NumberOfFrames = spec.frames
        ds.FrameIncrementPointer = 0x00181063  # Frame Time
        ds.FrameTime = "40"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.PixelSpacing = ["0.7", "0.7"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0 if spec.frames > 1 else 1
    if spec.modality == "CT":
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = spec.sop_class
    meta.MediaStorageSOPInstanceUID = ""  # set per instance
    meta.TransferSyntaxUID = EXPLICIT_VR_LE
    ds.file_meta = meta
    return ds


def _encode_header(ds: "object") -> bytes:
    import pydicom

    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def _pixel_element_header(length: int) -> bytes:
    # (7FE0,0010) OW, explicit VR little endian, 4-byte length
    return struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length)


def _header(template: "object", spec: SetSpec, study: int, series: int, number: int) -> "object":
    """The series template turned into the dataset of one instance (changed in place)."""
    ds = template
    sop_uid = uid("imagingstudy-scp-bench", spec.name, "instance", study, series, number)
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.InstanceNumber = number + 1
    if spec.frames == 1:
        ds.ImagePositionPatient = ["-250", "-250", f"{number * -1.25:.2f}".replace("-0.00", "0.00")]
    return ds


def _write_instance(spec: SetSpec, files_dir: Path, template: "object", study: int, series: int,
                    number: int) -> Instance:
    ds = _header(template, spec, study, series, number)
    header = _encode_header(ds)
    offset, _ = parse_file_meta(header)
    frame_bytes = spec.rows * spec.columns * 2
    pixel_length = frame_bytes * spec.frames
    rng = random.Random(_seed(spec.name, "pixels", study, series, number))

    rel = Path(f"{study:02d}") / f"{series:02d}" / f"{number:05d}.dcm"
    path = files_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(header[offset:])
    element = _pixel_element_header(pixel_length)
    digest.update(element)
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as handle:
        handle.write(header)
        handle.write(element)
        remaining = pixel_length
        chunk = max(frame_bytes, 1 << 22) if spec.frames > 1 else frame_bytes
        while remaining:
            block = rng.randbytes(min(chunk, remaining))
            digest.update(block)
            handle.write(block)
            remaining -= len(block)
        size = handle.tell()
    os.replace(tmp, path)
    return Instance(rel.as_posix(), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                    size, digest.hexdigest())



def _manifest_ok(root: Path, spec: SetSpec) -> list[Instance] | None:
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("generator") != GENERATOR_VERSION or manifest.get("spec") != dataclasses.asdict(spec):
        return None
    instances = [Instance(**item) for item in manifest["instances"]]
    if len(instances) != spec.instances:
        return None
    files_dir = root / "files"
    for inst in instances:
        try:
            if (files_dir / inst.path).stat().st_size != inst.size:
                return None
        except OSError:
            return None
    return instances


def load_or_generate(spec: SetSpec, data_root: Path, log=print) -> DataSet:
    """The cached set, generated first when absent or stale."""
    root = data_root / spec.name
    instances = _manifest_ok(root, spec)
    if instances is not None:
        return DataSet(spec, root, instances)
    if root.exists():
        shutil.rmtree(root)
    files_dir = root / "files"
    files_dir.mkdir(parents=True)
    log(f"generating data set {spec.name}: {spec.instances} instances into {root}")
    started = time.monotonic()
    instances = []
    for study in range(spec.studies):
        for series in range(spec.series_per_study):
            template = _series_template(spec, study, series)
            for number in range(spec.instances_per_series):
                instances.append(_write_instance(spec, files_dir, template, study, series, number))
    manifest = {"generator": GENERATOR_VERSION, "spec": dataclasses.asdict(spec),
                "instances": [dataclasses.asdict(i) for i in instances]}
    tmp = root / "manifest.json.part"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, root / "manifest.json")
    total = sum(i.size for i in instances)
    log(f"generated {spec.name}: {len(instances)} files, {total / 1e6:.1f} MB in {time.monotonic() - started:.1f}s")
    return DataSet(spec, root, instances)


if __name__ == "__main__":  # python scripts/benchmark/datasets.py [--quick] [set ...]: generate (or check) sets
    quick = "--quick" in sys.argv
    names = [a for a in sys.argv[1:] if not a.startswith("--")] or ["ct", "tiny", "multi"]
    table = QUICK_SETS if quick else SETS
    base = Path(__file__).resolve().parents[2] / ".bench" / "data"
    for set_name in names:
        data = load_or_generate(table[set_name], base)
        print(f"{data.spec.name}: {len(data.instances)} instances, {data.total_bytes / 1e6:.1f} MB, "
              f"{len(data.studies)} studies, in {data.root}")
