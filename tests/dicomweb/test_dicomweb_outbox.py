"""The persisted outbox delivers to DICOMweb (STOW-RS) and XNAT destinations, through outages, exactly once."""

from __future__ import annotations

from pathlib import Path

import pydicom

import peers
from config.settings import DestinationSettings, OutboxSettings, Secret, Settings
from dicom_io.dicomweb import DicomwebClient
from dicom_io.phantom import write_phantom_series
from dicom_io.store import KIND_RESULT, Store
from dw_helpers import start_orthanc_dicomweb
from fake_xnat import FakeXnat
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
        import numpy as np

        from dicom_io import seg as segmod
        from dicom_io.series import load_series

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


# --- Orthanc killed mid-delivery ----------------------------------------------------------------


def _restart_orthanc(old: peers.Proc) -> peers.Proc:
    """Start Orthanc again with the same configuration: same ports, same storage and index."""
    import json
    import time
    import urllib.error

    from dw_helpers import orthanc_call

    workdir = old.workdir
    assert workdir is not None
    cfg = workdir / "orthanc.json"
    log = workdir / "orthanc-restarted.stdout"
    p = peers.start([peers.ORTHANC, f"--logdir={workdir / 'logs'}", str(cfg)], log, env={"TCP_NODELAY": "1"})
    proc = peers.Proc(p, log, port=json.loads(cfg.read_text())["DicomPort"], http_port=old.http_port, workdir=workdir)
    deadline = time.monotonic() + 30
    while True:
        try:
            orthanc_call(proc, "GET", "/system")
            return proc
        except (OSError, urllib.error.URLError) as exc:
            if p.poll() is not None or time.monotonic() > deadline:
                proc.stop()
                raise RuntimeError("Orthanc did not restart:\n" + proc.log_text()[-2000:]) from exc
            time.sleep(0.05)


def _many_segs(tmp_path: Path, n: int, tag: str) -> list[Path]:
    """One real SEG (highdicom) of a phantom series, copied as ``n`` SEG instances with their own SOP Instance UIDs."""
    import numpy as np
    from pydicom.uid import generate_uid

    from dicom_io import seg as segmod
    from dicom_io.series import load_series

    ph = write_phantom_series(tmp_path / f"ph-{tag}", shape=(4, 64, 64), seed=11)
    series = load_series(ph.paths)
    mask = np.zeros(series.voxels.shape, dtype=bool)
    mask[1:3, 20:40, 20:40] = True
    first = segmod.write_seg(segmod.build_seg(mask, series, segmod.SegmentSpec(), segmod.AlgorithmSpec("t", "0")),
                             tmp_path / f"seg-{tag}.dcm")
    out = []
    for i in range(n):
        ds = pydicom.dcmread(first)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = tmp_path / f"seg-{tag}-{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def _kill_mid_delivery(outbox: Outbox, orthanc: peers.Proc, before: int, n: int) -> dict[str, int]:
    """Deliver in a thread; kill -9 Orthanc once it holds some but not all of the ``n`` new instances."""
    import signal
    import threading
    import time

    from dw_helpers import orthanc_call

    counts: dict[str, int] = {}
    worker = threading.Thread(target=lambda: counts.update(outbox.deliver_due()), daemon=True)
    worker.start()
    deadline = time.monotonic() + 60
    held = 0
    while time.monotonic() < deadline and worker.is_alive():
        try:
            held = orthanc_call(orthanc, "GET", "/statistics", timeout=5)["CountInstances"]
        except OSError:
            pass
        if held - before >= 3:
            break
        time.sleep(0.005)
    orthanc.stop(signal.SIGKILL)
    worker.join(timeout=120)
    assert not worker.is_alive()
    assert 0 < held - before < n, f"the kill did not land mid-delivery (Orthanc got {held - before} of {n})"
    return counts


def _check_each_once(orthanc: peers.Proc, sop_uids: list[str]) -> None:
    from dw_helpers import orthanc_call

    assert orthanc_call(orthanc, "GET", "/statistics")["CountInstances"] == len(sop_uids)
    for uid in sop_uids:
        found = orthanc_call(orthanc, "POST", "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": uid}})
        assert len(found) == 1, (uid, found)


def test_orthanc_killed_mid_delivery_each_seg_arrives_exactly_once(tmp_path: Path) -> None:
    """A running Orthanc is killed (-9) while the outbox delivers SEGs by STOW-RS, then by C-STORE: the
    outbox keeps them, Orthanc restarts on the same storage, and each SEG ends up there exactly once."""
    from pydicom import dcmread

    n = 60
    orthanc = start_orthanc_dicomweb(tmp_path / "orthanc")
    settings = Settings(
        data_dir=str(tmp_path / "data"),
        outbox=OutboxSettings(retry_base_seconds=0.1, retry_max_seconds=0.2),
        destinations={
            "web": DestinationSettings(kind="dicomweb", url=f"http://127.0.0.1:{orthanc.http_port}/dicom-web",
                                       timeout=30),
            "dimse": DestinationSettings(ae_title="ORTHANCDW", host="127.0.0.1", port=orthanc.port, timeout=30),
        },
    )
    store = Store.open(tmp_path / "store")
    outbox = Outbox(tmp_path / "outbox.sqlite", settings, store)
    procs = [orthanc]
    try:
        uids: list[str] = []
        for dest, tag in (("web", "stow"), ("dimse", "cstore")):
            segs = _many_segs(tmp_path, n, tag)
            batch = []
            for p in segs:
                put = store.put_file(p, kind=KIND_RESULT)
                assert outbox.enqueue(put.sop_instance_uid, put.path, [dest])
                batch.append(put.sop_instance_uid)
            assert {str(dcmread(p, stop_before_pixels=True).Modality) for p in segs} == {"SEG"}

            _kill_mid_delivery(outbox, procs[-1], len(uids), n)
            pending = [e for e in (outbox.entry(u, dest) for u in batch) if e is not None and e.state == PENDING]
            assert pending, "every SEG was confirmed although Orthanc died mid-delivery"
            # While Orthanc is down the outbox keeps trying and keeps everything.
            outbox.deliver_due(now=max(e.next_attempt for e in pending) + 1)
            assert all((e := outbox.entry(u, dest)) is not None and e.state in (PENDING, DELIVERED) for u in batch)

            procs.append(_restart_orthanc(procs[-1]))
            later = max(e.next_attempt for u in batch if (e := outbox.entry(u, dest)) is not None) + 1
            outbox.deliver_due(now=later)
            assert all((e := outbox.entry(u, dest)) is not None and e.state == DELIVERED for u in batch)
            uids += batch
            _check_each_once(procs[-1], uids)
            # Delivered is final: nothing is sent again.
            assert outbox.deliver_due(now=later + 3600) == {DELIVERED: 0, "failed": 0, PENDING: 0}
    finally:
        outbox.close()
        store.close()
        for p in procs:
            p.stop(timeout=15)
