"""Sessions of several segments (native, OHIF-AI, MONAI Label): one SEG with all of them; NIfTI label map + sidecar."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom

from api_helpers import Api, PhantomSeries
from dicom_io.seg import read_seg_masks
from dicom_io.series import load_series
from node.api.native import unpack_mask


def _mask(api: Api, sid: str) -> np.ndarray:
    r = api.client.get(f"/v1/sessions/{sid}/mask?output=bin")
    return unpack_mask(r.content, tuple(int(v) for v in r.headers["x-mask-shape"].split(",")))  # type: ignore[arg-type]


def _second_box(ph: PhantomSeries) -> dict[str, Any]:
    """A box on the other side of the slice from the lesion (the lesion is in the right lung, image left)."""
    _, rows, cols = ph.mask.shape
    return {"boxes": [{"ijk": [[cols - 22, rows // 2 - 8, ph.k], [cols - 8, rows // 2 + 8, ph.k]]}]}


def test_native_session_of_two_segments_commits_one_seg(api: Api, phantom: PhantomSeries) -> None:
    c = api.client
    r = c.post("/v1/sessions", json={"series": {"series_instance_uid": phantom.series_instance_uid},
                                     "segment": {"label": "Nodule", "color": "#ff0000"}})
    sid = r.json()["id"]
    x0, y0, x1, y1 = phantom.box
    assert c.post(f"/v1/sessions/{sid}/prompts",
                  json={"boxes": [{"ijk": [[x0, y0, phantom.k], [x1, y1, phantom.k]]}]}).status_code == 200
    first = _mask(api, sid)
    nxt = c.post(f"/v1/sessions/{sid}/segments", json={"segment": {"label": "Other", "color": "#00ff00",
                                                                   "type": "SCT^4147007^Mass"}})
    assert nxt.status_code == 201, nxt.text
    assert [s["label"] for s in nxt.json()["segments"]] == ["Nodule", "Other"] and nxt.json()["segment_number"] == 2
    assert nxt.json()["steps"] == 0 and nxt.json()["links"]["segments"] == f"/v1/sessions/{sid}/segments"
    assert c.post(f"/v1/sessions/{sid}/prompts", json=_second_box(phantom)).status_code == 200
    second = _mask(api, sid)
    assert first.any() and second.any()
    commit = c.post(f"/v1/sessions/{sid}/commit", json={"outputs": ["seg", "nifti"]})
    assert commit.status_code == 201, commit.text
    res = commit.json()
    assert res["segments"] == ["Nodule", "Other"] and res["seg_format"] == "binary"
    assert res["voxel_count"] == int((first | second).sum())
    ds = pydicom.dcmread(io.BytesIO(c.get(res["links"]["seg"]).content))
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["Nodule", "Other"]
    assert ds.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "4147007"
    path = Path(api.ctx.results_dir / res["id"] / "seg.dcm")
    path.write_bytes(c.get(res["links"]["seg"]).content)
    back, _ = read_seg_masks(path, load_series(phantom.paths))
    assert np.array_equal(back[0], first) and np.array_equal(back[1], second)
    # NIfTI: one label map (or a bitmask where the two overlap) and a sidecar naming each value
    values = np.asarray(nib.load(Path(api.ctx.results_dir / res["id"]).glob("*.nii.gz").__next__()).dataobj)
    sidecar = json.loads(next(Path(api.ctx.results_dir / res["id"]).glob("*.segments.json")).read_text())
    assert [s["label"] for s in sidecar["segments"]] == ["Nodule", "Other"]
    assert [s["color"] for s in sidecar["segments"]] == ["#ff0000", "#00ff00"]
    vol = values.transpose(2, 1, 0)
    if sidecar["encoding"] == "labelmap":
        assert not (first & second).any()
        assert np.array_equal(vol == 1, first) and np.array_equal(vol == 2, second)
    else:
        assert (first & second).any()
        assert np.array_equal((vol & 1) > 0, first) and np.array_equal((vol & 2) > 0, second)
    # undo/reset act on the segment being refined only; the finished one stays
    assert c.post(f"/v1/sessions/{sid}/reset").status_code == 200
    again = c.post(f"/v1/sessions/{sid}/commit", json={"outputs": ["seg"]})
    assert again.status_code == 201 and again.json()["segments"] == ["Nodule"]


def _params(**kw: Any) -> dict[str, Any]:
    return {"params": (None, json.dumps(kw))}


def test_ohif_ai_new_segment_then_commit_writes_both(api: Api, phantom: PhantomSeries) -> None:
    url = f"/infer/segmentation?image={phantom.series_instance_uid}&output=dicom_seg"
    base = {"largest_cc": False, "result_extension": ".nii.gz", "result_dtype": "uint16", "result_compress": False,
            "studyInstanceUID": phantom.study_instance_uid, "restore_label_idx": False}
    assert api.client.post(url, files=_params(**base, nninter="init")).status_code == 200
    series = load_series(phantom.paths)
    n = phantom.mask.shape[0]
    flipped = int(series.source_datasets[0].InstanceNumber) > int(series.source_datasets[1].InstanceNumber)
    kc = n - 1 - phantom.k if flipped else phantom.k
    x0, y0, x1, y1 = phantom.box
    one = api.client.post(url, files=_params(**base, pos_boxes=[[[x0, y0, kc], [x1, y1, kc]]], nninter=False,
                                             one=True))
    assert one.status_code == 200, one.text
    # "New" in the viewer: nninter reset, then the prompts of segment 2
    assert api.client.post(url, files=_params(**base, nninter="reset")).status_code == 200
    _, rows, cols = phantom.mask.shape
    two = api.client.post(url, files=_params(**base, pos_boxes=[[[cols - 22, rows // 2 - 8, kc],
                                                                  [cols - 8, rows // 2 + 8, kc]]],
                                             nninter=False, one=True))
    assert two.status_code == 200, two.text
    session = api.ctx.sessions.find("anonymous", phantom.series_instance_uid, "litemedsam")
    assert session is not None and len(session.finished) == 1 and len(session.steps) == 1
    specs, _ = session.segments()
    assert [s.label for s in specs] == ["Segment", "Segment 2"] and specs[0].color != specs[1].color
    commit = api.client.post(f"/v1/sessions/{session.id}/commit", json={"outputs": ["seg"]})
    assert commit.status_code == 201, commit.text
    ds = pydicom.dcmread(io.BytesIO(api.client.get(commit.json()["links"]["seg"]).content))
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["Segment", "Segment 2"]


def test_monailabel_session_labels_are_segments_of_one_seg(api: Api, phantom: PhantomSeries) -> None:
    files = [("files", (p.name, p.read_bytes(), "application/dicom")) for p in phantom.paths]
    sid = api.client.put("/session/?expiry=60", files=files).json()["session_id"]
    x, y = phantom.center
    _, rows, cols = phantom.mask.shape
    for name, point, colour in (("lesion", [x, y, phantom.k], [255, 0, 0]),
                                ("other", [cols - 15, rows // 2, phantom.k], [0, 0, 255])):
        r = api.client.post(f"/infer/sam_2d?session_id={sid}&output=dicom_seg",
                            files=_params(foreground=[point], label_info=[{"name": name, "color": colour}]))
        assert r.status_code == 200, r.text
    ds = pydicom.dcmread(io.BytesIO(r.content))
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["lesion", "other"]
    # the same label again replaces its segment
    r = api.client.post(f"/infer/sam_2d?session_id={sid}&output=dicom_seg",
                        files=_params(foreground=[[x, y, phantom.k]], label_info=[{"name": "lesion"}]))
    assert [s.SegmentLabel for s in pydicom.dcmread(io.BytesIO(r.content)).SegmentSequence] == ["lesion", "other"]
