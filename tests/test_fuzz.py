"""Issue 5: mutated datasets over real associations never crash or hang the server.

Real files (a generated instance with sequences and pydicom's bundled instances in five transfer
syntaxes, deflated included) are mutated with a seeded RNG — byte flips, truncations, mangled
lengths, VRs, tags and values, junk and reordered elements — and sent unparsed: the pynetdicom SCU
streams each mutated Part-10 file's dataset bytes as they are (``STORE_SEND_CHUNKED_DATASET``).
Every request must get a DIMSE status, the server must stay up, nothing may appear outside
``<data-dir>/studies`` but the index and published resources, and its memory must stay flat.
"""

from __future__ import annotations

import os
import re
import struct
import time
import warnings
import zlib
from collections import Counter
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import _config

from conftest import RunningSCP, temp_leftovers, wait_for
from dicom_factory import CT_IMAGE_STORAGE, UID_ROOT, dataset_bytes, make_instance
from fault_dicom import EXPLICIT_VR_LE, RawAssociation
from fault_mutate import Seed, load_seed, mutations
from fault_scu import NO_RESPONSE, connect, contexts_of, echo, send
from scp.header import read_header

SEED = 0x5EED
PER_ASSOCIATION = 100
PYDICOM_SEEDS = ["MR_small_implicit.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm", "rtplan.dcm", "test-SR.dcm",
                 "reportsi.dcm", "SC_rgb_small_odd.dcm", "JPEG2000.dcm", "liver_1frame.dcm", "CT_small.dcm"]
UID_NAME = re.compile(r"[0-9]+(\.[0-9]+)*")


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def fuzz_seeds(folder: Path) -> list[Seed]:
    generated = make_instance(
        folder / "generated.dcm", study_uid=generate_uid(UID_ROOT), series_uid=generate_uid(UID_ROOT),
        sop_uid=generate_uid(UID_ROOT),
        extra={"ProcedureCodeSequence": [_item(CodeValue="P1", CodingSchemeDesignator="L", CodeMeaning="proc")],
               "IssuerOfAccessionNumberSequence": [_item(LocalNamespaceEntityID="HOSP")],
               "RequestAttributesSequence": [_item(RequestedProcedureID="RP1", ScheduledProcedureStepID="S1")]},
    )
    bundled = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent  # type: ignore[arg-type]
    return [load_seed(generated)] + [load_seed(bundled / name) for name in PYDICOM_SEEDS]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def listing(root: Path) -> set[str]:
    return {str(Path(d, n).relative_to(root)) for d, dirs, files in os.walk(root) for n in dirs + files}


def unexpected(paths: set[str]) -> set[str]:
    """Paths under the data dir's parent that are neither stored instances, published resources, the
    server's own databases, its spare temp files (checked empty by temp_leftovers) nor its log."""
    allowed = (
        re.compile(r"data/studies(/[0-9.]+(/[0-9.]+(/[0-9.]+\.dcm)?)?)?"),
        re.compile(r"data/fhir(/ImagingStudy(/[0-9.]+\.json)?|/rejected(/[0-9.]+\.json)?)?"),
        re.compile(r"data/[a-z_]+\.sqlite3(-wal|-shm|-journal)?"),
        re.compile(r"data/tmp/spare-[0-9]+-[0-9a-f]+-[0-9]+\.dcm"),
        re.compile(r"data-serve\.log"),
    )
    return {p for p in paths if not any(a.fullmatch(p) for a in allowed)}


class Fuzzer:
    """Sends mutated files over associations of PER_ASSOCIATION requests each."""

    def __init__(self, server: RunningSCP, seeds: list[Seed], case_file: Path) -> None:
        self.server, self.case_file = server, case_file
        self.contexts = contexts_of([seed.path for seed in seeds])
        self.seeds = seeds
        self.statuses: Counter[int] = Counter()
        self.comments: Counter[str] = Counter()
        self.no_response: list[str] = []
        self.sent = 0

    def run(self, count: int, seed: int) -> None:
        assoc = None
        for number, source, kinds, data in mutations(self.seeds, count, seed):
            if assoc is None or not assoc.is_established or number % PER_ASSOCIATION == 0:
                if assoc is not None and assoc.is_established:
                    assoc.release()
                assoc = connect(self.server.port, self.contexts)
            self.case_file.write_bytes(data)
            status, comment = send(assoc, self.case_file)
            self.sent += 1
            self.statuses[status] += 1
            if status == NO_RESPONSE:
                self.no_response.append(f"case {seed}/{number} ({source.path.name}, {kinds})")
                assert self.server.process is not None and self.server.process.poll() is None, (
                    f"the server died on case {seed}/{number} ({source.path.name}, {kinds})")
            elif status != 0x0000:
                self.comments[re.sub(r"[0-9.]{8,}|'[^']*'|\d+", "…", comment or "")[:60]] += 1
        if assoc is not None and assoc.is_established:
            assoc.release()


def settle(server: RunningSCP, associations: int) -> None:
    """Wait until every association has ended and its publications are out."""
    wait_for(lambda: len(re.findall(r" association \w+ (?:released|aborted|closed) ", server.log())) >= associations,
             timeout=60, what=f"{associations} association log lines")
    time.sleep(1.0)


def fuzz(tmp_path: Path, cases: int) -> None:
    started = time.monotonic()
    parent = tmp_path / "server"
    data = parent / "data"
    server = RunningSCP(data).start()
    assert server.process is not None
    try:
        seeds = fuzz_seeds(tmp_path / "seeds")
        before = listing(parent)
        fuzzer = Fuzzer(server, seeds, tmp_path / "case.dcm")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fuzzer.run(200, SEED - 1)  # warm-up: every code path the cases reach, imports and caches
            settle(server, 2)
            rss_before = rss_kb(server.process.pid)
            warm = sum(fuzzer.statuses.values())
            fuzzer.statuses.clear()
            fuzzer.comments.clear()
            fuzzer.run(cases, SEED)
        associations = 2 + -(-cases // PER_ASSOCIATION)
        settle(server, associations)
        rss_after = rss_kb(server.process.pid)

        assert server.process.poll() is None, "the server exited"
        assert echo(server.port), "the server does not answer C-ECHO after the fuzz run"
        assert fuzzer.no_response == [], f"requests without a DIMSE status: {fuzzer.no_response[:20]}"
        assert sum(fuzzer.statuses.values()) == cases
        assert unexpected(listing(parent) - before) == set(), "written outside studies/"
        assert temp_leftovers(data) == [], "temp files left in tmp/"
        for root, _, names in os.walk(data / "studies"):
            for name in names:
                header = read_header(Path(root, name))  # everything stored has a valid identity
                assert name == f"{header.sop_uid}.dcm"
        assert rss_after <= rss_before * 1.2, f"RSS grew from {rss_before} kB to {rss_after} kB"
        internal = fuzzer.statuses.get(0x0110, 0)
        crashes = re.findall(r"C-STORE of \S+ failed\n(?:.*\n)*?(\w[\w.]*(?:Error|error|Exception)\b[^\n]*)", server.log())
        assert internal == 0, f"{internal} requests hit an internal error (a parser crash?): {crashes[:5]}"
        rejected = list((data / "fhir" / "rejected").glob("*.json")) if (data / "fhir" / "rejected").exists() else []
    finally:
        server.stop()
    distribution = ", ".join(f"0x{status:04X}: {n}" for status, n in sorted(fuzzer.statuses.items()))
    print(f"\nfuzz: {cases} cases (+{warm} warm-up) in {time.monotonic() - started:.1f}s; statuses {distribution}; "
          f"RSS {rss_before} kB -> {rss_after} kB ({(rss_after - rss_before) / rss_before:+.1%}); "
          f"0x0110 (internal errors: header-parsing crashes) {internal}; rejected resources {len(rejected)}")
    for comment, n in fuzzer.comments.most_common(12):
        print(f"  {n:5d}  {comment}")


def test_a_thousand_mutated_datasets_get_a_status_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    fuzz(tmp_path, 1000)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_twenty_thousand_mutated_datasets_get_a_status_each(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    fuzz(tmp_path, 20_000)


def _element(group: int, number: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"UT", b"SQ", b"UN"):
        return struct.pack("<HH2sHI", group, number, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, number, vr, len(value)) + value


_IDENTITY = (_element(0x0008, 0x0005, b"CS", b"ISO_IR 100")
             + _element(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.7\x00")
             + _element(0x0008, 0x0018, b"UI", b"1.2.3.4\x00"))
_DEFLATE = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
_DEFLATED_IDENTITY = _DEFLATE.compress(_IDENTITY * 20) + _DEFLATE.flush()

# Header-parsing crashes the fuzz run found (now fixed in scp/header.py): read_header let these exceptions
# through instead of raising HeaderError, so the answer was 0x0110 with a logged traceback instead of 0xC000.
HEADER_CRASHES = [
    pytest.param(EXPLICIT_VR_LE, _IDENTITY + _element(0x0008, 0x0081, b"UT", b"abcd")[:10],
                 id="struct.error: a long-VR element cut inside its 4-byte length"),
    pytest.param(EXPLICIT_VR_LE, _element(0x0008, 0x0005, b"UL", b"ISO_IR 100") + _IDENTITY[18:],
                 id="BytesLengthException: Specific Character Set sent with VR UL"),
    pytest.param(b"1.2.840.10008.1.2.1.99", _DEFLATED_IDENTITY[:len(_DEFLATED_IDENTITY) // 2],
                 id="zlib.error: a deflated dataset whose stream is cut short"),
]


@pytest.mark.parametrize(("transfer", "data"), HEADER_CRASHES)
def test_known_malformed_headers_are_cannot_understand(running_scp: RunningSCP, transfer: bytes, data: bytes) -> None:
    secondary_capture = b"1.2.840.10008.5.1.4.1.1.7"
    assoc = RawAssociation(running_scp.port, [(secondary_capture, [transfer])])
    assert assoc.accepted.get(1) == transfer
    response = assoc.c_store(1, secondary_capture, b"1.2.3.4", data)
    assoc.release()
    assert response.status == 0xC000, response
    assert "internal error" not in running_scp.log()


def test_a_refusal_quoting_non_ascii_bytes_still_answers(running_scp: RunningSCP, tmp_path: Path) -> None:
    """The Error Comment quotes the bad UID; bytes outside ASCII in it once made pynetdicom abort instead."""
    good = make_instance(tmp_path / "good.dcm", study_uid=generate_uid(UID_ROOT), series_uid=generate_uid(UID_ROOT),
                         sop_uid=generate_uid(UID_ROOT))
    study = str(pydicom.dcmread(good).StudyInstanceUID).encode()
    data = dataset_bytes(good)
    bad = data.replace(study, b"1.2.\xff\xfe\x1b\\" + study[8:])
    assert len(bad) == len(data) and bad != data
    assoc = RawAssociation(running_scp.port, [(CT_IMAGE_STORAGE.encode(), [EXPLICIT_VR_LE])])
    sop = str(pydicom.dcmread(good).SOPInstanceUID).encode()
    refused = assoc.c_store(1, CT_IMAGE_STORAGE.encode(), sop, bad)
    stored = assoc.c_store(1, CT_IMAGE_STORAGE.encode(), sop, data)
    assoc.release()
    assert refused.status == 0xC000, refused
    assert refused.error_comment and refused.error_comment.isascii() and "\\" not in refused.error_comment
    assert stored.status == 0x0000, stored
