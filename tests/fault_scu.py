"""pynetdicom SCU helpers for the fault and load tests: Nagle off, bounded timeouts, statuses recorded."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from conftest import AET

NO_RESPONSE = 0xFFFF  # the connection ended (or timed out) before a C-STORE-RSP came

# A killed or aborting peer is what these tests are about: pynetdicom's error lines are noise here.
logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


def contexts_of(items: Iterable[Dataset | Path]) -> list[tuple[str, str]]:
    """The distinct (SOP Class, Transfer Syntax) pairs of ``items``, in first-seen order."""
    seen: dict[tuple[str, str], None] = {}
    for item in items:
        if isinstance(item, Path):
            meta = pydicom.filereader.read_file_meta_info(item)
            key = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        else:
            key = (str(item.SOPClassUID), str(item.file_meta.TransferSyntaxUID))
        seen.setdefault(key, None)
    return list(seen)


def connect(port: int, contexts: Iterable[tuple[str, str]], *, calling: str = "FAULTSCU", called: str = AET,
            timeout: float = 15) -> Association:
    """An established association (Nagle off on our side too), failing loudly when refused."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    for sop_class, transfer_syntax in contexts:
        ae.add_requested_context(sop_class, transfer_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, f"association to 127.0.0.1:{port} was not established"
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
    return assoc


def send(assoc: Association, item: Dataset | Path) -> tuple[int, str | None]:
    """One C-STORE: (status, Error Comment); NO_RESPONSE when the association ended first."""
    if not assoc.is_established:
        return NO_RESPONSE, None
    answer = assoc.send_c_store(item)
    if "Status" not in answer:
        return NO_RESPONSE, None
    return int(answer.Status), (str(answer.ErrorComment) if "ErrorComment" in answer else None)


def echo(port: int) -> bool:
    """True when a fresh association answers C-ECHO with success."""
    try:
        assoc = connect(port, [], timeout=10)
    except AssertionError:
        return False
    answer = assoc.send_c_echo()
    ok = "Status" in answer and answer.Status == 0x0000
    assoc.release()
    return ok
