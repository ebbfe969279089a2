"""A raw DICOM Upper Layer client for fault tests: PDUs built byte by byte, nothing validated.

pynetdicom (rightly) refuses to put some values on the wire — UIDs over 64 characters, command
sets that do not decode — so tests that need to send exactly such bytes, or to see exactly what
came back (a C-STORE-RSP, an A-ABORT, or the connection simply closing), use this instead.
Only what those tests need: A-ASSOCIATE-RQ, C-STORE-RQ/C-ECHO-RQ in P-DATA-TF, A-RELEASE, A-ABORT.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = b"1.2.826.0.1.3680043.8.498.1"
VERIFICATION = b"1.2.840.10008.1.1"
EXPLICIT_VR_LE = b"1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = b"1.2.840.10008.1.2"


def _even(value: bytes, pad: bytes = b"\x00") -> bytes:
    return value + pad if len(value) % 2 else value


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _element(group: int, element: int, value: bytes) -> bytes:
    """One Implicit VR Little Endian element (command sets are always encoded so)."""
    return struct.pack("<HHI", group, element, len(value)) + value


def command_set(elements: list[tuple[int, bytes]]) -> bytes:
    """A group 0000 command set with its group length, from (element number, value bytes) pairs."""
    body = b"".join(_element(0x0000, number, value) for number, value in sorted(elements))
    return _element(0x0000, 0x0000, struct.pack("<I", len(body))) + body


def c_store_rq(message_id: int, sop_class: bytes, sop_instance: bytes) -> bytes:
    """A C-STORE-RQ command set carrying exactly the given UID bytes (padded to even length only)."""
    return command_set([
        (0x0002, _even(sop_class)),
        (0x0100, struct.pack("<H", 0x0001)),
        (0x0110, struct.pack("<H", message_id)),
        (0x0700, struct.pack("<H", 0x0000)),
        (0x0800, struct.pack("<H", 0x0000)),  # a dataset follows
        (0x1000, _even(sop_instance)),
    ])


def c_echo_rq(message_id: int) -> bytes:
    return command_set([
        (0x0002, _even(VERIFICATION)),
        (0x0100, struct.pack("<H", 0x0030)),
        (0x0110, struct.pack("<H", message_id)),
        (0x0800, struct.pack("<H", 0x0101)),  # no dataset
    ])


def parse_command(data: bytes) -> dict[int, bytes]:
    """Element number → value of an Implicit VR Little Endian group 0000 command set."""
    elements: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(data):
        group, number, length = struct.unpack_from("<HHI", data, offset)
        offset += 8
        elements[number] = data[offset:offset + length]
        offset += length
    return elements


@dataclass
class Response:
    """What came back for one request: a status, or how the peer ended instead."""

    status: int | None = None
    error_comment: str | None = None
    ended: str | None = None  # "A-ABORT" | "closed" | "timeout" | "A-RELEASE-RP" ... when no status came
    abort_source_reason: tuple[int, int] | None = None
    command: dict[int, bytes] = field(default_factory=dict)


class AssociationRefused(Exception):
    """The peer answered A-ASSOCIATE-RJ, aborted or closed instead of accepting."""


class RawAssociation:
    """One association made of hand-built PDUs."""

    def __init__(self, port: int, contexts: list[tuple[bytes, list[bytes]]], *, called: bytes = b"IMAGINGSTUDY",
                 calling: bytes = b"RAWSCU", host: str = "127.0.0.1", timeout: float = 10,
                 max_pdu: int = 16384) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer_max_pdu = 16384
        self.accepted: dict[int, bytes] = {}  # context id → transfer syntax of accepted contexts
        self.results: dict[int, int] = {}  # context id → result (0 = acceptance)
        self.context_ids: list[int] = []
        self._associate(contexts, called, calling, max_pdu)
        self._message_id = 0

    # -- PDU transport ----------------------------------------------------------------

    def _recv_exact(self, count: int) -> bytes:
        chunks = []
        while count:
            chunk = self.sock.recv(count)
            if not chunk:
                raise ConnectionResetError("peer closed the connection")
            chunks.append(chunk)
            count -= len(chunk)
        return b"".join(chunks)

    def read_pdu(self) -> tuple[int, bytes]:
        kind, _, length = struct.unpack(">BBI", self._recv_exact(6))
        return kind, self._recv_exact(length)

    def send_pdu(self, kind: int, body: bytes) -> None:
        self.sock.sendall(struct.pack(">BBI", kind, 0, len(body)) + body)

    # -- association ------------------------------------------------------------------

    def _associate(self, contexts: list[tuple[bytes, list[bytes]]], called: bytes, calling: bytes,
                   max_pdu: int) -> None:
        items = [_item(0x10, APPLICATION_CONTEXT)]
        for index, (abstract, transfers) in enumerate(contexts):
            context_id = 2 * index + 1
            self.context_ids.append(context_id)
            sub = _item(0x30, abstract) + b"".join(_item(0x40, ts) for ts in transfers)
            items.append(_item(0x20, bytes([context_id, 0, 0, 0]) + sub))
        user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, IMPLEMENTATION_CLASS_UID)
        items.append(_item(0x50, user))
        header = struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + b"\x00" * 32
        self.send_pdu(0x01, header + b"".join(items))
        try:
            kind, body = self.read_pdu()
        except (ConnectionError, TimeoutError, OSError) as exc:
            self.sock.close()
            raise AssociationRefused(f"no answer to A-ASSOCIATE-RQ: {exc}") from exc
        if kind != 0x02:
            self.sock.close()
            raise AssociationRefused(f"A-ASSOCIATE answered with PDU type 0x{kind:02X}: {body.hex()}")
        offset = 68
        while offset + 4 <= len(body):
            item_type, _, length = struct.unpack_from(">BBH", body, offset)
            value = body[offset + 4:offset + 4 + length]
            offset += 4 + length
            if item_type == 0x21:
                context_id, result = value[0], value[2]
                self.results[context_id] = result
                if result == 0:
                    ts_length = struct.unpack_from(">H", value, 6)[0]
                    self.accepted[context_id] = value[8:8 + ts_length]
            elif item_type == 0x50:
                sub_offset = 0
                while sub_offset + 4 <= len(value):
                    sub_type, _, sub_length = struct.unpack_from(">BBH", value, sub_offset)
                    if sub_type == 0x51 and sub_length == 4:
                        self.peer_max_pdu = struct.unpack_from(">I", value, sub_offset + 4)[0] or 1 << 20
                    sub_offset += 4 + sub_length

    def _send_message(self, context_id: int, command: bytes, dataset: bytes | None) -> None:
        room = max(self.peer_max_pdu - 6, 64)  # PDV item header (4 + 2) inside the PDU
        self.send_pdu(0x04, struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command)
        if dataset is None:
            return
        chunks = [dataset[i:i + room] for i in range(0, len(dataset), room)] or [b""]
        for number, chunk in enumerate(chunks):
            control = 0x02 if number == len(chunks) - 1 else 0x00
            self.send_pdu(0x04, struct.pack(">IBB", len(chunk) + 2, context_id, control) + chunk)

    def _response(self) -> Response:
        command = bytearray()
        while True:
            try:
                kind, body = self.read_pdu()
            except TimeoutError:
                return Response(ended="timeout")
            except (ConnectionError, OSError):
                return Response(ended="closed")
            if kind == 0x07:
                return Response(ended="A-ABORT", abort_source_reason=(body[2], body[3]))
            if kind != 0x04:
                return Response(ended=f"PDU 0x{kind:02X}")
            offset = 0
            while offset + 6 <= len(body):
                length, _context, control = struct.unpack_from(">IBB", body, offset)
                command += body[offset + 6:offset + 4 + length]
                offset += 4 + length
                if control & 0x03 == 0x03:
                    elements = parse_command(bytes(command))
                    status = struct.unpack("<H", elements[0x0900])[0] if 0x0900 in elements else None
                    comment = elements.get(0x0902, b"").decode("ascii", "replace").rstrip("\x00 ") or None
                    return Response(status=status, error_comment=comment, command=elements)

    def c_store(self, context_id: int, sop_class: bytes, sop_instance: bytes, dataset: bytes) -> Response:
        self._message_id += 1
        try:
            self._send_message(context_id, c_store_rq(self._message_id, sop_class, sop_instance), dataset)
        except (ConnectionError, OSError):
            return Response(ended="closed")
        return self._response()

    def c_echo(self, context_id: int) -> Response:
        self._message_id += 1
        self._send_message(context_id, c_echo_rq(self._message_id), None)
        return self._response()

    def release(self) -> bool:
        """A-RELEASE; True when the peer answered A-RELEASE-RP."""
        try:
            self.send_pdu(0x05, b"\x00" * 4)
            kind, _ = self.read_pdu()
            return kind == 0x06
        except (ConnectionError, OSError):
            return False
        finally:
            self.sock.close()

    def abort(self) -> None:
        try:
            self.send_pdu(0x07, b"\x00\x00\x00\x00")
        except OSError:
            pass
        self.sock.close()
