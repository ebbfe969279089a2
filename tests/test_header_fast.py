"""The header fast path gives exactly pydicom's answer, or no answer (pydicom then reads the file).

:func:`scp.header._fast_header` reads the header without pydicom's reader; whenever it returns a
header, it must be the one :func:`scp.header._pydicom_header` (the reference, pydicom's
``dcmread``) returns — same values, same order — and :func:`scp.header.read_header` must behave
as the reference does: the same header or the same :class:`HeaderError`. Checked on pydicom's
bundled files, on generated files (byte-level, to reach every encoding the reader mirrors) and
on a few hundred seeded mutations of both.
"""

from __future__ import annotations

import random
import struct
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pytest
from pydicom.uid import generate_uid

from dicom_factory import UID_ROOT, make_instance
from scp import header as header_module
from scp import header_fast
from scp.header import HeaderError, _decode_text, _fast_decode, _fast_header, _pydicom_header, read_header

TEST_FILES = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent  # type: ignore[arg-type]
CHARSET_FILES = TEST_FILES.parent / "charset_files"

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
CT = "1.2.840.10008.5.1.4.1.1.2"
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


@pytest.fixture(autouse=True)
def _quiet_pydicom() -> Iterator[None]:
    with warnings.catch_warnings():  # pydicom warns about the invalid values it reads
        warnings.simplefilter("ignore")
        yield


def outcome(path: Path) -> tuple[str, Any]:
    """("header", InstanceHeader) or ("error", message) of the reference reader."""
    try:
        return "header", _pydicom_header(path)
    except HeaderError as exc:
        return "error", str(exc)


def check(path: Path) -> bool:
    """The fast path agrees with pydicom on ``path`` (or declines); True when it answered."""
    kind, expected = outcome(path)
    fast = _fast_header(path)
    if fast is not None:
        assert kind == "header", f"fast path read {path.name}, pydicom fails: {expected}"
        assert repr(fast) == repr(expected), f"{path.name}: fast path differs from pydicom"
    try:
        got = read_header(path)
    except HeaderError as exc:
        assert (kind, expected) == ("error", str(exc))
    else:
        assert kind == "header" and repr(got) == repr(expected)
    check_with_head(path, kind, expected)
    return fast is not None


def check_with_head(path: Path, kind: str, expected: Any) -> None:
    """Given the file's first bytes in memory (as the receiver keeps them), whatever their length, the
    answer is the same: the head stands in for the first read and the rest is read from the file."""
    if not path.exists():
        return
    data = path.read_bytes()
    for cut in sorted({len(data), 1, 132, 300, 4096, 70_000, 300_000}):
        if cut > len(data):
            continue
        try:
            got = read_header(path, data[:cut], len(data))
        except HeaderError as exc:
            assert (kind, expected) == ("error", str(exc)), f"{path.name}, head of {cut} bytes"
        else:
            assert kind == "header" and repr(got) == repr(expected), f"{path.name}, head of {cut} bytes"


# -- byte-level Part-10 writer (every length, VR and nesting under the test's control) ----------

def element(tag: int, vr: str, value: bytes, implicit: bool, undefined: bool = False) -> bytes:
    length = 0xFFFFFFFF if undefined else len(value)
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack("<L", length) + value
    if vr in LONG_VRS:
        return head + vr.encode() + b"\0\0" + struct.pack("<L", length) + value
    return head + vr.encode() + struct.pack("<H", length) + value


def item(content: bytes, undefined: bool = False) -> bytes:
    if undefined:
        return b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + content + b"\xfe\xff\x0d\xe0\0\0\0\0"
    return b"\xfe\xff\x00\xe0" + struct.pack("<L", len(content)) + content


def sequence(tag: int, items: list[bytes], implicit: bool, undefined: bool = False,
             undefined_items: bool = False, vr: str = "SQ") -> bytes:
    body = b"".join(item(i, undefined_items) for i in items)
    if undefined:
        return element(tag, vr, body + b"\xfe\xff\xdd\xe0\0\0\0\0", implicit, undefined=True)
    return element(tag, vr, body, implicit)


def text(value: str, encoding: str = "latin-1", pad: bytes = b" ") -> bytes:
    data = value.encode(encoding, "replace")
    return data + pad if len(data) % 2 else data


def uid(value: str) -> bytes:
    return text(value, "ascii", b"\0")


def part10(dataset: bytes, transfer_syntax: str, sop_uid: str = UID_ROOT + "9.1") -> bytes:
    meta = b"".join([
        element(0x00020001, "OB", b"\0\1", False),
        element(0x00020002, "UI", uid(CT), False),
        element(0x00020003, "UI", uid(sop_uid), False),
        element(0x00020010, "UI", uid(transfer_syntax), False),
        element(0x00020012, "UI", uid(UID_ROOT + "1"), False),
    ])
    group_length = element(0x00020000, "UL", struct.pack("<L", len(meta)), False)
    return b"\0" * 128 + b"DICM" + group_length + meta + dataset


def code_item(value: str, scheme: str, meaning: str, implicit: bool, charset: str = "latin-1") -> bytes:
    return b"".join([
        element(0x00080100, "SH", text(value, charset), implicit),
        element(0x00080102, "SH", text(scheme, charset), implicit),
        element(0x00080104, "LO", text(meaning, charset), implicit),
    ])


def rich_dataset(implicit: bool, *, charset: bytes | None = b"ISO_IR 100", encoding: str = "latin-1",
                 undefined: bool = False, name: str = "Müller^Jürgen", pixel_data: bool = True,
                 extra: list[tuple[int, bytes]] | None = None) -> bytes:
    """A CT-like dataset with needed sequences (nested), unneeded ones, private data and icons."""
    u = undefined
    request_item = b"".join([
        element(0x00080005, "CS", text("ISO_IR 192"), implicit) if charset else b"",
        sequence(0x00321064, [code_item("RP", "L", "Requested ♥" if charset else "Requested", implicit,
                                        "utf-8" if charset else encoding)],
                 implicit, undefined=not u),  # RequestedProcedureCodeSequence, nested
        element(0x00400007, "LO", text("Step ♥" if charset else "Step", "utf-8" if charset else encoding),
                implicit),
        element(0x00400009, "SH", text("SPS1"), implicit),
        element(0x00401001, "SH", text("RP1"), implicit),
    ])
    icon = b"".join([
        element(0x00280010, "US", struct.pack("<H", 1), implicit),
        element(0x00280103, "US", struct.pack("<H", 0), implicit),
        element(0x7FE00010, "OB", b"\xfe\xff\x00\xe0\0\0\0\0\xfe\xff\x00\xe0\4\0\0\0abcd"
                b"\xfe\xff\xdd\xe0\0\0\0\0", implicit, undefined=True),
    ])
    elements: list[tuple[int, bytes]] = [
        (0x00080005, element(0x00080005, "CS", charset, implicit) if charset is not None else b""),
        (0x00080008, element(0x00080008, "CS", text("ORIGINAL\\PRIMARY\\AXIAL"), implicit)),
        (0x00080016, element(0x00080016, "UI", uid(CT), implicit)),
        (0x00080018, element(0x00080018, "UI", uid(UID_ROOT + "9.1"), implicit)),
        (0x00080020, element(0x00080020, "DA", text("20240315"), implicit)),
        (0x00080030, element(0x00080030, "TM", text("101530.25"), implicit)),
        (0x00080050, element(0x00080050, "SH", text("ACC-42"), implicit)),
        (0x00080051, sequence(0x00080051, [element(0x00400031, "UT", text("HOSP ♥", "utf-8"), implicit)
                                           if charset else element(0x00400031, "UT", text("HOSP"), implicit)],
                              implicit, undefined=u, undefined_items=u)),
        (0x00080060, element(0x00080060, "CS", text("CT"), implicit)),
        (0x00080080, element(0x00080080, "LO", text("Hôpital \\ Général", encoding), implicit)),
        (0x00080090, element(0x00080090, "PN", text("House^Gregory^^Dr.=ハウス^グレゴリー=はうす^ぐれごりー",
                                                    "utf-8") if encoding == "utf-8"
                                          else text("House^Gregory^^Dr.", encoding), implicit)),
        (0x00081030, element(0x00081030, "LO", text("Thorax \\ Abdomen", encoding), implicit)),
        (0x00081032, sequence(0x00081032, [code_item("P1", "L", "Proc ü", implicit, encoding),
                                           code_item("P2", "L", "Proc 2", implicit, encoding) + element(
                                               0x00090010, "LO", text("PRIVATE"), implicit)],
                              implicit, undefined=u, undefined_items=u)),
        (0x0008103E, element(0x0008103E, "LO", text("Series ü", encoding), implicit)),
        (0x00081070, element(0x00081070, "PN", text("Tech^One\\Tech^Two", encoding), implicit)),
        (0x00082112, sequence(0x00082112, [element(0x00081150, "UI", uid(CT), implicit)],
                              implicit, undefined=True, undefined_items=True)),  # not needed
        (0x00091010, sequence(0x00091010, [element(0x00091011, "LO", text("x"), implicit)],
                              implicit, undefined=True, vr="UN")),  # private
        (0x00100010, element(0x00100010, "PN", text(name, encoding), implicit)),
        (0x00100020, element(0x00100020, "LO", text("PID-0001"), implicit)),
        (0x00100021, element(0x00100021, "LO", text("Issuer"), implicit)),
        (0x00100030, element(0x00100030, "DA", b"", implicit)),
        (0x00100040, element(0x00100040, "CS", text("F"), implicit)),
        (0x00180015, element(0x00180015, "CS", text("CHEST"), implicit)),
        (0x00181000, element(0x00181000, "LO", text("device"), implicit)),
        (0x0020000D, element(0x0020000D, "UI", uid(UID_ROOT + "7"), implicit)),
        (0x0020000E, element(0x0020000E, "UI", uid(UID_ROOT + "7.1"), implicit)),
        (0x00200010, element(0x00200010, "SH", text("1"), implicit)),
        (0x00200011, element(0x00200011, "IS", text("3"), implicit)),
        (0x00200013, element(0x00200013, "IS", text("12 "), implicit)),
        (0x00280008, element(0x00280008, "IS", b"", implicit)),
        (0x00280103, element(0x00280103, "US", struct.pack("<H", 0), implicit)),
        (0x00321060, element(0x00321060, "LO", text("Requested procedure"), implicit)),
        (0x00324000, element(0x00324000, "LT", text("Comments \\ with backslash  ", encoding), implicit)),
        (0x00400275, sequence(0x00400275, [request_item, request_item.replace(b"RP1 ", b"RP2 ")],
                              implicit, undefined=u, undefined_items=u)),
        (0x0040A043, sequence(0x0040A043, [], implicit, undefined=u)),
        (0x00880200, sequence(0x00880200, [icon], implicit, undefined=True)),  # not needed
        (0x20500020, element(0x20500020, "CS", text("IDENTITY"), implicit)),
    ]
    elements += extra or []
    elements.sort(key=lambda pair: pair[0])
    body = b"".join(encoded for _, encoded in elements)
    if pixel_data:
        body += element(0x7FE00010, "OW", bytes(range(256)) * 4, implicit)
    return body


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def generated_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for implicit in (False, True):
        mode = "implicit" if implicit else "explicit"
        ts = IMPLICIT if implicit else EXPLICIT
        files[f"{mode}-latin1"] = write(folder, f"{mode}-latin1.dcm", part10(rich_dataset(implicit), ts))
        files[f"{mode}-undefined"] = write(folder, f"{mode}-undefined.dcm",
                                           part10(rich_dataset(implicit, undefined=True), ts))
        files[f"{mode}-utf8"] = write(folder, f"{mode}-utf8.dcm", part10(rich_dataset(
            implicit, charset=b"ISO_IR 192", encoding="utf-8", name="Yamada^Tarou=山田^太郎=やまだ^たろう"), ts))
        files[f"{mode}-no-charset"] = write(folder, f"{mode}-no-charset.dcm", part10(rich_dataset(
            implicit, charset=None, encoding="ascii", name="Doe^John^^^"), ts))
        files[f"{mode}-empty-charset"] = write(folder, f"{mode}-empty-charset.dcm", part10(rich_dataset(
            implicit, charset=b"", encoding="ascii", name="Doe^John=="), ts))
        files[f"{mode}-iso-ir-6"] = write(folder, f"{mode}-iso-ir-6.dcm", part10(rich_dataset(
            implicit, charset=b"ISO_IR 6", encoding="ascii", name="Doe^John\\Roe^Richard"), ts))
        files[f"{mode}-no-pixels"] = write(folder, f"{mode}-no-pixels.dcm", part10(rich_dataset(
            implicit, pixel_data=False), ts))
        # a later duplicate of a needed tag (out of order, before the pixel data): the last wins
        dataset = rich_dataset(implicit)
        pixels = dataset.rindex(b"\xe0\x7f\x10\x00")
        dataset = dataset[:pixels] + element(0x00100010, "PN", text("Late^Name"), implicit) + dataset[pixels:]
        files[f"{mode}-duplicate"] = write(folder, f"{mode}-duplicate.dcm", part10(dataset, ts))
        # header larger than the first read: private data before the needed tags
        big = element(0x00070010, "LO", text("BIG"), implicit) + element(0x00071001, "OB", b"\x11" * 150_000,
                                                                          implicit)
        files[f"{mode}-big-header"] = write(folder, f"{mode}-big-header.dcm", part10(big + rich_dataset(implicit), ts))
    # explicit-only encodings
    files["un-encoded-name"] = write(folder, "un-encoded-name.dcm", part10(rich_dataset(False, extra=[]).replace(
        element(0x00100010, "PN", text("Müller^Jürgen"), False),
        element(0x00100010, "UN", text("Müller^Jürgen"), False)), EXPLICIT))
    files["encapsulated"] = write(folder, "encapsulated.dcm", part10(
        rich_dataset(False, pixel_data=False) + element(
            0x7FE00010, "OB", b"\xfe\xff\x00\xe0\0\0\0\0\xfe\xff\x00\xe0\4\0\0\0abcd\xfe\xff\xdd\xe0\0\0\0\0",
            False, undefined=True), JPEG_BASELINE))
    implicit_items = [  # explicit VR sequences whose items are implicit VR (pydicom reads them)
        (0x0040100A, element(0x0040100A, "SQ", item(code_item("A", "B", "C", True)), False)),
        (0x00380014, sequence(0x00380014, [element(0x00400031, "UT", text("ADM"), True)], False,
                              undefined=True, undefined_items=True)),
    ]
    files["implicit-items-in-explicit"] = write(folder, "implicit-items-in-explicit.dcm", part10(
        rich_dataset(False, extra=implicit_items), EXPLICIT))
    return files


def edge_files(folder: Path) -> dict[str, tuple[Path, bool]]:
    """Unusual encodings the reader mirrors (True: the fast path must answer) or declines (False)."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[Path, bool]] = {}

    def add(name: str, data: bytes, fast: bool, ts: str = EXPLICIT) -> None:
        files[name] = (write(folder, name + ".dcm", part10(data, ts)), fast)

    def with_needed_item(content: bytes, implicit: bool, undefined: bool = False) -> bytes:
        """The rich dataset with an extra needed sequence (Reason for Requested Procedure Code)."""
        return rich_dataset(implicit, extra=[(0x0040100A, sequence(0x0040100A, [content], implicit,
                                                                    undefined=undefined))])

    for implicit in (False, True):
        mode = "implicit" if implicit else "explicit"
        nested = sequence(0x00400008, [code_item("N", "L", "nested", implicit)], implicit)
        pixel_representation = element(0x00280103, "US", struct.pack("<H", 1), implicit)
        add(f"{mode}-item-pixel-representation", with_needed_item(
            code_item("A", "B", "C", implicit) + pixel_representation + nested, implicit), True,
            IMPLICIT if implicit else EXPLICIT)
        add(f"{mode}-item-odd-pixel-representation", with_needed_item(
            code_item("A", "B", "C", implicit) + element(0x00280103, "US", b"\1\0\0", implicit) + nested,
            implicit), False, IMPLICIT if implicit else EXPLICIT)
        add(f"{mode}-item-group-length-private-repeaters", with_needed_item(b"".join([
            element(0x00080000, "UL", struct.pack("<L", 8), implicit),
            code_item("A", "B", "C", implicit),
            element(0x00090010, "LO", text("CREATOR"), implicit),
            element(0x00091001, "LO", text("private"), implicit),
            element(0x60000010, "US", struct.pack("<H", 4), implicit),
            element(0x60000022, "LO", text("first overlay"), implicit),
            element(0x60020022, "LO", text("second overlay"), implicit),
        ]), implicit), True, IMPLICIT if implicit else EXPLICIT)
        add(f"{mode}-item-out-of-order-and-duplicates", with_needed_item(b"".join([
            element(0x00080104, "LO", text("meaning"), implicit),
            element(0x00080100, "SH", text("V1"), implicit),
            element(0x00080102, "SH", text("S"), implicit),
            element(0x00080100, "SH", text("V2"), implicit),
        ]), implicit, undefined=True), True, IMPLICIT if implicit else EXPLICIT)
        add(f"{mode}-item-ambiguous-vr", with_needed_item(
            code_item("A", "B", "C", implicit) + element(0x00280106, "SS", struct.pack("<h", -5), implicit),
            implicit), True, IMPLICIT if implicit else EXPLICIT)
        add(f"{mode}-item-empty-ambiguous-vr", with_needed_item(
            code_item("A", "B", "C", implicit) + element(0x00280106, "US", b"", implicit), implicit),
            not implicit, IMPLICIT if implicit else EXPLICIT)
        add(f"{mode}-item-empty-values", with_needed_item(b"".join([
            element(0x00080100, "SH", b"", implicit), element(0x00080102, "SH", b"  ", implicit),
            element(0x00081160, "IS", b"", implicit), element(0x00400008, "SQ", b"", implicit),
            element(0x00401101, "SQ", b"", implicit), element(0x00080104, "LO", b"\0\0", implicit),
        ]), implicit), True, IMPLICIT if implicit else EXPLICIT)
        add(f"{mode}-item-delimiter-at-top-level", rich_dataset(implicit, extra=[
            (0x20510000, b"\xfe\xff\x0d\xe0\0\0\0\0" + element(0x00100010, "PN", text("Ignored"), implicit))]),
            True, IMPLICIT if implicit else EXPLICIT)
        add(f"{mode}-escape-and-bad-utf8", rich_dataset(
            implicit, charset=b"ISO_IR 192", encoding="utf-8", name="Esc\x1b(BName").replace(
                element(0x00321060, "LO", text("Requested procedure"), implicit),
                element(0x00321060, "LO", b"Bad \xff\xfe utf8 \xc3(  ", implicit)),
            True, IMPLICIT if implicit else EXPLICIT)
    # explicit VR only
    add("un-text-in-item", with_needed_item(
        element(0x00080100, "UN", text("A"), False) + element(0x00080104, "UN", text("Ü"), False), False), True)
    add("un-sequence-undefined-in-item", with_needed_item(
        code_item("A", "B", "C", False) + sequence(0x00400008, [code_item("N", "L", "n", True)], False,
                                                   undefined=True, vr="UN"), False), True)
    add("un-sequence-defined-in-item", with_needed_item(
        code_item("A", "B", "C", False) + sequence(0x00400008, [code_item("N", "L", "n", True)], False,
                                                   vr="UN"), False), False)
    add("un-needed-sequence", rich_dataset(False, extra=[(0x0040100A, sequence(
        0x0040100A, [code_item("A", "B", "C", True)], False, vr="UN"))]), False)
    add("wrong-vrs", rich_dataset(False).replace(
        element(0x00100010, "PN", text("Müller^Jürgen"), False),
        element(0x00100010, "LO", text("Müller^Jürgen\\Second"), False)).replace(
        element(0x00200013, "IS", text("12 "), False), element(0x00200013, "US", struct.pack("<H", 12), False)),
        True)
    add("space-padded-transfer-syntax", rich_dataset(False), True, EXPLICIT + " ")
    add("charset-padded", rich_dataset(False, charset=b" ISO_IR 100 "), True)
    add("charset-nul", rich_dataset(False, charset=b"ISO_IR 100\0\0"), False)
    add("float-pixel-data", rich_dataset(False, pixel_data=False) + element(0x7FE00008, "OF", b"\0" * 16, False),
        True)
    data = part10(rich_dataset(False), EXPLICIT)
    group_length = element(0x00020000, "UL", struct.pack("<L", 0), False)[:8]
    start = data.index(group_length)
    files["meta-without-group-length"] = (write(folder, "meta-without-group-length.dcm",
                                                data[:start] + data[start + 12:]), True)
    return files


# -- the tests -------------------------------------------------------------------------------

def pydicom_files() -> list[Path]:
    return sorted(TEST_FILES.glob("*.dcm")) + sorted(CHARSET_FILES.glob("*.dcm"))


@pytest.mark.parametrize("path", pydicom_files(), ids=lambda p: p.name)
def test_pydicom_bundled_files(path: Path) -> None:
    check(path)


def test_the_fast_path_reads_most_pydicom_files() -> None:
    fast = {p.name for p in pydicom_files() if _fast_header(p) is not None}
    assert {"CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm",
            "reportsi.dcm", "test-SR.dcm", "examples_overlay.dcm", "chrFren.dcm", "chrGerm.dcm",
            "chrX1.dcm"} <= fast  # ISO_IR 100 and ISO_IR 192 (UTF-8) included
    assert {"MR_small_bigendian.dcm", "image_dfl.dcm", "chrH31.dcm", "chrH32.dcm", "chrX2.dcm",
            "chrJapMulti.dcm", "chrArab.dcm", "chrRuss.dcm"}.isdisjoint(fast)  # other character sets


def test_generated_files(tmp_path: Path) -> None:
    files = generated_files(tmp_path)
    declined = [name for name, path in files.items() if not check(path)]
    assert declined == []
    header = read_header(files["explicit-utf8"])
    assert header.attributes["PatientName"] == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert header.attributes["StudyDescription"] == ["Thorax", "Abdomen"]
    assert header.attributes["StudyComments"] == "Comments \\ with backslash"
    assert header.attributes["RequestAttributesSequence"][0]["ScheduledProcedureStepDescription"] == "Step ♥"
    assert read_header(files["implicit-duplicate"]).attributes["PatientName"] == "Late^Name"
    assert read_header(files["explicit-latin1"]).attributes["PatientName"] == "Müller^Jürgen"


def test_unusual_encodings(tmp_path: Path) -> None:
    for name, (path, fast) in edge_files(tmp_path).items():
        assert check(path) == fast, name


def test_factory_instances(tmp_path: Path) -> None:
    def code(**values: str) -> Any:
        from pydicom.dataset import Dataset
        ds = Dataset()
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        return ds

    extras: list[dict[str, object]] = [
        {},
        {"ProcedureCodeSequence": [code(CodeValue="P1", CodingSchemeDesignator="L", CodeMeaning="proc")],
         "IssuerOfAccessionNumberSequence": [code(LocalNamespaceEntityID="HOSP")],
         "RequestAttributesSequence": [code(RequestedProcedureID="RP1", ScheduledProcedureStepID="S1")],
         "IssuerOfPatientIDQualifiersSequence": [code(UniversalEntityID="1.2.3", UniversalEntityIDType="ISO")],
         "ReasonForRequestedProcedureCodeSequence": [code(CodeValue="R", CodingSchemeDesignator="L")],
         "IssuerOfAdmissionIDSequence": [code(LocalNamespaceEntityID="ADM")],
         "SpecimenDescriptionSequence": [code(SpecimenIdentifier="S1", SpecimenUID="1.2.3.4")],
         "ConceptNameCodeSequence": [code(CodeValue="C", CodingSchemeDesignator="DCM", CodeMeaning="c")]},
        {"PatientName": "Müller^Jürgen", "InstitutionName": "Hôpital", "StudyDescription": "a\\b\\c",
         "OperatorsName": ["A^B", "C^D"], "PerformingPhysicianName": "", "TimezoneOffsetFromUTC": "+0100",
         "AdmissionID": "ADM1", "ReasonForTheRequestedProcedure": "pain", "RequestedProcedureID": "RP",
         "Laterality": "L", "ImageLaterality": "L", "DocumentTitle": "doc", "ContentLabel": "LABEL",
         "NumberOfFrames": 1, "StudyComments": "multi\nline", "IssuerOfPatientID": "ISS"},
        {"SpecificCharacterSet": "ISO_IR 192", "PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう",
         "StudyDescription": "Ünïcode ♥"},
        {"SpecificCharacterSet": "", "PatientName": "Doe^John"},
    ]
    for number, extra in enumerate(extras):
        path = make_instance(tmp_path / f"f{number}.dcm", study_uid=generate_uid(UID_ROOT),
                             series_uid=generate_uid(UID_ROOT), sop_uid=generate_uid(UID_ROOT), extra=extra)
        assert check(path), extra


def test_the_installed_pydicom_is_the_one_mirrored() -> None:
    assert pydicom.__version__.startswith(header_fast.MIRRORED_PYDICOM), (
        "scp/header_fast.py mirrors pydicom's reader; check it against this pydicom's "
        "filereader.py, then update MIRRORED_PYDICOM")
    assert header_fast.config_is_default()


def test_fast_path_is_taken_for_explicit_and_implicit_files(tmp_path: Path) -> None:
    ct = make_instance(tmp_path / "ct.dcm", study_uid=generate_uid(UID_ROOT), series_uid=generate_uid(UID_ROOT),
                       sop_uid=generate_uid(UID_ROOT), rows=256, columns=256)
    implicit = Path(pydicom.data.get_testdata_file("MR_small_implicit.dcm"))  # type: ignore[arg-type]
    for path in (ct, implicit):
        before = dict(header_module.FAST_PATH_COUNTS)
        header = read_header(path)
        assert header_module.FAST_PATH_COUNTS["fast"] == before["fast"] + 1
        assert header_module.FAST_PATH_COUNTS["fallback"] == before["fallback"]
        assert repr(header) == repr(_pydicom_header(path))


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "image_dfl.dcm", "no_meta.dcm"])
def test_other_encodings_go_to_pydicom(name: str) -> None:
    path = Path(pydicom.data.get_testdata_file(name))  # type: ignore[arg-type]
    assert _fast_header(path) is None
    check(path)


def test_other_character_sets_go_to_pydicom(tmp_path: Path) -> None:
    for charset in (b"ISO_IR 101", b"ISO 2022 IR 100", b"\\ISO 2022 IR 87", b"GB18030", b"ISO_IR 100\\ISO_IR 6"):
        path = write(tmp_path, "cs.dcm", part10(rich_dataset(False, charset=charset), EXPLICIT))
        assert _fast_header(path) is None, charset
        check(path)


def test_errors_are_header_errors(tmp_path: Path) -> None:
    cases = {
        "missing.dcm": None,
        "empty.dcm": b"",
        "garbage.dcm": random.Random(1).randbytes(4000),
        "no-uids.dcm": part10(element(0x00100010, "PN", text("Doe"), False), EXPLICIT),
        "bad-uid.dcm": part10(rich_dataset(False).replace(uid(UID_ROOT + "7.1"), uid("1.2.x.4" + "0" * 19)),
                              EXPLICIT),
    }
    for name, data in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(HeaderError):
            read_header(path)
        check(path)


def test_what_pydicom_raises_on_malformed_data_is_a_header_error(tmp_path: Path) -> None:
    """struct.error, BytesLengthException and zlib.error used to escape read_header."""
    identity = b"".join([element(0x00080016, "UI", uid(CT), False), element(0x00080018, "UI", uid(UID_ROOT + "9.1"), False),
                         element(0x0020000D, "UI", uid(UID_ROOT + "7"), False),
                         element(0x0020000E, "UI", uid(UID_ROOT + "7.1"), False)])
    deflate = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = deflate.compress(identity * 20) + deflate.flush()
    cases = {
        "cut-in-long-length": part10(identity + element(0x00400275, "SQ", b"", False)[:10], EXPLICIT),
        "charset-as-ul": part10(element(0x00080005, "UL", b"ISO_IR 100", False) + identity, EXPLICIT),
        "deflate-cut": part10(deflated[:len(deflated) // 2], "1.2.840.10008.1.2.1.99"),
    }
    for name, data in cases.items():
        path = write(tmp_path, name + ".dcm", data)
        with pytest.raises(HeaderError, match="dataset cannot be parsed"):
            read_header(path)


def test_a_file_object_goes_to_pydicom(tmp_path: Path) -> None:
    path = write(tmp_path, "a.dcm", part10(rich_dataset(False), EXPLICIT))
    with open(path, "rb") as handle:
        assert _fast_header(handle) is None
        handle.seek(0)
        assert repr(read_header(handle)) == repr(_pydicom_header(path))


# -- mutations --------------------------------------------------------------------------------

def header_end(data: bytes) -> int:
    """Where the pixel data starts (or the end), to aim mutations at the part that is read."""
    for marker in (b"\xe0\x7f\x10\x00OB", b"\xe0\x7f\x10\x00OW", b"\xe0\x7f\x10\x00"):
        at = data.rfind(marker)
        if at > 0:
            return at + 12
    return len(data)


def mutate(data: bytes, rng: random.Random) -> bytes:
    end = header_end(data)
    buffer = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        at = rng.randrange(128, end)
        kind = rng.randrange(10)
        if kind == 9 and at + 4 <= len(buffer):  # a length (or tag) nudged by a little
            width, fmt = rng.choice([(2, "<H"), (4, "<L")])
            value = (struct.unpack_from(fmt, buffer, at)[0] + rng.choice([-8, -4, -2, -1, 1, 2, 4, 8])) % (1 << 8 * width)
            struct.pack_into(fmt, buffer, at, value)
        elif kind == 0:  # flip one bit
            buffer[at] ^= 1 << rng.randrange(8)
        elif kind == 1:  # random bytes
            buffer[at:at + 2] = rng.randbytes(2) if rng.random() < 0.5 else bytes([rng.randrange(256)]) * 2
        elif kind == 2:  # a length or tag word set to something notable
            buffer[at:at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\0\0\0\0", b"\xfe\xff\x00\xe0",
                                            b"\xfe\xff\x0d\xe0", b"\xfe\xff\xdd\xe0", b"\x01\0\0\0", b"UN\0\0",
                                            b"SQ\0\0", b"\x05\x00\x08\x00"])
        elif kind == 3:  # truncation
            del buffer[at:]
            break
        elif kind == 4:  # a byte removed or added (everything after shifts)
            if rng.random() < 0.5:
                del buffer[at]
            else:
                buffer.insert(at, rng.randrange(256))
        elif kind == 5:  # a VR changed
            buffer[at:at + 2] = rng.choice([b"UN", b"SQ", b"OB", b"PN", b"LO", b"UT", b"US", b"XX", b"ab"])
        elif kind == 6:  # a chunk duplicated
            chunk = bytes(buffer[at:at + rng.randrange(2, 64)])
            buffer[at:at] = chunk
        elif kind == 7:  # an escape character or non-ASCII byte in a value
            buffer[at] = rng.choice([0x1B, 0xC3, 0xFF, 0x5C, 0x00, 0x3D])
        else:  # a charset value changed
            at = buffer.find(b"ISO_IR")
            if at > 0:
                buffer[at:at + 10] = rng.choice([b"ISO 2022 I", b"ISO_IR 192", b"ISO_IR 6  ", b"ISO_IR\0100",
                                                 b"GB18030   "])
    return bytes(buffer)


def mutation_seeds(folder: Path) -> list[bytes]:
    generated = generated_files(folder)
    seeds = [generated[name].read_bytes() for name in (
        "explicit-latin1", "explicit-undefined", "implicit-latin1", "implicit-undefined", "explicit-utf8",
        "implicit-no-charset", "encapsulated", "implicit-items-in-explicit")]
    edges = edge_files(folder / "edges")
    seeds += [edges[name][0].read_bytes() for name in (
        "explicit-item-pixel-representation", "implicit-item-group-length-private-repeaters",
        "un-sequence-undefined-in-item", "implicit-escape-and-bad-utf8")]
    seeds += [(TEST_FILES / name).read_bytes() for name in (
        "CT_small.dcm", "MR_small_implicit.dcm", "reportsi.dcm", "test-SR.dcm", "examples_overlay.dcm",
        "JPEG2000.dcm", "rtplan.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm")]
    return seeds


def test_mutated_files_give_pydicom_answer_or_none(tmp_path: Path) -> None:
    rng = random.Random(0x4EAD)
    seeds = mutation_seeds(tmp_path / "seeds")
    answered = declined = 0
    for number in range(800):
        data = mutate(seeds[number % len(seeds)], rng)
        path = write(tmp_path, f"m{number % 8}.dcm", data)
        if check(path):
            answered += 1
        else:
            declined += 1
    # both branches are exercised, not just one
    assert answered > 150 and declined > 100, (answered, declined)


# -- text decoding -------------------------------------------------------------------------------

def test_fast_decode_is_decode_text() -> None:
    rng = random.Random(7)
    alphabet = [b"a", b"Z", b"^", b"=", b"\\", b" ", b"\0", b"\xc3\xa9", b"\xe5\xb1\xb1", b"\xff", b"\x1b$B",
                b"\x1b(B", b"\xe9", b"\x80", b"\t", b"\xa0"]
    for _ in range(5000):
        raw = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        vr = rng.choice(["PN", "LO", "SH", "UC", "ST", "LT", "UT", "CS", "DA", "IS", "UI", "AE", "UR"])
        encodings = rng.choice([["iso8859"], ["latin_1"], ["UTF8"]])
        assert _fast_decode(raw, vr, encodings) == _decode_text(raw, vr, encodings), (raw, vr, encodings)


def test_reader_prefix_is_bounded(tmp_path: Path) -> None:
    """Only the first bytes are read for an ordinary image, however large the file."""
    path = write(tmp_path, "large.dcm", part10(rich_dataset(False), EXPLICIT) + b"\0" * 4_000_000)
    reads: list[int] = []
    real_open = open

    class Counting:
        def __init__(self, handle: Any) -> None:
            self.handle = handle

        def read(self, size: int = -1) -> bytes:
            data = self.handle.read(size)
            reads.append(len(data))
            return data

        def __getattr__(self, name: str) -> Any:
            return getattr(self.handle, name)

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

    header_fast_open = header_fast.__dict__.get("open")
    header_fast.open = lambda *a, **k: Counting(real_open(*a, **k))  # type: ignore[attr-defined]
    try:
        assert _fast_header(path) is not None
    finally:
        if header_fast_open is None:
            del header_fast.open  # type: ignore[attr-defined]
        else:
            header_fast.open = header_fast_open  # type: ignore[attr-defined]
    assert reads == [header_fast.PREFIX_BYTES]
