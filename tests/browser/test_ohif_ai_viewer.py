"""The real OHIF-AI viewer (production build in ../shared/clients/ohif-ai) driven end to end against the node.

The node serves the unpacked build at its site root (``viewer.ohif_ai_dist``), ``/dicomweb`` and the MONAI
Label routes under ``/monai`` (``api.monailabel_root_path``): the same origin layout as OHIF-AI's nginx, no
proxy and no shim. A chest-like CT is sent by C-STORE; the shared driver (``drive.js``) opens the study from
the node's study list, clicks the lesion, clicks negatively inside the mask, draws a box (a second segment)
and exports the DICOM SEG, which the viewer stores in the node by STOW-RS. The assertions are on what the
viewer holds and shows (its labelmap's voxels per segment and slice, the screenshots' pixels) and on the
SEG read back from the node with highdicom.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image

import peers
from browser_helpers import CHROMIUM, NODE_MODULES, check_browser
from dicom_io.phantom import write_phantom_series

pytestmark = pytest.mark.peers

ROOT = Path(__file__).resolve().parents[2]
#: The OHIF-AI fixture: ``../shared`` sits beside every checkout (CI included).
CLIENT = ROOT.parent / "shared" / "clients" / "ohif-ai"
#: (slices, rows, columns): Rows x Columns even (the viewer's SEG export fails on odd ones, docs/viewer.md).
SHAPE = (12, 256, 256)


def _need() -> None:
    check_browser()
    missing = [p for p in (CLIENT / "dist.tgz", CLIENT / "drive.js") if not p.is_file()]
    if missing:
        raise AssertionError(f"The OHIF-AI fixture is missing: {', '.join(map(str, missing))} "
                             "(../shared/clients/ohif-ai beside the checkout).")
    if not peers.have("storescu"):
        raise AssertionError("storescu (dcmtk) is missing: run `bash scripts/install.sh --test`.")


def _unpack(tmp: Path) -> Path:
    with tarfile.open(CLIENT / "dist.tgz") as tar:
        tar.extractall(tmp, filter="data")
    dist = tmp / "dist"
    assert (dist / "index.html").is_file(), sorted(p.name for p in tmp.iterdir())
    return dist


def _wado_instance(base: str, study: str, series: str, sop: str) -> bytes:
    r = httpx.get(f"{base}/dicomweb/studies/{study}/series/{series}/instances/{sop}", timeout=60,
                  headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert r.status_code == 200, r.text[:300]
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + r.headers["content-type"].encode() + b"\r\n\r\n" + r.content)
    parts = list(msg.iter_parts())
    assert len(parts) == 1
    return bytes(parts[0].get_payload(decode=True))


def _changed_pixels(before: Path, after: Path) -> int:
    a = np.asarray(Image.open(before).convert("RGB"), dtype=np.int16)
    b = np.asarray(Image.open(after).convert("RGB"), dtype=np.int16)
    return int((np.abs(a - b).max(axis=2) > 40).sum())


def test_ohif_ai_viewer_end_to_end(tmp_path: Path) -> None:
    _need()
    dist = _unpack(tmp_path / "viewer")
    ct = write_phantom_series(tmp_path / "ct", shape=SHAPE, spacing=(1.2, 1.2, 3.0))
    k = int(np.argmax(ct.mask.sum(axis=(1, 2))))  # instance numbers ascend with the slices: not flipped
    ys, xs = np.nonzero(ct.mask[k])
    point = (int(round(xs.mean())), int(round(ys.mean())))
    box = (110, 178, 146, 212)  # around the spine, away from the lesion: a second structure

    dimse, http = peers.free_port(), peers.free_port()
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[api]\nmonailabel_root_path = "/monai"\n\n[viewer]\nohif_ai_dist = "{dist}"\n')
    node = peers.start_node(tmp_path / "data", port=dimse, config=cfg,
                            extra_env={"AINODE_HTTP_PORT": str(http), "AINODE_MODEL_DEVICE": "cpu",
                                       "AINODE_STORE_STABLE_AFTER_SECONDS": "0.5",
                                       "AINODE_LITEMEDSAM_PREENCODE": "true"})
    base = f"http://127.0.0.1:{http}"
    try:
        peers.wait_tcp(http, timeout=60, proc=node.popen)
        subprocess.run(["storescu", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, ct.paths)],
                       check=True, capture_output=True, env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}, timeout=60)
        out = tmp_path / "drive"
        env = {**os.environ, "NODE_PATH": str(NODE_MODULES), "CHROMIUM": str(CHROMIUM),
               "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1", "HOME": str(tmp_path)}
        run = subprocess.run(["node", str(CLIENT / "drive.js"), base, ct.study_instance_uid, str(out),
                              "--slice", str(k), "--point", f"{point[0]},{point[1]}",
                              "--box", ",".join(map(str, box)), "--timeout", "240"],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert (out / "result.json").is_file(), f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
        result = json.loads((out / "result.json").read_text())
        _check(result, run, base, ct, k, box, out)
    finally:
        node.stop()


def _check(result: dict[str, Any], run: subprocess.CompletedProcess[str], base: str, ct: Any, k: int,
           box: tuple[int, int, int, int], out: Path) -> None:
    steps = {s["step"]: s for s in result["steps"]}
    where = f"driver exit {run.returncode}; steps: {run.stdout[-4000:]}\npage errors: {result['page_errors'][:5]}"
    assert "driver exception" not in steps, steps.get("driver exception")
    assert steps["study list shows the study"]["ok"], where

    # The viewer opened the study from the node's /dicomweb and posted nninter:"init" to /monai on the same origin.
    opened = steps["viewer opened the study; init request"]
    assert opened["ok"], where
    assert opened["viewport"]["n"] == SHAPE[0] and opened["viewport"]["dimensions"][:2] == [SHAPE[2], SHAPE[1]]
    init = opened["request"]
    assert init["url"].startswith(f"/monai/infer/segmentation?image={ct.series_instance_uid}&output=dicom_seg")
    assert init["nninter"] == "init" and init["status"] == 200

    # A click on the lesion: a mask on the clicked slice and on several slices around it.
    pos = steps["positive point"]
    assert pos["ok"], where
    seg1 = pos["segmentations"][0]
    assert seg1["voxels_on_slice_by_segment"].get("1", 0) > 0, seg1
    assert k in seg1["slices"] and len(seg1["slices"]) >= 3, f"mask only on slices {seg1['slices']}"
    lesion_slices = set(np.nonzero(ct.mask.any(axis=(1, 2)))[0].tolist())
    assert len(lesion_slices & set(seg1["slices"])) >= 3, (seg1["slices"], sorted(lesion_slices))
    # What the page shows: the mask drawn over the image where the click was (screenshots before/after).
    assert _changed_pixels(out / "03_slice.png", out / "04_point.png") > 150

    # A negative click inside the mask changes it; the segment stays.
    neg = steps["negative point"]
    assert neg["ok"], where
    before, after = pos["voxels_by_segment"]["1"], neg["voxels_by_segment"]["1"]
    assert 0 < after < before, (before, after)
    assert json.loads(neg["request"]["params"])["neg_points"], neg["request"]["params"][:300]

    # Refine/New + a box: a second segment next to the first.
    bx = steps["box"]
    assert bx["ok"], where
    sent = bx["box_sent"]
    assert sent and abs(sent[0][0] - box[0]) <= 3 and abs(sent[1][1] - box[3]) <= 3 and sent[0][2] == k, sent
    counts = bx["voxels_by_segment"]
    assert counts.get("1", 0) > 0 and counts.get("2", 0) > 0, counts
    assert any(r["nninter"] == "reset" and r["status"] == 200 for r in bx["requests"]), bx["requests"]
    assert _changed_pixels(out / "05_negative.png", out / "06_box.png") > 50

    # Every AI call went to /monai on the page's origin and was answered 200; nothing was blocked.
    monai = result["monai"]
    assert monai and all(r["url"].startswith("/monai/infer/segmentation?") and r["status"] == 200 for r in monai), monai
    assert not result["blocked_requests"], result["blocked_requests"]
    assert not result["page_errors"], result["page_errors"]

    # The exported SEG arrived by STOW-RS and reads back (highdicom) with the viewer's segments.
    export = steps["export DICOM SEG"]
    assert export["ok"], (export, where)
    assert export["stow"][0]["url"].startswith("/dicomweb/studies") and export["stow"][0]["status"] == 200
    found = httpx.get(f"{base}/dicomweb/studies/{ct.study_instance_uid}/series", params={"Modality": "SEG"},
                      timeout=30).json()
    assert len(found) == 1, found
    seg_series = found[0]["0020000E"]["Value"][0]
    inst = httpx.get(f"{base}/dicomweb/studies/{ct.study_instance_uid}/series/{seg_series}/instances",
                     timeout=30).json()
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(
        _wado_instance(base, ct.study_instance_uid, seg_series, inst[0]["00080018"]["Value"][0]))))
    assert seg.number_of_segments == 2
    viewer_labels = {s["index"]: s["label"] for s in bx["segmentations"][0]["segments"]}
    assert {n: seg.get_segment_description(n).segment_label for n in (1, 2)} == viewer_labels
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in ct.paths]
    sources.sort(key=lambda d: float(np.dot(d.ImagePositionPatient, np.cross(d.ImageOrientationPatient[:3],
                                                                            d.ImageOrientationPatient[3:]))))
    for n in (1, 2):
        arr = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in sources], segment_numbers=[n],
                                                combine_segments=True, skip_overlap_checks=True,
                                                ignore_spatial_locations=True)  # dcmjs does not say
        assert int(np.count_nonzero(arr)) == counts[str(n)], (n, int(np.count_nonzero(arr)), counts)
