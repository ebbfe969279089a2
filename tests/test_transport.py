"""The pynetdicom adaptations in scp/transport.py: pinned to the version they were written for, in use,
and still pynetdicom underneath. These fail loudly when pynetdicom changes, so the pin is revisited."""

from __future__ import annotations

import itertools
import struct
import time
from pathlib import Path

import pydicom
import pynetdicom
import pytest
from pydicom.uid import generate_uid

from conftest import RunningSCP, temp_leftovers
from dicom_factory import CT_IMAGE_STORAGE, UID_ROOT, dataset_bytes, make_instance, make_study
from fault_dicom import EXPLICIT_VR_LE, IMPLICIT_VR_LE, VERIFICATION, RawAssociation, c_store_rq
from fault_scu import echo
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
                 "artim_timer", "event_queue", "to_provider_queue", "to_user_queue", "state_machine",
                 "_read_pdu_data", "_decode_pdu", "_recv_pdu", "socket"):
        assert hasattr(DULServiceProvider, name) or name in DULServiceProvider.__init__.__code__.co_names, name
    # the direct P-DATA path replaces _read_pdu_data, which _is_transport_event calls to read a PDU
    assert "_read_pdu_data" in DULServiceProvider._is_transport_event.__code__.co_names
    from pynetdicom.dimse import DIMSEServiceProvider
    for name in ("message", "msg_queue", "maximum_pdu_size", "receive_primitive", "send_msg"):
        assert hasattr(DIMSEServiceProvider, name) or name in DIMSEServiceProvider.__init__.__code__.co_names, name
    assert hasattr(RequestHandler, "_create_association")
    from pynetdicom.timer import Timer
    assert hasattr(Timer, "restart") and hasattr(DULServiceProvider, "idle_timer_expired")


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


def pynetdicom_store_response(**fields: object) -> bytes:
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE

    primitive = C_STORE()
    for name, value in fields.items():
        setattr(primitive, name, value)
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    (pdata,) = list(message.encode_msg(1, 0))
    ((_, fragment),) = pdata.presentation_data_value_list
    assert fragment[0] == 0x03  # one command fragment, the last
    return bytes(fragment[1:])


def test_store_response_bytes_equal_pynetdicom_encoding() -> None:
    cases = [
        dict(MessageIDBeingRespondedTo=7, Status=0x0000, AffectedSOPClassUID="1.2.840.10008.5.1.4.1.1.2",
             AffectedSOPInstanceUID="1.2.3.4.5"),
        dict(MessageIDBeingRespondedTo=65535, Status=0xC000, AffectedSOPClassUID="1.2.840.10008.5.1.4.1.1.4",
             AffectedSOPInstanceUID="1.2.3.44", ErrorComment="Study Instance UID is missing"),
        dict(MessageIDBeingRespondedTo=1, Status=0xA700, AffectedSOPClassUID="1.2.3",
             AffectedSOPInstanceUID="1.2.3.4", ErrorComment="odd"),
    ]
    for fields in cases:
        ours = transport.store_response_command(
            fields["MessageIDBeingRespondedTo"], fields["AffectedSOPClassUID"], fields["AffectedSOPInstanceUID"],
            fields["Status"], fields.get("ErrorComment"))  # type: ignore[arg-type]
        assert ours == pynetdicom_store_response(**fields), fields


@pytest.mark.parametrize("max_pdu", [0, 16384, 150, 64, 20, 7])
def test_response_pdus_equal_pynetdicom_fragmentation(max_pdu: int) -> None:
    """A response longer than the peer's maximum PDU is cut as pynetdicom cuts it (one fragment per PDU)."""
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE

    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 3
    primitive.Status = 0xC000
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    primitive.AffectedSOPInstanceUID = "1.2.3.44"
    primitive.ErrorComment = "Study Instance UID is missing"
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    fragments = [bytes(f) for p in message.encode_msg(5, max_pdu) for _, f in p.presentation_data_value_list]
    command = b"".join(f[1:] for f in fragments)
    expected = b"".join(transport.p_data_tf(5, f) for f in fragments)
    assert transport.command_pdus(5, command, max_pdu) == expected


def test_file_meta_bytes_equal_pynetdicom_chunked_receive() -> None:
    from io import BytesIO

    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta

    for sop_class, sop, ts in (("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.840.10008.1.2.1"),
                               ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.44", "1.2.840.10008.1.2")):
        expected = BytesIO()
        expected.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(expected, create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop,
                                                        transfer_syntax=ts))
        assert transport.file_meta(sop_class, sop, ts) == expected.getvalue()


def test_parse_command_reads_a_pynetdicom_c_store_request() -> None:
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE

    primitive = C_STORE()
    primitive.MessageID = 12
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    primitive.AffectedSOPInstanceUID = "1.2.3.4.5.6"
    primitive.Priority = 2
    primitive.MoveOriginatorApplicationEntityTitle = "MOVER"
    primitive.MoveOriginatorMessageID = 3
    primitive.DataSet = __import__("io").BytesIO(b"\x08\x00\x18\x00\x00\x00\x00\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    fragments = [f for p in message.encode_msg(1, 0) for _, f in p.presentation_data_value_list]
    command = b"".join(bytes(f[1:]) for f in fragments if f[0] & 1)
    elements = transport.parse_command(command)
    assert elements is not None
    assert transport._unsigned(elements[0x0100]) == 0x0001
    assert transport._unsigned(elements[0x0110]) == 12
    assert transport._text(elements[0x1000]) == "1.2.3.4.5.6"
    assert transport._text(elements[0x1030]) == "MOVER"
    assert transport.parse_command(command[:-3]) is None  # truncated: not ours to guess


# -- the direct P-DATA path (PDUs read into one buffer, fragments straight to the DIMSE provider) ----------

def _stored_dataset(scp: RunningSCP, sop_uid: str) -> bytes:
    (path,) = list((scp.data_dir / "studies").rglob(f"{sop_uid}.dcm"))
    return dataset_bytes(path)


def _pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def test_fragments_in_any_pdu_layout_are_stored_intact(running_scp: RunningSCP, tmp_path: Path) -> None:
    """Command and data in one PDU, a dataset cut into odd fragments spread over PDUs with several PDVs
    each, and one PDU larger than the reused buffer grows to (over 4 MiB, beyond what we announced)."""
    study, series = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    sops = [generate_uid(UID_ROOT) for _ in range(3)]
    datasets = [dataset_bytes(make_instance(tmp_path / f"{n}.dcm", study_uid=study, series_uid=series,
                                            sop_uid=sop, instance_number=n + 1, rows=rows, columns=rows))
                for n, (sop, rows) in enumerate(zip(sops, (8, 64, 1700)))]
    assoc = RawAssociation(running_scp.port, [(CT_IMAGE_STORAGE.encode(), [EXPLICIT_VR_LE])])
    # 1: command and the whole dataset in one P-DATA-TF
    assoc.send_pdu(0x04, _pdv(1, 0x03, c_store_rq(1, CT_IMAGE_STORAGE.encode(), sops[0].encode()))
                   + _pdv(1, 0x02, datasets[0]))
    assert assoc._response().status == 0x0000
    # 2: fragments of 1, 7, 333 ... bytes, three PDVs per PDU
    data, cuts, offset = datasets[1], [], 0
    for size in itertools.cycle((1, 7, 333, 4096)):
        if offset >= len(data):
            break
        cuts.append(data[offset:offset + size])
        offset += size
    pdvs = [_pdv(1, 0x00, cut) for cut in cuts[:-1]] + [_pdv(1, 0x02, cuts[-1])]
    assoc.send_pdu(0x04, _pdv(1, 0x03, c_store_rq(2, CT_IMAGE_STORAGE.encode(), sops[1].encode())))
    for start in range(0, len(pdvs), 3):
        assoc.send_pdu(0x04, b"".join(pdvs[start:start + 3]))
    assert assoc._response().status == 0x0000
    # 3: one PDU over 4 MiB
    assert len(datasets[2]) > transport._MAX_BUFFER
    assoc.send_pdu(0x04, _pdv(1, 0x03, c_store_rq(3, CT_IMAGE_STORAGE.encode(), sops[2].encode())))
    assoc.send_pdu(0x04, _pdv(1, 0x02, datasets[2]))
    assert assoc._response().status == 0x0000
    assert assoc.release()
    for sop, data in zip(sops, datasets):
        assert _stored_dataset(running_scp, sop) == data
    running_scp.wait_for_study(study, instances=3)


def test_echo_between_stores_on_one_association(running_scp: RunningSCP, tmp_path: Path) -> None:
    """C-ECHO takes pynetdicom's own path (association thread), C-STORE the direct one: both answer."""
    study = make_study(tmp_path / "g", series=(("CT", 2),), seed="mixed")
    assoc = RawAssociation(running_scp.port, [(CT_IMAGE_STORAGE.encode(), [EXPLICIT_VR_LE]),
                                              (VERIFICATION, [IMPLICIT_VR_LE])])
    for path in study.files:
        assert assoc.c_echo(3).status == 0x0000
        sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert assoc.c_store(1, CT_IMAGE_STORAGE.encode(), sop.encode(), dataset_bytes(path)).status == 0x0000
    assert assoc.c_echo(3).status == 0x0000
    assert assoc.release()
    running_scp.wait_for_study(study.study_uid, instances=2)


@pytest.mark.parametrize("pdu", [
    pytest.param(struct.pack(">IB", 1, 1), id="item length below 2"),
    pytest.param(struct.pack(">IBB", 500, 1, 0x02) + b"\0" * 10, id="item longer than its PDU"),
    pytest.param(b"\0\0\0", id="item header cut short"),
])
def test_a_malformed_p_data_pdu_aborts_and_the_server_keeps_serving(running_scp: RunningSCP, pdu: bytes,
                                                                     tmp_path: Path) -> None:
    assoc = RawAssociation(running_scp.port, [(CT_IMAGE_STORAGE.encode(), [EXPLICIT_VR_LE])])
    assoc.send_pdu(0x04, pdu)
    assert assoc._response().ended in ("A-ABORT", "closed")
    assoc.sock.close()
    assert echo(running_scp.port)
    assert temp_leftovers(running_scp.data_dir) == []


def test_no_temp_file_for_a_dataset_gets_out_of_resources(tmp_path: Path) -> None:
    """When no file can be made to receive into (the disk is full), the dataset is read and dropped and the
    C-STORE answered 0xA700; the association and the server go on. The failure is injected where the
    receiver asks for the file (a full disk would also fail everything after it)."""
    from scp import StorageSCP

    study = make_study(tmp_path / "g", series=(("CT", 2),), seed="no-temp")
    with StorageSCP(tmp_path / "data") as scp:
        listener = scp._server.listener  # type: ignore[union-attr]
        calls = []

        def full() -> None:
            calls.append(1)
            raise OSError(28, "No space left on device")

        listener.temp_file = full  # type: ignore[method-assign]
        assoc = associate(scp.port, study.files)
        try:
            assert store(assoc, study.files[0]) == 0xA700
            del listener.temp_file  # space again
            assert store(assoc, study.files[1]) == 0x0000
        finally:
            assoc.release()
        assert calls == [1]
        second = pydicom.dcmread(study.files[1], stop_before_pixels=True).SOPInstanceUID
        assert [p.name for p in scp.stored_files(study.study_uid)] == [f"{second}.dcm"]
        assert temp_leftovers(scp.data_dir) == []
