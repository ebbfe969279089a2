"""Issue 5, acceptance 5: AE policy (called AE, calling allow-list, host binding) and DICOM TLS,
with DCMTK's storescu/echoscu as the clients."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import AET, RunningSCP, dcmtk, free_port, wait_for
from dicom_factory import UID_ROOT, dataset_bytes, make_instance, make_study
from scp.ae_policy import AEPolicy, CallingAE, RejectReason


def echo(port: int, *, aec: str = AET, aet: str = "ECHOSCU", extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk("echoscu"), "-aec", aec, "-aet", aet, *extra, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30)


def test_policy_decisions() -> None:
    import ipaddress

    policy = AEPolicy("IMAGINGSTUDY", calling=(
        CallingAE("CT1", (ipaddress.ip_network("10.0.0.0/8"),)),
        CallingAE("MR1"),
    ))
    assert policy.check("MR1", "IMAGINGSTUDY", "192.168.1.5") is None
    assert policy.check("CT1", "IMAGINGSTUDY", "10.2.3.4") is None
    assert policy.check("CT1", "IMAGINGSTUDY", "::ffff:10.2.3.4") is None
    assert policy.check("CT1", "IMAGINGSTUDY", "127.0.0.1").reason is RejectReason.CALLING_AE_NOT_RECOGNIZED
    assert policy.check("XA1", "IMAGINGSTUDY", "10.2.3.4").reason is RejectReason.CALLING_AE_NOT_RECOGNIZED
    assert policy.check("MR1", "OTHER", "10.2.3.4").reason is RejectReason.CALLED_AE_NOT_RECOGNIZED
    relaxed = AEPolicy("IMAGINGSTUDY", accept_any_called_aet=True)
    assert relaxed.check("ANY", "OTHER", "10.2.3.4") is None


def test_wrong_called_ae_not_listed_calling_ae_and_disallowed_host_are_rejected(scp_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "policy.toml"
    config.write_text(
        '[[calling_aets]]\naet = "CT1"\nhosts = ["10.0.0.0/8"]\n\n'
        '[[calling_aets]]\naet = "LOCALCT"\nhosts = ["127.0.0.0/8", "::1"]\n\n'
        '[[calling_aets]]\naet = "ANYWHERE"\n'
    )
    server = scp_factory("--config", str(config))
    wrong_called = echo(server.port, aec="NOT_US", aet="ANYWHERE")
    assert wrong_called.returncode != 0
    assert "Called AE Title Not Recognized" in wrong_called.stderr + wrong_called.stdout
    not_listed = echo(server.port, aet="STRANGER")
    assert not_listed.returncode != 0
    assert "Calling AE Title Not Recognized" in not_listed.stderr + not_listed.stdout
    wrong_host = echo(server.port, aet="CT1")
    assert wrong_host.returncode != 0
    assert "Calling AE Title Not Recognized" in wrong_host.stderr + wrong_host.stdout
    assert echo(server.port, aet="LOCALCT").returncode == 0
    assert echo(server.port, aet="ANYWHERE").returncode == 0
    log = server.log()
    assert "called AE title 'NOT_US' is not ours" in log
    assert "calling AE title 'STRANGER' is not on the allow-list" in log
    assert "calling AE title 'CT1' is not allowed from 127.0.0.1" in log


def test_accept_any_called_aet_relaxes_the_check(scp_factory) -> None:  # type: ignore[no-untyped-def]
    server = scp_factory("--accept-any-called-aet")
    assert echo(server.port, aec="WHATEVER").returncode == 0


def test_tls_with_a_trusted_client_certificate(scp_factory, pki: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tls_port = free_port()
    server: RunningSCP = scp_factory("--tls-port", str(tls_port), "--tls-cert", str(pki / "server.pem"),
                                     "--tls-key", str(pki / "server.key"), "--tls-ca", str(pki / "ca.pem"),
                                     "--tls-require-client-cert")
    wait_for(lambda: "listening with TLS" in server.log(), what="the TLS listener")
    study = make_study(tmp_path / "g", series=(("CT", 3),), seed="tls")
    with_cert = subprocess.run(
        [dcmtk("storescu"), "-aec", AET, "+tls", str(pki / "client.key"), str(pki / "client.pem"),
         "+cf", str(pki / "ca.pem"), "127.0.0.1", str(tls_port), *map(str, study.files)],
        capture_output=True, text=True, timeout=60)
    assert with_cert.returncode == 0, with_cert.stderr
    assert server.wait_for_study(study.study_uid, instances=3)["numberOfInstances"] == 3

    # an instance of many PDUs and TLS records: read as the records arrive, stored intact
    big = make_instance(tmp_path / "big.dcm", study_uid=study.study_uid, series_uid=generate_uid(UID_ROOT),
                        sop_uid=generate_uid(UID_ROOT), rows=700, columns=700)
    sent = subprocess.run(
        [dcmtk("storescu"), "-aec", AET, "+tls", str(pki / "client.key"), str(pki / "client.pem"),
         "+cf", str(pki / "ca.pem"), "127.0.0.1", str(tls_port), str(big)],
        capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    assert server.wait_for_study(study.study_uid, instances=4)["numberOfInstances"] == 4
    sop = pydicom.dcmread(big, stop_before_pixels=True).SOPInstanceUID
    (stored,) = (server.data_dir / "studies").rglob(f"{sop}.dcm")
    assert dataset_bytes(stored) == dataset_bytes(big) and len(dataset_bytes(big)) > 900_000

    anonymous = subprocess.run(
        [dcmtk("storescu"), "-aec", AET, "+tla", "+cf", str(pki / "ca.pem"), "127.0.0.1", str(tls_port),
         str(study.files[0])], capture_output=True, text=True, timeout=60)
    assert anonymous.returncode != 0  # no client certificate: the handshake fails

    assert echo(server.port).returncode == 0  # the plain listener runs beside the TLS one
