"""Issue 7, acceptance 4: `studies`, `show` and `publish` against a live server's data dir."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from conftest import assert_valid, storescu
from dicom_factory import make_study
from scp.fhir_version import FhirVersion


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scp", *args], capture_output=True, text=True, timeout=60)


def test_studies_show_publish_while_the_server_runs(scp_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = scp_factory()
    ct = make_study(tmp_path / "ct", series=(("CT", 4), ("CT", 2)), seed="cli-ct")
    mixed = make_study(tmp_path / "mixed", series=(("MR", 3), ("CT", 1)), seed="cli-mixed")
    storescu(server.port, ct.files + mixed.files)
    server.wait_for_study(ct.study_uid, instances=6)
    server.wait_for_study(mixed.study_uid, instances=4)
    data = str(server.data_dir)

    listing = cli("studies", "--data-dir", data)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split()[:3] == ["STUDY", "INSTANCE", "UID"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows[ct.study_uid][1:4] == ["PID-0001", "CT", "2/6"]
    assert rows[mixed.study_uid][1:4] == ["PID-0001", "CT/MR", "2/4"]
    assert rows[ct.study_uid][-1] == "published"

    shown = cli("show", mixed.study_uid, "--data-dir", data, "--fhir-version", "R4")
    assert shown.returncode == 0, shown.stderr
    r4 = orjson.loads(shown.stdout)
    assert_valid(r4, FhirVersion.R4)
    assert r4["numberOfInstances"] == 4
    assert r4["series"][0]["instance"][0]["sopClass"]["system"] == "urn:ietf:rfc:3986"
    assert "invalid:" not in shown.stderr

    published = server.study_path(ct.study_uid)
    published.unlink()
    again = cli("publish", ct.study_uid, "--data-dir", data)
    assert again.returncode == 0, again.stderr
    resource = orjson.loads(published.read_bytes())
    assert_valid(resource)
    assert resource["numberOfInstances"] == 6

    missing = cli("show", "1.2.3.4", "--data-dir", data)
    assert missing.returncode == 1 and "no study 1.2.3.4" in missing.stderr
