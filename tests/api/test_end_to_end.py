"""End to end over real HTTP (uvicorn on loopback): a series received by C-STORE and one pulled from Orthanc."""

from __future__ import annotations

import dataclasses
import gzip
import io
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import nibabel as nib
import numpy as np
import pydicom
import pytest

import peers
from api_helpers import PhantomSeries, make_phantom_series
from config.settings import (
    DestinationSettings,
    DimseSettings,
    HttpSettings,
    ModelSettings,
    OutboxSettings,
    Settings,
    StoreSettings,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dicomweb"))
import dw_helpers  # noqa: E402


class Served:
    """The node (DIMSE + outbox) and its HTTP app with the API, served by uvicorn on 127.0.0.1."""

    def __init__(self, settings: Settings, segmenter: Any) -> None:
        from node.api import api_routes, build_context
        from node.app import HttpServer, create_app
        from node.inference import InferencePool
        from node.service import NodeService

        self.service = NodeService(settings)
        self.service.start()
        store = self.service.store
        self.ctx = build_context(settings, store, InferencePool(settings, lambda name, s: segmenter),
                                 outbox=self.service.outbox)
        app = create_app(settings, store, routes=api_routes(settings, store, context=self.ctx))
        self.http = HttpServer(app, "127.0.0.1", 0)
        _, port = self.http.start()
        self.url = f"http://127.0.0.1:{port}"
        self.settings = settings

    def stop(self) -> None:
        self.http.stop()
        self.ctx.inference.stop()
        self.ctx.close()
        self.service.stop()


def _settings(data_dir: Path, **destinations: DestinationSettings) -> Settings:
    return Settings(
        data_dir=str(data_dir), model=ModelSettings(device="cpu"),
        dimse=DimseSettings(host="127.0.0.1", port=peers.free_port()),
        # The service's own HTTP server stays off: Served serves the same app with the test's segmenter.
        http=HttpSettings(host="127.0.0.1", port=0),
        store=StoreSettings(stable_after_seconds=0.5, stable_poll_seconds=0.1, min_free_gb=0.0),
        outbox=OutboxSettings(retry_base_seconds=0.2, retry_max_seconds=1.0, poll_seconds=0.1),
        destinations=destinations,
    )


def test_node_service_serves_the_api_next_to_dicomweb(tmp_path: Path) -> None:
    """`ainode serve`'s wiring: one HTTP server with DICOMweb, the native API and MONAI Label routes."""
    import httpx

    from node.service import NodeService

    settings = dataclasses.replace(_settings(tmp_path / "node"),
                                   http=HttpSettings(host="127.0.0.1", port=peers.free_port()))
    service = NodeService(settings)
    service.start()
    try:
        assert service.http_address is not None
        base = "http://{}:{}".format(*service.http_address)
        assert httpx.get(f"{base}/health").status_code == 200
        assert httpx.get(f"{base}/dicomweb/studies").json() == []
        assert httpx.get(f"{base}/v1/status").status_code == 200
        assert "litemedsam" in httpx.get(f"{base}/info/").json()["models"]
        assert httpx.get(f"{base}/openapi.json").json()["paths"]
        r = httpx.post(f"{base}/v1/segmentations", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json()
    finally:
        service.stop()
    assert service.api is None and service.http is None


@pytest.fixture
def recorder() -> Iterator[peers.RecorderSCP]:
    scp = peers.RecorderSCP().start()
    yield scp
    scp.stop()


def test_cstore_series_3d_over_uvicorn_with_delivery(tmp_path: Path, segmenter: Any, phantom: PhantomSeries,
                                                     recorder: peers.RecorderSCP) -> None:
    from dicom_io.scu import Peer, send_instances

    served = Served(_settings(tmp_path / "node", RECORDER=DestinationSettings(
        ae_title=recorder.ae_title, host="127.0.0.1", port=recorder.port)), segmenter)
    try:
        node = Peer(ae_title=served.settings.dimse.ae_title, host="127.0.0.1", port=served.settings.dimse.port,
                    calling_ae_title="MODALITY")
        results = send_instances(node, phantom.paths)
        assert all(r.status == 0 for r in results), results
        x0, y0, x1, y1 = phantom.box
        body = {"series": {"series_instance_uid": phantom.series_instance_uid},
                "prompts": {"boxes": [{"ijk": [[x0, y0, phantom.k], [x1, y1, phantom.k]]}]},
                "mode": "3d", "segment": {"label": "Lesion"}, "destinations": ["RECORDER"]}
        answer: dict[str, Any] = {}

        def post() -> None:
            with httpx.Client(base_url=served.url, timeout=300) as c:
                answer["r"] = c.post("/v1/segmentations", json=body)

        worker = threading.Thread(target=post)
        worker.start()
        latencies = []
        saw_running = False
        with httpx.Client(base_url=served.url, timeout=10) as c:
            while worker.is_alive():
                t = time.perf_counter()
                status = c.get("/v1/status").json()
                assert c.get("/health").status_code == 200
                latencies.append(time.perf_counter() - t)
                q = status["queues"].get("litemedsam")
                saw_running |= bool(q and q["running"])
                time.sleep(0.1)
        worker.join()
        r = answer["r"]
        assert r.status_code == 201, r.text
        res = r.json()
        assert saw_running and max(latencies) < 1.0, latencies
        # the lesion covers slices 3-6, the end ones with 13 partial-volume pixels only: propagation
        # stops where the mask would be mostly surrounding tissue (docs/models.md, 3D propagation)
        assert len(res["slices"]) >= 2 and res["voxel_count"] > phantom.mask[phantom.k].sum()
        with httpx.Client(base_url=served.url, timeout=30) as c:
            img = nib.Nifti1Image.from_bytes(gzip.decompress(c.get(res["links"]["nifti"]).content))
            mask = np.asarray(img.dataobj).transpose(2, 1, 0).astype(bool)
            dice = 2 * (mask & phantom.mask).sum() / (mask.sum() + phantom.mask.sum())
            assert dice > 0.5
            seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(c.get(res["links"]["seg"]).content)))
            assert seg.get_segment_description(1).segment_label == "Lesion"
            assert peers.wait_until(lambda: recorder.counts.get(res["seg_sop_instance_uid"]) == 1, timeout=20)
            assert peers.wait_until(lambda: c.get(res["links"]["self"]).json()["deliveries"]["RECORDER"]["state"]
                                    == "delivered", timeout=10)
    finally:
        served.stop()


@pytest.fixture(scope="module")
def orthanc_dw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Proc]:
    if not peers.have(peers.ORTHANC) or not dw_helpers.DICOMWEB_PLUGIN.exists():
        pytest.fail("Orthanc and its DICOMweb plugin are not installed (apt-get install orthanc orthanc-dicomweb): "
                    "scripts/install.sh --test installs the peers the tests need")
    proc = dw_helpers.start_orthanc_dicomweb(tmp_path_factory.mktemp("orthanc-api"))
    yield proc
    proc.stop(timeout=15)


def test_series_pulled_from_orthanc_monailabel_and_native(tmp_path: Path, segmenter: Any,
                                                           orthanc_dw: peers.Proc) -> None:
    pulled = make_phantom_series(tmp_path / "a", seed=3)
    other = make_phantom_series(tmp_path / "b", seed=3)  # same pixels, new UIDs: embeddings are reused
    dw_helpers.upload(orthanc_dw, pulled.paths + other.paths)
    served = Served(_settings(tmp_path / "node", ORTHANC=DestinationSettings(
        kind="dicomweb", url=f"http://127.0.0.1:{orthanc_dw.http_port}/dicom-web")), segmenter)
    try:
        with httpx.Client(base_url=served.url, timeout=300) as c:
            # OHIF v3 / MONAI Label: image=<SeriesInstanceUID> resolved through the DICOMweb archive.
            x, y = pulled.center
            r = c.post(f"/infer/sam_2d?image={pulled.series_instance_uid}&output=dicom_seg",
                       files={"params": (None, f'{{"foreground": [[{x:f}, {y:f}, {pulled.k:d}]], '
                                         f'"label_info": [{{"name": "lesion"}}]}}')})
            assert r.status_code == 200, r.text
            # Like every result, the SEG goes into the store and through the persisted outbox (retried, once).
            assert r.headers["x-stored-to"] == "ORTHANC: pending"
            seg = pydicom.dcmread(io.BytesIO(r.content))

            def on_orthanc() -> Any:
                return dw_helpers.orthanc_call(orthanc_dw, "GET",
                                               f"/dicom-web/series?SeriesInstanceUID={seg.SeriesInstanceUID}")

            assert peers.wait_until(lambda: len(on_orthanc()) == 1, timeout=30)
            assert on_orthanc()[0]["00080060"]["Value"] == ["SEG"]
            entry = served.service.outbox.entry(str(seg.SOPInstanceUID), "ORTHANC")
            assert entry is not None and peers.wait_until(
                lambda: served.service.outbox.entry(str(seg.SOPInstanceUID), "ORTHANC").state == "delivered",
                timeout=10)
            assert served.service.store.get_series(pulled.series_instance_uid).num_instances == len(pulled.paths)

            # Native: an archive plus Study/Series UIDs; the result goes back where the series came from.
            x0, y0, x1, y1 = other.box
            r = c.post("/v1/segmentations", json={
                "series": {"series_instance_uid": other.series_instance_uid,
                           "study_instance_uid": other.study_instance_uid, "archive": "ORTHANC"},
                "prompts": {"boxes": [{"ijk": [[x0, y0, other.k], [x1, y1, other.k]]}]}, "mode": "2d"})
            assert r.status_code == 201, r.text
            res = r.json()
            assert list(res["deliveries"]) == ["ORTHANC"]
            assert peers.wait_until(lambda: c.get(res["links"]["self"]).json()["deliveries"]["ORTHANC"]["state"]
                                    == "delivered", timeout=20), c.get(res["links"]["self"]).json()
            missing = c.post("/v1/segmentations", json={
                "series": {"series_instance_uid": "1.2.826.0.1.3680043.8.498.1", "archive": "ORTHANC"},
                "prompts": {"points": [{"ijk": [1, 1, 1]}]}})
            assert missing.status_code == 404 and "nor found on archive 'ORTHANC'" in missing.json()["error"]
    finally:
        served.stop()
