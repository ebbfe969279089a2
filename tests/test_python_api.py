"""Issue 7, acceptance 5: the README's fixture example is a test of this suite, verbatim; and the API."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from conftest import storescu
from dicom_factory import make_study
from scp import StorageSCP, StudyNotPublished

ROOT = Path(__file__).resolve().parent.parent


def test_readme_shows_the_fixture_example_verbatim() -> None:
    example = (ROOT / "tests" / "test_fixture_example.py").read_text()
    readme = (ROOT / "README.md").read_text()
    assert f"```python\n{example}```" in readme


def test_storage_scp_context_manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGINGSTUDY_SCP_AET", "FROM_ENV")  # an embedded server ignores the host's env
    before = tempfile.gettempdir()
    study = make_study(tmp_path / "g", series=(("CT", 3), ("MR", 2)), seed="api")
    with StorageSCP(tmp_path / "data", aet="EMBEDDED", fhir_version="R4") as scp:
        assert scp.aet == "EMBEDDED" and scp.host == "127.0.0.1" and scp.port > 0
        storescu(scp.port, study.files, aec="EMBEDDED")
        resource = scp.wait_for_study(study.study_uid, timeout=20)
        assert resource["numberOfInstances"] == 5
        assert resource["modality"][0]["code"] == "CT"  # R4: Coding
        files = scp.stored_files(study.study_uid)
        assert len(files) == 5 and all(f.is_file() for f in files)
        with pytest.raises(StudyNotPublished):
            scp.wait_for_study("1.2.3.4", timeout=0.2)
    assert tempfile.gettempdir() == before
    assert os.path.isdir(before)
