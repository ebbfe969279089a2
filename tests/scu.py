"""A small pynetdicom SCU for tests: real associations, statuses recorded per instance."""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from conftest import AET


def associate(port: int, datasets: Iterable[Dataset | Path] = (), *, calling: str = "PYSCU",
              called: str = AET, tls: ssl.SSLContext | None = None) -> Association:
    """An established association proposing the SOP classes/transfer syntaxes of ``datasets`` (over TLS with
    ``tls``, a client context that trusts the server)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    seen: set[tuple[str, str]] = set()
    for item in datasets:
        ds = pydicom.dcmread(item, stop_before_pixels=True) if isinstance(item, Path) else item
        key = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        if key not in seen:
            seen.add(key)
            ae.add_requested_context(*key)
    tls_args = (tls, "127.0.0.1") if tls is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls_args)
    assert assoc.is_established, "association was not established"
    return assoc


def store(assoc: Association, item: Dataset | Path) -> int:
    """Send one instance; returns the DIMSE status (0xFFFF when no response came)."""
    dataset = pydicom.dcmread(item) if isinstance(item, Path) else item
    answer = assoc.send_c_store(dataset)
    return int(answer.Status) if "Status" in answer else 0xFFFF
