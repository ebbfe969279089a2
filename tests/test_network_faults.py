"""Faults at the network edge: requests the transport cannot store, peers that stall, and stopping while
associations are open. Real servers (a subprocess, or the embedded one where the test must look inside or
shorten the stop's grace) and raw PDUs (tests/fault_dicom.py) for what pynetdicom would refuse to send."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from conftest import RunningSCP, free_port, temp_leftovers, wait_for
from dicom_factory import CT_IMAGE_STORAGE, UID_ROOT, dataset_bytes, make_instance
from fault_dicom import EXPLICIT_VR_LE, AssociationRefused, RawAssociation, c_store_rq, parse_command
from fault_scu import echo
from scp import StorageSCP, transport

CT_CONTEXT = [(CT_IMAGE_STORAGE.encode(), [EXPLICIT_VR_LE])]


@dataclasses.dataclass
class Instance:
    study: str
    sop: str
    data: bytes  # the dataset as sent (no file meta)


def instance(folder: Path, study: str | None = None) -> Instance:
    study = study or generate_uid(UID_ROOT)
    sop = generate_uid(UID_ROOT)
    path = make_instance(folder / f"{sop}.dcm", study_uid=study, series_uid=generate_uid(UID_ROOT), sop_uid=sop,
                         rows=8, columns=8)
    return Instance(study, sop, dataset_bytes(path))


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def stall_mid_dataset(assoc: RawAssociation, item: Instance) -> None:
    """A C-STORE-RQ, part of its dataset, then a PDU announced as 5000 bytes of which 100 come; the
    connection stays open (a peer that lost power behind a NAT, a dead firewall path)."""
    assoc.send_pdu(0x04, pdv(1, 0x03, c_store_rq(99, CT_IMAGE_STORAGE.encode(), item.sop.encode())))
    assoc.send_pdu(0x04, pdv(1, 0x00, item.data[:600]))
    assoc.sock.sendall(struct.pack(">BBI", 0x04, 0, 5000) + b"\0" * 100)


def open_tmp_files(tmp: Path) -> list[str]:
    """This process's open file descriptors into ``tmp`` (the embedded server's temp dir)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{tmp}/"):
            found.append(target)
    return sorted(found)


def only_the_spare_pool(scp: StorageSCP) -> Callable[[], bool]:
    """True once every file in tmp/, and every fd open on one, is an unused spare file of the pool: nothing
    was taken and left behind (a leaked spare is an empty spare-* file too, so the names alone do not tell)."""
    listener = scp._server.listener  # type: ignore[union-attr]
    tmp = scp.data_dir / "tmp"

    def check() -> bool:
        pool = sorted(path for path, _ in list(listener._spare_files._ready))
        return open_tmp_files(tmp) == pool == sorted(str(p) for p in tmp.iterdir())
    return check


def can_associate(port: int) -> bool:
    try:
        assoc = RawAssociation(port, CT_CONTEXT, timeout=5)
    except AssociationRefused:
        return False
    return assoc.release()


def read_study(data_dir: Path, study: str) -> dict[str, Any]:
    import orjson

    return orjson.loads((data_dir / "fhir" / "ImagingStudy" / f"{study}.json").read_bytes())


# -- a C-STORE-RQ whose UIDs cannot be UIDs (report bug 1), a response longer than a tiny PDU (bug 5) -------

def test_request_uids_that_cannot_be_uids_are_refused_and_nothing_is_taken(tmp_path: Path) -> None:
    """A byte beyond ASCII, an absurd length or nothing at all in the request's Affected SOP Class/Instance UID:
    the dataset is read and dropped, 0xC000 with an Error Comment, no temp file taken or left open, the association
    goes on."""
    good = instance(tmp_path / "g")
    cases = [
        (CT_IMAGE_STORAGE.encode() + b"\xe9", good.sop.encode(), "Affected SOP Class UID is not a UID"),
        (CT_IMAGE_STORAGE.encode(), good.sop.encode()[:-2] + b"\xe9\xe9", "Affected SOP Instance UID is not"),
        (CT_IMAGE_STORAGE.encode(), b"1." + b"2" * 70000, "Affected SOP Instance UID is 70002 characters"),
        (CT_IMAGE_STORAGE.encode(), b"1." + b"2" * 68, "Affected SOP Instance UID is 70 characters"),
        (b"", good.sop.encode(), "the request has no Affected SOP Class UID"),  # mandatory, both
        (CT_IMAGE_STORAGE.encode(), b"\x00", "the request has no Affected SOP Instance UID"),
    ]
    with StorageSCP(tmp_path / "data") as scp:
        listener = scp._server.listener  # type: ignore[union-attr]
        taken: list[str] = []
        take = listener.temp_file

        def counted() -> Any:
            made = take()
            taken.append(made.path)
            return made

        listener.temp_file = counted  # type: ignore[method-assign]
        assoc = RawAssociation(scp.port, CT_CONTEXT)
        for sop_class, sop_instance, why in cases * 3:  # enough to drain the pool's first half
            answer = assoc.c_store(1, sop_class, sop_instance, good.data)
            assert (answer.status, answer.ended) == (0xC000, None), why
            assert answer.error_comment is not None and answer.error_comment.startswith(why)
            assert 0x1000 not in answer.command and 0x0002 not in answer.command  # not UIDs: not echoed
        assert taken == []
        assert assoc.c_store(1, CT_IMAGE_STORAGE.encode(), good.sop.encode(), good.data).status == 0x0000
        assert assoc.release()
        assert len(taken) == 1
        wait_for(only_the_spare_pool(scp), 3, what="tmp/ to hold only the spare pool")
        assert scp.wait_for_study(good.study, instances=1)["numberOfInstances"] == 1


def read_command_pdus(assoc: RawAssociation) -> tuple[list[int], dict[int, bytes]]:
    """The lengths of the P-DATA-TF PDUs carrying one response command, and its elements."""
    lengths, command = [], bytearray()
    while True:
        kind, body = assoc.read_pdu()
        assert kind == 0x04, f"PDU type 0x{kind:02X} instead of the response"
        lengths.append(len(body))
        offset = 0
        while offset < len(body):
            length, _, control = struct.unpack_from(">IBB", body, offset)
            command += body[offset + 6:offset + 4 + length]
            offset += 4 + length
            if control & 0x03 == 0x03:
                return lengths, parse_command(bytes(command))


def test_a_refusal_longer_than_the_peer_pdu_is_fragmented(tmp_path: Path) -> None:
    """A peer accepting PDUs of 64 bytes, a request UID of 70 characters: the C-STORE-RSP (with its Error
    Comment) is cut into PDUs of at most 64 bytes, not the association aborted."""
    good = instance(tmp_path / "g")
    with StorageSCP(tmp_path / "data") as scp:
        assoc = RawAssociation(scp.port, CT_CONTEXT, max_pdu=64)
        assoc.send_pdu(0x04, pdv(1, 0x03, c_store_rq(7, CT_IMAGE_STORAGE.encode(), b"1." + b"2" * 68)))
        assoc.send_pdu(0x04, pdv(1, 0x02, good.data))
        lengths, command = read_command_pdus(assoc)
        assert len(lengths) > 1 and max(lengths) <= 64
        assert struct.unpack("<H", command[0x0900])[0] == 0xC000
        assert struct.unpack("<H", command[0x0120])[0] == 7
        assert command[0x0902].startswith(b"Affected SOP Instance UID is 70 characters")
        # and the association goes on, with responses that fit
        assert assoc.c_store(1, CT_IMAGE_STORAGE.encode(), good.sop.encode(), good.data).status == 0x0000
        assert assoc.release()


# -- a C-STORE on a presentation context never accepted (report bug 4) ----------------------------------

def test_a_c_store_on_a_context_never_accepted_aborts_before_anything_is_made(tmp_path: Path) -> None:
    item = instance(tmp_path / "g")
    with StorageSCP(tmp_path / "data") as scp:
        for _ in range(3):
            assoc = RawAssociation(scp.port, CT_CONTEXT)
            assoc.send_pdu(0x04, pdv(99, 0x03, c_store_rq(1, CT_IMAGE_STORAGE.encode(), item.sop.encode())))
            assoc.send_pdu(0x04, pdv(99, 0x02, item.data))
            answer = assoc._response()
            assoc.sock.close()
            assert answer.ended == "A-ABORT"
            assert answer.abort_source_reason is not None and answer.abort_source_reason[0] == 0x02  # provider
        assert echo(scp.port)
        assert temp_leftovers(scp.data_dir) == []
        wait_for(only_the_spare_pool(scp), 3, what="tmp/ to hold only the spare pool")


# -- peers that stall (report bug 2) ---------------------------------------------------------------------

@pytest.mark.parametrize("stock", [False, True], ids=["event-driven", "stock"])
def test_a_peer_stalled_mid_pdu_is_dropped_after_the_network_timeout(  # type: ignore[no-untyped-def]
        scp_factory, tmp_path: Path, stock: bool) -> None:
    """The peer's connection is closed (mostly with an A-ABORT on the event-driven transport), the partial
    instance is not kept, what was acknowledged before is published, and the only association slot is free again."""
    server: RunningSCP = scp_factory("--network-timeout", "1", "--max-associations", "1",
                                     *(["--stock-transport"] if stock else []))
    first, second = instance(tmp_path / "g"), instance(tmp_path / "g")
    assoc = RawAssociation(server.port, CT_CONTEXT, timeout=6)
    assert assoc.c_store(1, CT_IMAGE_STORAGE.encode(), first.sop.encode(), first.data).status == 0x0000
    stall_mid_dataset(assoc, second)
    started = time.monotonic()
    answer = assoc._response()
    assoc.sock.close()
    assert answer.ended in ("A-ABORT", "closed"), answer  # "timeout": the server never gave up
    assert time.monotonic() - started < 4
    if not stock:  # an A-ABORT, unless the association thread's own timeout closed the connection first
        wait_for(lambda: temp_leftovers(server.data_dir) == [], 3, what="the partial temp file to go")
    server.wait_for_study(first.study, instances=1, timeout=5)
    wait_for(lambda: can_associate(server.port), 5, what="the association slot to be free again")


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", "key.pem", "-out", "cert.pem", "-days", "1", "-subj", "/CN=127.0.0.1"],
                   cwd=folder, check=True, capture_output=True, timeout=30)
    return folder / "cert.pem", folder / "key.pem"


def test_a_peer_stalled_mid_tls_handshake_is_dropped(  # type: ignore[no-untyped-def]
        scp_factory, tmp_path: Path) -> None:
    """Three bytes of a ClientHello, then nothing: the connection is closed after the network timeout, and
    the only association slot serves the plain port again."""
    cert, key = self_signed_certificate(tmp_path / "pki")
    tls_port = free_port()
    server: RunningSCP = scp_factory("--tls-port", str(tls_port), "--tls-cert", str(cert), "--tls-key", str(key),
                                     "--network-timeout", "1", "--acse-timeout", "1", "--max-associations", "1")
    wait_for(lambda: "listening with TLS" in server.log(), 5, what="the TLS port to listen")
    with socket.create_connection(("127.0.0.1", tls_port), timeout=6) as client:
        client.sendall(b"\x16\x03\x01")
        started = time.monotonic()
        assert client.recv(10) == b""  # closed by the server (a TimeoutError here: it never gave up)
        assert time.monotonic() - started < 4
    wait_for(lambda: can_associate(server.port), 5, what="the association slot to be free again")


# -- stopping while associations are open (report bug 3) ---------------------------------------------------

def test_sigterm_lets_an_open_association_finish_within_the_grace(  # type: ignore[no-untyped-def]
        scp_factory, tmp_path: Path) -> None:
    """After SIGTERM, a C-STORE on an association already open is still stored and acknowledged (the index
    stays open), its release is answered, its study published, and the process exits as soon as it ends."""
    server: RunningSCP = scp_factory()
    first = instance(tmp_path / "g")
    second = instance(tmp_path / "g", study=first.study)
    assoc = RawAssociation(server.port, CT_CONTEXT, timeout=10)
    assert assoc.c_store(1, CT_IMAGE_STORAGE.encode(), first.sop.encode(), first.data).status == 0x0000
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    wait_for(lambda: "stopping" in server.log(), 5, what="the server to start stopping")
    time.sleep(1.5)  # well past the listener's shutdown (the old stop had closed the index by then)
    answer = assoc.c_store(1, CT_IMAGE_STORAGE.encode(), second.sop.encode(), second.data)
    assert (answer.status, answer.error_comment) == (0x0000, None)
    assert assoc.release()
    assert server.process.wait(3) == 0  # at once, not at the end of the grace
    assert read_study(server.data_dir, first.study)["numberOfInstances"] == 2


@pytest.mark.parametrize("stalled", [False, True], ids=["idle", "stalled mid-PDU"])
@pytest.mark.parametrize("stock", [False, True], ids=["event-driven", "stock"])
def test_stop_aborts_associations_still_open_after_the_grace(tmp_path: Path, stalled: bool, stock: bool) -> None:
    """Past the grace (shortened here), open associations are aborted; the stop returns within a bounded
    time with no DUL thread left (pynetdicom's are not daemons: one left would keep the process alive), and
    what they acknowledged is published."""
    first, second = instance(tmp_path / "g"), instance(tmp_path / "g")
    scp = StorageSCP(tmp_path / "data", event_driven_transport=not stock, stop_grace=0.5).start()
    assoc = RawAssociation(scp.port, CT_CONTEXT, timeout=10)
    assert assoc.c_store(1, CT_IMAGE_STORAGE.encode(), first.sop.encode(), first.data).status == 0x0000
    if stalled:
        stall_mid_dataset(assoc, second)
    stopper = threading.Thread(target=scp.stop)
    started = time.monotonic()
    stopper.start()
    answer = assoc._response()
    stopper.join(10)
    assoc.sock.close()
    assert not stopper.is_alive(), "stop() did not return"
    assert time.monotonic() - started < 5  # listener shutdown (<= 0.5 s) + grace 0.5 s + abort (<= 1 s)
    assert answer.ended == ("closed" if stock else "A-ABORT"), answer
    assert [t for t in threading.enumerate() if isinstance(t, transport.DULServiceProvider) and t.is_alive()] == []
    assert read_study(scp.data_dir, first.study)["numberOfInstances"] == 1
    if not stock:  # pynetdicom's own receive leaves its partial file to the next start's cleaning
        assert temp_leftovers(scp.data_dir) == []
