"""The compiled schema check is cached as bytecode: a server does not carry compile()'s peak memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROBE = """
import os
def rss():
    return int(open(f"/proc/{os.getpid()}/status").read().split("VmRSS:")[1].split()[0]) // 1024
import scp.server
from scp.fhir_version import FhirVersion
from scp.validation import imaging_study_problems, prepare
before = rss()
prepare(FhirVersion.R6)
grown = rss() - before
valid = {"resourceType": "ImagingStudy", "status": "available", "subject": {"display": "x"}}
assert imaging_study_problems(valid, FhirVersion.R6) == []
assert imaging_study_problems({**valid, "bogus": 1}, FhirVersion.R6) != []
print(grown)
"""


def run_probe(cache: Path) -> int:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "XDG_CACHE_HOME": str(cache)})
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip())


def test_the_schema_check_is_compiled_once_into_the_cache_and_stays_small(tmp_path: Path) -> None:
    first = run_probe(tmp_path)  # compiles in a child process, then loads the bytecode
    cached = list((tmp_path / "imagingstudy-scp").glob("ImagingStudy.R6.*.marshal"))
    assert len(cached) == 1
    second = run_probe(tmp_path)  # loads the bytecode
    assert list((tmp_path / "imagingstudy-scp").glob("ImagingStudy.R6.*.marshal")) == cached
    # compiling the generated code in-process grows a process by ~90 MiB; loading bytecode by a few
    assert first < 30 and second < 30, (first, second)


def test_an_unwritable_cache_falls_back_to_compiling_here(tmp_path: Path) -> None:
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")  # the cache dir cannot be created below a file, even as root
    run_probe(blocked)
