"""Label Map SEGs on the way out and in: per-destination form, fallback to BINARY once (remembered), the node's
own SCP/STOW/WADO."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import peers
from config.settings import DestinationSettings, HttpSettings, SegSettings, Settings
from dicom_io.phantom import write_phantom_series
from dicom_io.scu import Peer, send_instances
from dicom_io.seg import LABELMAP_SEG_SOP_CLASS, SEG_SOP_CLASS, SegmentSpec, read_seg_masks
from dicom_io.series import Series, load_series
from dicom_io.store import KIND_RESULT, Store
from node.app import HttpServer
from node.outbox import DELIVERED, Outbox
from node.results import queue_result, write_outputs

SPECS = [SegmentSpec("Liver", "red"), SegmentSpec("Lesion", "#00ff00", type="SCT^4147007^Mass")]


@pytest.fixture
def series(tmp_path: Path) -> Series:
    write_phantom_series(tmp_path / "ct", shape=(5, 32, 32), spacing=(1.0, 1.0, 2.0), seed=3)
    return load_series([tmp_path / "ct"])


def _masks(series: Series) -> np.ndarray:
    m = np.zeros((2,) + series.voxels.shape, dtype=bool)
    m[0, 1:3, 4:12, 4:12] = True
    m[1, 2:5, 18:28, 16:30] = True
    return m


@pytest.fixture
def recorder() -> Iterator[peers.RecorderSCP]:
    rec = peers.RecorderSCP().start()  # pynetdicom 3.0.4: its storage contexts include the Label Map SEG
    yield rec
    rec.stop()


def _write(series: Series, settings: Settings, out: Path, destinations: list[str], outbox: Outbox) -> tuple:
    written = write_outputs(series, _masks(series), SPECS, settings, "litemedsam", "1", out, "r", ["seg", "nifti"],
                            destinations=destinations, refuses_labelmap=outbox.refuses_labelmap)
    return written


def test_dimse_auto_label_map_where_negotiated_binary_where_not(
    series: Series, recorder: peers.RecorderSCP, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = peers.start_storescp(tmp_path / "old-in", tmp_path / "storescp.log", ae_title="OLDPACS")  # dcmtk 3.6.7
    try:
        settings = dataclasses.replace(
            peers.node_settings(tmp_path / "node"), seg=SegSettings(format="auto"),
            destinations={"OLD": DestinationSettings(ae_title="OLDPACS", host="127.0.0.1", port=old.port, timeout=5),
                          "NEW": DestinationSettings(ae_title=recorder.ae_title, host="127.0.0.1",
                                                     port=recorder.port, timeout=5)})
        store = Store.open(settings.store_path)
        outbox = Outbox(tmp_path / "outbox.sqlite", settings, store)
        written = _write(series, settings, tmp_path / "r1", ["OLD", "NEW"], outbox)
        assert written.seg_format == "labelmap" and written.seg_binary is not None
        assert written.segments_json is not None and written.nifti is not None
        put = store.put_file(written.seg, kind=KIND_RESULT)
        queue_result(outbox, settings, put.sop_instance_uid, put.path, ["OLD", "NEW"], written.seg_binary)
        assert outbox.deliver_due()[DELIVERED] == 2
        # NEW negotiated the Label Map SEG; OLD (dcmtk 3.6.7 predates it) accepted no context and got BINARY once.
        assert recorder.sop_classes[put.sop_instance_uid] == LABELMAP_SEG_SOP_CLASS
        [got] = [pydicom.dcmread(p) for p in (tmp_path / "old-in").iterdir()]
        assert got.SOPClassUID == SEG_SOP_CLASS and got.SegmentationType == "BINARY"
        (tmp_path / "got.dcm").write_bytes(_bytes(got))
        back, labels = read_seg_masks(tmp_path / "got.dcm", series)
        assert labels == ["Liver", "Lesion"] and np.array_equal(back, _masks(series))
        e_old = outbox.entry(put.sop_instance_uid, "OLD")
        assert e_old is not None and e_old.state == DELIVERED and e_old.path.name.endswith(".binary.seg.dcm")
        assert "OLD refused the Label Map SEG" in caplog.text and "accepted no presentation context" in caplog.text
        assert outbox.refuses_labelmap("OLD") and not outbox.refuses_labelmap("NEW")
        assert store.get_series(written.seg_series_instance_uid) is not None  # the node keeps the label map

        # Remembered: the next result goes to OLD as BINARY at the first attempt, to NEW as a label map.
        second = _write(series, settings, tmp_path / "r2", ["OLD", "NEW"], outbox)
        put2 = store.put_file(second.seg, kind=KIND_RESULT)
        queue_result(outbox, settings, put2.sop_instance_uid, put2.path, ["OLD", "NEW"], second.seg_binary)
        e2 = outbox.entry(put2.sop_instance_uid, "OLD")
        assert e2 is not None and e2.path.name.endswith(".binary.seg.dcm") and not e2.fallback
        assert outbox.deliver_due()[DELIVERED] == 2
        e2 = outbox.entry(put2.sop_instance_uid, "OLD")
        assert e2 is not None and e2.attempts == 1 and e2.last_status == 0
        assert caplog.text.count("refused the Label Map SEG") == 1
        assert recorder.sop_classes[put2.sop_instance_uid] == LABELMAP_SEG_SOP_CLASS
        outbox.close()
        store.close()
    finally:
        old.stop()


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class _OldArchive:
    """A STOW-RS endpoint that refuses Label Map SEGs as dcm4chee-arc 5's default configuration does (0x0122)."""

    def __init__(self) -> None:
        self.stored: list[pydicom.Dataset] = []
        self.refused = 0
        self.app = Starlette(routes=[Route("/dicom-web/studies", self.stow, methods=["POST"])])

    async def stow(self, request: Request) -> JSONResponse:
        body = await request.body()
        boundary = request.headers["content-type"].split("boundary=")[1].strip('"').encode()
        parts = [p.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0] for p in body.split(b"--" + boundary)[1:-1]]
        ok, failed = [], []
        for part in parts:
            ds = pydicom.dcmread(io.BytesIO(part))
            ref = {"00081150": {"vr": "UI", "Value": [ds.SOPClassUID]},
                   "00081155": {"vr": "UI", "Value": [ds.SOPInstanceUID]}}
            if ds.SOPClassUID == LABELMAP_SEG_SOP_CLASS:
                self.refused += 1
                failed.append({**ref, "00081197": {"vr": "US", "Value": [0x0122]}})
            else:
                self.stored.append(ds)
                ok.append(ref)
        doc: dict[str, object] = {}
        if ok:
            doc["00081199"] = {"vr": "SQ", "Value": ok}
        if failed:
            doc["00081198"] = {"vr": "SQ", "Value": failed}
        return JSONResponse(doc, status_code=409 if failed and not ok else 200,
                            media_type="application/dicom+json")


def test_stow_refusal_falls_back_to_binary_once_and_is_remembered(series: Series, tmp_path: Path) -> None:
    archive = _OldArchive()
    server = HttpServer(archive.app, "127.0.0.1", peers.free_port())
    server.start()
    try:
        settings = dataclasses.replace(
            peers.node_settings(tmp_path / "node"),
            destinations={"pacs": DestinationSettings(kind="dicomweb", url=f"http://127.0.0.1:{server.port}/dicom-web",
                                                      seg_format="auto", timeout=5)})
        store = Store.open(settings.store_path)
        outbox = Outbox(tmp_path / "outbox.sqlite", settings, store)
        for n in (1, 2):
            written = _write(series, settings, tmp_path / f"r{n}", ["pacs"], outbox)
            # pacs is 'auto' (the global seg.format stays binary); once it refused a label map, only BINARY is written
            assert (written.seg_format, written.seg_binary is not None) == (("labelmap", True) if n == 1 else
                                                                            ("binary", False))
            put = store.put_file(written.seg, kind=KIND_RESULT)
            queue_result(outbox, settings, put.sop_instance_uid, put.path, ["pacs"], written.seg_binary)
            assert outbox.deliver_due()[DELIVERED] == 1
            assert archive.refused == 1  # the second result was not offered as a label map any more
            assert len(archive.stored) == n and archive.stored[-1].SOPClassUID == SEG_SOP_CLASS
            e = outbox.entry(put.sop_instance_uid, "pacs")
            assert e is not None and e.state == DELIVERED
        assert outbox.refuses_labelmap("pacs")
        outbox.close()
        store.close()
    finally:
        server.stop()


def test_global_binary_and_forced_label_map(series: Series, tmp_path: Path) -> None:
    base = peers.node_settings(tmp_path / "node")
    store = Store.open(base.store_path)
    outbox = Outbox(tmp_path / "outbox.sqlite", base, store)
    assert _write(series, base, tmp_path / "a", [], outbox).seg_format == "binary"  # the default keeps BINARY
    lm = dataclasses.replace(base, seg=SegSettings(format="labelmap"))
    w = _write(series, lm, tmp_path / "b", [], outbox)
    assert w.seg_format == "labelmap" and w.seg_binary is None
    overlapping = _masks(series)
    overlapping[1, 1:3, 4:12, 4:12] = True
    w = write_outputs(series, overlapping, SPECS, lm, "m", "1", tmp_path / "c", "o", ["seg", "nifti"])
    assert w.seg_format == "binary"  # never flattened
    sidecar = __import__("json").loads(w.segments_json.read_text())  # type: ignore[union-attr]
    assert sidecar["encoding"] == "bitmask" and [s["bit"] for s in sidecar["segments"]] == [0, 1]
    import nibabel as nib

    values = np.asarray(nib.load(w.nifti).dataobj).transpose(2, 1, 0)  # type: ignore[arg-type]
    assert np.array_equal((values & 1) > 0, overlapping[0]) and np.array_equal((values & 2) > 0, overlapping[1])
    bad = dataclasses.replace(base, seg=SegSettings(format="rle"))
    with pytest.raises(ValueError, match="'seg.format' has value 'rle'"):
        _write(series, bad, tmp_path / "d", [], outbox)
    outbox.close()
    store.close()


def test_node_scp_and_stow_take_label_maps_and_wado_serves_them(start_node, series: Series,  # type: ignore[no-untyped-def]
                                                                   tmp_path: Path) -> None:
    settings = dataclasses.replace(peers.node_settings(tmp_path / "node"),
                                   http=HttpSettings(host="127.0.0.1", port=peers.free_port()))
    node = start_node(settings)
    host, port = node.service.http_address
    sources = [p for p in (tmp_path / "ct").iterdir() if p.is_file()]
    assert all(r.ok for r in send_instances(Peer(settings.dimse.ae_title, "127.0.0.1", node.port,
                                                 calling_ae_title="MOD"), sources))
    lm = dataclasses.replace(settings, seg=SegSettings(format="labelmap"))
    outbox = Outbox(tmp_path / "o.sqlite", lm)
    by_dimse = _write(series, lm, tmp_path / "a", [], outbox)
    by_stow = _write(series, lm, tmp_path / "b", [], outbox)
    outbox.close()
    [res] = send_instances(Peer(settings.dimse.ae_title, "127.0.0.1", node.port, calling_ae_title="MOD"),
                           [by_dimse.seg])
    assert res.ok, res
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + by_stow.seg.read_bytes()  # type: ignore[union-attr]
            + f"\r\n--{boundary}--\r\n".encode())
    r = httpx.post(f"http://{host}:{port}/dicomweb/studies", content=body,
                   headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert r.status_code == 200 and len(r.json()["00081199"]["Value"]) == 1, r.text
    study = series.study_instance_uid
    for w in (by_dimse, by_stow):
        found = httpx.get(f"http://{host}:{port}/dicomweb/studies/{study}/series/{w.seg_series_instance_uid}/instances",
                          headers={"Accept": "application/dicom+json"}).json()
        assert [i["00080016"]["Value"][0] for i in found] == [LABELMAP_SEG_SOP_CLASS]
        got = httpx.get(f"http://{host}:{port}/dicomweb/studies/{study}/series/{w.seg_series_instance_uid}/instances/"
                        f"{w.seg_sop_instance_uid}", headers={"Accept": 'multipart/related; type="application/dicom"'})
        assert got.status_code == 200
        data = got.content
        start = data.index(b"DICM") - 128
        path = tmp_path / f"{w.seg_sop_instance_uid}.dcm"
        path.write_bytes(data[start:data.rindex(b"\r\n--")])
        back, labels = read_seg_masks(path, series)
        assert labels == ["Liver", "Lesion"] and np.array_equal(back, _masks(series))
