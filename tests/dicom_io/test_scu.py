"""The DIMSE client against a real pynetdicom SCP on 127.0.0.1: statuses per instance, never an exception."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification

import peers
from dicom_io.scu import Peer, echo, send_instances

DATA = Path(__import__("data_store").__file__).parent / "data"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
OUT_OF_RESOURCES = 0xA700


class Recorder:
    def __init__(self) -> None:
        self.received: dict[str, tuple[str, str, bytes]] = {}
        self.order: list[tuple[str, str, str]] = []
        self.refuse: set[str] = set()

    def handle_store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if uid in self.refuse:
            return OUT_OF_RESOURCES
        self.received[uid] = (str(event.request.AffectedSOPClassUID), str(event.context.transfer_syntax),
                              event.request.DataSet.getvalue())
        self.order.append((uid, self.received[uid][0], self.received[uid][1]))
        return 0


@pytest.fixture
def scp() -> Iterator[tuple[Recorder, int, Any]]:
    rec = Recorder()
    ae = AE("TESTSCP")
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    port = peers.free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, rec.handle_store)])
    yield rec, port, ae
    server.shutdown()


def test_echo(scp: tuple[Recorder, int, Any]) -> None:
    _, port, _ = scp
    res = echo(Peer("TESTSCP", "127.0.0.1", port))
    assert res.ok and res.status == 0


def test_echo_to_nothing_returns_no_status() -> None:
    res = echo(Peer("NOBODY", "127.0.0.1", peers.free_port(), timeout=2))
    assert res.status is None and not res.ok and "NOBODY" in res.error


def test_send_files_as_stored_with_per_instance_status(tmp_path: Path, scp: tuple[Recorder, int, Any]) -> None:
    rec, port, _ = scp
    series = peers.make_ct_series(tmp_path / "ct", n=3, rows=16, cols=16)
    rec.refuse.add(series.sop_uids[1])
    results = send_instances(Peer("TESTSCP", "127.0.0.1", port), series.paths)
    assert [r.status for r in results] == [0, OUT_OF_RESOURCES, 0]
    assert [r.ok for r in results] == [True, False, True]
    assert [r.sop_instance_uid for r in results] == series.sop_uids
    # Bytes go as stored: the data set received equals the file's data set bytes.
    path = series.paths[0]
    _meta, offset = split_dataset(path)
    assert rec.received[series.sop_uids[0]][2] == path.read_bytes()[offset:]


def test_seg_and_compressed_get_their_own_contexts(scp: tuple[Recorder, int, Any]) -> None:
    rec, port, _ = scp
    files = [DATA / "liver.dcm", DATA / "JPEG-LL.dcm", DATA / "emri_small_jpeg_ls_lossless.dcm",
             DATA / "emri_small_RLE.dcm", DATA / "MR2_J2KR.dcm", DATA / "gdcm-US-ALOKA-16.dcm"]
    results = send_instances(Peer("TESTSCP", "127.0.0.1", port), files)
    assert [r.status for r in results] == [0] * len(files), results
    assert rec.order[0][1] == SEG_STORAGE
    for f, r, got in zip(files, results, rec.order, strict=True):
        assert got[0] == r.sop_instance_uid
        assert got[2] == str(dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def test_dataset_and_meta_less_file(tmp_path: Path, scp: tuple[Recorder, int, Any]) -> None:
    rec, port, _ = scp
    series = peers.make_ct_series(tmp_path / "ct", n=1, rows=8, cols=8)
    results = send_instances(Peer("TESTSCP", "127.0.0.1", port), [series.datasets[0], DATA / "OT-PAL-8-face.dcm"])
    assert [r.status for r in results] == [0, 0]
    assert series.sop_uids[0] in rec.received


def test_unreadable_file_and_refused_association(tmp_path: Path, scp: tuple[Recorder, int, Any]) -> None:
    _, port, ae = scp
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    series = peers.make_ct_series(tmp_path / "ct", n=1, rows=8, cols=8)
    results = send_instances(Peer("TESTSCP", "127.0.0.1", port), [junk, series.paths[0]])
    assert results[0].status is None and results[0].error.startswith("not sent")
    assert results[1].status == 0
    # A peer that rejects the association: statuses are None, with the reason, and nothing raises.
    ae.require_calling_aet = ["SOMEONE_ELSE"]
    results = send_instances(Peer("TESTSCP", "127.0.0.1", port, calling_ae_title="ME"), series.paths)
    assert results[0].status is None and "rejected" in results[0].error
    # A peer that is down.
    results = send_instances(Peer("TESTSCP", "127.0.0.1", peers.free_port(), timeout=2), series.paths)
    assert results[0].status is None and results[0].error


def test_peer_parse() -> None:
    p = Peer.parse("PACS@127.0.0.1:104", calling_ae_title="ME")
    assert (p.ae_title, p.host, p.port, p.calling_ae_title) == ("PACS", "127.0.0.1", 104, "ME")
    with pytest.raises(ValueError, match="AE@host:port"):
        Peer.parse("PACS:104")


def test_the_reactor_is_really_paused_even_when_its_flag_is_stale(scp: tuple[Recorder, int, Any]) -> None:
    """pynetdicom's pause trusts `_is_paused`, which stays True for a moment after the reactor's wait
    returned; the client's pause counts the reactor's waits instead (dicom_io/pynetdicom_speedups.py `Checkpoint`)."""
    import time

    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom.sop_class import Verification as VerificationSOP

    from dicom_io.pynetdicom_speedups import pause_reactor
    from dicom_io.scu import _associate, _close

    _, port, _ = scp
    assoc, error = _associate(Peer("TESTSCP", "127.0.0.1", port), [(VerificationSOP, [ExplicitVRLittleEndian])])
    assert assoc is not None, error
    try:
        checkpoint = assoc._reactor_checkpoint
        for _ in range(50):
            assoc._is_paused = True  # stale, as right after the reactor's wait returned
            pause_reactor(assoc)
            waits = checkpoint.waits
            assert not checkpoint.is_set() and assoc._is_paused
            time.sleep(0.005)  # a reactor that was not blocked would loop (1 ms sleep) and wait again
            assert checkpoint.waits == waits
            checkpoint.set()
            time.sleep(0.002)
        pause_reactor(assoc)
        rsp = assoc.send_c_echo()  # pynetdicom's own calls still work with the counting checkpoint
        assert rsp.Status == 0 and checkpoint.is_set()  # and resume the reactor
    finally:
        _close(assoc)
    assert not assoc.is_established
