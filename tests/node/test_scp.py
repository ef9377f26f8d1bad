"""The node's SCP in-process on 127.0.0.1: durable C-STORE, refusals, access control, TLS, limits, events."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification

import peers
from dicom_io.scu import Peer, client_tls_context, echo, send_instances
from node import status
from node.events import SeriesStable


def _peer(node: Any, calling: str = "TESTSCU", **kw: Any) -> Peer:
    return Peer(node.settings.dimse.ae_title, "127.0.0.1", node.port, calling_ae_title=calling, timeout=5, **kw)


def _raw_file(path: Path, sop_class: str, sop_uid: str, body: bytes) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    fp = DicomBytesIO()
    write_file_meta_info(fp, meta, enforce_standard=True)
    path.write_bytes(b"\x00" * 128 + b"DICM" + fp.getvalue() + body)
    return path


def _body(path: Path) -> bytes:
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def test_echo_and_store_are_durable_and_indexed(node: Any, ct_series: peers.CtSeries) -> None:
    assert echo(_peer(node)).status == status.SUCCESS
    results = send_instances(_peer(node), ct_series.paths)
    assert [r.status for r in results] == [status.SUCCESS] * len(ct_series.paths)
    store = node.store
    assert store.count() == len(ct_series.paths)
    [ser] = store.series()
    assert ser.series_instance_uid == ct_series.series_uid and ser.calling_ae_title == "TESTSCU"
    for path, uid in zip(ct_series.paths, ct_series.sop_uids, strict=True):
        rec = store.instance(uid)
        assert rec is not None
        # The stored file is a valid Part 10 file whose data set bytes are exactly what was sent.
        assert _body(rec.path) == _body(path)
        assert dcmread(rec.path).SOPInstanceUID == uid
    assert not list(store.instances_dir.rglob("*.partial"))


def test_duplicate_is_success_and_stored_once(node: Any, ct_series: peers.CtSeries) -> None:
    send_instances(_peer(node), ct_series.paths[:2])
    results = send_instances(_peer(node), ct_series.paths[:2])
    assert [r.status for r in results] == [status.SUCCESS, status.SUCCESS]
    assert node.store.count() == 2


def test_malformed_instances_refused_quarantined_and_association_goes_on(
    node: Any, ct_series: peers.CtSeries, tmp_path: Path
) -> None:
    good = ct_series.paths[0]
    body = _body(good)
    # Truncated in the middle of an element value -> cannot be decoded.
    # (cut inside Pixel Data, the last and largest value: at a fixed offset such as 200 bytes the four added
    # bytes can complete a value, depending on the lengths of the random UIDs before it)
    garbage = _raw_file(tmp_path / "garbage.dcm", CTImageStorage, "1.2.3.4.5", body[:-100] + b"\xff\xff\xff\xff")
    # Decodes, but the Series Instance UID is missing.
    ds = dcmread(ct_series.paths[1])
    del ds.SeriesInstanceUID
    no_series = tmp_path / "no_series.dcm"
    ds.save_as(no_series)
    # The command says MR Image Storage, the data set says CT.
    mismatch = _raw_file(tmp_path / "mismatch.dcm", MRImageStorage, ct_series.sop_uids[2], _body(ct_series.paths[2]))
    results = send_instances(_peer(node), [garbage, no_series, mismatch, good])
    assert [r.status for r in results] == [
        status.CANNOT_DECODE, status.INVALID_UID, status.DATASET_DOES_NOT_MATCH_SOP_CLASS, status.SUCCESS,
    ]
    assert node.store.count() == 1
    reasons = [q["reason"] for q in node.store.quarantined()]
    assert len(reasons) == 3
    assert any("SeriesInstanceUID" in r for r in reasons) and any("differs" in r for r in reasons)
    assert echo(_peer(node)).ok


def test_allow_list_with_host(start_node: Any, ct_series: peers.CtSeries, caplog: pytest.LogCaptureFixture) -> None:
    node = start_node(allowed_callers=("GOOD", "HOSTED@127.0.0.1", "ELSEWHERE@192.0.2.1"))
    assert echo(_peer(node, "GOOD")).ok
    assert echo(_peer(node, "HOSTED")).ok
    for calling in ("BAD", "ELSEWHERE"):
        res = send_instances(_peer(node, calling), ct_series.paths[:1])
        assert res[0].status is None and "rejected" in res[0].error
    assert node.store.count() == 0
    assert any("not allowed" in r.getMessage() for r in caplog.records)


def test_called_ae_title_checked(node: Any) -> None:
    res = echo(Peer("NOT_AINODE", "127.0.0.1", node.port, calling_ae_title="X", timeout=5))
    assert res.status is None and "rejected" in res.error


def test_tcp_nodelay_on_accepted_sockets_and_association_limit(start_node: Any) -> None:
    node = start_node(max_associations=1)
    ae = AE("HOLDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    try:
        assert assoc.is_established
        [server] = node.service.dimse.servers
        [acceptor] = server.active_associations
        sock = acceptor.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        # A second association is over the limit: transient reject.
        res = echo(_peer(node))
        assert res.status is None and "rejected" in res.error
    finally:
        assoc.release()


def test_tls_required_mutual(start_node: Any, tmp_path: Path, ct_series: peers.CtSeries) -> None:
    ca = peers.make_test_ca(tmp_path / "ca")
    node = start_node(tls_cert=str(ca["server_cert"]), tls_key=str(ca["server_key"]), tls_ca=str(ca["ca"]),
                      require_tls=True)
    tls = client_tls_context(str(ca["ca"]), str(ca["client_cert"]), str(ca["client_key"]))
    assert echo(_peer(node, tls=tls)).ok
    results = send_instances(_peer(node, tls=tls), ct_series.paths)
    assert all(r.status == status.SUCCESS for r in results)
    assert node.store.count() == len(ct_series.paths)
    # Plain DIMSE to the TLS port is refused; so is TLS without a client certificate.
    assert echo(_peer(node)).status is None
    assert echo(_peer(node, tls=client_tls_context(str(ca["ca"])))).status is None
    assert echo(_peer(node, tls=tls)).ok  # the node is still fine


def test_series_stable_event(node: Any, ct_series: peers.CtSeries) -> None:
    events: list[SeriesStable] = []
    node.service.watcher.subscribe(events.append)
    send_instances(_peer(node), ct_series.paths)
    deadline = time.monotonic() + 10
    while not events and time.monotonic() < deadline:
        time.sleep(0.05)
    [event] = events
    assert event.series_instance_uid == ct_series.series_uid
    assert event.num_instances == len(ct_series.paths) and event.modality == "CT"
    assert event.calling_ae_title == "TESTSCU"
    assert node.store.get_series(ct_series.series_uid).stable_at is not None


def test_no_patient_identifiers_in_logs(node: Any, ct_series: peers.CtSeries, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    ds = dcmread(ct_series.paths[0])
    del ds.StudyInstanceUID
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad)
    send_instances(_peer(node), [*ct_series.paths, bad])
    text = "\n".join(r.getMessage() for r in caplog.records)
    for secret in ("PEERS-SECRET-ID", "Peers^Secret", "PEERSACC", "19700101"):
        assert secret not in text


def test_tls_optional_adds_a_tls_listener(start_node: Any, tmp_path: Path) -> None:
    ca = peers.make_test_ca(tmp_path / "ca")
    tls_port = peers.free_port()
    node = start_node(tls_cert=str(ca["server_cert"]), tls_key=str(ca["server_key"]), tls_port=tls_port)
    assert echo(_peer(node)).ok  # plain on the main port
    tls = client_tls_context(str(ca["ca"]))
    res = echo(Peer("AINODE", "127.0.0.1", tls_port, calling_ae_title="T", tls=tls, timeout=5))
    assert res.ok  # TLS (no client certificate needed without tls_ca)
    assert [a[1] for a in node.service.addresses] == [node.port, tls_port]


def test_fast_store_response_encoding_matches_pynetdicom() -> None:
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE

    from dicom_io.pynetdicom_speedups import encode_store_rsp

    for code, inst in ((status.SUCCESS, "1.2.3.4"), (status.CANNOT_DECODE, "1.2.3.45")):
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = 7
        rsp.AffectedSOPClassUID = CTImageStorage
        rsp.AffectedSOPInstanceUID = inst
        rsp.Status = code
        msg = C_STORE_RSP()
        msg.primitive_to_message(rsp)
        [pdata] = list(msg.encode_msg(1, 0))
        assert b"\x03" + encode_store_rsp(rsp) == pdata.presentation_data_value_list[0][1]


def test_concurrent_associations_and_racing_duplicates(node: Any, tmp_path: Path) -> None:
    import threading

    series = [peers.make_ct_series(tmp_path / f"ct{i}", n=8, rows=32, cols=32, seed=i) for i in range(3)]
    jobs = [s.paths for s in series] + [series[0].paths]  # the fourth sender races the first with duplicates
    results: list[list[Any]] = [[] for _ in jobs]

    def run(i: int) -> None:
        results[i] = send_instances(_peer(node, f"SCU{i}"), jobs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r.status == status.SUCCESS for res in results for r in res)
    assert node.store.count() == 24
    for s in series:
        assert {i.sop_instance_uid for i in node.store.instances(s.series_uid)} == set(s.sop_uids)
        assert len(list(node.store.instances(s.series_uid)[0].path.parent.iterdir())) == 8


def test_deflated_transfer_syntax_is_stored_as_received(node: Any, ct_series: peers.CtSeries, tmp_path: Path) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = dcmread(ct_series.paths[0])
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    [res] = send_instances(_peer(node), [path])
    assert res.status == status.SUCCESS
    rec = node.store.instance(ct_series.sop_uids[0])
    assert rec.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    back = dcmread(rec.path)
    assert back.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert back.PixelData == ds.PixelData and back.SeriesInstanceUID == ct_series.series_uid
    assert _body(rec.path) == _body(path)


def test_fast_store_request_decoding_matches_pynetdicom() -> None:
    from io import BytesIO

    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE

    from dicom_io.pynetdicom_speedups import decode_store_rq

    rq = C_STORE()
    rq.MessageID = 12
    rq.AffectedSOPClassUID = CTImageStorage
    rq.AffectedSOPInstanceUID = "1.2.3.4.5"
    rq.Priority = 1
    rq.MoveOriginatorApplicationEntityTitle = "MOVER"
    rq.MoveOriginatorMessageID = 3
    rq.DataSet = BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00")
    msg = C_STORE_RQ()
    msg.primitive_to_message(rq)
    command_pdata = list(msg.encode_msg(1, 0))[0]
    got = decode_store_rq(command_pdata.presentation_data_value_list[0][1][1:])
    assert got is not None
    for name in ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority",
                 "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID"):
        assert getattr(got, name) == getattr(rq, name), name
    # Anything else (a C-ECHO-RQ, garbage) is left to pynetdicom.
    assert decode_store_rq(b"\x00\x00\x00\x01\x02\x00\x00\x00\x30\x00") is None
    assert decode_store_rq(b"\x01\x02") is None
