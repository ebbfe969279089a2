"""The pynetdicom adaptations in scp/transport.py: pinned to the version they were written for, in use,
and still pynetdicom underneath. These fail loudly when pynetdicom changes, so the pin is revisited."""

from __future__ import annotations

import time
from pathlib import Path

import pynetdicom

from conftest import RunningSCP
from dicom_factory import make_study
from scp import transport
from scu import associate, store


def test_installed_pynetdicom_is_the_adapted_version() -> None:
    assert transport.adapted(), (
        f"pynetdicom {pynetdicom.__version__} is not one scp/transport.py was written for "
        f"({transport.ADAPTED_FOR}): review the adaptation against the new version, then update the pin")


def test_the_adapted_internals_still_exist() -> None:
    """The private names the adaptation relies on (a rename would silently fall back or break)."""
    from pynetdicom.association import Association
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.transport import RequestHandler

    for name in ("_run_reactor", "_serve_request", "_reactor_checkpoint", "_kill", "_is_paused"):
        assert hasattr(Association, name) or name in Association.__init__.__code__.co_names, name
    for name in ("run_reactor", "_process_recv_primitive", "_is_transport_event", "kill_dul", "_idle_timer",
                 "artim_timer", "event_queue", "to_provider_queue", "to_user_queue", "state_machine"):
        assert hasattr(DULServiceProvider, name) or name in DULServiceProvider.__init__.__code__.co_names, name
    assert hasattr(RequestHandler, "_create_association")


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, clock ticks of 1/100 s


def test_an_idle_open_association_costs_almost_no_cpu(running_scp: RunningSCP, tmp_path: Path) -> None:
    """Polling with zero sleeps would burn most of a core; event-driven waits stay near idle."""
    study = make_study(tmp_path / "g", series=(("CT", 2),), seed="idle")
    assoc = associate(running_scp.port, study.files)
    try:
        assert store(assoc, study.files[0]) == 0x0000
        assert running_scp.process is not None
        pid = running_scp.process.pid
        before = process_cpu_seconds(pid)
        time.sleep(2.0)
        used = process_cpu_seconds(pid) - before
        # measured here: event-driven ~0.02 s, pynetdicom's 1 ms polling ~0.14 s
        assert used < 0.08, f"an idle association used {used:.2f} s of CPU in 2 s"
        assert store(assoc, study.files[1]) == 0x0000  # and it still answers at once
    finally:
        assoc.release()
    running_scp.wait_for_study(study.study_uid, instances=2)


def test_the_stock_transport_still_works(scp_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = scp_factory("--stock-transport")
    study = make_study(tmp_path / "g", series=(("CT", 3),), seed="stock")
    assoc = associate(server.port, study.files)
    assert [store(assoc, p) for p in study.files] == [0, 0, 0]
    assoc.release()
    server.wait_for_study(study.study_uid, instances=3)
