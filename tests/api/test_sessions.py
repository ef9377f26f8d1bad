"""Interactive sessions: refine click by click without re-encoding, undo, reset, compact mask, commit, expiry."""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import pydicom
import pytest

from api_helpers import Api, PhantomSeries, api_settings
from node.api.native import unpack_mask


def _open(api: Api, ph: PhantomSeries, **extra: Any) -> str:
    r = api.client.post("/v1/sessions", json={"series": {"series_instance_uid": ph.series_instance_uid},
                                              "segment": {"label": "Nodule"}, **extra})
    assert r.status_code == 201, r.text
    assert r.json()["shape"] == list(ph.mask.shape) and r.json()["mode"] == "2d"
    return str(r.json()["id"])


def _background_done(api: Api) -> None:
    """Wait until the pre-encoding a session open scheduled has finished (it runs in the background)."""
    q = api.ctx.inference.queue("litemedsam")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        st = q.status()
        if st["background"] == 0 and st["queued"] == 0 and st["running"] is None:
            return
        time.sleep(0.05)
    raise AssertionError(f"pre-encoding did not finish: {q.status()}")


def test_session_refine_undo_reset_commit(api: Api, phantom: PhantomSeries, segmenter: Any) -> None:
    c = api.client
    sid = _open(api, phantom)
    _background_done(api)
    x, y = phantom.center
    k = phantom.k

    first = c.post(f"/v1/sessions/{sid}/prompts", json={"points": [{"ijk": [x, y, k]}]})
    assert first.status_code == 200, first.text
    one = first.json()
    assert one["step"] == 1 and one["voxel_count"] > 0 and one["slices"] == [k]

    encoder_calls = segmenter.encoder_calls
    x0, y0, x1, y1 = phantom.box
    second = c.post(f"/v1/sessions/{sid}/prompts", json={"boxes": [{"ijk": [[x0, y0, k], [x1, y1, k]]}]})
    assert second.status_code == 200, second.text
    two = second.json()
    assert two["step"] == 2 and two["prompts"] == {"points": 1, "boxes": 1}
    # The follow-up prompt on the same slice re-encodes nothing: the session keeps the series in memory and
    # the model's embedding cache is keyed by slice content.
    assert two["stats"]["slices_encoded"] == 0
    assert segmenter.encoder_calls == encoder_calls

    neg = c.post(f"/v1/sessions/{sid}/prompts", json={"points": [{"ijk": [5, 5, k], "positive": False}]})
    assert neg.status_code == 200 and neg.json()["step"] == 3

    binary = c.get(f"/v1/sessions/{sid}/mask?output=bin")
    assert binary.status_code == 200 and binary.headers["content-type"] == "application/x-ainode-mask"
    shape = tuple(int(v) for v in binary.headers["x-mask-shape"].split(","))
    mask = unpack_mask(binary.content, shape)  # httpx undid the Content-Encoding: gzip
    assert int(mask.sum()) == neg.json()["voxel_count"]

    undo = c.post(f"/v1/sessions/{sid}/undo")
    assert undo.status_code == 200 and undo.json()["step"] == 2
    assert undo.json()["voxel_count"] == two["voxel_count"]

    nifti = c.get(f"/v1/sessions/{sid}/mask?output=nifti")
    assert nifti.status_code == 200 and nifti.content[:2] == b"\x1f\x8b"

    commit = c.post(f"/v1/sessions/{sid}/commit", json={"outputs": ["seg", "nifti"]})
    assert commit.status_code == 201, commit.text
    res = commit.json()
    assert res["voxel_count"] == two["voxel_count"] and res["label"] == "Nodule" and res["session"] == sid
    seg = pydicom.dcmread(io.BytesIO(c.get(res["links"]["seg"]).content))
    assert seg.Modality == "SEG" and seg.SegmentSequence[0].SegmentLabel == "Nodule"
    assert res["deliveries"] == {}

    reset = c.post(f"/v1/sessions/{sid}/reset")
    assert reset.status_code == 200 and reset.json()["voxel_count"] == 0 and reset.json()["step"] == 0
    assert c.post(f"/v1/sessions/{sid}/undo").status_code == 409
    assert c.post(f"/v1/sessions/{sid}/commit", json={}).status_code == 409

    assert c.delete(f"/v1/sessions/{sid}").json()["deleted"] is True
    gone = c.get(f"/v1/sessions/{sid}")
    assert gone.status_code == 404 and "does not exist" in gone.json()["error"]


@pytest.mark.parametrize("body,status,words", [
    ({"points": [{"ijk": [1, 1, 1], "positive": False}]}, 422, ["positive"]),
    ({"points": [{"ijk": [1, 1, 42]}]}, 422, ["slice 42"]),
    ({}, 422, ["prompts", "at least one"]),
    ({"points": [{"ijk": [1, 1, 1]}], "mode": "5d"}, 422, ["mode"]),
])
def test_session_prompt_errors(api: Api, phantom: PhantomSeries, body: dict[str, Any], status: int,
                               words: list[str]) -> None:
    sid = _open(api, phantom)
    r = api.client.post(f"/v1/sessions/{sid}/prompts", json=body)
    assert r.status_code == status, r.text
    for w in words:
        assert w in r.json()["error"]
    assert api.client.post(f"/v1/sessions/{sid}/prompts?output=png",
                           json={"points": [{"ijk": [1, 1, 1]}]}).status_code == 422


def test_sessions_expire_and_are_limited(make_api: Any, tmp_path: Any, phantom: PhantomSeries) -> None:
    api = make_api(api_settings(tmp_path / "exp", session_ttl_seconds=0.3, max_sessions=2, retry_after_seconds=3),
                   series=[phantom])
    a = _open(api, phantom)
    _open(api, phantom)
    full = api.client.post("/v1/sessions", json={"series": {"series_instance_uid": phantom.series_instance_uid}})
    assert full.status_code == 503 and full.headers["retry-after"] == "3"
    time.sleep(0.4)
    r = api.client.get(f"/v1/sessions/{a}")
    assert r.status_code == 410 and "expired" in r.json()["error"]
    _open(api, phantom)  # expired sessions freed their places


def test_session_open_preencodes_and_follow_up_reuses_embeddings_and_decodes(
        api: Api, phantom: PhantomSeries, segmenter: Any) -> None:
    c = api.client
    r = c.post("/v1/sessions", json={"series": {"series_instance_uid": phantom.series_instance_uid}, "mode": "3d"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    _background_done(api)  # opening the session pre-encoded every slice
    assert segmenter.cached_slices >= phantom.mask.shape[0]
    encoder_calls = segmenter.encoder_calls
    x, y = phantom.center
    k = phantom.k
    first = c.post(f"/v1/sessions/{sid}/prompts", json={"points": [{"ijk": [x, y, k]}]})
    assert first.status_code == 200, first.text
    one = first.json()
    assert one["stats"]["slices_encoded"] == 0 and len(one["slices"]) > 1
    # a negative click far from the object: the follow-up reuses the embeddings and every earlier decode
    # that its prompts repeat (candidate boxes, propagation steps), so the mask stays the same
    second = c.post(f"/v1/sessions/{sid}/prompts", json={"points": [{"ijk": [2, 2, k], "positive": False}]})
    assert second.status_code == 200, second.text
    two = second.json()
    assert two["stats"]["slices_encoded"] == 0 and segmenter.encoder_calls == encoder_calls
    assert two["stats"]["decodes_reused"] > 0
    assert two["stats"]["decoder_calls"] < max(1, one["stats"]["decoder_calls"])
    assert two["voxel_count"] == one["voxel_count"] and two["slices"] == one["slices"]


def test_sessions_keep_series_in_memory(api: Api, phantom: PhantomSeries) -> None:
    sid = _open(api, phantom)
    session = api.ctx.sessions.get(sid, "anonymous")
    assert session.series.voxels.shape == phantom.mask.shape
    assert isinstance(session.series.voxels, np.ndarray)
