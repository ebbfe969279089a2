"""Issue 7, acceptance 2: /metrics counts what a storescu run did; /healthz and /readyz tell the truth."""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port, storescu, wait_for
from dicom_factory import make_study


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_after_a_storescu_run(scp_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    http_port = free_port()
    server = scp_factory("--http-port", str(http_port))
    study = make_study(tmp_path / "g", series=(("CT", 7), ("MR", 5)), seed="metrics")
    storescu(server.port, study.files)
    server.wait_for_study(study.study_uid, instances=12)
    stored_bytes = sum(p.stat().st_size for p in (server.data_dir / "studies").rglob("*.dcm"))

    def published() -> dict | None:  # type: ignore[type-arg]
        values = samples(get(http_port, "/metrics")[1])
        return values if values.get(("imagingstudy_scp_publication_latency_seconds_count",
                                     (("sink", "directory"),))) else None

    values = wait_for(published, what="a publication latency observation")
    assert values[("imagingstudy_scp_instances_stored_total", ())] == 12
    assert values[("imagingstudy_scp_bytes_stored_total", ())] == stored_bytes
    assert values[("imagingstudy_scp_associations_total", (("outcome", "accepted"),))] == 1
    assert values[("imagingstudy_scp_publications_total", (("result", "delivered"), ("sink", "directory")))] == 1
    assert values[("imagingstudy_scp_publication_latency_seconds_count", (("sink", "directory"),))] == 1
    assert values[("imagingstudy_scp_publication_latency_seconds_sum", (("sink", "directory"),))] > 0
    assert values[("imagingstudy_scp_outbox_depth", ())] == 0

    storescu(server.port, study.files[:2])  # the same instances again: duplicates, identical content
    wait_for(lambda: samples(get(http_port, "/metrics")[1]).get(
        ("imagingstudy_scp_duplicates_total", (("identical", "yes"),))) == 2, what="duplicates counted")


def test_health_and_readiness(scp_factory) -> None:  # type: ignore[no-untyped-def]
    http_port = free_port()
    server = scp_factory("--http-port", str(http_port))
    assert get(http_port, "/healthz") == (200, "ok\n")
    assert get(http_port, "/readyz") == (200, "ready\n")
    assert get(http_port, "/nope")[0] == 404

    # Make the store unwritable in a way that also holds for root: its tmp dir becomes a plain file.
    tmp_dir = server.data_dir / "tmp"
    shutil.rmtree(tmp_dir)
    tmp_dir.write_text("not a directory")
    status, body = get(http_port, "/readyz")
    assert status == 503
    assert "store not writable" in body
    assert get(http_port, "/healthz")[0] == 200  # still up, just not ready
    tmp_dir.unlink()
    tmp_dir.mkdir()
    assert get(http_port, "/readyz")[0] == 200


def test_readiness_fails_below_the_free_disk_threshold(scp_factory) -> None:  # type: ignore[no-untyped-def]
    http_port = free_port()
    scp_factory("--http-port", str(http_port), "--min-free-disk-mb", str(10**9))
    status, body = get(http_port, "/readyz")
    assert status == 503 and "free disk" in body
