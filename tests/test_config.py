"""Issue 7, acceptance 1: flags > environment > config file > defaults, and bad values fail fast by key."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from scp.fhir_version import FhirVersion
from scp.settings import SettingsError, load_settings


def run_config(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IMAGINGSTUDY_SCP_")}
    return subprocess.run([sys.executable, "-m", "scp", *args], cwd=cwd, capture_output=True, text=True,
                          env={**clean, **(env or {})}, timeout=60)


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    (tmp_path / "imagingstudy-scp.toml").write_text('port = 1111\naet = "FROMFILE"\nfhir_version = "R5"\n'
                                                     'log_format = "json"\n')
    env = {"IMAGINGSTUDY_SCP_PORT": "2222", "IMAGINGSTUDY_SCP_AET": "FROMENV"}
    result = run_config("config", "--data-dir", "elsewhere", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    effective = tomllib.loads(result.stdout)
    assert effective["port"] == 2222  # env beats file
    assert effective["aet"] == "FROMENV"
    assert effective["fhir_version"] == "R5"  # file beats default
    assert effective["log_format"] == "json"
    assert effective["data_dir"] == "elsewhere"  # flag
    assert effective["host"] == "0.0.0.0"  # default

    flagged = run_config("serve", "--help", cwd=tmp_path, env=env)
    assert "--port" in flagged.stdout
    in_process = load_settings({"port": 3333}, tmp_path / "imagingstudy-scp.toml")
    assert in_process.port == 3333  # flag beats everything
    assert in_process.fhir_version is FhirVersion.R5


def test_config_output_is_a_usable_config_file(tmp_path: Path) -> None:
    result = run_config("config", cwd=tmp_path)
    (tmp_path / "again.toml").write_text(result.stdout)
    again = run_config("config", "--config", "again.toml", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert tomllib.loads(again.stdout) == tomllib.loads(result.stdout)


@pytest.mark.parametrize(("source", "key"), [
    ("file", "port"), ("env", "port"), ("flag", "port"),
    ("file", "fhir_version"), ("env", "aet"), ("file", "timezone"), ("file", "no_such_setting"),
])
def test_a_bad_value_fails_fast_naming_its_key(tmp_path: Path, source: str, key: str) -> None:
    bad = {"port": "99999", "fhir_version": "R9", "aet": "WAY_TOO_LONG_AE_TITLE", "timezone": "Mars/Olympus",
           "no_such_setting": "1"}[key]
    args: list[str] = ["serve"]
    env: dict[str, str] = {}
    if source == "file":
        (tmp_path / "imagingstudy-scp.toml").write_text(f'{key} = "{bad}"\n')
    elif source == "env":
        env[f"IMAGINGSTUDY_SCP_{key.upper()}"] = bad
    else:
        args += [f"--{key.replace('_', '-')}", bad]
    result = run_config(*args, cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert f"{key}:" in result.stderr
    assert "listening" not in result.stderr


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="config: .* does not exist"):
        load_settings({}, tmp_path / "nope.toml")


def test_readme_documents_every_setting() -> None:
    from scp.settings import Settings

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [key for key in Settings.model_fields if f"| `{key}` |" not in readme]
    assert missing == [], f"settings missing from the README's configuration table: {missing}"
