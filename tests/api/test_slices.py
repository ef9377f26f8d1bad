"""What the prompt page reads: a session's geometry and slice voxels (GET /v1/sessions/{id}/slices[/{k}]), and `/`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from starlette.applications import Starlette
from starlette.testclient import TestClient

from api_helpers import Api, PhantomSeries, api_settings


def _open(api: Api, ph: PhantomSeries, headers: dict[str, str] | None = None) -> str:
    r = api.client.post("/v1/sessions", json={"series": ph.series_instance_uid}, headers=headers)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_slices_geometry_and_voxels_match_the_files(api: Api, phantom: PhantomSeries) -> None:
    c = api.client
    sid = _open(api, phantom)
    geo = c.get(f"/v1/sessions/{sid}/slices")
    assert geo.status_code == 200, geo.text
    g = geo.json()
    n, rows, cols = phantom.mask.shape
    assert g["shape"] == [n, rows, cols] and g["dtype"] == "float32"
    assert g["series_instance_uid"] == phantom.series_instance_uid and g["modality"] == "CT"
    # The phantom's own window (WindowCenter 40 / WindowWidth 400) is the default.
    assert g["window"] == {"center": 40.0, "width": 400.0, "source": "dicom"}
    assert g["links"]["slice"] == f"/v1/sessions/{sid}/slices/{{k}}"

    # Independently of the node: each file's ImagePositionPatient and rescaled pixels.
    files = [pydicom.dcmread(p) for p in phantom.paths]
    by_position = {tuple(round(float(v), 3) for v in ds.ImagePositionPatient): ds for ds in files}
    assert len(g["positions"]) == n
    normal = np.cross(g["orientation"][:3], g["orientation"][3:])
    along = [float(np.dot(p, normal)) for p in g["positions"]]
    assert along == sorted(along)  # slice k is k-th along the normal, as the API's k
    for k, pos in enumerate(g["positions"]):
        ds = by_position[tuple(round(v, 3) for v in pos)]
        assert [round(float(v), 6) for v in ds.ImageOrientationPatient] == g["orientation"]
        assert [float(v) for v in ds.PixelSpacing] == g["pixel_spacing"]
        expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        r = c.get(f"/v1/sessions/{sid}/slices/{k}")
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/x-ainode-slice"
        assert r.headers["content-encoding"] == "gzip"  # httpx asked for it and undid it
        assert r.headers["x-slice-shape"] == f"{rows},{cols}" and r.headers["x-slice"] == str(k)
        got = np.frombuffer(r.content, dtype="<f4").reshape(rows, cols)
        np.testing.assert_array_equal(got, expected)
    # The lesion of the phantom's mask is bright on the slice the API calls phantom.k.
    lesion = np.frombuffer(c.get(f"/v1/sessions/{sid}/slices/{phantom.k}").content, dtype="<f4").reshape(rows, cols)
    assert lesion[phantom.mask[phantom.k]].mean() > lesion[~phantom.mask[phantom.k]].mean() + 50

    plain = c.get(f"/v1/sessions/{sid}/slices/0", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers and len(plain.content) == rows * cols * 4


def test_slice_errors_name_the_field(api: Api, phantom: PhantomSeries) -> None:
    c = api.client
    sid = _open(api, phantom)
    n = phantom.mask.shape[0]
    r = c.get(f"/v1/sessions/{sid}/slices/{n}")
    assert r.status_code == 404 and r.json()["field"] == "k" and f"0..{n - 1}" in r.json()["error"]
    r = c.get(f"/v1/sessions/{sid}/slices/-1")
    assert r.status_code == 404 and r.json()["field"] == "k"
    r = c.get(f"/v1/sessions/{sid}/slices/two")
    assert r.status_code == 422 and r.json()["field"] == "k"
    r = c.get("/v1/sessions/0123456789abcdef/slices/0")
    assert r.status_code == 404 and r.json()["field"] == "session_id"
    assert c.get("/v1/sessions/0123456789abcdef/slices").status_code == 404
    paths = c.get("/openapi.json").json()["paths"]
    assert "/v1/sessions/{id}/slices" in paths and "/v1/sessions/{id}/slices/{k}" in paths


def test_slices_follow_tokens_and_users(make_api: Any, tmp_path: Path, phantom: PhantomSeries) -> None:
    from config.settings import Secret

    api = make_api(api_settings(tmp_path / "auth", tokens=(Secret("alice:tok-a"), Secret("bob:tok-b"))),
                   series=[phantom])
    alice = {"Authorization": "Bearer tok-a"}
    sid = _open(api, phantom, alice)
    c = api.client
    assert c.get(f"/v1/sessions/{sid}/slices/0").status_code == 401
    assert c.get(f"/v1/sessions/{sid}/slices/0", headers={"Authorization": "Bearer tok-b"}).status_code == 404
    assert c.get(f"/v1/sessions/{sid}/slices/0", headers=alice).status_code == 200
    # The page itself holds no data: it is served without a token (it asks for one), ahead of the API.
    page = c.get("/")
    assert page.status_code in (200, 503), page.text
    assert page.status_code != 401


def test_prompt_page_served_or_explains_how_to_build(tmp_path: Path) -> None:
    from node.prompt_page import prompt_page_routes

    dist = tmp_path / "dist"
    with TestClient(Starlette(routes=prompt_page_routes(dist))) as c:
        r = c.get("/")
        assert r.status_code == 503 and "npm run build" in r.text and "scripts/install.sh" in r.text
        assert c.get("/prompt/app.js").status_code == 404
        dist.mkdir()
        (dist / "index.html").write_text("<!doctype html><title>ainode</title>")
        (dist / "app.js").write_text("console.log(1)")
        r = c.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "<title>ainode</title>" in r.text
        js = c.get("/prompt/app.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
        assert c.get("/prompt/missing.js").status_code == 404
