"""The node's DICOMweb server (real uvicorn on 127.0.0.1): dicomweb-client and Orthanc as its clients."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

import peers
from config.settings import HttpSettings, Settings
from dicom_io.phantom import write_phantom_series
from dicom_io.store import Store
from dw_helpers import orthanc_call, start_orthanc_dicomweb, upload
from node.app import HttpServer, create_app


class NodeHttp:
    def __init__(self, root: Path) -> None:
        self.store = Store.open(root / "store")
        self.stored: list[str] = []
        settings = Settings(data_dir=str(root), http=HttpSettings(host="127.0.0.1", port=peers.free_port()))
        app = create_app(settings, self.store, on_stored=[lambda ev: self.stored.append(ev.sop_instance_uid)])
        self.server = HttpServer(app, "127.0.0.1", settings.http.port)
        self.server.start()
        self.base = f"http://127.0.0.1:{self.server.port}/dicomweb"

    def close(self) -> None:
        self.server.stop()
        self.store.close()


@pytest.fixture
def node_http(tmp_path: Path) -> Iterator[NodeHttp]:
    node = NodeHttp(tmp_path / "node")
    yield node
    node.close()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return write_phantom_series(tmp_path_factory.mktemp("ph"), shape=(5, 32, 40), seed=7,
                                patient_name="Server^Test", patient_id="SRV-ID-1")


def test_stow_qido_wado_with_dicomweb_client(node_http: NodeHttp, phantom) -> None:  # type: ignore[no-untyped-def]
    client = DICOMwebClient(url=node_http.base)
    datasets = [pydicom.dcmread(p) for p in phantom.paths]
    client.set_chunk_size(50_000)  # forces a chunked (Transfer-Encoding) STOW body
    rsp = client.store_instances(datasets)
    assert len(rsp.ReferencedSOPSequence) == 5 and "FailedSOPSequence" not in rsp
    assert node_http.store.count() == 5 and len(node_http.stored) == 5
    study, series = phantom.study_instance_uid, phantom.series_instance_uid

    studies = client.search_for_studies(search_filters={"PatientName": "server*"})
    assert len(studies) == 1
    s = studies[0]
    assert s["0020000D"]["Value"] == [study] and s["00201208"]["Value"] == [5]
    assert s["00080061"]["Value"] == ["CT"] and s["00100010"]["Value"][0]["Alphabetic"] == "Server^Test"
    assert client.search_for_studies(search_filters={"PatientID": "other"}) == []
    assert client.search_for_studies(search_filters={"StudyDate": "19000101-20991231"}) != []

    found = client.search_for_series(study, search_filters={"Modality": "CT"}, fields=["00180050"])
    assert [x["0020000E"]["Value"][0] for x in found] == [series]
    assert found[0]["00201209"]["Value"] == [5] and "00180050" in found[0]
    page = client.search_for_instances(study, series, limit=2, offset=4)
    assert len(page) == 1
    assert len(client.search_for_instances(study, series)) == 5
    assert len(client.search_for_instances()) == 5  # /instances across studies

    got = client.retrieve_series(study, series)
    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    assert sorted(ds.SOPInstanceUID for ds in got) == sorted(by_uid)
    for ds in got:
        assert ds.PixelData == by_uid[ds.SOPInstanceUID].PixelData
    assert len(client.retrieve_study(study)) == 5

    meta = client.retrieve_series_metadata(study, series)
    assert len(meta) == 5
    uri = meta[0]["7FE00010"]["BulkDataURI"]
    # BulkDataURIs follow the request's Host header (so they work behind a proxy); dicomweb-client sends
    # Host without the port, so put the port back before fetching.
    assert uri.startswith("http://127.0.0.1") and "/dicomweb/studies/" in uri
    uri = node_http.base + uri.split("/dicomweb", 1)[1]
    sop = meta[0]["00080018"]["Value"][0]
    assert client.retrieve_bulkdata(uri)[0] == by_uid[sop].PixelData
    frames = client.retrieve_instance_frames(study, series, sop, frame_numbers=[1],
                                             media_types=("application/octet-stream",))
    assert frames[0] == by_uid[sop].PixelData


def test_frames_of_a_compressed_instance_and_ohif_style_requests(node_http: NodeHttp, tmp_path: Path) -> None:
    ph = write_phantom_series(tmp_path / "rle", shape=(2, 16, 16), transfer_syntax="1.2.840.10008.1.2.5", seed=2)
    client = DICOMwebClient(url=node_http.base)
    client.store_instances([pydicom.dcmread(p) for p in ph.paths])
    ds = pydicom.dcmread(ph.paths[0])
    url = (f"{node_http.base}/studies/{ph.study_instance_uid}/series/{ph.series_instance_uid}"
           f"/instances/{ds.SOPInstanceUID}/frames/1")
    # What OHIF sends (omitQuotationForMultipartRequest): any transfer syntax → the stored RLE frame.
    r = httpx.get(url, headers={"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"})
    assert r.status_code == 200 and b"image/dicom-rle" in r.content
    # Without transfer-syntax=* the frame is decoded to native little-endian pixels.
    r = httpx.get(url, headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    assert r.status_code == 200
    native = ds.pixel_array.astype("<i2").tobytes()
    assert native in r.content
    # OHIF's study list query: comma-joined includefield, limit/offset, fuzzymatching.
    r = httpx.get(f"{node_http.base}/studies", params={"limit": "101", "offset": "0", "fuzzymatching": "false",
                                                       "includefield": "00081030,00080060"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/dicom+json")
    assert len(r.json()) == 1
    assert httpx.get(f"{node_http.base}/studies/1.2.3/series/4.5").status_code == 404
    assert httpx.get(f"{node_http.base}/studies", params={"NoSuchKey": "x"}).status_code == 400


def test_stow_refusals_are_per_instance(node_http: NodeHttp, phantom, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    good = phantom.paths[0].read_bytes()
    broken = good[:400]  # a truncated data set
    boundary = "xyz"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
                    for part in (good, broken)) + f"--{boundary}--\r\n".encode()
    ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
    r = httpx.post(f"{node_http.base}/studies", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 202
    doc = r.json()
    assert len(doc["00081199"]["Value"]) == 1 and len(doc["00081198"]["Value"]) == 1
    assert doc["00081198"]["Value"][0]["00081197"]["Value"][0] in (0xC210, 0xC212)
    assert len(node_http.store.quarantined()) == 1
    # The study in the URL must match.
    r = httpx.post(f"{node_http.base}/studies/1.2.3.4", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 409
    assert r.json()["00081198"]["Value"][0]["00081197"]["Value"][0] == 0xC409
    r = httpx.post(f"{node_http.base}/studies", content=b"x", headers={"Content-Type": "application/json"})
    assert r.status_code == 415
    # A truncated body (connection cut mid-part) stores nothing of the cut part.
    r = httpx.post(f"{node_http.base}/studies", content=body[:len(good) // 2], headers={"Content-Type": ctype})
    assert r.status_code == 400 and node_http.store.count() == 1


def test_orthanc_pushes_to_the_node_and_reads_it_back(tmp_path: Path) -> None:
    """Orthanc's DicomWeb.Servers client STOWs a study to the node (chunked), then queries it over QIDO/WADO."""
    if not peers.have(peers.ORTHANC):
        pytest.fail("Orthanc is not installed: scripts/install.sh --test installs the peers the tests need")
    node = NodeHttp(tmp_path / "node")
    orthanc = None
    try:
        orthanc = start_orthanc_dicomweb(tmp_path / "orthanc", servers={
            "ainode": {"Url": node.base + "/", "ChunkedTransfers": True, "HasDelete": False}})
        ph = write_phantom_series(tmp_path / "ph", shape=(8, 32, 32), seed=11)
        upload(orthanc, ph.paths)
        studies = orthanc_call(orthanc, "GET", "/studies")
        job = orthanc_call(orthanc, "POST", "/dicom-web/servers/ainode/stow",
                           {"Resources": studies, "Synchronous": True})
        assert job is not None
        held = node.store.instances(ph.series_instance_uid)
        assert len(held) == 8
        # Orthanc as a QIDO client of the node (its raw proxy "get").
        answer = orthanc_call(orthanc, "POST", "/dicom-web/servers/ainode/get",
                              {"Uri": f"/studies/{ph.study_instance_uid}/series"})
        series = json.loads(answer) if isinstance(answer, (bytes, str)) else answer
        assert series[0]["0020000E"]["Value"] == [ph.series_instance_uid]
        # ... and as a WADO-RS client: delete the study in Orthanc, retrieve it from the node.
        orthanc_call(orthanc, "DELETE", f"/studies/{studies[0]}")
        orthanc_call(orthanc, "POST", "/dicom-web/servers/ainode/retrieve",
                     {"Resources": [{"Study": ph.study_instance_uid}], "Synchronous": True})
        assert len(orthanc_call(orthanc, "GET", "/instances")) == 8
    finally:
        if orthanc is not None:
            orthanc.stop(timeout=15)
        node.close()


def test_numpy_sanity_of_frames_helper() -> None:
    """1-bit frames (BINARY SEG) are re-packed per frame."""
    from pydicom.dataset import Dataset

    from node.dicomweb import _frames

    ds = Dataset()
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.NumberOfFrames, ds.SamplesPerPixel = 3, 3, 1, 2, 1
    bits = np.array([1, 0, 0, 0, 1, 0, 0, 0, 1] + [0, 1, 0, 1, 0, 1, 0, 1, 0], dtype=np.uint8)
    packed = np.packbits(bits, bitorder="little").tobytes()
    f2 = _frames(ds, packed, "1.2.840.10008.1.2.1", [2], transcode=False)[0][1]
    assert np.array_equal(np.unpackbits(np.frombuffer(f2, np.uint8), bitorder="little")[:9], bits[9:])


def test_api_tokens_guard_dicomweb(tmp_path: Path, phantom) -> None:  # type: ignore[no-untyped-def]
    from config.settings import ApiSettings, Secret

    store = Store.open(tmp_path / "store")
    settings = Settings(data_dir=str(tmp_path), api=ApiSettings(tokens=(Secret("orthanc:tok-123"),)))
    server = HttpServer(create_app(settings, store), "127.0.0.1", peers.free_port())
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}/dicomweb"
        assert httpx.get(f"{base}/studies").status_code == 401
        assert httpx.get(f"{base}/studies", headers={"Authorization": "Bearer wrong"}).status_code == 401
        client = DICOMwebClient(url=base, headers={"Authorization": "Bearer tok-123"})
        assert len(client.store_instances([pydicom.dcmread(phantom.paths[0])]).ReferencedSOPSequence) == 1
        assert len(client.search_for_studies()) == 1
        assert httpx.get(f"http://127.0.0.1:{server.port}/health").status_code == 200
    finally:
        server.stop()
        store.close()


def test_rendered_frames(node_http: NodeHttp, phantom) -> None:  # type: ignore[no-untyped-def]
    import io

    from PIL import Image

    DICOMwebClient(url=node_http.base).store_instances([pydicom.dcmread(p) for p in phantom.paths])
    ds = pydicom.dcmread(phantom.paths[0])
    url = (f"{node_http.base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
           f"/instances/{ds.SOPInstanceUID}")
    r = httpx.get(url + "/rendered", headers={"Accept": "image/jpeg"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).size == (40, 32)
    r = httpx.get(url + "/frames/1/rendered", params={"viewport": "20,16"}, headers={"Accept": "image/png"})
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (20, 16)
    assert httpx.get(url + "/frames/3/rendered").status_code == 404
