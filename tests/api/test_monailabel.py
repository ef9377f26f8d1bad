"""Contract tests: the exact requests MONAI Label, OHIF-AI and AIAA clients send, parsed as those clients do."""

from __future__ import annotations

import gzip
import io
import json
import time
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from api_helpers import Api, PhantomSeries, api_settings
from clients import parse_form_multipart, parse_nrrd, parse_ohif_ai
from dicom_io.nifti import write_nifti
from dicom_io.series import load_series


def _params(**kw: Any) -> dict[str, Any]:
    """A multipart body with one plain ``params`` field, as ``FormData.append('params', JSON)`` sends it."""
    return {"params": (None, json.dumps(kw))}


def test_info_lists_models_with_type_labels_dimension(api: Api) -> None:
    info = api.client.get("/info/").json()
    assert info["name"] == "ainode"
    for name, dim in (("sam_2d", 2), ("sam_3d", 3), ("litemedsam", 3), ("litemedsam_2d", 2), ("segmentation", 3)):
        m = info["models"][name]
        assert m["type"] == "deepgrow" and m["dimension"] == dim and "Segment" in m["labels"]
    assert "sam2" not in info["models"]  # no checkpoint configured
    assert api.client.get("/info").status_code == 200


def test_ohif_v3_plugin_infer_image_nrrd(api: Api, phantom: PhantomSeries) -> None:
    """MonaiLabelClient.js: POST infer/{model}?image=<SeriesUID>&output=image, params form field, NRRD back."""
    x, y = phantom.center
    params = _params(foreground=[[x, y, phantom.k]], background=[], result_extension=".nrrd", result_dtype="uint8",
                     result_compress=False, restore_label_idx=False)
    r = api.client.post(f"/infer/sam_2d?image={phantom.series_instance_uid}&output=image", files=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"].endswith('.nrrd"')
    fields, arr = parse_nrrd(r.content)
    series = load_series(phantom.paths)
    assert arr.shape == phantom.mask.shape  # (slices, rows, columns): first NRRD axis is the column
    assert fields["space"] == "left-posterior-superior"
    origin = [float(v) for v in fields["space origin"].strip("()").split(",")]
    np.testing.assert_allclose(origin, series.geometry.affine[:3, 3], atol=1e-4)
    assert arr[phantom.k].sum() > 0 and arr.sum() == arr[phantom.k].sum()


def test_monailabel_output_all_multipart_params_and_image(api: Api, phantom: PhantomSeries) -> None:
    x0, y0, x1, y1 = phantom.box
    # MONAI Label SAM2's roi + slice
    r = api.client.post(f"/infer/litemedsam_2d?image={phantom.series_instance_uid}",
                        files=_params(roi=[x0, y0, x1, y1, phantom.k, phantom.k], slice=phantom.k))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("multipart/form-data; boundary=")
    parts = parse_form_multipart(r.content, r.headers["content-type"])
    assert list(parts) == ["params", "image"]
    meta = json.loads(parts["params"][1])
    assert meta["label_names"] == {"Segment": 1} and "latencies" in meta and meta["voxel_count"] > 0
    headers, data = parts["image"]
    assert 'filename="' in headers["content-disposition"] and ".nii.gz" in headers["content-disposition"]
    img = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    series = load_series(phantom.paths)
    np.testing.assert_allclose(img.affine, series.geometry.affine_ras, atol=1e-4)
    assert int(np.asarray(img.dataobj).sum()) == meta["voxel_count"]

    js = api.client.post(f"/infer/litemedsam_2d?image={phantom.series_instance_uid}&output=json",
                         files=_params(roi=[x0, y0, x1, y1, phantom.k, phantom.k], slice=phantom.k))
    assert js.headers["content-type"] == "application/json" and js.json()["voxel_count"] == meta["voxel_count"]


def test_dicom_seg_output_is_readable_by_highdicom(api: Api, phantom: PhantomSeries) -> None:
    x, y = phantom.center
    r = api.client.post(f"/infer/sam_2d?image={phantom.series_instance_uid}&output=dicom_seg",
                        files=_params(foreground=[[x, y, phantom.k]],
                                      label_info=[{"name": "lesion", "idx": 1, "color": [255, 0, 0]}]))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom"
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(r.content)))
    assert seg.get_segment_description(1).segment_label == "lesion"
    series = load_series(phantom.paths)
    arr = seg.get_pixels_by_source_instance([uid for uid, _ in series.frame_refs], segment_numbers=[1],
                                            combine_segments=True, assert_missing_frames_are_empty=True)
    assert arr[phantom.k].sum() > 0 and arr.sum() == arr[phantom.k].sum()


def test_ohif_ai_init_prompts_streamed_meta_seg_and_reset(api: Api, phantom: PhantomSeries) -> None:
    """commandsModule.ts: every call POSTs /infer/segmentation?image=<uid>&output=dicom_seg with one params field."""
    base = {"largest_cc": False, "result_extension": ".nii.gz", "result_dtype": "uint16", "result_compress": False,
            "studyInstanceUID": phantom.study_instance_uid, "restore_label_idx": False}
    url = f"/infer/segmentation?image={phantom.series_instance_uid}&output=dicom_seg"
    init = api.client.post(url, files=_params(**base, nninter="init"))
    assert init.status_code == 200 and init.headers["content-type"] == "application/json"
    assert init.json() == "/code/predictions/init.nii.gz"

    n = phantom.mask.shape[0]
    series = load_series(phantom.paths)
    flipped = int(series.source_datasets[0].InstanceNumber) > int(series.source_datasets[1].InstanceNumber)
    kc = n - 1 - phantom.k if flipped else phantom.k  # the viewer's slice index
    x0, y0, x1, y1 = phantom.box
    r = api.client.post(url, files=_params(**base, pos_points=[], neg_points=[], pos_boxes=[[[x0, y0, kc],
                                                                                            [x1, y1, kc]]],
                                           texts=[], nninter=False, medsam2=False, one=True))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("multipart/form-data; boundary=monai-")
    meta, seg = parse_ohif_ai(r.content, r.headers["content-type"])
    # Every field but label_name is a JSON-encoded string, as OHIF-AI's server sends it (the viewer calls
    # meta.flipped.toLowerCase()).
    assert meta["flipped"] == ("true" if flipped else "false") and meta["label_name"].startswith("sam2_pred_")
    assert meta["nninter_elapsed"] == "null" and float(meta["sam_elapsed"]) >= 0
    assert json.loads(meta["prompt_info"])["pos_boxes"] == [[[x0, y0, kc], [x1, y1, kc]]]
    vol = np.frombuffer(seg, dtype=np.uint8).reshape(phantom.mask.shape)
    assert set(np.unique(vol)) <= {0, 1}
    assert vol[phantom.k].sum() > 0 and vol.sum() == vol[phantom.k].sum()

    # The viewer resends all prompts of the segment plus the new click; the session keeps them.
    x, y = phantom.center
    r2 = api.client.post(url, files=_params(**base, pos_points=[[x, y, kc]], neg_points=[],
                                            pos_boxes=[[[x0, y0, kc], [x1, y1, kc]]], nninter=True, one=True))
    meta2, seg2 = parse_ohif_ai(r2.content, r2.headers["content-type"])
    assert "nninter_elapsed" in meta2 and len(seg2) == phantom.mask.size
    session = api.ctx.sessions.find("anonymous", phantom.series_instance_uid, "litemedsam")
    assert session is not None and len(session.steps) == 2
    reset = api.client.post(url, files=_params(**base, nninter="reset"))
    assert reset.json() == "/code/predictions/reset.nii.gz" and not session.steps


def test_xnat_monailabel_session_upload_then_infer_nifti(api: Api, phantom: PhantomSeries, tmp_path: Path) -> None:
    """XNAT viewer: PUT /session/?expiry=7200&uncompress=false (files=image.nii.gz), then infer by session_id."""
    series = load_series(phantom.paths)
    nii = write_nifti(series.voxels, series.geometry, tmp_path / "image.nii.gz")
    put = api.client.put("/session/?expiry=7200&uncompress=false",
                         files=[("files", ("image.nii.gz", nii.read_bytes(), "application/octet-stream"))],
                         data={"params": "{}"})  # a plain field next to the file
    assert put.status_code == 200, put.text
    sid = put.json()["session_id"]
    assert put.json()["session_info"]["expiry"] <= 7200
    assert api.client.get(f"/session/{sid}?update_ts=true").status_code == 200
    x, y = phantom.center
    r = api.client.post(f"/infer/sam_2d?model=sam_2d&session_id={sid}&output=image",
                        files=_params(result_extension=".nii.gz", result_dtype="uint8", result_compress=True,
                                      foreground=[[x, y, phantom.k]], background=[]))
    assert r.status_code == 200, r.text
    img = nib.Nifti1Image.from_bytes(gzip.decompress(r.content))
    np.testing.assert_allclose(img.affine, nib.load(nii).affine, atol=1e-4)
    data = np.asarray(img.dataobj).transpose(2, 1, 0)
    assert data.dtype == np.uint8 and data[phantom.k].sum() > 0
    seg = api.client.post(f"/infer/sam_2d?session_id={sid}&output=dicom_seg",
                          files=_params(foreground=[[x, y, phantom.k]]))
    assert seg.status_code == 422 and "NIfTI" in seg.json()["error"]
    assert api.client.delete(f"/session/{sid}").status_code == 200
    assert api.client.get(f"/session/{sid}").status_code == 404


def test_monailabel_session_with_dicom_files(api: Api, phantom: PhantomSeries) -> None:
    files = [("files", (p.name, p.read_bytes(), "application/dicom")) for p in phantom.paths]
    put = api.client.put("/session/?expiry=60", files=files)
    assert put.status_code == 200, put.text
    sid = put.json()["session_id"]
    x, y = phantom.center
    r = api.client.post(f"/infer/sam_2d?session_id={sid}&output=json", files=_params(foreground=[[x, y, phantom.k]]))
    assert r.status_code == 200 and r.json()["voxel_count"] > 0


def test_aiaa_models_session_deepgrow_dextr3d(api: Api, phantom: PhantomSeries, tmp_path: Path) -> None:
    models = api.client.get("/v1/models").json()
    assert isinstance(models, list)
    by_name = {m["name"]: m for m in models}
    assert by_name["litemedsam"]["type"] == "deepgrow" and by_name["litemedsam"]["deepgrow"] == "3D"
    assert by_name["litemedsam_2d"]["deepgrow"] == "2D"
    assert by_name["litemedsam_annotation"]["type"] == "annotation"
    assert [m["name"] for m in api.client.get("/v1/models?type=annotation").json()] == ["litemedsam_annotation"]

    series = load_series(phantom.paths)
    nii = write_nifti(series.voxels, series.geometry, tmp_path / "image.nii.gz")
    put = api.client.put("/session/?expiry=7200", files={"image": ("image.nii.gz", nii.read_bytes())},
                         data={"params": "{}"})  # a plain field next to the file
    assert put.status_code == 200, put.text
    sid = put.json()["session_id"]
    x, y = phantom.center
    common = {"result_extension": ".nii.gz", "result_dtype": "uint16", "result_compress": True}
    r = api.client.post(f"/v1/deepgrow?model=litemedsam_2d&session_id={sid}&output=image",
                        files=_params(**common, foreground=[[x, y, phantom.k]], background=[]),
                        headers={"Accept": "multipart/form-data"})
    assert r.status_code == 200, r.text
    img = nib.Nifti1Image.from_bytes(gzip.decompress(r.content))
    assert img.get_data_dtype() == np.uint16 and np.asarray(img.dataobj)[:, :, phantom.k].sum() > 0

    x0, y0, x1, y1 = phantom.box
    k = phantom.k
    extreme = [[x0 + 3, (y0 + y1) / 2, k], [x1 - 3, (y0 + y1) / 2, k], [(x0 + x1) / 2, y0 + 3, k],
               [(x0 + x1) / 2, y1 - 3, k], [(x0 + x1) / 2, (y0 + y1) / 2, k], [(x0 + x1) / 2, (y0 + y1) / 2, k]]
    d = api.client.post(f"/v1/dextr3d?model=litemedsam_annotation&session_id={sid}",
                        files=_params(**common, points=json.dumps(extreme)))
    assert d.status_code == 200, d.text
    parts = parse_form_multipart(d.content, d.headers["content-type"])
    assert json.loads(parts["params"][1])["voxel_count"] > 0

    missing = api.client.post(f"/v1/deepgrow?session_id={sid}", files=_params(foreground=[[x, y, k]]))
    assert missing.status_code == 422 and "model" in missing.json()["error"]
    unknown = api.client.post(f"/v1/deepgrow?model=nnunet&session_id={sid}", files=_params(foreground=[[x, y, k]]))
    assert unknown.status_code == 404 and "nnunet" in unknown.json()["error"]


def test_aiaa_expired_session_is_440(make_api: Any, tmp_path: Path, phantom: PhantomSeries) -> None:
    api = make_api(api_settings(tmp_path / "s", session_ttl_seconds=0.2), series=[phantom])
    files = [("files", (p.name, p.read_bytes(), "application/dicom")) for p in phantom.paths]
    sid = api.client.put("/session/", files=files).json()["session_id"]
    time.sleep(0.3)
    r = api.client.get(f"/session/{sid}?update_ts=true")
    assert r.status_code == 440 and "expired" in r.json()["error"]
    r = api.client.post(f"/v1/deepgrow?model=litemedsam&session_id={sid}&output=image",
                        files=_params(foreground=[[1, 1, 1]]))
    assert r.status_code == 440


@pytest.mark.parametrize("url,form,status,words", [
    ("/infer/sam_2d?image={uid}", {"params": "{bad"}, 400, ["params", "malformed JSON"]),
    ("/infer/sam_2d?image={uid}", {"params": "[]"}, 400, ["params", "JSON object"]),
    ("/infer/sam_2d?image={uid}", {"params": "{}"}, 422, ["params", "no prompt"]),
    ("/infer/sam_2d", {"params": json.dumps({"foreground": [[1, 1, 1]]})}, 422, ["image"]),
    ("/infer/sam_2d?image=undefined", {"params": json.dumps({"foreground": [[1, 1, 1]]})}, 422, ["image"]),
    ("/infer/sam_2d?image=1.2.3.4.5", {"params": json.dumps({"foreground": [[1, 1, 1]]})}, 404, ["1.2.3.4.5"]),
    ("/infer/deepedit?image={uid}", {"params": json.dumps({"foreground": [[1, 1, 1]]})}, 404, ["model", "deepedit"]),
    ("/infer/sam_2d?image={uid}&output=png", {"params": "{}"}, 422, ["output", "png"]),
    ("/infer/sam_2d?image={uid}", {"params": json.dumps({"foreground": [[1, 1, 77]]})}, 422, ["slice 77"]),
    ("/infer/sam_2d?image={uid}", {"params": json.dumps({"foreground": [[1, 1]]})}, 422, ["params.foreground[0]"]),
    ("/infer/sam_2d?image={uid}", {"params": json.dumps({"pos_boxes": [[[1, 1, 2], [9, 9, 3]]]})}, 422,
     ["params.pos_boxes[0]", "different slices"]),
    ("/infer/sam_2d?image={uid}", {"params": json.dumps({"foreground": [[1, 1, 4]],
                                                         "result_extension": ".png"})}, 422,
     ["params.result_extension"]),
    ("/session/{uid}", None, 404, ["does not exist"]),
])
def test_compat_bad_requests(api: Api, phantom: PhantomSeries, url: str, form: dict[str, str] | None, status: int,
                             words: list[str]) -> None:
    url = url.format(uid=phantom.series_instance_uid)
    r = api.client.get(url) if form is None else api.client.post(url, files={k: (None, v) for k, v in form.items()})
    assert r.status_code == status, r.text
    for w in words:
        assert w in r.json()["detail"], (w, r.json())


def test_uploaded_zip_file_each_call_like_anandpreshob_ohif_ai(api: Api, phantom: PhantomSeries,
                                                               tmp_path: Path) -> None:
    """``curl -F file=@series.zip -F params=...`` to /infer/segmentation?output=all (upload on every call)."""
    import zipfile

    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in phantom.paths:
            zf.write(p, p.name)
    x, y = phantom.center
    r = api.client.post("/infer/sam_2d?output=all", files={"file": ("series.zip", archive.read_bytes()),
                                                         **_params(foreground=[[x, y, phantom.k]])})
    assert r.status_code == 200, r.text
    parts = parse_form_multipart(r.content, r.headers["content-type"])
    assert json.loads(parts["params"][1])["voxel_count"] > 0
    assert not any((api.settings.data_path / "uploads").iterdir())  # the upload is not kept


def test_ohif_ai_flipped_series(make_api: Any, tmp_path: Path, phantom: PhantomSeries) -> None:
    """Instance numbers descending along the normal: OHIF-AI's z counts from the other end, meta.flipped is true."""
    from api_helpers import make_phantom_series

    flipped = make_phantom_series(tmp_path / "f", descending_instance_numbers=True)
    api = make_api(series=[flipped])
    n = flipped.mask.shape[0]
    x0, y0, x1, y1 = flipped.box
    kc = n - 1 - flipped.k
    r = api.client.post(f"/infer/segmentation?image={flipped.series_instance_uid}&output=dicom_seg",
                        files=_params(pos_boxes=[[[x0, y0, kc], [x1, y1, kc]]], nninter=False, one=True))
    assert r.status_code == 200, r.text
    meta, seg = parse_ohif_ai(r.content, r.headers["content-type"])
    assert meta["flipped"] == "true"
    vol = np.frombuffer(seg, dtype=np.uint8).reshape(flipped.mask.shape)
    assert vol[flipped.k].sum() > 0 and vol.sum() == vol[flipped.k].sum()


def test_logs_carry_uids_never_patient_identifiers(api: Api, phantom: PhantomSeries,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    x, y = phantom.center
    r = api.client.post(f"/infer/sam_2d?image={phantom.series_instance_uid}&output=dicom_seg",
                        files=_params(foreground=[[x, y, phantom.k]]))
    assert r.status_code == 200
    bad = api.client.post("/v1/segmentations", json={"series": phantom.series_instance_uid,
                                                     "prompts": {"points": [{"ijk": [1, 1, 99]}]}})
    assert bad.status_code == 422
    assert phantom.series_instance_uid in caplog.text
    assert "Phantom^Test" not in caplog.text and "PHANTOM001" not in caplog.text


@pytest.mark.parametrize("params", [
    {"foreground": {"a": 1}}, {"foreground": [None]}, {"foreground": [[1, "x", 2]]}, {"foreground": "[[1,2"},
    {"points": [[1, 1, 1]], "point_labels": ["a"]}, {"points": [[1, 1, 1]], "point_labels": [1, 0]},
    {"pos_boxes": [[1, 2, 3]]}, {"pos_boxes": [[[1, 1, 1]]]}, {"roi": [1, 2, 3]}, {"roi": [1, 1, 9, 9, 1, 1],
                                                                                     "slice": "top"},
    {"foreground": [[1e9, 1, 1]]}, {"foreground": [[float("nan"), 1, 1]]}, {"result_dtype": "float64",
                                                                            "foreground": [[20, 30, 4]]},
    {"nninter": "bogus"}, {"label_info": "x", "foreground": [[1, 1, 400]]},
])
def test_odd_params_never_500(api: Api, phantom: PhantomSeries, params: dict[str, Any]) -> None:
    r = api.client.post(f"/infer/sam_2d?image={phantom.series_instance_uid}&output=image",
                        files={"params": (None, json.dumps(params))})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.json()["detail"]


def test_malformed_multipart_is_400(api: Api, phantom: PhantomSeries) -> None:
    r = api.client.post(f"/infer/sam_2d?image={phantom.series_instance_uid}", content=b"--x\r\nbroken",
                        headers={"content-type": "multipart/form-data; boundary=y"})
    assert 400 <= r.status_code < 500
