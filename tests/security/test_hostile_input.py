"""The independent attack of issue 18, kept in the suite: every repro is a precise 4xx, bounded in time.

Nested JSON on every JSON body and ``params`` field, a damaged ``.nii.gz``, many-member zip bombs and
junk members, unbounded echo of user input, 10,000-point prompts, and the small gaps (wrong study,
±1e300 boxes, non-ASCII digits, NUL in a label, ``Allow`` of a 405).
"""

from __future__ import annotations

import io
import json
import logging
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from api_helpers import make_phantom_series
from config.settings import InputSettings
from dicom_io.sources import is_dicom_file
from hostile import damaged_nifti_gz, nested_json, zip_of_copies
from sec_helpers import settings_for


@pytest.fixture
def ph(tmp_path: Path) -> Any:
    return make_phantom_series(tmp_path / "ph")


def _session(c: Any, ph: Any) -> str:
    r = c.post("/v1/sessions", json={"series": ph.series_instance_uid})
    assert r.status_code == 201, r.text[:300]
    return str(r.json()["id"])


def test_nested_json_is_400_naming_the_depth_limit_everywhere(make_app: Any, tmp_path: Path, ph: Any) -> None:
    app = make_app(settings_for(tmp_path / "node"), ph.paths)
    c = app.client
    sid = _session(c, ph)
    body = nested_json()
    t0 = time.monotonic()
    for path in ("/v1/segmentations", "/v1/sessions", f"/v1/sessions/{sid}/prompts", f"/v1/sessions/{sid}/commit"):
        r = c.post(path, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (path, r.status_code, r.text[:300])
        assert "api.max_json_depth (32)" in r.json()["error"] and r.json()["field"] == "body"
    # A nested list inside an object, in a field the handler reads.
    r = c.post("/v1/segmentations", content=b'{"series": ' + body + b"}", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "max_json_depth" in r.json()["error"]
    # The params field of MONAI Label, OHIF-AI and AIAA, as a form field and as a file part.
    for path in (f"/infer/segmentation?image={ph.series_instance_uid}&output=json",
                 f"/v1/segmentation?model=litemedsam_2d&image={ph.series_instance_uid}",
                 f"/v1/deepgrow?model=litemedsam_2d&image={ph.series_instance_uid}"):
        for files in ({"params": (None, body.decode())}, {"params": ("params.json", body, "application/json")}):
            r = c.post(path, files=files)
            assert r.status_code == 400, (path, r.status_code, r.text[:300])
            assert "api.max_json_depth" in r.json()["error"] and r.json()["field"] == "params"
    # A JSON list given as a string inside params (OHIF-AI sends some that way).
    r = c.post(f"/infer/sam_2d?image={ph.series_instance_uid}&output=json",
               files={"params": (None, json.dumps({"foreground": "[" * 5000 + "]" * 5000}))})
    assert r.status_code == 400 and r.json()["field"] == "params.foreground", r.text[:300]
    assert time.monotonic() - t0 < 30
    # Ordinary depth still works, and the node is fine.
    r = c.post(f"/v1/sessions/{sid}/prompts", json={"points": [{"ijk": [ph.center[0], ph.center[1], ph.k]}]})
    assert r.status_code == 200, r.text[:300]


def test_json_body_size_is_bounded_separately(make_app: Any, tmp_path: Path, ph: Any) -> None:
    app = make_app(settings_for(tmp_path / "node", max_json_bytes=4096), ph.paths)
    r = app.client.post("/v1/sessions", content=b'{"series": "' + b"1" * 5000 + b'"}',
                        headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "api.max_json_bytes (4096)" in r.json()["error"]


def test_damaged_nifti_upload_is_422(make_app: Any, tmp_path: Path) -> None:
    app = make_app(settings_for(tmp_path / "node"))
    for name in ("x.nii.gz", "x.nii"):
        r = app.client.post("/infer/sam_2d?output=json", files={"file": (name, damaged_nifti_gz()),
                                                                "params": (None, '{"foreground": [[1, 1, 1]]}')})
        assert r.status_code == 422, (name, r.status_code, r.text[:300])
        assert "not a readable NIfTI image" in r.json()["error"] and r.json()["field"] == "file"
        assert str(tmp_path) not in r.text  # the server's upload folder is not echoed
    assert not any(app.ctx.uploads_dir.iterdir())


def test_nifti_declaring_more_voxels_than_allowed_is_refused_before_reading(make_app: Any, tmp_path: Path) -> None:
    import nibabel as nib
    import numpy as np

    img = nib.Nifti1Image(np.zeros((64, 64, 64), dtype=np.float32), np.eye(4))
    buf = io.BytesIO()
    file_map = nib.Nifti1Image.make_file_map({"image": buf, "header": buf})
    img.to_file_map(file_map)
    app = make_app(settings_for(tmp_path / "node", input=InputSettings(max_zip_bytes=100_000)))
    r = app.client.post("/infer/sam_2d?output=json", files={"file": ("big.nii", buf.getvalue()),
                                                            "params": (None, '{"foreground": [[1, 1, 1]]}')})
    assert r.status_code == 422 and "input.max_zip_bytes" in r.json()["error"], r.text[:300]


def test_many_member_zip_bomb_is_refused_before_extraction(make_app: Any, tmp_path: Path) -> None:
    """The attack's zip: 200 members of 8,000,000 zero bytes (1.5 MB), each under the per-member ratio floor."""
    bomb = zip_of_copies(b"\0" * 8_000_000, 200)
    assert len(bomb) < 2_000_000
    app = make_app(settings_for(tmp_path / "node"))
    t0 = time.monotonic()
    r = app.client.put("/session/", files={"files": ("series.zip", bomb, "application/zip")})
    assert r.status_code == 422, r.text[:300]
    assert "input.max_zip_ratio" in r.json()["error"] and "zip bomb" in r.json()["error"]
    assert time.monotonic() - t0 < 10
    assert not any(app.ctx.uploads_dir.iterdir())


def test_zip_member_count_and_junk_members(make_app: Any, tmp_path: Path, ph: Any) -> None:
    app = make_app(settings_for(tmp_path / "node", input=InputSettings(max_zip_members=50)))
    r = app.client.put("/session/", files={"files": ("series.zip", zip_of_copies(b"x", 51), "application/zip")})
    assert r.status_code == 422 and "input.max_zip_members" in r.json()["error"], r.text[:300]
    # Junk members (incompressible, so no ratio refusal) beside the series: probed, never read in full.
    import os

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in ph.paths:
            zf.writestr(f"s/{p.name}", p.read_bytes())
        for n in range(4):
            zf.writestr(f"junk{n}.bin", os.urandom(1 << 20))
    t0 = time.monotonic()
    r = app.client.put("/session/", files={"files": ("series.zip", buf.getvalue(), "application/zip")})
    assert r.status_code == 200, r.text[:300]
    assert time.monotonic() - t0 < 30


def test_non_dicom_probe_is_bounded(tmp_path: Path) -> None:
    """A forced read of 8 MB of zeros walked a million empty elements (~20 s); the probe reads 64 KiB."""
    zeros = tmp_path / "zeros.bin"
    zeros.write_bytes(b"\0" * 8_000_000)
    crafted = tmp_path / "crafted.bin"  # starts like a data set, then zeros
    crafted.write_bytes(b"\x08\x00\x05\x00" + b"\x0a\x00\x00\x00" + b"ISO_IR 100" + b"\0" * 8_000_000)
    t0 = time.perf_counter()
    assert not is_dicom_file(zeros) and not is_dicom_file(crafted)
    assert time.perf_counter() - t0 < 2.0


def test_echo_of_user_input_is_truncated(make_app: Any, tmp_path: Path, ph: Any,
                                         caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(settings_for(tmp_path / "node"), ph.paths)
    huge = "1." + "2" * 2_000_000 + "x"
    caplog.set_level(logging.DEBUG)
    for body in ({"series": huge}, {"series": {"series_instance_uid": ph.series_instance_uid}, "mode": huge},
                 {"series": ph.series_instance_uid, "segment": {"label": huge}},
                 {"series": ph.series_instance_uid, "model": [huge[:3000]] * 1000}):
        r = app.client.post("/v1/sessions", json=body)
        assert r.status_code == 422, r.text[:300]
        assert len(r.content) < 3000, len(r.content)
        assert "characters" in r.json()["error"] or "..." in r.json()["error"]
    r = app.client.post("/v1/segmentations", json={"series": ph.series_instance_uid, "prompts": {"points": huge}})
    assert r.status_code == 422 and len(r.content) < 3000
    assert max(len(rec.getMessage()) for rec in caplog.records) < 2000


@pytest.mark.parametrize("n", [10_000])
def test_ten_thousand_point_prompt_is_422_naming_the_limit(make_app: Any, tmp_path: Path, ph: Any, n: int) -> None:
    app = make_app(settings_for(tmp_path / "node"), ph.paths)
    c = app.client
    x, y = ph.center
    points = [[x + (i % 7) * 0.1, y, ph.k] for i in range(n)]
    t0 = time.monotonic()
    r = c.post("/v1/segmentations", json={"series": ph.series_instance_uid, "mode": "2d",
                                          "prompts": {"points": [{"ijk": p} for p in points]}})
    assert r.status_code == 422 and "api.max_points (128)" in r.json()["error"], r.text[:300]
    sid = _session(c, ph)
    r = c.post(f"/v1/sessions/{sid}/prompts", json={"points": [{"ijk": p} for p in points]})
    assert r.status_code == 422 and "api.max_points (128)" in r.json()["error"]
    for path in (f"/infer/segmentation?image={ph.series_instance_uid}&output=json",
                 f"/infer/sam_2d?image={ph.series_instance_uid}&output=json"):
        r = c.post(path, files={"params": (None, json.dumps({"foreground": points, "nninter": False}))})
        assert r.status_code == 422 and "api.max_points (128)" in r.json()["error"], (path, r.text[:300])
    boxes = [[[x - 5, y - 5, ph.k], [x + 5, y + 5, ph.k]]] * 40
    r = c.post(f"/infer/sam_2d?image={ph.series_instance_uid}&output=json",
               files={"params": (None, json.dumps({"pos_boxes": boxes}))})
    assert r.status_code == 422 and "api.max_boxes (32)" in r.json()["error"], r.text[:300]
    lasso = [[x + i % 5, y + i % 3, ph.k] for i in range(10)]
    r = c.post(f"/infer/sam_2d?image={ph.series_instance_uid}&output=json",
               files={"params": (None, json.dumps({"pos_lassos": [lasso] * 33}))})
    assert r.status_code == 422 and "api.max_polylines (32)" in r.json()["error"], r.text[:300]
    r = c.post(f"/infer/sam_2d?image={ph.series_instance_uid}&output=json",
               files={"params": (None, json.dumps({"pos_scribbles": [[[x, y, ph.k]] * 2001]}))})
    assert r.status_code == 422 and "api.max_polyline_points (2000)" in r.json()["error"], r.text[:300]
    assert time.monotonic() - t0 < 30
    # Nothing was queued for any of them.
    queues = c.get("/v1/status").json()["queues"]
    assert all(q["completed"] + q["failed"] + q["cancelled"] == 0 for q in queues.values()), queues


def test_small_gaps(make_app: Any, tmp_path: Path, ph: Any) -> None:
    other = make_phantom_series(tmp_path / "other", seed=9)
    app = make_app(settings_for(tmp_path / "node"), ph.paths)
    c = app.client
    # A study_instance_uid that is not the series' study.
    r = c.post("/v1/sessions", json={"series": {"series_instance_uid": ph.series_instance_uid,
                                                "study_instance_uid": other.study_instance_uid}})
    assert r.status_code == 422 and r.json()["field"] == "series.study_instance_uid", r.text[:300]
    assert ph.study_instance_uid in r.json()["error"]
    assert c.post("/v1/sessions", json={"series": {"series_instance_uid": ph.series_instance_uid,
                                                   "study_instance_uid": ph.study_instance_uid}}).status_code == 201
    # A box a universe away is refused (it used to be clipped to the slice and accepted), also via MONAI Label.
    for far in (1e300, -1e300):
        r = c.post("/v1/segmentations", json={"series": ph.series_instance_uid, "mode": "2d", "prompts": {
            "boxes": [{"ijk": [[0, 0, ph.k], [far, far, ph.k]] if far > 0 else [[far, far, ph.k], [10, 10, ph.k]]}]}})
        assert r.status_code == 422 and "farther outside" in r.json()["error"], r.text[:300]
        r = c.post(f"/infer/sam_2d?image={ph.series_instance_uid}&output=json",
                   files={"params": (None, json.dumps({"pos_boxes": [[[0, 0, ph.k], [far, 10, ph.k]]]}))})
        assert r.status_code == 422 and "farther outside" in r.json()["error"], r.text[:300]
    # Non-ASCII digits are no slice index (int("\u0663") == 3).
    sid = _session(c, ph)
    assert c.get(f"/v1/sessions/{sid}/slices/3").status_code == 200
    r = c.get(f"/v1/sessions/{sid}/slices/\u0663")
    assert r.status_code == 422 and r.json()["field"] == "k", r.text[:300]
    r = c.put("/session/?expiry=\u0663", files={"files": ("a.dcm", ph.paths[0].read_bytes())})
    assert r.status_code == 422 and r.json()["field"] == "expiry", r.text[:300]
    # NUL (and other control characters) in a label.
    for label in ("liver\x00", "a\x1bb", "back\\slash"):
        r = c.post("/v1/sessions", json={"series": ph.series_instance_uid, "segment": {"label": label}})
        assert r.status_code == 422 and r.json()["field"] == "segment.label", (label, r.text[:300])
    # 405 lists every method of the path.
    r = c.put("/v1/jobs/0123456789abcdef0123456789abcdef")
    assert r.status_code == 405 and {"GET", "DELETE"} <= {m.strip() for m in r.headers["allow"].split(",")}
    r = c.put(f"/v1/sessions/{sid}")
    assert r.status_code == 405 and {"GET", "DELETE"} <= {m.strip() for m in r.headers["allow"].split(",")}
    r = c.post("/session/abc")
    assert r.status_code == 405 and {"GET", "DELETE"} <= {m.strip() for m in r.headers["allow"].split(",")}
