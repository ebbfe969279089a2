"""Issue 5: path-escape attempts in every UID position are refused and create nothing outside studies/.

UIDs become path components (``studies/<study>/<series>/<sop>.dcm``), so each position a sender
controls gets escape attempts: Study, Series and SOP Instance UID in the dataset; Affected SOP
Instance UID and Affected SOP Class UID in the command (the class is also the presentation
context's abstract syntax); and the transfer syntax the context negotiates, which lands in the
stored file meta. The requests are built byte by byte (tests/fault_dicom.py) so that nothing on
our side cleans them up. ``tests/test_core_associations.py`` covers plain invalid UIDs in the dataset.
"""

from __future__ import annotations

import os
import struct
import time
import uuid
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import tag_for_keyword
from pydicom.uid import generate_uid

from conftest import RunningSCP, temp_leftovers, wait_for
from dicom_factory import CT_IMAGE_STORAGE, UID_ROOT, dataset_bytes, make_instance
from fault_dicom import EXPLICIT_VR_LE, AssociationRefused, RawAssociation
from scp.uids import InvalidUID, check_uid

TOKEN = f"pwn{uuid.uuid4().hex[:8]}"
CT = CT_IMAGE_STORAGE.encode()

# Each fits in 64 characters (pynetdicom's own limit); longer ones are checked separately.
ESCAPES = {
    "relative to /tmp": f"../../../../../../../../../tmp/{TOKEN}",
    "absolute": f"/tmp/{TOKEN}",
    "dot-dot": "..",
    "dot": ".",
    "uid then traversal": f"1.2.3/../../../{TOKEN}",
    "backslash traversal": f"1.2.3\\..\\..\\{TOKEN}",
    "nul then traversal": f"1.2.3\x00/../../{TOKEN}",
    "percent-encoded": f"..%2f..%2f{TOKEN}",
    "trailing newline": "1.2.3\n",
    "home": f"~/{TOKEN}",
    "windows drive": f"C:\\{TOKEN}",
}
POSITIONS = ["dataset study", "dataset series", "dataset and command sop instance", "dataset sop instance",
             "command sop instance", "command and dataset sop class", "command sop class", "transfer syntax"]
REFUSED = {0xA900, 0xC000}  # Dataset does not match SOP Class / Cannot understand


def build(folder: Path, position: str, escape: str) -> tuple[bytes, bytes, bytes, bytes]:
    """(abstract syntax, transfer syntax, command SOP Instance UID, dataset bytes) of one attempt.

    A dataset UID is written as a placeholder of the same length and then replaced by the escape's
    exact bytes, so that pydicom's value handling cannot clean it (it strips, for one, a trailing newline).
    """
    sop = generate_uid(UID_ROOT)
    path = make_instance(folder / f"{uuid.uuid4().hex}.dcm", study_uid=generate_uid(UID_ROOT),
                         series_uid=generate_uid(UID_ROOT), sop_uid=sop)
    ds = pydicom.dcmread(path)
    raw = escape.encode("latin-1")
    placeholder = "9" * len(raw)
    abstract, transfer, command_sop = CT, EXPLICIT_VR_LE, sop.encode()
    keyword = {"dataset study": "StudyInstanceUID", "dataset series": "SeriesInstanceUID",
               "dataset and command sop instance": "SOPInstanceUID", "dataset sop instance": "SOPInstanceUID",
               "command and dataset sop class": "SOPClassUID"}.get(position)
    if keyword:
        setattr(ds, keyword, placeholder)
    if position == "dataset and command sop instance":
        command_sop = raw
    elif position == "command sop instance":
        command_sop = raw
    elif position in ("command and dataset sop class", "command sop class"):
        abstract = raw
    elif position == "transfer syntax":
        transfer = raw
    ds.save_as(path, enforce_file_format=True)
    data = dataset_bytes(path)
    if keyword:
        tag = tag_for_keyword(keyword)
        padded = len(raw) + len(raw) % 2
        element = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + b"UI" + struct.pack("<H", padded)
        assert data.count(element + placeholder.encode()) == 1
        data = data.replace(element + placeholder.encode(), element + raw)
    return abstract, transfer, command_sop, data


def attempt(port: int, abstract: bytes, transfer: bytes, command_sop: bytes, data: bytes) -> str:
    """What the server did: a status as 0xNNNN, or how the association ended without one."""
    try:
        assoc = RawAssociation(port, [(abstract, [transfer])])
    except AssociationRefused as exc:
        return f"association refused ({exc})"
    if 1 not in assoc.accepted:
        assoc.abort()
        return f"context refused (result {assoc.results.get(1)})"
    response = assoc.c_store(1, abstract, command_sop, data)
    assoc.release()
    if response.status is None:
        return f"no status: {response.ended}"
    return f"0x{response.status:04X}"


def found_outside(roots: list[Path]) -> list[str]:
    hits = []
    for root in roots:
        for directory, dirs, files in os.walk(root):
            hits += [str(Path(directory, n)) for n in dirs + files if TOKEN in n]
            if root in (Path("/"), Path("/tmp")):
                break  # top level only there
    return hits


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> RunningSCP:
    running = RunningSCP(tmp_path_factory.mktemp("escape") / "data").start()
    yield running  # type: ignore[misc]
    running.stop()


def stored(server: RunningSCP) -> set[Path]:
    return {Path(d, n) for d, _, names in os.walk(server.data_dir / "studies") for n in names}


@pytest.mark.parametrize(("position", "escape"), [(p, e) for p in POSITIONS for e in ESCAPES])
def test_escape_attempt_is_refused(server: RunningSCP, tmp_path: Path, position: str, escape: str) -> None:
    before = stored(server)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every invalid UI value we write on purpose
        outcome = attempt(server.port, *build(tmp_path, position, ESCAPES[escape]))
    assert_nothing_escaped(server)
    refused = outcome.startswith("0x") and int(outcome, 16) in REFUSED
    assert refused, f"{position} / {escape}: {outcome}"
    assert stored(server) == before, "a refused instance was stored"


def test_over_long_uids_in_the_command_are_refused(server: RunningSCP, tmp_path: Path) -> None:
    """Beyond 64 characters: an Affected SOP Instance UID gets a failure status (0xC000) and the association
    lives on (pynetdicom's own transport, ``--stock-transport``, cannot hold the value and aborts instead);
    an Affected SOP Class UID of that length never gets a presentation context."""
    long_escape = "1.2.3/" + "../" * 20 + TOKEN
    before = stored(server)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sop_outcome = attempt(server.port, *build(tmp_path, "command sop instance", long_escape))
        class_outcome = attempt(server.port, *build(tmp_path, "command sop class", long_escape))
    assert sop_outcome == "0xC000", sop_outcome
    assert class_outcome.startswith("association refused"), class_outcome
    assert found_outside([server.data_dir.parent, Path("/tmp"), Path("/")]) == []
    assert stored(server) == before
    time.sleep(0.5)  # the association has ended; any temp file of it should be gone by now
    assert temp_leftovers(server.data_dir) == [], "the refused request left its temp file behind"


def assert_nothing_escaped(server: RunningSCP) -> None:
    data = server.data_dir
    assert found_outside([data.parent, Path("/tmp"), Path("/")]) == []
    for directory, dirs, files in os.walk(data / "studies"):
        for name in dirs + files:
            assert name.removesuffix(".dcm").replace(".", "").isdigit(), f"{directory}/{name}"
    wait_for(lambda: not temp_leftovers(data), timeout=5, what="tmp/ to be empty")


def test_a_refused_over_long_uid_does_not_hold_back_what_was_stored_before(server: RunningSCP,
                                                                            tmp_path: Path) -> None:
    study, sop = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    path = make_instance(tmp_path / "ok.dcm", study_uid=study, series_uid=generate_uid(UID_ROOT), sop_uid=sop)
    assoc = RawAssociation(server.port, [(CT, [EXPLICIT_VR_LE])])
    assert assoc.c_store(1, CT, sop.encode(), dataset_bytes(path)).status == 0x0000
    refused = assoc.c_store(1, CT, b"1." + b"2" * 80, dataset_bytes(path))
    assoc.abort()
    assert refused.status == 0xC000, refused  # refused, and the abort that follows still publishes the study
    server.wait_for_study(study, instances=1, timeout=10)


@pytest.mark.parametrize("bad", ["1.2.840.10008.1.2\n", "1.2.840.10008.1.2/..", " 1.2.840.10008.1.2", "1.2.840.10008.01.2"])
def test_a_uid_remembered_as_valid_does_not_let_a_variant_through(bad: str) -> None:
    """check_uid remembers valid UIDs (a series' UIDs come with every instance); only the exact string."""
    good = "1.2.840.10008.1.2"
    assert check_uid(good, "UID") == good
    assert check_uid(good, "UID") == good  # now from memory
    assert check_uid(good + " ", "UID") == good  # padding is still stripped
    with pytest.raises(InvalidUID):
        check_uid(bad, "UID")
