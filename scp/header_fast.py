"""A small Part-10 reader that mirrors what pydicom's ``dcmread`` reads, for the header fast path.

:func:`scp.header.read_header` calls pydicom's ``dcmread(stop_before_pixels=True,
specific_tags=...)``, which costs hundreds of microseconds per instance. This module reads the
same elements straight from the file's bytes in a fraction of that time, and produces exactly
what pydicom's reader would hold for them: the same raw values (bytes), the same VRs (``None``
for implicit VR, as pydicom's ``RawDataElement`` has), the same sequence items, in the same
order, with the same "last duplicate wins" semantics. :mod:`scp.header` then applies one and
the same value conversion to either.

It only handles what it can mirror for certain: Part-10 files in Implicit or Explicit VR Little
Endian (including the encapsulated transfer syntaxes, whose dataset is Explicit VR Little
Endian), walked to the Pixel Data (or the end of the dataset), with pydicom's default reading
configuration. Anything else — big endian, deflate, a file without preamble or meta, an unknown
VR, a structure pydicom would read differently or fail on (lengths running past their item or
sequence, items not tagged as items, an undefined length value that is not encapsulated data,
...) — raises :class:`Fallback`, and the caller uses pydicom. The whole top-level dataset up to
the Pixel Data is walked (not just up to the last needed tag): a later duplicate of a needed
tag, or malformed data that would make pydicom fail, must give the same answer as pydicom.

Undefined-length sequences are parsed even when not needed (pydicom parses them while reading,
and fails on malformed ones); defined-length elements that are not needed are skipped by their
length, as pydicom does.

The file is read, not memory-mapped (a file truncated under a mapping would kill the process
with SIGBUS): the first 64 KiB, then four times more whenever the walk needs bytes beyond, up
to 16 MiB. What pydicom does is mirrored for the pydicom version this was checked against
(:data:`MIRRORED_PYDICOM`); with any other, every file goes to pydicom until re-checked (the
tests in ``tests/test_header_fast.py`` then fail).
"""

from __future__ import annotations

from struct import Struct
from struct import error as struct_error
from typing import Any, Union

import pydicom
from pydicom import config
from pydicom import uid as pydicom_uid
from pydicom.charset import convert_encodings
from pydicom.datadict import _dictionary_vr_fast
from pydicom.filereader import ENCODED_VR
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, STR_VR
from pydicom.values import convert_string

MIRRORED_PYDICOM = "3.0."  # the pydicom releases whose reader this mirrors
PREFIX_BYTES = 64 * 1024  # read first; more only when the walk needs it
MAX_READ_BYTES = 16 * 1024 * 1024  # headers larger than this (to the Pixel Data) go to pydicom

UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
CHARSET = 0x00080005
PIXEL_REPRESENTATION = 0x00280103
PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})  # pydicom's stop_before_pixels

_PYDICOM_MIRRORED = pydicom.__version__.startswith(MIRRORED_PYDICOM)

_EXPLICIT_HEADER = Struct("<HH2sH").unpack_from
_IMPLICIT_HEADER = Struct("<HHL").unpack_from
_UINT32 = Struct("<L").unpack_from
_TAG = Struct("<HH").unpack_from

# Two-character VRs pydicom recognises in explicit VR, by their encoded bytes.
_VR_BY_BYTES: dict[bytes, str] = {vr: vr.decode("ascii") for vr in ENCODED_VR if len(vr) == 2}
_LONG_LENGTH_VRS = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)
_IS_LONG_BY_BYTES = {encoded: vr in _LONG_LENGTH_VRS for encoded, vr in _VR_BY_BYTES.items()}
# What pydicom stores for a zero-length value read from the file (empty_value_for_VR(raw=True)).
_EMPTY_AS_BYTES = frozenset({"SQ", "PN"} | {str(vr) for vr in STR_VR} - {"DS", "IS"})

_IMPLICIT_LE = "1.2.840.10008.1.2"
# Transfer syntaxes whose dataset pydicom would not read as plain Little Endian.
_NOT_LITTLE_ENDIAN_DATASET = frozenset({
    "1.2.840.10008.1.2.2",     # Explicit VR Big Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.95",  # JPIP Referenced Deflate
})
_META_FIRST_VRS = frozenset({"OB", "UI", "AE", "SH", "CS", "LO"})  # converted by pydicom; safe

# A raw element as pydicom's RawDataElement holds it: (VR or None, value or None, implicit VR?).
RawElement = tuple[Union[str, None], Union[bytes, None], bool]
# An undefined-length sequence, which pydicom parses while reading: its items.
Items = list["Elements"]
Elements = dict[int, Union[RawElement, Items]]


class Fallback(Exception):
    """The fast reader cannot be sure to read this file exactly as pydicom would."""


class _NeedMore(Exception):
    """The walk needs bytes beyond the prefix read so far."""


def config_is_default() -> bool:
    """True when pydicom's reading configuration is the one this reader mirrors."""
    settings = config.settings
    return (_PYDICOM_MIRRORED
            and settings.reading_validation_mode != config.RAISE
            and settings.infer_sq_for_un_vr
            and config.replace_un_with_known_vr
            and config.assume_implicit_vr_switch
            and not config.use_none_as_empty_text_VR_value
            and config.data_element_callback is None
            and not pydicom_uid.PrivateTransferSyntaxes)


def read_file(path: str, needed: frozenset[int], head: bytes | bytearray = b"",
              size: int | None = None) -> tuple[str, Elements]:
    """The Transfer Syntax UID and the ``needed`` top-level elements of the Part-10 file at ``path``.

    ``needed`` are the ``specific_tags`` pydicom is given (plus Specific Character Set). Reads
    :data:`PREFIX_BYTES` first, then three times what it has each time the walk needs bytes
    beyond, up to :data:`MAX_READ_BYTES`. ``head`` (the file's first bytes, already in memory,
    with the file's ``size``) stands in for the first read; the file is then opened only when
    the walk needs more. Raises :class:`Fallback` (or OSError) when pydicom must do it.
    """
    data, complete = (bytes(head), len(head) >= size) if head and size is not None else (b"", False)
    handle: Any = None
    try:
        while True:
            if data or complete:
                try:
                    return _Reader(data, complete).read(needed)
                except _NeedMore:
                    if len(data) >= MAX_READ_BYTES:
                        raise Fallback("header larger than the fast path reads") from None
            if handle is None:
                handle = open(path, "rb", buffering=0)  # noqa: SIM115 (closed below)
                handle.seek(len(data))
            asked = max(PREFIX_BYTES, 3 * len(data))
            more = _read(handle, asked)
            data += more
            complete = len(more) < asked
    finally:
        if handle is not None:
            handle.close()


def _read(handle: Any, size: int) -> bytes:
    """``size`` bytes, or fewer only at the end of the file."""
    data = handle.read(size)
    while 0 < len(data) < size:  # a short read before the end (rare for regular files)
        more = handle.read(size - len(data))
        if not more:
            break
        data += more
    return data


def read_sequence_value(value: bytes, implicit: bool) -> Items:
    """The items of a defined-length sequence value, as pydicom's ``convert_SQ`` reads them."""
    reader = _Reader(value, True)
    items, _ = reader.sequence(0, len(value), implicit, len(value), True)
    return items if items is not None else []


class _Reader:
    """Walks ``data`` (the file's first bytes, or all of them when ``complete``)."""

    __slots__ = ("data", "size", "complete")

    def __init__(self, data: Any, complete: bool) -> None:
        self.data = data
        self.size = len(data)
        self.complete = complete

    def _short(self, end: int, bound: int) -> None:
        """Reading up to ``end`` would pass ``bound``: need more bytes, or give up."""
        if bound >= self.size and end > self.size and not self.complete:
            raise _NeedMore
        raise Fallback("value or item runs past its container")

    # -- file meta information, as pydicom's read_preamble + _read_file_meta_info ------------

    def read(self, needed: frozenset[int]) -> tuple[str, Elements]:
        position, transfer_syntax = self._meta()
        implicit = self._dataset_encoding(position, transfer_syntax)
        return transfer_syntax, self._top_level(position, implicit, needed)

    def _meta(self) -> tuple[int, str]:
        data, size = self.data, self.size
        if size < 144:
            if not self.complete:
                raise _NeedMore
            raise Fallback("too short for a Part-10 file")
        if data[128:132] != b"DICM":
            raise Fallback("no DICM prefix")
        position = 132
        group, _, vr_bytes, _ = _EXPLICIT_HEADER(data, position)
        if group != 2 or vr_bytes not in _VR_BY_BYTES:
            raise Fallback("file meta does not start with an explicit VR group 2 element")
        meta: dict[int, tuple[str, bytes]] = {}
        while True:
            if position + 8 > size:
                if not self.complete:
                    raise _NeedMore
                raise Fallback("file ends in the file meta")
            group, element, vr_bytes, length = _EXPLICIT_HEADER(data, position)
            vr = _VR_BY_BYTES.get(vr_bytes)
            if group != 2:
                if vr in _LONG_LENGTH_VRS and position + 12 > size:
                    if not self.complete:
                        raise _NeedMore
                    raise Fallback("file ends in an element header")
                break
            if vr is None:
                raise Fallback("unknown VR in the file meta")
            value_at = position + 8
            if vr in _LONG_LENGTH_VRS:
                if position + 12 > size:
                    if not self.complete:
                        raise _NeedMore
                    raise Fallback("file ends in an element header")
                length = _UINT32(data, value_at)[0]
                value_at += 4
            if length == UNDEFINED:
                raise Fallback("undefined length in the file meta")
            end = value_at + length
            if end > size:
                if not self.complete:
                    raise _NeedMore
                raise Fallback("file ends in the file meta")
            meta[0x00020000 | element] = (vr, data[value_at:end])
            position = end
        first_vr, first_value = next(iter(meta.values()))
        if first_vr not in _META_FIRST_VRS and not (first_vr == "UL" and len(first_value) == 4):
            raise Fallback("unusual first file meta element")  # pydicom converts it
        group_length = meta.get(0x00020000)
        if group_length is not None and (group_length[0] != "UL" or len(group_length[1]) != 4):
            raise Fallback("unusual File Meta Information Group Length")  # pydicom converts it
        ts_element = meta.get(0x00020010)
        if ts_element is None or ts_element[0] != "UI":
            raise Fallback("no Transfer Syntax UID")
        transfer_syntax = ts_element[1].decode("latin-1").rstrip("\x00 ")
        if "\\" in transfer_syntax:
            raise Fallback("several Transfer Syntax UIDs")
        return position, transfer_syntax

    def _dataset_encoding(self, position: int, transfer_syntax: str) -> bool:
        """Implicit VR? As pydicom's read_partial decides, or Fallback where it would not be plain."""
        implicit = transfer_syntax == _IMPLICIT_LE
        if not implicit and not _is_explicit_le(transfer_syntax):
            raise Fallback(f"transfer syntax {transfer_syntax[:70]!r}")
        data = self.data
        if position + 12 > self.size:
            if not self.complete:
                raise _NeedMore
            raise Fallback("no dataset")
        if data[position] == 0 and data[position + 1] == 0:
            raise Fallback("command set elements in the dataset")  # group 0000
        # pydicom's _is_implicit_vr: it trusts the first element's VR bytes over the transfer syntax
        looks_implicit = not (0x40 < data[position + 4] < 0x5B and 0x40 < data[position + 5] < 0x5B)
        if looks_implicit != implicit:
            raise Fallback("dataset VR encoding differs from the transfer syntax")
        return implicit

    # -- the top-level dataset, as pydicom's data_element_generator with specific_tags --------

    def _top_level(self, position: int, implicit: bool, needed: frozenset[int]) -> Elements:
        data, size, complete = self.data, self.size, self.complete
        is_long_by_bytes, pixel_tags = _IS_LONG_BY_BYTES, PIXEL_DATA_TAGS
        found: Elements = {}
        while True:
            try:  # (struct.error: fewer than 8 bytes left)
                if implicit:
                    group, element, length = _IMPLICIT_HEADER(data, position)
                else:
                    group, element, vr_bytes, length = _EXPLICIT_HEADER(data, position)
            except struct_error:
                if not complete:
                    raise _NeedMore from None
                return found  # end of file (pydicom also ends here when a skip passed it)
            position += 8
            if not implicit:
                is_long = is_long_by_bytes.get(vr_bytes)
                if is_long:
                    if position + 4 > size:
                        if not complete:
                            raise _NeedMore
                        raise Fallback("file ends in an element header")
                    length = _UINT32(data, position)[0]
                    position += 4
                elif is_long is None:
                    if group == 0xFFFE and element == 0xE00D:
                        return found  # an item delimiter ends pydicom's dataset
                    raise Fallback(f"unknown VR {vr_bytes!r}")
            tag = group << 16 | element
            if length != UNDEFINED and group < 0x7FE0 and tag not in needed:
                position += length  # pydicom seeks past it (past the end of the file, too)
                continue
            # a needed element, an undefined length, the pixel data or beyond
            vr = None if implicit else _VR_BY_BYTES[vr_bytes]
            if group == 0xFFFE:
                if tag == ITEM_DELIMITER:
                    return found
                raise Fallback("item or sequence delimiter in the dataset")
            if tag in pixel_tags:
                return found
            if length != UNDEFINED:
                if tag not in needed:
                    position += length
                    continue
                end = position + length
                if end > size:
                    if not complete:
                        raise _NeedMore
                    raise Fallback("file ends in a needed value")
                found[tag] = (vr, _value(data, position, end, vr, tag), implicit)
                position = end
                continue
            if tag == CHARSET:
                raise Fallback("Specific Character Set of undefined length")
            position = self._undefined(tag, vr, position, implicit, size, tag in needed, found)

    # -- nested data, as pydicom's read_sequence / read_sequence_item / read_dataset ----------

    def _undefined(self, tag: int, vr: str | None, position: int, implicit: bool, bound: int,
                   keep: bool, into: Elements) -> int:
        """Read an undefined-length element at ``position`` (its value); store it if ``keep``."""
        if vr == "UN":
            vr = "SQ"  # config.settings.infer_sq_for_un_vr
        if vr is None:
            try:
                vr = _dictionary_vr_fast(tag)
            except KeyError:
                if position + 4 > bound:
                    self._short(position + 4, bound)
                if _UINT32(self.data, position)[0] == 0xE000FFFE:  # (FFFE,E000) little endian
                    vr = "SQ"
        if vr == "SQ":
            items, position = self.sequence(position, UNDEFINED, implicit, bound, keep)
            if keep:
                into[tag] = items  # type: ignore[assignment]
            return position
        value, position = self._encapsulated(position, bound)
        if keep:
            into[tag] = (vr, value, implicit)
        return position

    def sequence(self, position: int, length: int, implicit: bool, bound: int,
                 keep: bool) -> tuple[Items | None, int]:
        """Read a sequence value; its items (dicts) when ``keep``, else only checked."""
        data = self.data
        items: Items | None = [] if keep else None
        if length == UNDEFINED:
            end = bound
        else:
            end = position + length
            if end > bound:
                self._short(end, bound)
        while length == UNDEFINED or position < end:
            if position + 8 > end:
                self._short(position + 8, end)
            group, element, item_length = _IMPLICIT_HEADER(data, position)
            position += 8
            if group != 0xFFFE:
                raise Fallback("sequence item without item tag")
            if element == 0xE0DD:
                if length != UNDEFINED:
                    raise Fallback("sequence delimiter in a defined-length sequence")
                return items, position
            if element != 0xE000:
                raise Fallback("sequence item without item tag")
            item, position = self._item(position, item_length, implicit, end, keep)
            if items is not None:
                items.append(item)  # type: ignore[arg-type]
        if position != end:
            raise Fallback("items run past their sequence")
        return items, position

    def _item(self, position: int, length: int, implicit: bool, bound: int,
              keep: bool) -> tuple[Elements | None, int]:
        data = self.data
        if length == UNDEFINED:
            end = bound
        else:
            end = position + length
            if end > bound:
                self._short(end, bound)
            if length == 0:
                return ({} if keep else None), position
        if position + 8 > end:
            self._short(position + 8, end)
        if not implicit:
            # pydicom's _is_implicit_vr for a sequence item: an explicit VR dataset may hold
            # implicit VR items; the first element's VR bytes decide.
            implicit = not (0x40 < data[position + 4] < 0x5B and 0x40 < data[position + 5] < 0x5B)
        vr_by_bytes, long_vrs = _VR_BY_BYTES, _LONG_LENGTH_VRS
        found: Elements | None = {} if keep else None
        while length == UNDEFINED or position < end:
            if position + 8 > end:
                self._short(position + 8, end)
            vr: str | None
            if implicit:
                group, element, value_length = _IMPLICIT_HEADER(data, position)
                vr = None
                position += 8
            else:
                group, element, vr_bytes, value_length = _EXPLICIT_HEADER(data, position)
                position += 8
                vr = vr_by_bytes.get(vr_bytes)
                if group == 0xFFFE and element == 0xE00D:
                    if vr_bytes != b"\0\0" or value_length:
                        raise Fallback("item delimiter with a non-zero length")
                elif vr is None:
                    raise Fallback(f"unknown VR {vr_bytes!r}")
                elif vr in long_vrs:
                    if position + 4 > end:
                        self._short(position + 4, end)
                    value_length = _UINT32(data, position)[0]
                    position += 4
            if group == 0xFFFE:
                if element == 0xE00D and length == UNDEFINED:
                    return found, position
                raise Fallback("item or delimiter tag inside an item")
            tag = group << 16 | element
            if value_length != UNDEFINED:
                value_end = position + value_length
                if value_end > end:
                    self._short(value_end, end)
                if found is not None or tag == CHARSET:
                    value = _value(data, position, value_end, vr, tag)
                    if found is not None:
                        found[tag] = (vr, value, implicit)
                position = value_end
            elif tag == CHARSET:
                raise Fallback("Specific Character Set of undefined length")
            else:
                position = self._undefined(tag, vr, position, implicit, end, found is not None,
                                           found if found is not None else {})
        if position != end:
            raise Fallback("elements run past their item")
        return found, position

    def _encapsulated(self, position: int, bound: int) -> tuple[bytes, int]:
        """An undefined-length non-sequence value, when it is well-formed encapsulated data.

        pydicom first tries this (``_try_read_encapsulated_pixel_data``); when that fails it
        scans the bytes for a delimiter, which is not mirrored here.
        """
        data = self.data
        start = position
        while True:
            if position + 4 > bound:
                self._short(position + 4, bound)
            marker = data[position:position + 4]
            position += 4
            if marker == b"\xfe\xff\xdd\xe0":
                break
            if marker != b"\xfe\xff\x00\xe0":
                raise Fallback("undefined length value that is not encapsulated")
            if position + 4 > bound:
                self._short(position + 4, bound)
            position += 4 + _UINT32(data, position)[0]
        if position + 4 > bound:
            self._short(position + 4, bound)
        return data[start:position - 4], position + 4


_CHARSETS_READ: dict[bytes, bool] = {}


def _value(data: Any, start: int, end: int, vr: str | None, tag: int) -> bytes | None:
    """An element's value as pydicom's raw element holds it: the bytes, or for an empty value ``b""`` or
    None by VR; a Specific Character Set is checked as it is read."""
    value = data[start:end] if end > start else (b"" if vr in _EMPTY_AS_BYTES else None)
    if tag == CHARSET:
        check_charset(vr, value)
    return value


def check_charset(vr: str | None, value: bytes | None) -> None:
    """Fallback unless pydicom reads this Specific Character Set value without an error.

    pydicom converts every (0008,0005) it reads, nested ones included, and some values make
    that raise (a NUL inside, for one); others only warn.
    """
    if vr not in (None, "CS"):
        raise Fallback("Specific Character Set with an unusual VR")
    key = value or b""
    known = _CHARSETS_READ.get(key)
    if known is None:
        try:
            convert_encodings(convert_string(key, True))
            known = True
        except Exception:
            known = False
        if len(_CHARSETS_READ) < 256:
            _CHARSETS_READ[key] = known
    if not known:
        raise Fallback("Specific Character Set pydicom cannot read")


_EXPLICIT_LE_CACHE: dict[str, bool] = {}


def _is_explicit_le(transfer_syntax: str) -> bool:
    """A transfer syntax pydicom knows whose dataset is Explicit VR Little Endian, not deflated."""
    known = _EXPLICIT_LE_CACHE.get(transfer_syntax)
    if known is None:
        syntax = pydicom_uid.UID(transfer_syntax)
        try:
            known = (syntax.is_transfer_syntax and syntax.is_little_endian
                     and not syntax.is_implicit_VR and not syntax.is_deflated
                     and transfer_syntax not in _NOT_LITTLE_ENDIAN_DATASET)
        except ValueError:
            known = False
        if len(_EXPLICIT_LE_CACHE) < 256:
            _EXPLICIT_LE_CACHE[transfer_syntax] = known
    return known
