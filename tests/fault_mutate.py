"""Seeded mutations of real Part-10 files for the fuzz test: byte flips, truncations, mangled lengths,
VRs, tags and values, junk and reordered elements. The file meta is left intact (the SCU reads the
presentation context and the command's UIDs from it); only the dataset bytes after it are mutated.
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom

from dicom_factory import dataset_bytes

LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
VRS = [b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB", b"OD", b"OF",
       b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN",
       b"UR", b"US", b"UT", b"UV"]
BAD_VRS = [b"ZZ", b"\x00\x00", b"sq", b"  ", b"\xff\xff", b"O", b"SQ"]
INTERESTING_LENGTHS = [0, 1, 2, 3, 7, 0xFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF]
INTERESTING_TAGS = [(0x0002, 0x0010), (0x0008, 0x0005), (0x0008, 0x0018), (0x0020, 0x000D), (0x0020, 0x000E),
                    (0x0008, 0x0016), (0x7FE0, 0x0010), (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD),
                    (0x0009, 0x0010), (0x0000, 0x0000), (0xFFFF, 0xFFFF), (0x0010, 0x0010)]
CHARSETS = [b"ISO_IR 192", b"ISO 2022 IR 87", b"ISO 2022 IR 149\\ISO 2022 IR 87", b"GB18030", b"\x1b$B", b"\\\\\\",
            b"ISO_IR 100\\ISO_IR 999", b"\xff\xfe"]
TEXT_JUNK = [b"\x1b$B\x1b(B", b"\x1b$)C\xa1", b"\\\\\\\\", b"=^=^=", b"\xff" * 9, b"\x00" * 5, b"^" * 300,
             b"../../../../etc/passwd", b"1.2.3/../../x", b"%s%n%x", b"\xc3\x28", b"\x1b%G\xe2\x82"]


@dataclass(frozen=True)
class Element:
    """Where one element's header and value are in the encoded dataset (nested elements too)."""

    offset: int
    tag: tuple[int, int]
    vr_offset: int | None  # explicit VR only
    length_offset: int
    length_size: int
    value_offset: int
    length: int


@dataclass(frozen=True)
class Seed:
    """A real file to mutate: its file meta prefix and the encoded dataset after it."""

    path: Path
    prefix: bytes
    dataset: bytes
    explicit: bool
    little: bool
    deflated: bool


def load_seed(path: Path) -> Seed:
    whole = path.read_bytes()
    dataset = dataset_bytes(path)
    ts = pydicom.filereader.read_file_meta_info(path).TransferSyntaxUID
    deflated = ts == pydicom.uid.DeflatedExplicitVRLittleEndian
    if deflated:
        dataset = zlib.decompress(dataset, -zlib.MAX_WBITS)
    return Seed(path, whole[:len(whole) - len(dataset_bytes(path))], dataset, not ts.is_implicit_VR,
                ts.is_little_endian, deflated)


def walk(data: bytes, explicit: bool, little: bool) -> list[Element]:
    """Every element header in ``data``, best effort (stops where the encoding stops making sense)."""
    found: list[Element] = []
    end = "<" if little else ">"

    def elements(offset: int, stop: int, depth: int) -> int:
        while offset + 8 <= stop and len(found) < 5000:
            group, number = struct.unpack_from(f"{end}HH", data, offset)
            if group == 0xFFFE:  # item / delimiters: always 4-byte length, no VR
                length = struct.unpack_from(f"{end}I", data, offset + 4)[0]
                found.append(Element(offset, (group, number), None, offset + 4, 4, offset + 8, length))
                if number in (0xE00D, 0xE0DD):
                    return offset + 8
                offset += 8
                if length == 0xFFFFFFFF:
                    offset = elements(offset, stop, depth + 1)
                else:
                    offset += length
                continue
            vr_offset = None
            if explicit:
                vr_offset = offset + 4
                vr = data[offset + 4:offset + 6]
                if vr in LONG_LENGTH_VRS:
                    if offset + 12 > stop:
                        return stop
                    length_offset, length_size, value_offset = offset + 8, 4, offset + 12
                else:
                    length_offset, length_size, value_offset = offset + 6, 2, offset + 8
            else:
                vr = b""
                length_offset, length_size, value_offset = offset + 4, 4, offset + 8
            fmt = f"{end}{'H' if length_size == 2 else 'I'}"
            length = struct.unpack_from(fmt, data, length_offset)[0]
            found.append(Element(offset, (group, number), vr_offset, length_offset, length_size, value_offset, length))
            if length == 0xFFFFFFFF:
                if depth > 20:
                    return stop
                offset = elements(value_offset, stop, depth + 1)
            else:
                offset = value_offset + length
        return offset

    try:
        elements(0, len(data), 0)
    except struct.error:
        pass
    return found


def _position(rng: random.Random, size: int) -> int:
    """Mostly in the header region (the first 2 KiB), sometimes anywhere."""
    if size <= 1:
        return 0
    return rng.randrange(min(size, 2048)) if rng.random() < 0.8 else rng.randrange(size)


def _with_length(data: bytearray, element: Element, length: int, little: bool) -> None:
    end = "<" if little else ">"
    if element.length_size == 2:
        length &= 0xFFFF
        struct.pack_into(f"{end}H", data, element.length_offset, length)
    else:
        struct.pack_into(f"{end}I", data, element.length_offset, length & 0xFFFFFFFF)


def mutate_once(rng: random.Random, seed: Seed, data: bytearray) -> tuple[str, bytearray]:
    """Apply one mutation; returns its kind and the (possibly new) buffer."""
    elements = walk(bytes(data), seed.explicit, seed.little)
    kind = rng.choice(["flip", "flip", "truncate", "length", "length", "vr", "tag", "junk", "reorder",
                       "charset", "value"])
    if not elements and kind not in ("flip", "truncate", "junk"):
        kind = "flip"
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            if data:
                data[_position(rng, len(data))] ^= rng.randint(1, 255)
    elif kind == "truncate":
        data = data[:_position(rng, len(data))]
    elif kind == "length":
        element = rng.choice(elements)
        choice = rng.choice(INTERESTING_LENGTHS + ["+1", "-1", "x2", "rest", "random"])
        length = {"+1": element.length + 1, "-1": max(element.length - 1, 0), "x2": element.length * 2,
                  "rest": len(data) - element.value_offset + rng.randint(0, 16),
                  "random": rng.getrandbits(32)}.get(str(choice), choice)
        _with_length(data, element, int(length), seed.little)
    elif kind == "vr":
        candidates = [e for e in elements if e.vr_offset is not None]
        if candidates:
            element = rng.choice(candidates)
            vr = rng.choice(VRS + BAD_VRS)
            data[element.vr_offset:element.vr_offset + 2] = (vr + b"  ")[:2]
        else:  # implicit VR: the only "VR" is what the dictionary says; mangle the tag instead
            kind = "tag"
    if kind == "tag":
        element = rng.choice(elements)
        group, number = rng.choice(INTERESTING_TAGS) if rng.random() < 0.7 else (rng.getrandbits(16),
                                                                                 rng.getrandbits(16))
        struct.pack_into(f"{'<' if seed.little else '>'}HH", data, element.offset, group, number)
    elif kind == "junk":
        at = _position(rng, len(data) + 1)
        starts = [e.offset for e in elements]
        if starts and rng.random() < 0.7:
            at = rng.choice(starts)
        data[at:at] = bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 2, 4, 8, 12, 64])))
    elif kind == "reorder":
        top = [e for e in elements if e.tag[0] != 0xFFFE and e.length != 0xFFFFFFFF
               and e.value_offset + e.length <= len(data)]
        if len(top) >= 2:
            a, b = sorted(rng.sample(top, 2), key=lambda e: e.offset)
            chunk = bytes(data[b.offset:b.value_offset + b.length])
            if rng.random() < 0.5:
                del data[b.offset:b.value_offset + b.length]  # move b before a (tags out of order)
            data[a.offset:a.offset] = chunk  # ... or duplicate it there
    elif kind in ("charset", "value"):
        texts = [e for e in elements if e.tag[0] != 0xFFFE and e.length != 0xFFFFFFFF and e.length < 1024
                 and e.value_offset + e.length <= len(data)]
        if kind == "charset":
            target = [e for e in texts if e.tag == (0x0008, 0x0005)]
            value = rng.choice(CHARSETS)
        else:
            target = [e for e in texts if e.tag[0] in (0x0008, 0x0010, 0x0020, 0x0032, 0x0040)]
            value = rng.choice(TEXT_JUNK) if rng.random() < 0.6 else bytes(
                rng.getrandbits(8) for _ in range(rng.randint(1, 40)))
        if target:
            element = rng.choice(target)
            value = value + b" " if len(value) % 2 else value
            data[element.value_offset:element.value_offset + element.length] = value
            _with_length(data, element, len(value), seed.little)
        else:
            data[_position(rng, len(data))] ^= 0x5A
    return kind, data


def mutations(seeds: list[Seed], count: int, seed: int) -> Iterator[tuple[int, Seed, str, bytes]]:
    """``count`` mutated files: (number, seed, kinds applied, complete Part-10 bytes)."""
    rng = random.Random(seed)
    for number in range(count):
        source = rng.choice(seeds)
        while True:
            data = bytearray(source.dataset)
            kinds = []
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                kind, data = mutate_once(rng, source, data)
                kinds.append(kind)
            # A dataset that starts in group 0002 would be read as more file meta by the sending SCU
            # (pynetdicom's split_dataset) and never go out as sent: mutate again.
            if source.deflated or data[:2] != (b"\x02\x00" if source.little else b"\x00\x02"):
                break
        body = bytes(data)
        if source.deflated:
            if rng.random() < 0.3:  # the compressed stream itself damaged
                compressed = bytearray(_deflate(body))
                if compressed:
                    compressed[rng.randrange(len(compressed))] ^= rng.randint(1, 255)
                body = bytes(compressed[:rng.randrange(len(compressed) + 1)] if rng.random() < 0.5 else compressed)
                kinds.append("deflate-stream")
            else:
                body = _deflate(body)
        yield number, source, "+".join(kinds), source.prefix + body


def _deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()
