"""Withdrawing a study left without stored instances, with real sinks: the directory, a FHIR server (sekmet),
and the FHIR sink's answers to a conditional delete (a scripted HTTP server). A few seconds each."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
import pytest

from conftest import wait_for
from fhir_server import FhirServer
from scp.index import Index
from scp.mapping.imaging_study import MappingOptions
from scp.outbox import DELIVERED, PENDING, Backoff
from scp.publish import Publisher
from scp.sinks.base import DeliveryError
from scp.sinks.directory import DirectorySink
from scp.sinks.fhir_server import FhirServerSink
from test_outbox import NEW, OLD, put_instance

SOP = "1.2.3.9.1"
DICOM_UID = "urn:dicom:uid"


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    idx = Index(tmp_path / "index.sqlite3")
    yield idx
    idx.close()


def publisher(index: Index, tmp_path: Path, sinks: list[Any]) -> Publisher:
    return Publisher(index, sinks, MappingOptions(), tmp_path / "rejected", backoff=Backoff(0.2, 0.5), fsync=False)


def instance_uids(resource: dict[str, Any]) -> list[str]:
    return [i["uid"] for series in resource["series"] for i in series["instance"]]


# -- the directory ---------------------------------------------------------------------------------

def test_the_directory_removes_the_file_of_a_study_whose_last_instance_moved(index: Index, tmp_path: Path) -> None:
    directory = DirectorySink(tmp_path / "fhir", fsync=True)
    pub = publisher(index, tmp_path, [directory])
    pub.start()
    put_instance(index, tmp_path / "a", OLD, SOP)
    pub.submit([OLD])
    assert pub.wait_idle(20) and directory.path_for(OLD).exists()
    put_instance(index, tmp_path / "b", NEW, SOP)  # re-sent with the same SOP Instance UID into another study
    pub.submit([OLD, NEW])
    assert pub.wait_idle(20)
    assert not directory.path_for(OLD).exists()
    assert instance_uids(orjson.loads(directory.path_for(NEW).read_bytes())) == [SOP]
    assert sorted(p.name for p in directory.folder.iterdir()) == [f"{NEW}.json"]  # no temp file left either
    pub.stop()

    again = directory.withdraw(OLD)  # nothing there any more: that is what was asked
    assert again.fields == {"removed": False}


# -- a real FHIR server ----------------------------------------------------------------------------

@pytest.fixture
def fhir(tmp_path: Path) -> Iterator[FhirServer]:
    server = FhirServer(tmp_path / "sekmet")
    yield server.start()
    server.stop()


def studies_with_uid(fhir: FhirServer, study_uid: str) -> list[dict[str, Any]]:
    return fhir.search("ImagingStudy", identifier=f"{DICOM_UID}|urn:oid:{study_uid}")


def test_the_fhir_server_no_longer_has_the_old_study_after_the_move(index: Index, tmp_path: Path,
                                                                    fhir: FhirServer) -> None:
    sink = FhirServerSink(fhir.base_url)
    pub = publisher(index, tmp_path, [DirectorySink(tmp_path / "fhir", fsync=False), sink])
    pub.start()
    put_instance(index, tmp_path / "a", OLD, SOP)
    pub.submit([OLD])
    assert pub.wait_idle(20)
    old_id = studies_with_uid(fhir, OLD)[0]["id"]
    put_instance(index, tmp_path / "b", NEW, SOP)
    pub.submit([OLD, NEW])
    assert pub.wait_idle(20)
    assert studies_with_uid(fhir, OLD) == []
    assert [instance_uids(s) for s in studies_with_uid(fhir, NEW)] == [[SOP]]
    assert [s["id"] for s in fhir.all("ImagingStudy")] != [old_id]
    assert len(fhir.all("Patient")) == 1  # the Patient stays: it is NEW's subject too
    row = pub.outbox.get(sink.name, OLD)
    assert row is not None and (row.state, row.delivered_count) == (DELIVERED, 0)
    pub.stop()


def test_a_withdrawal_while_the_fhir_server_is_down_is_retried_until_it_is_up(index: Index, tmp_path: Path,
                                                                              fhir: FhirServer) -> None:
    sink = FhirServerSink(fhir.base_url, timeout=5)
    pub = publisher(index, tmp_path, [sink])
    pub.start()
    put_instance(index, tmp_path / "a", OLD, SOP)
    pub.submit([OLD])
    assert pub.wait_idle(20) and len(studies_with_uid(fhir, OLD)) == 1
    fhir.stop()
    put_instance(index, tmp_path / "b", NEW, SOP)
    pub.submit([OLD])
    wait_for(lambda: (row := pub.outbox.get(sink.name, OLD)) and row.attempts >= 2, what="failed withdrawals")
    row = pub.outbox.get(sink.name, OLD)
    assert row is not None and row.state == PENDING and "DELETE" in (row.last_error or "")
    fhir.start()
    assert pub.wait_idle(20)
    assert studies_with_uid(fhir, OLD) == []
    assert pub.outbox.get(sink.name, OLD).delivered_count == 0  # type: ignore[union-attr]
    pub.stop()


# -- what the FHIR sink makes of the answers to its DELETE ----------------------------------------

class _Scripted(BaseHTTPRequestHandler):
    """Answers every DELETE with the next (status, headers, body) of the server's script."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_DELETE(self) -> None:  # noqa: N802 (http.server's naming)
        server: Any = self.server
        server.requests.append((self.path, self.headers.get("Authorization")))
        status, headers, body = server.script.pop(0)
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        for key, value in {"Content-Type": "application/fhir+json", **headers}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def scripted() -> Iterator[Callable[..., tuple[FhirServerSink, Any]]]:
    servers: list[ThreadingHTTPServer] = []
    sinks: list[FhirServerSink] = []

    def make(*script: tuple[int, dict[str, str], Any]) -> tuple[FhirServerSink, Any]:
        server: Any = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
        server.script, server.requests = list(script), []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        sink = FhirServerSink(f"http://127.0.0.1:{server.server_address[1]}/fhir", token="s3cret", timeout=5)
        sinks.append(sink)
        return sink, server

    yield make
    for sink in sinks:
        sink.close()
    for server in servers:
        server.shutdown()
        server.server_close()


OUTCOME = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "forbidden",
                                                          "diagnostics": "no deletes for you"}]}


@pytest.mark.parametrize("status", [200, 202, 204, 404, 410])
def test_deleted_or_already_gone_counts_as_withdrawn(scripted: Callable[..., Any], status: int) -> None:
    sink, server = scripted((status, {}, None if status == 204 else {"resourceType": "OperationOutcome",
                                                                       "issue": []}))
    delivery = sink.withdraw(OLD)
    assert delivery.fields["status"] == status
    assert delivery.fields["sent"] == [f"DELETE ImagingStudy?identifier={DICOM_UID}|urn:oid:{OLD}"]
    path, auth = server.requests[0]
    parts = urlsplit(path)
    assert parts.path == "/fhir/ImagingStudy"
    assert parse_qsl(parts.query) == [("identifier", f"{DICOM_UID}|urn:oid:{OLD}")]  # the PUT's own address
    assert auth == "Bearer s3cret"


@pytest.mark.parametrize("status", [400, 403, 405, 501])
def test_a_refused_delete_is_not_retried_and_carries_the_outcome(scripted: Callable[..., Any], status: int) -> None:
    """501: the server has no (conditional) delete; unlike an outage, trying again cannot help."""
    sink, _ = scripted((status, {}, OUTCOME))
    with pytest.raises(DeliveryError) as refused:
        sink.withdraw(OLD)
    assert not refused.value.retryable and refused.value.status == status
    assert refused.value.outcome == OUTCOME and "no deletes for you" in str(refused.value)


@pytest.mark.parametrize("status", [412, 429, 500, 503])
def test_a_delete_the_server_may_accept_later_is_retried(scripted: Callable[..., Any], status: int) -> None:
    sink, _ = scripted((status, {"Retry-After": "7"}, OUTCOME))
    with pytest.raises(DeliveryError) as failed:
        sink.withdraw(OLD)
    assert failed.value.retryable and failed.value.status == status and failed.value.retry_after == 7


def test_no_answer_is_retried(tmp_path: Path) -> None:
    sink = FhirServerSink("http://127.0.0.1:9/fhir", timeout=2)  # the discard port: nobody listens
    started = time.monotonic()
    with pytest.raises(DeliveryError) as failed:
        sink.withdraw(OLD)
    assert failed.value.retryable and failed.value.status is None and time.monotonic() - started < 5
    sink.close()
