"""OHIF served by the node (/ohif/), end to end in headless Debian chromium (docs/viewer.md).

Scenario 1 (embedded): storescu -> node, a 3D segmentation through the REST API, OHIF's study list
shows the study with its SEG series, and the viewer opened on the SEG holds the segment with the
voxels the SEG file has, slice by slice (read from OHIF's segmentation service in the page).
Scenario 2 (archive): the series lives in Orthanc (DICOMweb plugin, HTTP basic auth), the node pulls
it for a segmentation and stores the SEG back in Orthanc; OHIF served by the node reads Orthanc
through the node's same-origin proxy (the browser holds no Orthanc credentials) and shows it.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest

import peers
from browser_helpers import BrowserRun, check_browser, run_browser

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dicomweb"))
from dicom_io.phantom import write_phantom_series  # noqa: E402
from dw_helpers import AUTH_PASSWORD, AUTH_USER, DICOMWEB_PLUGIN, orthanc_call, start_orthanc_dicomweb  # noqa: E402
from node.viewer import DIST  # noqa: E402

pytestmark = pytest.mark.peers

SEG_DESCRIPTION = "ainode segmentation"  # [seg] series_description default
PATIENT = "Phantom, Test"  # Phantom^Test as OHIF shows it


def _need_viewer() -> None:
    check_browser()
    if not (DIST / "index.html").is_file():
        raise AssertionError(f"The OHIF dist is missing at {DIST}: run `bash scripts/install.sh --test`.")
    if not peers.have("storescu"):
        raise AssertionError("storescu (dcmtk) is missing: run `bash scripts/install.sh --test`.")


def _phantom(out: Path) -> Any:
    # Small, and the lesion on two slices: the model encodes few slices (CPU time dominates these tests).
    return write_phantom_series(out, shape=(8, 64, 64), spacing=(1.5, 1.5, 4.0))


def _box_prompt(phantom: Any) -> dict[str, Any]:
    mask = phantom.mask
    k = int(np.argmax(mask.sum(axis=(1, 2))))
    ys, xs = np.nonzero(mask[k])
    return {"boxes": [{"ijk": [[int(xs.min()) - 3, int(ys.min()) - 3, k], [int(xs.max()) + 3, int(ys.max()) + 3, k]]}]}


def _start_node(workdir: Path, config: str) -> tuple[peers.Proc, str]:
    dimse, http = peers.free_port(), peers.free_port()
    cfg = workdir / "node.toml"
    cfg.write_text(config.replace("@DIMSE@", str(dimse)))
    node = peers.start_node(workdir / "data", port=dimse, config=cfg,
                            extra_env={"AINODE_HTTP_PORT": str(http), "AINODE_MODEL_DEVICE": "cpu",
                                       "AINODE_STORE_STABLE_AFTER_SECONDS": "0.5",
                                       "AINODE_LITEMEDSAM_PREENCODE": "false",  # only what the job needs
                                       "AINODE_OUTBOX_RETRY_BASE_SECONDS": "0.2",
                                       "AINODE_OUTBOX_POLL_SECONDS": "0.2"})
    try:
        peers.wait_tcp(http, timeout=60, proc=node.popen)
    except Exception:
        node.stop()
        raise
    return node, f"http://127.0.0.1:{http}"


def _segment(base: str, series: dict[str, Any], prompts: dict[str, Any], destinations: list[str] | None) -> dict:
    body: dict[str, Any] = {"series": series, "prompts": prompts, "mode": "3d"}
    if destinations is not None:
        body["destinations"] = destinations
    r = httpx.post(f"{base}/v1/segmentations", json=body, timeout=900)
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["state"] == "done" and out["voxel_count"] > 0, out
    return out


def seg_voxels_by_source(data: bytes) -> dict[str, int]:
    """Non-zero voxels of a (BINARY) SEG per referenced source image SOP Instance UID."""
    ds = pydicom.dcmread(io.BytesIO(data))
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    out: dict[str, int] = {}
    for item, frame in zip(ds.PerFrameFunctionalGroupsSequence, frames, strict=True):
        sop = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        n = int(np.count_nonzero(frame))
        if n:
            out[sop] = out.get(sop, 0) + n
    return out


def _check_ohif(run: BrowserRun, expected: dict[str, int], result: dict[str, Any]) -> None:
    page = run.result
    assert PATIENT in page["studyListText"]
    assert SEG_DESCRIPTION in page["panelText"] and "SEG" in page["panelText"], page["panelText"]
    segs = page["segmentations"]
    assert len(segs) == 1, segs
    assert segs[0]["label"] == SEG_DESCRIPTION
    assert [s["segmentIndex"] for s in segs[0]["segments"]] == [1]
    # The same voxels on the same source images as the SEG file, and as the API reported.
    assert segs[0]["voxelsBySop"] == expected
    assert sum(expected.values()) == result["voxel_count"]
    assert len(expected) == len(result["slices"])
    # Everything OHIF asked the node for was answered (DICOMweb conformance as OHIF uses it).
    failed = run.failed_requests()
    assert not failed, failed
    assert not run.blocked, run.blocked


def test_ohif_embedded_shows_the_nodes_seg(tmp_path: Path) -> None:
    _need_viewer()
    phantom = _phantom(tmp_path / "ct")
    # No destination at all: the node's own store is where an embedded result goes.
    node, base = _start_node(tmp_path, "")
    try:
        subprocess.run(["storescu", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, phantom.paths)],
                       check=True, capture_output=True, env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}, timeout=60)
        result = _segment(base, {"series_instance_uid": phantom.series_instance_uid}, _box_prompt(phantom), [])
        study, seg_series = result["study_instance_uid"], result["seg_series_instance_uid"]
        r = httpx.get(f"{base}{result['links']['seg']}", timeout=60)
        assert r.status_code == 200
        expected = seg_voxels_by_source(r.content)
        assert set(expected) <= {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in phantom.paths}
        run = run_browser("ohif_seg.js", {"base": base, "study": study, "seg": seg_series, "patient": PATIENT,
                                          "segDescription": SEG_DESCRIPTION, "out": str(tmp_path)}, tmp_path)
        _check_ohif(run, expected, result)
        assert any("/dicomweb/studies/" in r["url"] and "/frames/" in r["url"] for r in run.requests)
        assert (tmp_path / "ohif_viewer_seg.png").stat().st_size > 10_000
    finally:
        node.stop()


def test_ohif_embedded_shows_the_nodes_label_map_seg(tmp_path: Path) -> None:
    """The same with ``seg.format = "labelmap"``: OHIF 3.13.2 opens the node's Label Map SEG (RLE) over its image."""
    _need_viewer()
    phantom = _phantom(tmp_path / "ct")
    node, base = _start_node(tmp_path, '[seg]\nformat = "labelmap"\n')
    try:
        subprocess.run(["storescu", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, phantom.paths)],
                       check=True, capture_output=True, env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}, timeout=60)
        result = _segment(base, {"series_instance_uid": phantom.series_instance_uid}, _box_prompt(phantom), [])
        assert result["seg_format"] == "labelmap"
        study, seg_series = result["study_instance_uid"], result["seg_series_instance_uid"]
        r = httpx.get(f"{base}{result['links']['seg']}", timeout=60)
        assert r.status_code == 200
        ds = pydicom.dcmread(io.BytesIO(r.content), stop_before_pixels=True)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"
        expected = seg_voxels_by_source(r.content)
        run = run_browser("ohif_seg.js", {"base": base, "study": study, "seg": seg_series, "patient": PATIENT,
                                          "segDescription": SEG_DESCRIPTION, "out": str(tmp_path)}, tmp_path)
        page = run.result
        assert SEG_DESCRIPTION in page["panelText"] and "SEG" in page["panelText"], page["panelText"]
        segs = page["segmentations"]
        assert len(segs) == 1 and segs[0]["label"] == SEG_DESCRIPTION, segs
        # OHIF 3.13.2 lists the label map's described background (SegmentNumber 0, which highdicom writes as
        # Supplement 243 has it) as a segment of its own, before the node's segment 1.
        assert [(s["segmentIndex"], s["label"]) for s in segs[0]["segments"]] == [(0, "Background"), (1, "Segment")]
        assert segs[0]["voxelsBySop"] == expected and sum(expected.values()) == result["voxel_count"]
        assert not run.failed_requests(), run.failed_requests()
        assert not run.blocked, run.blocked
    finally:
        node.stop()


def test_ohif_through_the_proxy_shows_the_seg_stored_in_orthanc(tmp_path: Path) -> None:
    _need_viewer()
    if not DICOMWEB_PLUGIN.exists():
        raise AssertionError("Orthanc's DICOMweb plugin is missing: run `bash scripts/install.sh --test`.")
    users = {AUTH_USER: AUTH_PASSWORD}
    orthanc = start_orthanc_dicomweb(tmp_path / "orthanc", users=users)
    node = None
    try:
        phantom = _phantom(tmp_path / "ct")
        for p in phantom.paths:
            orthanc_call(orthanc, "POST", "/instances", p.read_bytes(), users=users)
        node, base = _start_node(tmp_path, f"""
[viewer]
archive = "PACS"

[destinations.PACS]
kind = "dicomweb"
url = "http://127.0.0.1:{orthanc.http_port}/dicom-web"
auth = "basic"
username = "{AUTH_USER}"
password = "{AUTH_PASSWORD}"
""")
        series = {"series_instance_uid": phantom.series_instance_uid,
                  "study_instance_uid": phantom.study_instance_uid, "archive": "PACS"}
        result = _segment(base, series, _box_prompt(phantom), None)  # default: back to where it came from
        study, seg_series = result["study_instance_uid"], result["seg_series_instance_uid"]

        def seg_in_orthanc() -> bool:
            found = orthanc_call(orthanc, "GET", f"/dicom-web/studies/{study}/series?SeriesInstanceUID={seg_series}",
                                 users=users)
            return bool(found)

        assert peers.wait_until(seg_in_orthanc, timeout=60, interval=0.5), "the SEG did not reach Orthanc"
        # The expectation comes from the SEG as Orthanc holds it.
        sops = orthanc_call(orthanc, "GET", f"/dicom-web/studies/{study}/series/{seg_series}/instances", users=users)
        seg_sop = sops[0]["00080018"]["Value"][0]
        seg_bytes = _orthanc_instance(orthanc, users, study, seg_series, seg_sop)
        expected = seg_voxels_by_source(seg_bytes)
        run = run_browser("ohif_seg.js", {"base": base, "study": study, "seg": seg_series, "patient": PATIENT,
                                          "segDescription": SEG_DESCRIPTION, "out": str(tmp_path)}, tmp_path)
        _check_ohif(run, expected, result)
        dicomweb = [r["url"] for r in run.requests if "/studies" in r["url"]]
        assert dicomweb and all(u.startswith(f"{base}/ohif-archive/") for u in dicomweb), dicomweb[:5]
        assert any("/frames/" in u for u in dicomweb)
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()


def test_ohif_viewer_with_a_token(tmp_path: Path) -> None:
    """With api.tokens on, /dicomweb needs a token; OHIF's viewer URL carries it (``&token=``) and
    every DICOMweb request of the page succeeds."""
    _need_viewer()
    phantom = write_phantom_series(tmp_path / "ct", shape=(4, 32, 32), spacing=(1.0, 1.0, 2.0))
    token = "viewer-token-5f2c9a"
    node, base = _start_node(tmp_path, f"""
[api]
tokens = ["reader:read:{token}"]
""")
    try:
        subprocess.run(["storescu", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, phantom.paths)],
                       check=True, capture_output=True, env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}, timeout=60)
        assert httpx.get(f"{base}/dicomweb/studies").status_code == 401
        assert httpx.get(f"{base}/ohif/").status_code == 200  # the static viewer holds no data
        run = run_browser("ohif_token.js", {"base": base, "study": phantom.study_instance_uid, "token": token,
                                            "out": str(tmp_path)}, tmp_path)
        assert run.result["imageIds"] == 4, run.result
        dicomweb = [r for r in run.requests if "/dicomweb/" in r["url"]]
        assert any("/frames/" in r["url"] for r in dicomweb)
        assert dicomweb and all(r["status"] == 200 for r in dicomweb), [r for r in dicomweb if r["status"] != 200]
    finally:
        node.stop()


def _orthanc_instance(orthanc: peers.Proc, users: dict[str, str], study: str, series: str, sop: str) -> bytes:
    """The instance file from Orthanc's REST API (found by its UIDs)."""
    ids = orthanc_call(orthanc, "POST", "/tools/lookup", sop.encode(), users=users)
    oid = next(x["ID"] for x in ids if x["Type"] == "Instance")
    data = orthanc_call(orthanc, "GET", f"/instances/{oid}/file", users=users)
    assert isinstance(data, bytes), type(data)
    return data


def test_viewer_routes_without_a_browser(tmp_path: Path) -> None:
    """The static side: SPA fallback, rewritten prefix, generated config, the proxy's includefield split."""
    from starlette.testclient import TestClient

    from config.settings import DestinationSettings, Settings, ViewerSettings
    from dicom_io.store import Store
    from node.app import create_app
    from node.viewer import _Dist, split_includefield

    if not (DIST / "index.html").is_file():
        raise AssertionError(f"The OHIF dist is missing at {DIST}: run `bash scripts/install.sh`.")
    settings = Settings(data_dir=str(tmp_path))
    with TestClient(create_app(settings, Store(tmp_path / "store"))) as client:
        index = client.get("/ohif/viewer", params={"StudyInstanceUIDs": "1.2.3"})
        assert index.status_code == 200 and 'window.PUBLIC_URL="/ohif/"' in index.text
        assert 'src="/app' not in index.text and "init-service-worker" not in index.text
        config = client.get("/ohif/app-config.js")
        assert '"qidoRoot": "/dicomweb"' in config.text and '"routerBasename": "/ohif"' in config.text
        assert '"disableConfirmationPrompts": true' in config.text
        bundle = next(p.name for p in DIST.glob("app.bundle.*.js"))
        js = client.get(f"/ohif/{bundle}")
        assert js.status_code == 200 and '__webpack_require__.p = "/ohif/";' in js.text
        assert client.get("/ohif/no-such-chunk.js").status_code == 404
        redirect = client.get("/ohif", params={"a": "1"}, follow_redirects=False)
        assert redirect.status_code == 308 and redirect.headers["location"] == "/ohif/?a=1"
        css = client.get("/ohif/app.bundle.css")
        assert "url(/ohif/" in css.text and "url(/a" not in css.text
        assert '"src": "/ohif/assets/' in client.get("/ohif/manifest.json").text
        # Path tricks: refused by the request guard, and the dist's own lookup stays inside the dist.
        assert client.get("/ohif/%2e%2e/%2e%2e/%2e%2e/pyproject.toml").status_code == 400
        assert (DIST / "../../../node/viewer.py").resolve().is_file()
        dist = _Dist(DIST)
        for sneaky in ("../../../node/viewer.py", "%2e%2e/%2e%2e/%2e%2e/pyproject.toml", "/../../../pyproject.toml"):
            assert dist.file(sneaky) is None, sneaky
        assert dist.file("index.html") == (DIST / "index.html").resolve()
        wasm = next(DIST.glob("*.wasm")).name
        assert client.get(f"/ohif/{wasm}").headers["content-type"] == "application/wasm"
    assert split_includefield("a=1&includefield=00081030%2C00080060&includefield=x") == \
        "a=1&includefield=00081030&includefield=00080060&includefield=x"
    missing = Settings(data_dir=str(tmp_path), viewer=ViewerSettings(dist=str(tmp_path / "nothing")))
    with TestClient(create_app(missing, Store(tmp_path / "store2"))) as client:
        r = client.get("/ohif/")
        assert r.status_code == 503 and "scripts/install.sh" in r.text
    bad = Settings(data_dir=str(tmp_path), viewer=ViewerSettings(archive="NOPE"),
                   destinations={"D": DestinationSettings(ae_title="X", host="127.0.0.1")})
    with pytest.raises(ValueError, match="NOPE"):
        create_app(bad, Store(tmp_path / "store3"))


def test_archive_proxy_against_orthanc(tmp_path: Path) -> None:
    """The proxy without a browser: auth added, includefield split, archive URLs rewritten, frames streamed."""
    from starlette.testclient import TestClient

    from config.settings import DestinationSettings, Secret, Settings, ViewerSettings
    from dicom_io.store import Store
    from node.app import create_app

    if not DICOMWEB_PLUGIN.exists():
        raise AssertionError("Orthanc's DICOMweb plugin is missing: run `bash scripts/install.sh --test`.")
    users = {AUTH_USER: AUTH_PASSWORD}
    orthanc = start_orthanc_dicomweb(tmp_path / "orthanc", users=users)
    try:
        phantom = write_phantom_series(tmp_path / "ct", shape=(3, 16, 16), spacing=(1.0, 1.0, 2.0))
        for p in phantom.paths:
            orthanc_call(orthanc, "POST", "/instances", p.read_bytes(), users=users)
        dest = DestinationSettings(kind="dicomweb", url=f"http://127.0.0.1:{orthanc.http_port}/dicom-web",
                                   auth="basic", username=AUTH_USER, password=Secret(AUTH_PASSWORD))
        settings = Settings(data_dir=str(tmp_path), viewer=ViewerSettings(archive="PACS"), destinations={"PACS": dest})
        with TestClient(create_app(settings, Store(tmp_path / "store")), base_url="http://viewer.test") as client:
            assert '"qidoRoot": "/ohif-archive"' in client.get("/ohif/app-config.js").text
            # OHIF's comma-separated includefield reaches Orthanc as repeats: the description is returned.
            studies = client.get("/ohif-archive/studies", params={"includefield": "00081030,00080060"})
            assert studies.status_code == 200, studies.text
            (study,) = [s for s in studies.json() if s["0020000D"]["Value"][0] == phantom.study_instance_uid]
            assert study["00081030"]["Value"] == ["Synthetic phantom"]
            s, se = phantom.study_instance_uid, phantom.series_instance_uid
            meta = client.get(f"/ohif-archive/studies/{s}/series/{se}/metadata")
            assert meta.status_code == 200 and len(meta.json()) == 3
            text = meta.text
            assert f"127.0.0.1:{orthanc.http_port}" not in text
            uri = meta.json()[0]["7FE00010"]["BulkDataURI"]
            assert uri.startswith("http://viewer.test/ohif-archive/studies/"), uri
            sop = meta.json()[0]["00080018"]["Value"][0]
            frame = client.get(f"/ohif-archive/studies/{s}/series/{se}/instances/{sop}/frames/1",
                               headers={"Accept": "multipart/related; type=application/octet-stream; "
                                                  "transfer-syntax=*"})
            assert frame.status_code == 200 and frame.headers["content-type"].startswith("multipart/related")
            assert len(frame.content) >= 16 * 16 * 2
            bulk = client.get(uri.removeprefix("http://viewer.test"))
            assert bulk.status_code == 200 and len(bulk.content) >= 16 * 16 * 2
            assert client.get("/ohif-archive/studies/1.2.3/series/4.5.6/metadata").status_code == 404
    finally:
        orthanc.stop()
    down = Settings(data_dir=str(tmp_path), viewer=ViewerSettings(archive="PACS"), destinations={"PACS": dest})
    with TestClient(create_app(down, Store(tmp_path / "store2"))) as client:
        r = client.get("/ohif-archive/studies")
        assert r.status_code == 502 and "PACS" in r.json()["error"]


def test_dicomweb_thumbnails(tmp_path: Path) -> None:
    """PS3.18 thumbnails (OHIF's thumbnailRendering 'thumbnail'/'thumbnailDirect') of a study, series, instance."""
    from PIL import Image
    from starlette.testclient import TestClient

    from config.settings import Settings
    from dicom_io.store import Store
    from node.app import create_app

    store = Store(tmp_path / "store")
    phantom = write_phantom_series(tmp_path / "ct", shape=(3, 40, 32), spacing=(1.0, 1.0, 2.0))
    for p in phantom.paths:
        store.put_file(p, kind="received")
    s, se = phantom.study_instance_uid, phantom.series_instance_uid
    sop = pydicom.dcmread(phantom.paths[0], stop_before_pixels=True).SOPInstanceUID
    with TestClient(create_app(Settings(data_dir=str(tmp_path)), store)) as client:
        for path in (f"/studies/{s}", f"/studies/{s}/series/{se}", f"/studies/{s}/series/{se}/instances/{sop}",
                     f"/studies/{s}/series/{se}/instances/{sop}/frames/1"):
            r = client.get(f"/dicomweb{path}/thumbnail", headers={"Accept": "image/jpeg"})
            assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", (path, r.text)
            assert Image.open(io.BytesIO(r.content)).size == (32, 40)  # fits the default 128x128 box
        r = client.get(f"/dicomweb/studies/{s}/series/{se}/thumbnail", params={"viewport": "16,16"},
                       headers={"Accept": "image/png"})
        assert r.headers["content-type"] == "image/png" and max(Image.open(io.BytesIO(r.content)).size) == 16
        assert client.get(f"/dicomweb/studies/{s}/series/1.2.3/thumbnail").status_code == 404
        assert client.get(f"/dicomweb/studies/{s}/series/{se}/thumbnail", params={"viewport": "x"}).status_code == 400
