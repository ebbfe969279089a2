"""The FHIR sink's transport against the real server: bearer and basic auth, TLS with a CA bundle,
the release read from /metadata, how refusals are classified; and the settings that configure it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from dicom_factory import make_study
from fhir_server import FhirServer
from scp.fhir_version import FhirVersion
from scp.header import read_header
from scp.mapping.imaging_study import MappingOptions, build_imaging_study
from scp.records import Provenance, StoredInstance
from scp.settings import SettingsError, load_settings
from scp.sinks.base import DeliveryError, Publication
from scp.sinks.fhir_server import FhirServerSink, sink_name


@pytest.fixture
def fhir_factory(tmp_path: Path) -> Iterator[Callable[..., FhirServer]]:
    made: list[FhirServer] = []

    def make(name: str = "fhir", **options: Any) -> FhirServer:
        server = FhirServer(tmp_path / name, **options)
        made.append(server)
        return server.start()

    yield make
    for server in made:
        server.stop()


def publication(folder: Path, seed: str, version: FhirVersion = FhirVersion.R4) -> Publication:
    study = make_study(folder, series=(("CT", 2),), seed=seed)
    instances = tuple(StoredInstance(read_header(p), f"studies/{p.name}", p.stat().st_size,
                                     Provenance(None, None, None, None, time.time())) for p in study.files)
    resource = build_imaging_study([i.header for i in instances], MappingOptions(version=version)).resource
    return Publication(study.study_uid, version, resource, instances)


def test_bearer_token_and_tls_with_a_ca_bundle(fhir_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fhir = fhir_factory(tokens=["s3cret-token"], tls=True)
    assert fhir.base_url.startswith("https://")
    pub = publication(tmp_path / "a", "auth-bearer")

    with closing(FhirServerSink(fhir.base_url, token="s3cret-token", ca_bundle=fhir.ca_bundle, timeout=10)) as sink:
        assert sink.fhir_version() is FhirVersion.R4  # from the CapabilityStatement
        delivery = sink.publish(pub)
    assert delivery.fields["status"] == 200
    assert [e["status"][:3] for e in delivery.fields["entries"]] == ["201", "201"]
    assert len(fhir.all("ImagingStudy")) == 1

    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    with closing(FhirServerSink(fhir.base_url, token_file=token_file, ca_bundle=fhir.ca_bundle, timeout=10)) as sink:
        again = sink.publish(pub)
    assert [e["status"][:3] for e in again.fields["entries"]] == ["200", "200"]  # found, updated: no duplicate
    assert len(fhir.all("Patient")) == 1 and len(fhir.all("ImagingStudy")) == 1

    with pytest.raises(DeliveryError) as refused, \
            closing(FhirServerSink(fhir.base_url, token="wrong", ca_bundle=fhir.ca_bundle, timeout=10)) as sink:
        sink.publish(pub)
    assert refused.value.status == 401 and not refused.value.retryable

    with pytest.raises(DeliveryError) as untrusted, \
            closing(FhirServerSink(fhir.base_url, token="s3cret-token", timeout=10)) as sink:
        sink.publish(pub)  # the system CAs do not know the server's certificate
    assert untrusted.value.status is None and untrusted.value.retryable
    assert "certificate" in str(untrusted.value).lower() or "ssl" in str(untrusted.value).lower()


def test_basic_auth(fhir_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fhir = fhir_factory(users={"scp": "pa55word"})
    pub = publication(tmp_path / "a", "auth-basic")
    with closing(FhirServerSink(fhir.base_url, username="scp", password="pa55word", timeout=10)) as sink:
        sink.publish(pub)
    assert len(fhir.all("ImagingStudy")) == 1
    with pytest.raises(DeliveryError) as refused, \
            closing(FhirServerSink(fhir.base_url, username="scp", password="nope", timeout=10)) as sink:
        sink.publish(pub)
    assert refused.value.status == 401 and not refused.value.retryable


def test_refusals_and_silence_are_classified(fhir_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fhir = fhir_factory()
    r6 = publication(tmp_path / "a", "classify", FhirVersion.R6)
    with pytest.raises(DeliveryError) as invalid, \
            closing(FhirServerSink(fhir.base_url, version=FhirVersion.R6, timeout=10)) as sink:
        sink.publish(r6)  # strict R4 validation refuses an R6 ImagingStudy
    assert invalid.value.status == 400 and not invalid.value.retryable
    assert invalid.value.outcome is not None and invalid.value.outcome["resourceType"] == "OperationOutcome"

    fhir.stop()
    with pytest.raises(DeliveryError) as silent, closing(FhirServerSink(fhir.base_url, timeout=2)) as sink:
        sink.fhir_version()
    assert silent.value.retryable and silent.value.status is None


def test_sink_names_hide_credentials() -> None:
    assert sink_name("https://user:pw@fhir.example:8443/base/") == "fhir:https://fhir.example:8443/base"


def test_fhir_settings_from_flags_env_and_file(tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IMAGINGSTUDY_SCP_")}
    env = {**clean, "IMAGINGSTUDY_SCP_FHIR_URL": '["http://127.0.0.1:1/fhir", "https://h.example/r4/"]',
           "IMAGINGSTUDY_SCP_FHIR_TOKEN": "t0ken"}
    result = subprocess.run([sys.executable, "-m", "scp", "config"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    effective = tomllib.loads(result.stdout)
    assert effective["fhir_url"] == ["http://127.0.0.1:1/fhir", "https://h.example/r4"]
    assert effective["fhir_token"] == "***" and "t0ken" not in result.stdout
    assert "fhir_version" not in effective  # unset: R6 for the directory, the server's own for a FHIR server

    settings = load_settings({"fhir_url": ["http://a/fhir", "http://b/fhir"], "fhir_username": "u",
                              "fhir_password": "p", "outbox_max_delay": 5}, search_default=False,
                             environment=False)
    assert settings.fhir_url == ["http://a/fhir", "http://b/fhir"] and settings.outbox_max_delay == 5
    assert settings.directory_fhir_version() is FhirVersion.R6
    for bad in ({"fhir_url": ["ftp://x"]}, {"fhir_username": "u"}, {"fhir_token": "t", "fhir_username": "u",
                                                                    "fhir_password": "p"}):
        with pytest.raises(SettingsError):
            load_settings(bad, search_default=False, environment=False)


@pytest.mark.parametrize(("value", "expected"), [
    ("http://a.example/fhir", ["http://a.example/fhir"]),
    ("http://a.example/fhir, https://b.example/r4/", ["http://a.example/fhir", "https://b.example/r4"]),
    ("http://a.example/fhir https://b.example", ["http://a.example/fhir", "https://b.example"]),
    ('["http://a.example/fhir"]', ["http://a.example/fhir"]),
])
def test_fhir_url_from_the_environment_needs_no_json(monkeypatch: pytest.MonkeyPatch, value: str,
                                                      expected: list[str]) -> None:
    """A container's `-e IMAGINGSTUDY_SCP_FHIR_URL=http://hapi:8080/fhir` just works; JSON lists still do."""
    monkeypatch.setenv("IMAGINGSTUDY_SCP_FHIR_URL", value)
    assert load_settings(None, None, search_default=False).fhir_url == expected


def test_a_broken_json_list_of_fhir_urls_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGINGSTUDY_SCP_FHIR_URL", '["http://a.example/fhir"')
    with pytest.raises(SettingsError, match="fhir_url"):
        load_settings(None, None, search_default=False)


def test_credentials_in_a_fhir_url_stay_out_of_messages(tmp_path: Path) -> None:
    """Basic credentials can be given per server as user:password@ in its URL; no message repeats them."""
    with closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once closed
    sink = FhirServerSink(f"http://alice:s3cret@127.0.0.1:{port}/fhir", timeout=2)
    assert sink.name == f"fhir:http://127.0.0.1:{port}/fhir" and "s3cret" not in sink.shown_url
    with pytest.raises(DeliveryError) as refused:
        sink.fhir_version()  # asks the server's CapabilityStatement: connection refused
    assert "s3cret" not in str(refused.value) and f"127.0.0.1:{port}/fhir/metadata" in str(refused.value)


def test_config_masks_a_password_in_a_fhir_url() -> None:
    settings = load_settings({"fhir_url": ["https://alice:s3cret@h.example/fhir", "http://h2.example/fhir"]},
                             None, search_default=False, environment=False)
    assert settings.effective()["fhir_url"] == ["https://alice:***@h.example/fhir", "http://h2.example/fhir"]
    assert settings.fhir_url[0] == "https://alice:s3cret@h.example/fhir"  # the sink still gets it
