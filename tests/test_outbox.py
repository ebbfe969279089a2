"""The outbox and the publisher's workers, with sinks of our own making (no network, a few seconds)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import scp.publish
from conftest import wait_for
from dicom_factory import make_instance, make_study
from scp.fhir_version import FhirVersion
from scp.header import read_header
from scp.index import Index
from scp.mapping.imaging_study import MappingOptions
from scp.metrics import Metrics
from scp.outbox import DEAD, DELIVERED, OUTBOX_FILE, PENDING, Backoff, Outbox
from scp.publish import Publisher
from scp.records import Provenance, StoredInstance
from scp.sinks.base import Delivery, DeliveryError, Publication
from scp.sinks.fhir_server import retryable_status

FAST = Backoff(initial=0.05, cap=0.1)


class FakeSink:
    """Records what it was given; raises the queued errors first. ``version`` set = a FHIR-server-like sink."""

    def __init__(self, name: str, version: FhirVersion | None = None, errors: list[Exception] | None = None,
                 gate: threading.Event | None = None) -> None:
        self.name = name
        self.errors = list(errors or [])
        self.published: list[Publication] = []
        self.withdrawn: list[str] = []  # study UIDs, one per successful withdrawal
        self.calls: list[float] = []  # time.monotonic() of every attempt, failed ones too
        self.gate = gate
        self.entered = threading.Event()
        if version is not None:
            self.fhir_version = lambda: version

    def publish(self, publication: Publication) -> Delivery:
        self.calls.append(time.monotonic())
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        if self.errors:
            raise self.errors.pop(0)
        self.published.append(publication)
        return Delivery(self.name, "ok", {"status": 200})

    def withdraw(self, study_uid: str) -> Delivery:
        self.calls.append(time.monotonic())
        if self.errors:
            raise self.errors.pop(0)
        self.withdrawn.append(study_uid)
        return Delivery(self.name, "withdrawn", {"status": 204})


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    idx = Index(tmp_path / "index.sqlite3")
    yield idx
    idx.close()


def store(index: Index, folder: Path, seed: str, count: int = 2) -> str:
    """Index a generated study (as if received now); its Study Instance UID."""
    study = make_study(folder, series=(("CT", count),), seed=seed)
    for path in study.files:
        index.put(StoredInstance(read_header(path), f"studies/{path.name}", path.stat().st_size,
                                 Provenance("SCU", "IMAGINGSTUDY", "127.0.0.1", "a1", time.time())))
    return study.study_uid


def put_instance(index: Index, folder: Path, study_uid: str, sop_uid: str = "1.2.3.9.1") -> None:
    """Index instance ``sop_uid`` in ``study_uid`` (received now): a move when it was in another study."""
    path = make_instance(folder / f"{study_uid}-{sop_uid}.dcm", study_uid=study_uid, series_uid=f"{study_uid}.1",
                         sop_uid=sop_uid)
    index.put(StoredInstance(read_header(path), f"studies/{study_uid}/{path.name}", path.stat().st_size,
                             Provenance("SCU", "IMAGINGSTUDY", "127.0.0.1", "a1", time.time())))


def publisher(index: Index, tmp_path: Path, sinks: list[Any], metrics: Metrics | None = None) -> Publisher:
    return Publisher(index, sinks, MappingOptions(), tmp_path / "rejected", metrics, backoff=FAST, fsync=False)


def test_pending_revisions_collapse_into_one_item(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / OUTBOX_FILE, fsync=False)
    for ended in (1.0, 2.0, 3.0):
        outbox.submit(["directory", "fhir:x"], ["1.2.3"], ended_at=ended)
    items = outbox.items()
    assert [(i.sink, i.state, i.revision) for i in items] == [("directory", PENDING, 3), ("fhir:x", PENDING, 3)]
    assert items[0].ended_at == 1.0 and items[0].last_ended_at == 3.0  # latency counts from the first release
    assert outbox.depth(["directory", "fhir:x"]) == 1  # one study waiting
    outbox.close()


def test_a_failed_attempt_does_not_delay_content_that_arrived_during_it(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / OUTBOX_FILE, fsync=False)
    outbox.submit(["fhir:x"], ["1.2.3"], now=100.0)
    tried, _ = outbox.next_due("fhir:x", now=100.0)
    assert tried is not None
    outbox.failed(tried, delay=300, error="conflict", status=409, now=101.0)
    assert outbox.get("fhir:x", "1.2.3").next_attempt_at == 401.0  # type: ignore[union-attr]

    again, _ = outbox.next_due("fhir:x", now=401.0)
    assert again is not None
    outbox.submit(["fhir:x"], ["1.2.3"], now=402.0)  # new instances while that attempt is on the wire
    outbox.failed(again, delay=300, error="conflict", status=409, now=403.0)
    assert outbox.get("fhir:x", "1.2.3").next_attempt_at == 403.0  # type: ignore[union-attr]  # tried now
    outbox.close()


def test_backoff_is_exponential_capped_and_jittered() -> None:
    backoff = Backoff(initial=1, cap=8)
    for attempt, ceiling in ((1, 1), (2, 2), (3, 4), (4, 8), (5, 8), (50, 8)):
        delays = [backoff.delay(attempt) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jitter
    assert backoff.delay(1, retry_after=30) == 30  # a server's Retry-After wins


def test_which_answers_are_worth_retrying() -> None:
    assert [s for s in (400, 401, 403, 404, 405, 410, 415, 422) if retryable_status(s)] == []
    assert all(retryable_status(s) for s in (408, 409, 412, 429, 500, 502, 503, 504, 302))


def test_each_release_is_built_once_per_study_whatever_the_sinks(index: Index, tmp_path: Path) -> None:
    uid = store(index, tmp_path / "s", "build-once")
    sinks = [FakeSink("directory"), FakeSink("fhir:a", FhirVersion.R4), FakeSink("fhir:b", FhirVersion.R4),
             FakeSink("fhir:c", FhirVersion.R6)]
    pub = publisher(index, tmp_path, sinks)
    pub.start()
    pub.submit([uid], ended_at=time.monotonic())
    assert pub.wait_idle(20)
    assert [len(s.published) for s in sinks] == [1, 1, 1, 1]
    assert [s.published[0].version for s in sinks] == [FhirVersion.R6, FhirVersion.R4, FhirVersion.R4, FhirVersion.R6]
    assert pub._assembler.builds == 2  # R6 once, R4 once
    assert index.unpublished_studies() == []  # every sink has it: the index says published
    pub.stop()


def test_retryable_failures_back_off_until_delivered(index: Index, tmp_path: Path) -> None:
    uid = store(index, tmp_path / "s", "retry")
    metrics = Metrics()
    flaky = FakeSink("fhir:flaky", FhirVersion.R4, errors=[DeliveryError("down", retryable=True),
                                                          ConnectionError("reset"),
                                                          DeliveryError("busy", retryable=True, status=503)])
    pub = publisher(index, tmp_path, [FakeSink("directory"), flaky], metrics)
    pub.start()
    pub.submit([uid])
    assert pub.wait_idle(20)
    assert len(flaky.published) == 1
    assert metrics.publications.labels(sink="fhir:flaky", result="failed")._value.get() == 3
    assert pub.outbox.get("fhir:flaky", uid).state == DELIVERED  # type: ignore[union-attr]
    assert index.unpublished_studies() == []
    pub.stop()


def test_a_refusal_dead_letters_until_retry(index: Index, tmp_path: Path) -> None:
    uid = store(index, tmp_path / "s", "dead")
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid"}]}
    picky = FakeSink("fhir:picky", FhirVersion.R4,
                     errors=[DeliveryError("no", retryable=False, status=422, outcome=outcome)])
    pub = publisher(index, tmp_path, [FakeSink("directory"), picky])
    pub.start()
    pub.submit([uid])
    item = wait_for(lambda: (i := pub.outbox.get("fhir:picky", uid)) and i.state == DEAD and i, what="dead")
    assert item.last_status == 422 and '"OperationOutcome"' in item.outcome
    assert uid in index.unpublished_studies()  # one sink still lacks it
    assert pub.depth() == 0 and pub.outbox.dead_count(["fhir:picky"]) == 1

    pub.resume([uid])  # a start-up does not revive a dead item whose content is unchanged
    assert pub.outbox.get("fhir:picky", uid).state == DEAD  # type: ignore[union-attr]
    assert pub.outbox.retry(uid) == 1
    assert pub.wait_idle(20)
    assert len(picky.published) == 1 and index.unpublished_studies() == []
    pub.stop()


def test_new_content_during_a_delivery_is_delivered_after_it(index: Index, tmp_path: Path) -> None:
    uid = store(index, tmp_path / "s", "stale", count=1)
    gate = threading.Event()
    slow = FakeSink("fhir:slow", FhirVersion.R4, gate=gate)
    pub = publisher(index, tmp_path, [slow])
    pub.start()
    pub.submit([uid])
    assert slow.entered.wait(10)
    store(index, tmp_path / "s2", "stale", count=3)  # more instances of the same study (same seed, same UIDs+)
    pub.submit([uid])  # a newer revision while the first is on the wire
    gate.set()
    assert pub.wait_idle(20)
    assert [p.resource["numberOfInstances"] for p in slow.published] == [1, 3]
    pub.stop()


def test_a_restart_resumes_pending_deliveries(index: Index, tmp_path: Path) -> None:
    uid = store(index, tmp_path / "s", "restart")
    down = FakeSink("fhir:x", FhirVersion.R4, errors=[DeliveryError("down", retryable=True)] * 1000)
    first = publisher(index, tmp_path, [FakeSink("directory"), down])
    first.start()
    first.submit([uid])
    wait_for(lambda: first.outbox.get("fhir:x", uid).attempts >= 2, what="failed attempts")  # type: ignore[union-attr]
    first.stop()

    up = FakeSink("fhir:x", FhirVersion.R4)
    directory = FakeSink("directory")
    second = publisher(index, tmp_path, [directory, up])
    second.start()
    second.resume(index.unpublished_studies())  # what Server.start does
    assert second.wait_idle(20)
    assert len(up.published) == 1
    assert directory.published == []  # it had the study already: not sent twice
    assert index.unpublished_studies() == []
    second.stop()


def test_start_up_compares_the_outbox_with_the_study_state_the_index_holds(index: Index, tmp_path: Path) -> None:
    uid = store(index, tmp_path / "s", "state", count=3)
    instances = index.study_instances(uid)
    assert index.study_state(uid) == (3, max(i.provenance.received_at for i in instances))
    assert index.study_state("1.2.3.999") is None

    sink = FakeSink("directory")
    pub = publisher(index, tmp_path, [sink])
    pub.start()
    pub.resume([uid, "1.2.3.999"])  # a study the index no longer holds is skipped
    assert pub.wait_idle(20) and len(sink.published) == 1
    pub.resume([uid])  # delivered as the index holds it: not again
    store(index, tmp_path / "s2", "state", count=4)  # one more instance, as if received while stopped
    pub.resume([uid])
    assert pub.wait_idle(20)
    assert [p.resource["numberOfInstances"] for p in sink.published] == [3, 4]
    pub.stop()


def test_a_study_whose_assembly_raises_is_dead_lettered_without_holding_back_the_sink(
        index: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken, fine = store(index, tmp_path / "b", "assembly-bug"), store(index, tmp_path / "f", "assembly-fine")
    sink = FakeSink("directory")
    pub = publisher(index, tmp_path, [sink])
    assemble = scp.publish._Assembler.get

    def raising_for_one(self: Any, uid: str, version: Any, instances: Any) -> Any:
        if uid == broken:  # stands in for a mapping bug triggered by this study's data
            raise ValueError("unexpected value")
        return assemble(self, uid, version, instances)

    monkeypatch.setattr(scp.publish._Assembler, "get", raising_for_one)
    pub.start()
    pub.submit([broken])
    wait_for(lambda: (i := pub.outbox.get("directory", broken)) and i.state == DEAD, what="dead")
    started = time.monotonic()
    pub.submit([fine])
    assert pub.wait_idle(20) and [p.study_uid for p in sink.published] == [fine]
    assert time.monotonic() - started < 1  # not held back by a pause of the sink
    dead = pub.outbox.get("directory", broken)
    assert dead is not None and "ValueError: unexpected value" in (dead.last_error or "")
    pub.stop()


def test_publish_now_delivers_and_queues_what_failed(index: Index, tmp_path: Path) -> None:
    uid = store(index, tmp_path / "s", "now")
    ok, failing = FakeSink("directory"), FakeSink("fhir:x", FhirVersion.R4,
                                                  errors=[DeliveryError("down", retryable=True)])
    pub = publisher(index, tmp_path, [ok, failing])
    outcome = pub.publish_now(uid)
    assert not outcome.published and outcome.sinks == ("directory",)
    assert pub.outbox.get("fhir:x", uid).state == PENDING  # type: ignore[union-attr]
    assert pub.outbox.get("directory", uid).state == DELIVERED  # type: ignore[union-attr]
    pub.start()  # the server's workers take it from there
    assert pub.wait_idle(20)
    assert len(failing.published) == 1 and index.unpublished_studies() == []
    pub.stop()


def test_a_sink_that_is_down_is_not_hammered_once_per_study(index: Index, tmp_path: Path) -> None:
    uids = [store(index, tmp_path / f"s{n}", f"down-{n}", count=1) for n in range(5)]
    down = FakeSink("fhir:down", FhirVersion.R4, errors=[DeliveryError("refused", retryable=True)] * 10_000)
    pub = Publisher(index, [down], MappingOptions(), tmp_path / "rejected", backoff=Backoff(0.2, 0.4), fsync=False)
    pub.start()
    pub.submit(uids)
    time.sleep(2.5)
    assert all(pub.outbox.get("fhir:down", uid).state == PENDING for uid in uids)  # type: ignore[union-attr]
    pub.stop()
    tried = 10_000 - len(down.errors)
    # The sink as a whole waits 0.1-0.4 s between attempts: at most 1 + 2.5/0.1 = 26, about 1 + 2.5/0.3 ≈ 9
    # (per study it would be 5 × 2.5/0.3 ≈ 40).
    assert 3 <= tried <= 25


@pytest.mark.parametrize("status", [429, 503])
def test_a_retry_after_pauses_the_whole_sink_new_studies_too(index: Index, tmp_path: Path, status: int) -> None:
    """Report bug 6: while a server's Retry-After runs, studies that arrive meanwhile are not sent either."""
    first, *later = [store(index, tmp_path / f"s{n}", f"retry-after-{status}-{n}", count=1) for n in range(3)]
    limited = FakeSink("fhir:limited", FhirVersion.R4,
                       errors=[DeliveryError("slow down", retryable=True, status=status, retry_after=1.5)])
    pub = publisher(index, tmp_path, [limited])  # FAST backoff (≤ 0.1 s): only the Retry-After can hold it back
    pub.start()
    pub.submit([first])
    wait_for(lambda: (item := pub.outbox.get("fhir:limited", first)) and item.attempts == 1, what="the refusal")
    for uid in later:  # new studies while the server has asked for 1.5 s of quiet
        pub.submit([uid])
        time.sleep(0.3)
    time.sleep(0.4)
    assert len(limited.calls) == 1, "a study was sent during the Retry-After"
    assert pub.wait_idle(10)
    assert min(limited.calls[1:]) - limited.calls[0] >= 1.45
    assert sorted(p.study_uid for p in limited.published) == sorted([first, *later])
    pub.stop()


def test_a_sink_added_later_gets_the_studies_stored_before(index: Index, tmp_path: Path) -> None:
    """Report bug 3: a FHIR server added to an existing data dir is given every stored study at start."""
    old, gone = store(index, tmp_path / "a", "added-old"), "1.2.3.999"
    directory = FakeSink("directory")
    first = publisher(index, tmp_path, [directory])
    first.start()
    first.submit([old, gone])  # `gone` has no stored instances: nothing to give anybody
    assert first.wait_idle(20) and len(directory.published) == 1
    first.stop()
    assert index.unpublished_studies() == []  # the index's all-sinks mark says "published"

    again, added = FakeSink("directory"), FakeSink("fhir:added", FhirVersion.R4)
    second = publisher(index, tmp_path, [again, added])
    second.start()  # no resume(): the index has no backlog, as in Server.start
    assert second.wait_idle(20)
    assert [p.study_uid for p in added.published] == [old]
    assert again.published == []  # the directory had it already
    assert second.outbox.get("fhir:added", old).state == DELIVERED  # type: ignore[union-attr]
    assert second.backfill() == 0  # once given, never again
    second.stop()


def test_publish_racing_a_worker_never_leaves_the_older_content_last(index: Index, tmp_path: Path) -> None:
    """Report bug 2: `publish` sends 2 instances; a worker delivers 3 meanwhile; the 2 land last. The study
    must not stay at 2 on the sink nor be recorded as delivered at 2: it is queued and the 3 go out again."""
    uid = store(index, tmp_path / "s", "race", count=2)
    gate = threading.Event()
    landed: list[Publication] = []  # what reached the one FHIR server, in order, from either process
    command_side, server_side = FakeSink("fhir:x", FhirVersion.R4, gate=gate), FakeSink("fhir:x", FhirVersion.R4)
    command_side.published = server_side.published = landed
    command, server = publisher(index, tmp_path, [command_side]), publisher(index, tmp_path, [server_side])
    outcome: list[Any] = []
    publishing = threading.Thread(target=lambda: outcome.append(command.publish_now(uid)))
    publishing.start()
    assert command_side.entered.wait(10)  # `publish` has the 2-instance snapshot on the wire

    store(index, tmp_path / "s3", "race", count=3)  # a third instance arrives; its association ends
    server.start()
    server.submit([uid])
    wait_for(lambda: [p.resource["numberOfInstances"] for p in landed] == [3], what="the worker's delivery")
    wait_for(lambda: index.unpublished_studies() == [], what="the worker's bookkeeping")
    gate.set()  # the stale request lands last
    publishing.join(10)
    assert outcome and outcome[0].published  # it was delivered, all the same

    wait_for(lambda: len(landed) == 3, timeout=5, what="the newest content sent again")
    assert [p.resource["numberOfInstances"] for p in landed] == [3, 2, 3]
    assert server.wait_idle(10)
    row = server.outbox.get("fhir:x", uid)
    assert row is not None and (row.state, row.delivered_count) == (DELIVERED, 3)
    assert index.unpublished_studies() == []
    time.sleep(1.2)  # a worker poll: nothing more to send
    assert len(landed) == 3
    server.stop()
    command.close()


def test_a_direct_delivery_never_overwrites_a_newer_recorded_one(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / OUTBOX_FILE, fsync=False)
    assert outbox.record_direct("fhir:x", "1.2.3", 3, 30.0)  # nothing recorded yet
    assert outbox.record_direct("fhir:x", "1.2.3", 3, 30.0)  # the same content again
    assert not outbox.record_direct("fhir:x", "1.2.3", 2, 20.0)  # older: queued again, the 3 stay recorded
    row = outbox.get("fhir:x", "1.2.3")
    assert row is not None and (row.state, row.delivered_count, row.delivered_up_to) == (PENDING, 3, 30.0)
    assert not outbox.record_direct("fhir:x", "1.2.3", 4, 40.0)  # pending: a worker may be sending older content
    assert outbox.get("fhir:x", "1.2.3").revision == 3  # type: ignore[union-attr]
    outbox.close()


# -- withdrawals: a study left without stored instances ----------------------------------------

OLD, NEW = "1.2.3.200", "1.2.3.201"


def instance_uids(publication: Publication) -> list[str]:
    return [i["uid"] for series in publication.resource["series"] for i in series["instance"]]


def test_a_study_whose_last_instance_moved_is_withdrawn_from_every_sink_once(index: Index, tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Report bug (store) 6: the old study was dropped from the outbox, and every sink kept listing the instance."""
    caplog.set_level(logging.INFO, logger="scp.publish")
    metrics = Metrics()
    sinks = [FakeSink("directory"), FakeSink("fhir:x", FhirVersion.R4)]
    pub = publisher(index, tmp_path, sinks, metrics)
    pub.start()
    put_instance(index, tmp_path / "a", OLD)
    pub.submit([OLD], ended_at=time.monotonic())
    assert pub.wait_idle(20)
    put_instance(index, tmp_path / "b", NEW)  # the same SOP Instance UID, re-sent in another study
    pub.submit([OLD, NEW], ended_at=time.monotonic())  # the association touched both
    assert pub.wait_idle(20)
    for sink in sinks:
        assert sink.withdrawn == [OLD]
        assert [p.study_uid for p in sink.published] == [OLD, NEW]
        assert instance_uids(sink.published[-1]) == ["1.2.3.9.1"]
        row = pub.outbox.get(sink.name, OLD)
        assert row is not None and (row.state, row.delivered_count) == (DELIVERED, 0)
        assert metrics.publications.labels(sink=sink.name, result="withdrawn")._value.get() == 1
    assert index.unpublished_studies() == []
    withdrawn = [r for r in caplog.records if getattr(r, "fields", {}).get("result") == "withdrawn"]
    assert sorted(r.fields["sink"] for r in withdrawn) == ["directory", "fhir:x"]  # type: ignore[attr-defined]
    assert all(r.fields["study_uid"] == OLD and r.fields["latency"] is not None  # type: ignore[attr-defined]
               for r in withdrawn)
    pub.stop()

    # A restart, even one told the study changed (its files vanished), does not withdraw it again.
    again = [FakeSink("directory"), FakeSink("fhir:x", FhirVersion.R4)]
    second = publisher(index, tmp_path, again)
    second.start()
    second.resume(sorted({OLD, *index.unpublished_studies()}), changed=[OLD])
    assert second.wait_idle(20)
    time.sleep(0.3)
    assert [(s.withdrawn, s.published) for s in again] == [([], []), ([], [])]

    # New instances of the withdrawn study publish it afresh (here: the instance moves back).
    put_instance(index, tmp_path / "a2", OLD)
    second.submit([OLD, NEW])
    assert second.wait_idle(20)
    for sink in again:
        assert [p.study_uid for p in sink.published] == [OLD] and sink.withdrawn == [NEW]
    assert index.unpublished_studies() == []
    second.stop()


def test_a_withdrawal_is_retried_while_the_sink_is_down(index: Index, tmp_path: Path) -> None:
    metrics = Metrics()
    flaky = FakeSink("fhir:flaky", FhirVersion.R4)
    pub = publisher(index, tmp_path, [flaky], metrics)
    pub.start()
    put_instance(index, tmp_path / "a", OLD)
    pub.submit([OLD])
    assert pub.wait_idle(20)
    flaky.errors = [DeliveryError("down", retryable=True), ConnectionError("reset"),
                    DeliveryError("busy", retryable=True, status=503)]
    put_instance(index, tmp_path / "b", NEW)
    pub.submit([OLD])
    assert pub.wait_idle(20)
    assert flaky.withdrawn == [OLD] and flaky.errors == []
    assert metrics.publications.labels(sink="fhir:flaky", result="failed")._value.get() == 3
    row = pub.outbox.get("fhir:flaky", OLD)
    assert row is not None and (row.state, row.delivered_count, row.attempts) == (DELIVERED, 0, 0)
    pub.stop()


def test_a_refused_withdrawal_is_dead_lettered_and_stays_dead_until_retry(index: Index, tmp_path: Path) -> None:
    picky = FakeSink("fhir:picky", FhirVersion.R4)
    pub = publisher(index, tmp_path, [FakeSink("directory"), picky])
    pub.start()
    put_instance(index, tmp_path / "a", OLD)
    pub.submit([OLD])
    assert pub.wait_idle(20)
    picky.errors = [DeliveryError("forbidden", retryable=False, status=403)]
    put_instance(index, tmp_path / "b", NEW)
    pub.submit([OLD])
    item = wait_for(lambda: (i := pub.outbox.get("fhir:picky", OLD)) and i.state == DEAD and i, what="dead")
    assert (item.last_status, item.tried_count) == (403, 0)  # a refused withdrawal, not a refused publication
    assert pub.depth() == 0 and picky.withdrawn == []
    assert pub.withdraw_emptied() == 0  # a start-up does not revive it...
    pub.resume([OLD])
    assert pub.outbox.get("fhir:picky", OLD).state == DEAD  # type: ignore[union-attr]
    assert pub.outbox.retry(OLD) == 1  # ...`outbox retry` does
    assert pub.wait_idle(20)
    assert picky.withdrawn == [OLD]
    assert index.unpublished_studies() == [NEW]  # never submitted here; OLD has nothing left to publish
    pub.stop()


def test_start_up_withdraws_a_study_emptied_before_its_association_ended(index: Index, tmp_path: Path) -> None:
    """The server died after the move was indexed but before the association's end queued the old study."""
    first = publisher(index, tmp_path, [FakeSink("directory")])
    first.start()
    put_instance(index, tmp_path / "a", OLD)
    first.submit([OLD])
    assert first.wait_idle(20)
    first.stop()
    put_instance(index, tmp_path / "b", NEW)  # no submit: the association never ended

    directory = FakeSink("directory")
    second = publisher(index, tmp_path, [directory])
    second.start()
    second.resume(index.unpublished_studies())  # what Server.start does: NEW only (OLD has no rows left)
    assert second.wait_idle(20)
    assert directory.withdrawn == [OLD] and [p.study_uid for p in directory.published] == [NEW]
    second.stop()

    third_sink = FakeSink("directory")
    third = publisher(index, tmp_path, [third_sink])
    third.start()
    assert third.withdraw_emptied() == 0
    assert third.wait_idle(20) and third_sink.withdrawn == [] and third_sink.published == []
    third.stop()


def test_publish_now_withdraws_a_study_without_instances(index: Index, tmp_path: Path) -> None:
    directory, down = FakeSink("directory"), FakeSink("fhir:x", FhirVersion.R4)
    pub = publisher(index, tmp_path, [directory, down])
    put_instance(index, tmp_path / "a", OLD)
    assert pub.publish_now(OLD).published
    put_instance(index, tmp_path / "b", NEW)
    down.errors = [DeliveryError("down", retryable=True)]
    outcome = pub.publish_now(OLD)
    assert outcome.withdrawn and not outcome.published and outcome.sinks == ("directory",)
    assert directory.withdrawn == [OLD]
    assert pub.outbox.get("fhir:x", OLD).state == PENDING  # type: ignore[union-attr]
    pub.start()  # the workers take it from there
    assert pub.wait_idle(20)
    assert down.withdrawn == [OLD]
    assert pub.outbox.get("directory", OLD).delivered_count == 0  # type: ignore[union-attr]

    unknown = pub.publish_now("1.2.3.999")  # never stored, never published (a mistyped UID): left alone
    assert not unknown.published and not unknown.withdrawn and unknown.sinks == ()
    assert pub.outbox.get("directory", "1.2.3.999") is None and directory.withdrawn == [OLD]
    pub.stop()


def test_a_sink_that_cannot_withdraw_dead_letters_instead_of_retrying_for_ever(index: Index,
                                                                              tmp_path: Path) -> None:
    class PublishOnly:
        name = "legacy"

        def publish(self, publication: Publication) -> Delivery:
            return Delivery(self.name, "ok")

    pub = publisher(index, tmp_path, [PublishOnly()])
    pub.start()
    put_instance(index, tmp_path / "a", OLD)
    pub.submit([OLD])
    assert pub.wait_idle(20)
    put_instance(index, tmp_path / "b", NEW)
    pub.submit([OLD])
    item = wait_for(lambda: (i := pub.outbox.get("legacy", OLD)) and i.state == DEAD and i, what="dead")
    assert "cannot withdraw" in (item.last_error or "")
    pub.stop()


def test_a_study_whose_files_were_removed_is_withdrawn_at_start(index: Index, tmp_path: Path) -> None:
    """Start-up reconciliation drops the rows of files that are gone and reports their studies as changed."""
    uid = store(index, tmp_path / "s", "removed", count=2)
    first = publisher(index, tmp_path, [FakeSink("directory")])
    first.start()
    first.submit([uid])
    assert first.wait_idle(20)
    first.stop()
    assert index.remove_paths([i.path for i in index.study_instances(uid)]) == [uid]  # what reconcile does

    directory = FakeSink("directory")
    second = publisher(index, tmp_path, [directory])
    second.start()
    second.resume([uid], changed=[uid])  # what Server.start does with reconcile's answer
    assert second.wait_idle(20)
    assert directory.withdrawn == [uid] and directory.published == []
    second.stop()
