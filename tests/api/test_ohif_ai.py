"""Contract tests for both OHIF-AI forks: meta encoding, the /monai root path, lassos and scribbles,
anandpreshob/OHIF-AI's ``output=all`` answer decoded as its viewer and as nibabel read it, and the
request forms of its deployment guide (``curl -F file=@series.zip -F params=...``)."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from api_helpers import Api, PhantomSeries, api_settings, make_phantom_series
from clients import parse_form_multipart, parse_ohif_ai, parse_ohif_ai_fork
from config.settings import ApiSettings, ConfigError, Secret, ViewerSettings
from dicom_io.series import load_series


def _params(**kw: Any) -> dict[str, Any]:
    return {"params": (None, json.dumps(kw))}


def _zip(series: PhantomSeries) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in series.paths:
            zf.write(p, p.name)
    return buf.getvalue()


def _upload(series: PhantomSeries, **params: Any) -> dict[str, Any]:
    """What the fork's ``postToMonaiWithDicom`` posts: ``params`` and ``file=series.zip``."""
    return {**_params(**params), "file": ("series.zip", _zip(series), "application/zip")}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


# ---------------------------------------------------------------- meta as upstream encodes it


def test_nninter_meta_fields_are_json_encoded_strings(api: Api, phantom: PhantomSeries) -> None:
    x, y = phantom.center
    k = phantom.k
    r = api.client.post(f"/infer/segmentation?image={phantom.series_instance_uid}&output=dicom_seg",
                        files=_params(pos_points=[[round(x), round(y), k]], neg_points=[], pos_boxes=[],
                                      neg_boxes=[], pos_lassos=[], neg_lassos=[], pos_scribbles=[],
                                      neg_scribbles=[], texts=[], nninter=True))
    assert r.status_code == 200, r.text
    meta, seg = parse_ohif_ai(r.content, r.headers["content-type"])
    assert set(meta) == {"prompt_info", "flipped", "nninter_elapsed", "sam_elapsed", "label_name"}
    assert all(isinstance(v, str) for v in meta.values()), meta
    assert meta["flipped"].lower() == "false"  # what the viewer evaluates
    assert float(json.loads(meta["nninter_elapsed"])) > 0 and meta["sam_elapsed"] == "null"
    assert meta["label_name"].startswith("nninter_pred_") and len(meta["label_name"]) == len("nninter_pred_") + 14
    assert json.loads(meta["prompt_info"])["pos_points"] == [[round(x), round(y), k]]
    vol = np.frombuffer(seg, np.uint8).reshape(phantom.mask.shape)
    assert vol[k].sum() > 0


# ---------------------------------------------------------------- root path


def test_monailabel_routes_also_answer_under_the_root_path(make_api: Any, tmp_path: Path,
                                                          phantom: PhantomSeries) -> None:
    settings = api_settings(tmp_path / "n", monailabel_root_path="/monai")
    api = make_api(settings, series=[phantom])
    c = api.client
    assert c.get("/monai/info/").json()["models"] == c.get("/info/").json()["models"]
    url = f"/monai/infer/segmentation?image={phantom.series_instance_uid}&output=dicom_seg"
    init = c.post(url, files=_params(nninter="init", studyInstanceUID=phantom.study_instance_uid))
    assert init.status_code == 200 and init.json() == "/code/predictions/init.nii.gz"
    bad = c.post(url, files=_params(nninter=True, pos_points=[[1, 1, 99]]))
    assert bad.status_code == 422 and "slice 99" in bad.json()["error"]  # the API's own errors, not a 404
    assert c.get("/monai/v1/status").status_code == 404  # only the MONAI Label routes move
    assert c.get("/monai/session/nope").status_code == 404


@pytest.mark.parametrize("value,words", [
    ("monai", "not a URL path"), ("/mo nai", "not a URL path"), ("/dicomweb", "/dicomweb"), ("/v1", "/v1"),
    ("/ohif/x", "/ohif"), ("/..", "not a URL path"),
])
def test_bad_root_paths_stop_start_up(make_api: Any, tmp_path: Path, value: str, words: str) -> None:
    with pytest.raises(ConfigError, match="monailabel_root_path") as exc:
        make_api(api_settings(tmp_path / "n", monailabel_root_path=value))
    assert words in str(exc.value)


def test_root_path_routes_keep_their_roles(make_api: Any, tmp_path: Path, phantom: PhantomSeries) -> None:
    settings = api_settings(tmp_path / "n", monailabel_root_path="/monai/",
                            tokens=(Secret("r:read:tok-read"), Secret("s:segment:tok-seg")))
    api = make_api(settings, series=[phantom])
    c = api.client
    url = f"/monai/infer/segmentation?image={phantom.series_instance_uid}&output=dicom_seg"
    assert c.get("/monai/info/").status_code == 401
    assert c.get("/monai/info/", headers={"Authorization": "Bearer tok-read"}).status_code == 200
    assert c.post(url, files=_params(nninter="init"), headers={"Authorization": "Bearer tok-read"}).status_code == 403
    ok = c.post(url, files=_params(nninter="init"), headers={"Authorization": "Bearer tok-seg"})
    assert ok.status_code == 200


# ---------------------------------------------------------------- the OHIF-AI viewer at the site root


def _fake_dist(folder: Path) -> Path:
    """The layout of an OHIF-AI build (index.html, app-config.js, hashed bundles, .wasm, assets/)."""
    folder.mkdir(parents=True)
    (folder / "index.html").write_text('<!doctype html><script src="/app.bundle.js"></script>')
    (folder / "app-config.js").write_text("window.config = {dataSources: [{configuration: {qidoRoot: '/dicomweb'}}]};")
    (folder / "app.bundle.js").write_text("console.log('viewer');")
    (folder / "17dd54813d5acc10bf8f.wasm").write_bytes(b"\0asm\1\0\0\0")
    (folder / "assets").mkdir()
    (folder / "assets" / "logo.svg").write_text("<svg/>")
    return folder


def test_site_root_serves_the_ohif_ai_build_beside_dicomweb_and_monai(make_api: Any, tmp_path: Path,
                                                                     phantom: PhantomSeries) -> None:
    dist = _fake_dist(tmp_path / "dist")
    settings = dataclasses.replace(api_settings(tmp_path / "n", monailabel_root_path="/monai"),
                                   viewer=ViewerSettings(ohif_ai_dist=str(dist)))
    api = make_api(settings, series=[phantom])
    c = api.client
    index = dist.joinpath("index.html").read_text()
    for path in ("/", "/viewer?StudyInstanceUIDs=1.2.3", "/segmentation", "/local", "/a/b/c"):
        r = c.get(path)
        assert r.status_code == 200 and r.text == index and r.headers["content-type"].startswith("text/html"), path
    assert c.get("/app-config.js").text.startswith("window.config")
    wasm = c.get("/17dd54813d5acc10bf8f.wasm")
    assert wasm.status_code == 200 and wasm.headers["content-type"] == "application/wasm"
    assert c.get("/assets/logo.svg").text == "<svg/>"
    assert c.head("/app.bundle.js").status_code == 200
    # Missing files and the node's own paths are not the viewer's.
    missing = c.get("/no-such-chunk.js")
    assert missing.status_code == 404 and "index" not in missing.text
    assert c.get("/dicomweb/studies").json()[0]["0020000D"]["Value"] == [phantom.study_instance_uid]
    assert c.get("/monai/info/").json()["name"] == "ainode"
    assert c.get("/info/").json()["name"] == "ainode"
    assert c.get("/v1/status").status_code == 200 and c.get("/health").json() == {"status": "ok"}
    assert c.get("/ohif/app-config.js").status_code == 200  # the bundled OHIF stays at /ohif/
    assert c.get("/v1/no-such-route").status_code == 404  # not the SPA: /v1 is the node's
    # Path tricks stay inside the dist.
    assert c.get("/%2e%2e/%2e%2e/pyproject.toml").status_code in (400, 404)


def test_site_root_viewer_is_public_but_data_is_not(make_api: Any, tmp_path: Path, phantom: PhantomSeries) -> None:
    dist = _fake_dist(tmp_path / "dist")
    settings = dataclasses.replace(
        api_settings(tmp_path / "n", monailabel_root_path="/monai", tokens=(Secret("u:tok-u"),)),
        viewer=ViewerSettings(ohif_ai_dist=str(dist)))
    api = make_api(settings, series=[phantom])
    c = api.client
    for path in ("/", "/viewer", "/app-config.js", "/17dd54813d5acc10bf8f.wasm", "/assets/logo.svg"):
        assert c.get(path).status_code == 200, path
    assert c.get("/dicomweb/studies").status_code == 401
    assert c.get("/monai/info/").status_code == 401 and c.get("/v1/status").status_code == 401
    assert c.post("/monai/infer/segmentation", files=_params(nninter="init")).status_code == 401
    assert c.post("/", content=b"x").status_code == 401  # writes are never public
    auth = {"Authorization": "Bearer tok-u"}
    assert c.get("/dicomweb/studies", headers=auth).status_code == 200


def test_site_root_viewer_needs_an_index(make_api: Any, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    settings = dataclasses.replace(api_settings(tmp_path / "n", monailabel_root_path="/monai"),
                                   viewer=ViewerSettings(ohif_ai_dist=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="ohif_ai_dist"):
        make_api(settings)


# ---------------------------------------------------------------- lassos and scribbles


def test_lassos_and_scribbles_become_boxes_and_clicks() -> None:
    from node.api.monailabel import SCRIBBLE_POINTS, prompts_from_params

    lasso = [[10, 12, 3], [20, 11, 3], [22, 25, 3], [15, 30, 3], [9, 20, 3]]
    scribble = [[5, 5, 3], [5, 40, 3], [45, 40, 3]]  # 75 px long
    p = prompts_from_params({"pos_lassos": [lasso], "neg_lassos": [[[30, 30, 4], [34, 30, 4], [32, 36, 4]]],
                             "pos_scribbles": [scribble], "neg_scribbles": [[[50, 50, 3], [52, 52, 3]]]},
                            n_slices=10, flip=True, shape=(64, 64))
    assert [(b.x0, b.y0, b.x1, b.y1, b.k, b.positive) for b in p.boxes] == [
        (9, 11, 22, 30, 6, True), (30, 30, 34, 36, 5, False)]
    pos = [(q.x, q.y) for q in p.points if q.positive]
    assert len(pos) == SCRIBBLE_POINTS and pos[0] == (5, 5) and pos[-1] == (45, 40)
    # evenly spaced along the stroke (down the first leg, then along the second)
    along = [y - 5 if x == 5 else 35 + (x - 5) for x, y in pos]
    np.testing.assert_allclose(along, np.linspace(0, 75, SCRIBBLE_POINTS), atol=1e-6)
    assert {q.k for q in p.points} == {6}
    neg = [(q.x, q.y) for q in p.points if not q.positive]
    assert neg[0] == (50, 50) and neg[-1] == (52, 52) and len(neg) == 3  # a 2.8 px stroke: 3 points
    # A stroke leaving the image keeps its part inside (clipped to the last row/column).
    out = prompts_from_params({"pos_scribbles": [[[60, 10, 0], [90, 10, 0]]]}, n_slices=1, shape=(64, 64))
    assert max(q.x for q in out.points) == 63


@pytest.mark.parametrize("params,field,words", [
    ({"pos_lassos": [[[1, 1, 0]] * 3] * 33}, "params", "33 polylines, more than api.max_polylines (32)"),
    ({"neg_scribbles": [[[1, 1, 0]] * 2001]}, "params.neg_scribbles", "2001 points, more than api.max_polyline_points"),
    ({"pos_lassos": [[[1, 1, 0], [9, 9, 0]]]}, "params.pos_lassos[0]", "at least 3 points"),
    ({"pos_lassos": [[[1, 1, 0], [9, 1, 0], [5, 1, 0]]]}, "params.pos_lassos[0]", "encloses no area"),
    ({"pos_scribbles": [[[1, 1, 0], [2, 2, 1]]]}, "params.pos_scribbles[0]", "several slices"),
    ({"pos_scribbles": [[[100, 100, 0], [120, 100, 0]]]}, "params.pos_scribbles[0]", "outside the slice"),
    ({"pos_scribbles": [[[1, "a", 0]]]}, "params.pos_scribbles[0][0]", "non-number"),
    ({"pos_lassos": 5}, "params.pos_lassos", "a list is required"),
    ({"pos_scribbles": [[]]}, "params.pos_scribbles[0]", "list of [x, y, z] points"),
])
def test_bad_lassos_and_scribbles_are_precise_422s(params: dict[str, Any], field: str, words: str) -> None:
    from node.api.core import ApiError
    from node.api.monailabel import prompts_from_params

    with pytest.raises(ApiError) as exc:
        prompts_from_params(params, n_slices=4, shape=(64, 64))
    assert exc.value.status == 422 and exc.value.field == field and words in str(exc.value), str(exc.value)


def test_lasso_and_scribble_segment_the_lesion(api: Api, phantom: PhantomSeries) -> None:
    """A lasso around the lesion and a scribble across it, as the viewer's Lasso / Scribble tools send them."""
    k = phantom.k
    ys, xs = np.nonzero(phantom.mask[k])
    cy, cx = ys.mean(), xs.mean()
    ry, rx = (ys.max() - ys.min()) / 2 + 3, (xs.max() - xs.min()) / 2 + 3
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    lasso = [[int(round(cx + rx * np.cos(a))), int(round(cy + ry * np.sin(a))), k] for a in t]
    url = f"/infer/segmentation?image={phantom.series_instance_uid}&output=dicom_seg"
    r = api.client.post(url, files=_params(pos_lassos=[lasso], nninter=True, one=True))
    assert r.status_code == 200, r.text
    _, seg = parse_ohif_ai(r.content, r.headers["content-type"])
    by_lasso = np.frombuffer(seg, np.uint8).reshape(phantom.mask.shape)[k].astype(bool)
    assert _dice(by_lasso, phantom.mask[k]) > 0.7
    api.client.post(url, files=_params(nninter="reset"))
    scribble = [[int(xs.min()) + 2, int(round(cy)), k], [int(round(cx)), int(round(cy)), k],
                [int(xs.max()) - 2, int(round(cy)), k]]
    r = api.client.post(url, files=_params(pos_scribbles=[scribble], nninter=True, one=True))
    assert r.status_code == 200, r.text
    _, seg = parse_ohif_ai(r.content, r.headers["content-type"])
    by_scribble = np.frombuffer(seg, np.uint8).reshape(phantom.mask.shape)[k].astype(bool)
    assert _dice(by_scribble, phantom.mask[k]) > 0.7
    assert all(by_scribble[p[1], p[0]] for p in scribble)  # every clicked point of the stroke is in the mask


# ---------------------------------------------------------------- anandpreshob/OHIF-AI: output=all, file=zip


def _check_fork_answer(r: Any, series: PhantomSeries, viewer_k: int,
                       min_dice: float = 0.7) -> tuple[dict[str, Any], np.ndarray]:
    """Decode as the fork's viewer and as nibabel; both must put the mask on the same voxels."""
    assert r.status_code == 200, r.text
    meta, volume, dims, datatype = parse_ohif_ai_fork(r.content, r.headers["content-type"])
    n, rows, cols = series.mask.shape
    assert dims[:3] == [n, rows, cols] and datatype == 2  # uint8: the viewer reads one byte per voxel
    flipped = meta["flipped"].lower() == "true"
    shown = volume[::-1] if flipped else volume  # the viewer reverses its labelmap slices when flipped
    assert set(np.unique(shown)) <= {0, 1}
    assert shown[viewer_k].sum() > 0, np.nonzero(shown.any(axis=(1, 2)))
    # The part as sent: application/gzip, a .nii.gz file name; nibabel with the affine.
    parts = parse_form_multipart(r.content, r.headers["content-type"])
    headers, data = parts["image"]
    assert headers["content-type"] == "application/gzip" and data[:2] == b"\x1f\x8b"
    assert '.nii.gz"' in headers["content-disposition"]
    img = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    geometry = load_series(series.paths).geometry
    ijk = np.argwhere(np.asarray(img.dataobj) > 0)  # the file's own axes
    world = nib.affines.apply_affine(img.affine, ijk)
    xyk = np.rint(nib.affines.apply_affine(np.linalg.inv(geometry.affine_ras), world)).astype(int)
    in_node_order = np.zeros(series.mask.shape, bool)
    in_node_order[xyk[:, 2], xyk[:, 1], xyk[:, 0]] = True
    # The same voxels as the viewer shows (node order = the file's slice order; the viewer flips it back).
    np.testing.assert_array_equal(in_node_order, volume.astype(bool))
    assert _dice(in_node_order[series.k], series.mask[series.k]) > min_dice  # on the lesion, at its place
    params = json.loads(parts["params"][1])
    assert list(params)[:5] == ["prompt_info", "flipped", "nninter_elapsed", "sam_elapsed", "label_name"]
    assert params["voxel_count"] == int(volume.sum())
    return meta, volume


def test_fork_direct_format_with_zip_upload(api: Api, phantom: PhantomSeries) -> None:
    """Deployment guide:
    ``-F file=@series.zip -F 'params={"nninter":"sam3","pos_points":[[x,y,z]],"neg_points":[]}'``."""
    x, y = phantom.center
    k = phantom.k
    init = api.client.post("/infer/segmentation", files=_upload(phantom, nninter="init"))
    assert init.status_code == 200 and init.json() == {}  # the guide's "Expected output: {}"
    r = api.client.post("/infer/segmentation",
                        files=_upload(phantom, nninter="sam3", pos_points=[[round(x), round(y), k]], neg_points=[]))
    meta, volume = _check_fork_answer(r, phantom, k)
    assert meta["flipped"] == "false" and json.loads(meta["prompt_info"])["pos_points"] == [[round(x), round(y), k]]
    assert b"prompt_info" in r.content[:500]  # what the guide greps for
    # The same prompt through the viewer's output=all path (postToMonaiWithImageId) and the explicit query.
    r2 = api.client.post("/infer/segmentation?output=all",
                         files=_upload(phantom, nninter="sam3", pos_points=[[round(x), round(y), k]], neg_points=[]))
    np.testing.assert_array_equal(parse_ohif_ai_fork(r2.content, r2.headers["content-type"])[1], volume)
    reset = api.client.post("/infer/segmentation", files=_upload(phantom, nninter="reset"))
    assert reset.status_code == 200 and reset.json() == {}
    assert not any((api.settings.data_path / "uploads").iterdir())  # uploads are not kept


def test_fork_prompt_info_points_and_boxes(api: Api, phantom: PhantomSeries) -> None:
    """The guide's OHIF format: ``prompt_info`` points (click / erase) and boxes (x, y, width, height)."""
    x, y = phantom.center
    k = phantom.k
    x0, y0, x1, y1 = phantom.box
    point = {"type": "point", "data": {"pointType": "click", "slice": k, "x": round(x), "y": round(y)}}
    r = api.client.post("/infer/segmentation", files=_upload(phantom, nninter="sam3", prompt_info=[point]))
    _, by_info = _check_fork_answer(r, phantom, k)
    direct = api.client.post("/infer/segmentation",
                             files=_upload(phantom, nninter="sam3", pos_points=[[round(x), round(y), k]]))
    np.testing.assert_array_equal(by_info, parse_ohif_ai_fork(direct.content, direct.headers["content-type"])[1])
    box = {"type": "box", "data": {"pointType": "click", "slice": k, "x": x0, "y": y0, "width": x1 - x0,
                                   "height": y1 - y0}}
    r = api.client.post("/infer/segmentation", files=_upload(phantom, nninter="sam3", prompt_info=[box]))
    _, by_box = _check_fork_answer(r, phantom, k)
    flat = api.client.post("/infer/segmentation",  # the guide's direct box form [x1, y1, x2, y2, z]
                           files=_upload(phantom, nninter="sam3", pos_boxes=[[x0, y0, x1, y1, k]]))
    np.testing.assert_array_equal(by_box, parse_ohif_ai_fork(flat.content, flat.headers["content-type"])[1])
    # A negative box over the right half of the lesion clears it on that slice.
    cut = {"type": "box", "data": {"pointType": "erase", "slice": k, "x": x, "y": y0, "width": x1 - x,
                                   "height": y1 - y0}}
    r = api.client.post("/infer/segmentation",
                        files=_upload(phantom, nninter="sam3", prompt_info=[box, cut], one=True))
    _, halved = _check_fork_answer(r, phantom, k, min_dice=0.3)
    assert 0 < halved[k].sum() < by_box[k].sum() and not halved[k][:, int(np.ceil(x)) + 1:].any()


def test_fork_answer_on_a_flipped_series(make_api: Any, tmp_path: Path) -> None:
    """Instance numbers descending: the fork's viewer reverses the slices; both decodings still agree."""
    flipped = make_phantom_series(tmp_path / "f", descending_instance_numbers=True)
    api = make_api(series=[flipped])
    n = flipped.mask.shape[0]
    x, y = flipped.center
    kc = n - 1 - flipped.k  # the viewer's slice index
    r = api.client.post(f"/infer/segmentation?image={flipped.series_instance_uid}&output=all",
                        files=_params(nninter="sam3", pos_points=[[round(x), round(y), kc]], one=True))
    meta, volume = _check_fork_answer(r, flipped, kc)
    assert meta["flipped"] == "true" and volume[flipped.k].sum() > 0 and volume.sum() == volume[flipped.k].sum()


@pytest.mark.parametrize("info,field,words", [
    ([{"type": "lasso", "data": {"x": 1, "y": 1, "slice": 0}}], "params.prompt_info[0].type", "'point' or 'box'"),
    ([{"type": "point", "data": {"pointType": "add", "x": 1, "y": 1, "slice": 0}}],
     "params.prompt_info[0].data.pointType", "'click'"),
    ([{"type": "point", "data": {"x": 1, "y": 1}}], "params.prompt_info[0].data.slice", "a number is required"),
    ([{"type": "box", "data": {"x": 1, "y": 1, "slice": 0, "width": "w", "height": 3}}],
     "params.prompt_info[0].data.width", "a number is required"),
    ([{"type": "point", "data": {"x": 1, "y": 1, "slice": 1.5}}], "params.prompt_info[0].data.slice", "not an integer"),
    (["x"], "params.prompt_info[0]", "an object"),
    ([{"type": "point", "data": {"x": 1, "y": 1, "slice": 0}}] * 257, "params.prompt_info", "257 entries"),
])
def test_bad_prompt_info_is_a_precise_422(api: Api, phantom: PhantomSeries, info: list[Any], field: str,
                                          words: str) -> None:
    r = api.client.post(f"/infer/segmentation?image={phantom.series_instance_uid}",
                        files=_params(nninter="sam3", prompt_info=info))
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and words in r.json()["error"], r.json()
    assert len(r.json()["error"]) < 400


def test_nifti_kyx_axes_keep_the_patient_position(tmp_path: Path) -> None:
    """write_nifti(axes="kyx"): slice-fastest storage, the affine permuted so every voxel keeps its place."""
    from dicom_io.nifti import read_nifti, write_nifti

    series = make_phantom_series(tmp_path / "p", shape=(5, 12, 9), orientation=(0.8, 0.6, 0, -0.6, 0.8, 0))
    geometry = load_series(series.paths).geometry
    vol = np.zeros(series.mask.shape, np.uint8)
    vol[1, 2, 3] = vol[4, 11, 8] = 1
    a = write_nifti(vol, geometry, tmp_path / "a.nii.gz", dtype="uint8", axes="kyx")
    b = write_nifti(vol, geometry, tmp_path / "b.nii.gz", dtype="uint8")
    ia, ib = nib.load(a), nib.load(b)
    assert ia.shape == (5, 12, 9) and ib.shape == (9, 12, 5)
    raw = gzip.decompress(a.read_bytes())
    offset = max(352, int(np.ceil(np.frombuffer(raw[108:112], "<f4")[0])))  # as the fork's parseNifti
    # Z fastest in the file: voxel (k, y, x) at k + K * (y + Y * x)
    assert raw[offset + 1 + 5 * (2 + 12 * 3)] == 1 and raw[offset + 4 + 5 * (11 + 12 * 8)] == 1
    for img in (ia, ib):
        pts = nib.affines.apply_affine(img.affine, np.argwhere(np.asarray(img.dataobj) > 0))
        expected = nib.affines.apply_affine(geometry.affine_ras, [[3, 2, 1], [8, 11, 4]])
        np.testing.assert_allclose(sorted(map(tuple, pts)), sorted(map(tuple, expected)), atol=1e-4)
    np.testing.assert_allclose(ia.get_qform(), ia.get_sform(), atol=1e-4)  # the qform holds the permutation too
    assert np.array_equal(read_nifti(b)[0], vol)
    with pytest.raises(ValueError, match="axes"):
        write_nifti(vol, geometry, tmp_path / "c.nii.gz", axes="zyx")  # type: ignore[arg-type]


def test_settings_have_the_new_keys() -> None:
    assert ApiSettings().monailabel_root_path == "" and ViewerSettings().ohif_ai_dist == ""
