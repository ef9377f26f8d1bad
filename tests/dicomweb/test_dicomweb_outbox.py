"""The persisted outbox delivers to DICOMweb (STOW-RS) and XNAT destinations, through outages, exactly once."""

from __future__ import annotations

from pathlib import Path

import peers
import pydicom
from dw_helpers import start_orthanc_dicomweb
from fake_xnat import FakeXnat

from config.settings import DestinationSettings, OutboxSettings, Secret, Settings
from dicom_io.dicomweb import DicomwebClient
from dicom_io.phantom import write_phantom_series
from dicom_io.store import KIND_RESULT, Store
from node.app import HttpServer
from node.outbox import DELIVERED, PENDING, Outbox


def _result(src: Path, out: Path) -> Path:
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(src)
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out, enforce_file_format=True)
    return out


def test_orthanc_down_during_a_push_then_delivered(tmp_path: Path) -> None:
    port = peers.free_port()
    settings = Settings(
        data_dir=str(tmp_path / "data"),
        outbox=OutboxSettings(retry_base_seconds=0.1, retry_max_seconds=0.2),
        destinations={"pacs": DestinationSettings(kind="dicomweb", url=f"http://127.0.0.1:{port}/dicom-web",
                                                  timeout=5)},
    )
    ph = write_phantom_series(tmp_path / "ph", shape=(2, 16, 16), seed=8)
    store = Store.open(tmp_path / "store")
    put = store.put_file(_result(ph.paths[0], tmp_path / "seg.dcm"), kind=KIND_RESULT)
    outbox = Outbox(tmp_path / "outbox.sqlite", settings, store)
    orthanc = None
    try:
        assert outbox.enqueue(put.sop_instance_uid, put.path, ["pacs"])
        assert outbox.deliver_due()[PENDING] == 1  # Orthanc is not there
        entry = outbox.entry(put.sop_instance_uid, "pacs")
        assert entry is not None and entry.state == PENDING and entry.last_status is None and entry.last_error
        orthanc = start_orthanc_dicomweb(tmp_path / "orthanc", http_port=port)
        assert outbox.deliver_due(now=entry.next_attempt + 1)[DELIVERED] == 1
        assert not outbox.enqueue(put.sop_instance_uid, put.path, ["pacs"])  # queued once, delivered once
        assert outbox.deliver_due(now=entry.next_attempt + 60) == {DELIVERED: 0, "failed": 0, PENDING: 0}
        with DicomwebClient(f"http://127.0.0.1:{port}/dicom-web") as client:
            found = client.search_for_instances(ph.study_instance_uid, search_filters={
                "SOPInstanceUID": put.sop_instance_uid})
        assert len(found) == 1
        rec = store.instance(put.sop_instance_uid)
        assert rec is not None and rec.delivered_at is not None
    finally:
        outbox.close()
        store.close()
        if orthanc is not None:
            orthanc.stop(timeout=15)


def test_xnat_outage_then_delivered(tmp_path: Path) -> None:
    fake = FakeXnat({"u": "p"})
    server = HttpServer(fake, "127.0.0.1", peers.free_port())
    server.start()
    try:
        ph = write_phantom_series(tmp_path / "ph", shape=(2, 16, 16), seed=9)
        exp = fake.add_session("P", "S", "E", ph.study_instance_uid)
        settings = Settings(
            data_dir=str(tmp_path / "data"),
            outbox=OutboxSettings(retry_base_seconds=0.1, retry_max_seconds=0.2),
            destinations={"xn": DestinationSettings(kind="xnat", url=f"http://127.0.0.1:{server.port}",
                                                    username="u", password=Secret("p"), project="P")},
        )
        store = Store.open(tmp_path / "store")
        from dicom_io import seg as segmod
        from dicom_io.series import load_series

        import numpy as np

        series = load_series(ph.paths)
        mask = np.zeros(series.voxels.shape, dtype=bool)
        mask[0, 4:8, 4:8] = True
        seg = segmod.write_seg(segmod.build_seg(mask, series, segmod.SegmentSpec(), segmod.AlgorithmSpec("t", "0")),
                               tmp_path / "seg.dcm")
        put = store.put_file(seg, kind=KIND_RESULT)
        outbox = Outbox(tmp_path / "outbox.sqlite", settings, store)
        fake.fail_next = [503, 503, 503]
        outbox.enqueue(put.sop_instance_uid, put.path, ["xn"])
        assert outbox.deliver_due()[PENDING] == 1
        fake.fail_next = []
        entry = outbox.entry(put.sop_instance_uid, "xn")
        assert entry is not None
        assert outbox.deliver_due(now=entry.next_attempt + 1)[DELIVERED] == 1
        assert list(fake.collections) == [(exp.id, "ainode_" + put.sop_instance_uid.replace(".", "_")[-40:])]
        outbox.close()
        store.close()
    finally:
        server.stop()
