"""Native API: one-shot segmentations, 4xx validation, queue behaviour, auth, OpenAPI (real LiteMedSAM)."""

from __future__ import annotations

import gzip
import io
import threading
import time
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest

from api_helpers import Api, PhantomSeries, api_settings
from dicom_io.series import load_series


def _box_request(ph: PhantomSeries, **extra: Any) -> dict[str, Any]:
    x0, y0, x1, y1 = ph.box
    body = {"series": {"series_instance_uid": ph.series_instance_uid},
            "prompts": {"boxes": [{"ijk": [[x0, y0, ph.k], [x1, y1, ph.k]]}]}, "mode": "2d"}
    body.update(extra)
    return body


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def test_segmentation_2d_box_nifti_and_seg(api: Api, phantom: PhantomSeries) -> None:
    r = api.client.post("/v1/segmentations", json=_box_request(phantom, segment={"label": "Lesion",
                                                                                  "color": "#ff0000"}))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["state"] == "done"
    assert body["voxel_count"] > 20
    assert body["slices"] == [phantom.k]
    assert body["volume_ml"] == pytest.approx(body["voxel_count"] * 1.2 * 1.2 * 3.0 / 1000, rel=1e-3)
    assert {"load", "queue", "inference", "nifti", "seg"} <= set(body["timings"])
    assert body["links"]["nifti"] == f"/v1/segmentations/{body['id']}/nifti"
    assert r.headers["location"] == f"/v1/segmentations/{body['id']}"

    nifti = api.client.get(body["links"]["nifti"])
    assert nifti.status_code == 200
    img = nib.Nifti1Image.from_bytes(gzip.decompress(nifti.content))
    series = load_series(phantom.paths)
    np.testing.assert_allclose(img.affine, series.geometry.affine_ras, atol=1e-4)
    mask = np.asarray(img.dataobj).transpose(2, 1, 0).astype(bool)
    assert int(mask.sum()) == body["voxel_count"]
    assert _dice(mask[phantom.k], phantom.mask[phantom.k]) > 0.6

    seg_r = api.client.get(body["links"]["seg"])
    assert seg_r.status_code == 200 and seg_r.headers["content-type"] == "application/dicom"
    seg = hd.seg.Segmentation.from_dataset(__import__("pydicom").dcmread(io.BytesIO(seg_r.content)))
    assert seg.get_segment_description(1).segment_label == "Lesion"
    assert seg.SeriesInstanceUID == body["seg_series_instance_uid"]
    assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == phantom.series_instance_uid

    again = api.client.get(f"/v1/segmentations/{body['id']}")
    assert again.status_code == 200 and again.json()["voxel_count"] == body["voxel_count"]


def test_point_in_millimetres_matches_voxel_point(api: Api, phantom: PhantomSeries) -> None:
    series = load_series(phantom.paths)
    x, y = phantom.center
    lps = series.geometry.voxel_to_lps([x, y, phantom.k]).tolist()
    common = {"series": {"series_instance_uid": phantom.series_instance_uid}, "mode": "2d", "outputs": ["nifti"]}
    a = api.client.post("/v1/segmentations", json={**common, "prompts": {"points": [{"ijk": [x, y, phantom.k]}]}})
    b = api.client.post("/v1/segmentations", json={**common, "prompts": {"points": [{"lps": lps}]}})
    assert a.status_code == b.status_code == 201, (a.text, b.text)
    assert a.json()["voxel_count"] == b.json()["voxel_count"] > 0
    assert "seg" not in a.json()["links"]
    assert api.client.get(a.json()["links"]["self"] + "/seg").status_code == 404


BAD_REQUESTS = [
    # (body or raw text, status, words the message must contain)
    ("{not json", 400, ["body", "malformed JSON"]),
    ("[1, 2]", 400, ["body", "JSON object"]),
    ({"prompts": {"points": [{"ijk": [1, 1, 1]}]}}, 422, ["series", "required"]),
    ({"series": {"series_instance_uid": "1.2.3.999"}, "prompts": {"points": [{"ijk": [1, 1, 1]}]}}, 404,
     ["series.series_instance_uid", "1.2.3.999", "not stored"]),
    ({"series": {"series_instance_uid": "not-a-uid"}, "prompts": {}}, 422, ["series.series_instance_uid"]),
    ({"series": "@S", "model": "gpt5", "prompts": {"points": [{"ijk": [1, 1, 1]}]}}, 422,
     ["model", "gpt5", "litemedsam"]),
    ({"series": "@S", "mode": "4d", "prompts": {"points": [{"ijk": [1, 1, 1]}]}}, 422, ["mode", "4d"]),
    ({"series": "@S"}, 422, ["prompts", "required"]),
    ({"series": "@S", "prompts": {"points": []}}, 422, ["prompts", "positive"]),
    ({"series": "@S", "prompts": {"points": [{"ijk": [10, 10, 99]}]}}, 422, ["prompts", "slice 99", "outside"]),
    ({"series": "@S", "prompts": {"points": [{"ijk": [500, 10, 2]}]}}, 422, ["prompts", "outside the slice"]),
    ({"series": "@S", "prompts": {"points": [{"ijk": [10, 10, 2.5]}]}}, 422, ["prompts.points[0].ijk[2]",
                                                                                 "not an integer"]),
    ({"series": "@S", "prompts": {"points": [{"ijk": [10, "x", 2]}]}}, 422, ["prompts.points[0].ijk[1]"]),
    ({"series": "@S", "prompts": {"points": [{"xyz": [1, 2, 3]}]}}, 422, ["prompts.points[0]", "ijk"]),
    ({"series": "@S", "prompts": {"boxes": [{"ijk": [[10, 10, 4], [10.5, 30, 4]]}]}}, 422, ["prompts", "empty"]),
    ({"series": "@S", "prompts": {"boxes": [{"ijk": [[10, 10, 3], [30, 30, 4]]}]}}, 422,
     ["prompts.boxes[0]", "different slices"]),
    ({"series": "@S", "prompts": {"points": [{"lps": [0, 0, 500]}]}}, 422, ["prompts.points[0]", "not on a slice"]),
    ({"series": "@S", "prompts": {"points": [{"ijk": [1, 1, 1], "positive": "yes"}]}}, 422,
     ["prompts.points[0].positive"]),
    ({"series": "@S", "prompts": {"points": [{"ijk": [1, 1, 1]}]}, "outputs": ["png"]}, 422, ["outputs[0]", "png"]),
    ({"series": "@S", "prompts": {"points": [{"ijk": [1, 1, 1]}]}, "destinations": ["NOWHERE"]}, 422,
     ["destinations[0]", "NOWHERE", "not configured"]),
    ({"series": "@S", "prompts": {"points": [{"ijk": [1, 1, 1]}]}, "segment": {"color": "blurple"}}, 422,
     ["segment.color", "blurple"]),
    ({"series": "@S", "prompts": {"points": [{"ijk": [1, 1, 1]}]}, "segment": {"category": "x"}}, 422,
     ["segment.category"]),
    ({"series": "@S", "prompts": {"points": [{"ijk": [1, 1, 1]}]}, "colour": "red"}, 422, ["body", "colour"]),
]


@pytest.mark.parametrize("body,status,words", BAD_REQUESTS)
def test_bad_requests_get_4xx_naming_the_field(api: Api, phantom: PhantomSeries, body: Any, status: int,
                                               words: list[str]) -> None:
    if isinstance(body, str):
        r = api.client.post("/v1/segmentations", content=body, headers={"content-type": "application/json"})
    else:
        if body.get("series") == "@S":
            body = {**body, "series": {"series_instance_uid": phantom.series_instance_uid}}
        r = api.client.post("/v1/segmentations", json=body)
    assert r.status_code == status, r.text
    message = r.json()["error"]
    for word in words:
        assert word in message, (word, message)
    assert r.json()["detail"] == message


def test_unknown_ids_are_404(api: Api) -> None:
    for path in ("/v1/segmentations/0123", "/v1/segmentations/" + "a" * 32 + "/nifti", "/v1/jobs/x",
                 "/v1/sessions/nope"):
        r = api.client.get(path)
        assert r.status_code == 404, (path, r.text)
        assert "does not exist" in r.json()["error"]


def _blocker(api: Api) -> tuple[Any, threading.Event]:
    """Occupy the model's worker with a job that waits for an event (a long 3D job stand-in)."""
    release = threading.Event()
    job = api.ctx.inference.submit(None, lambda seg, ctx: release.wait(30), kind="blocker")
    deadline = time.monotonic() + 10
    while job.state != "running" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job.state == "running"
    return job, release


def test_full_queue_is_503_with_retry_after_and_status_stays_responsive(make_api: Any, tmp_path: Any,
                                                                         phantom: PhantomSeries) -> None:
    api = make_api(api_settings(tmp_path / "q", queue_size=1, retry_after_seconds=7), series=[phantom])
    job, release = _blocker(api)
    try:
        queued = api.client.post("/v1/segmentations", json=_box_request(phantom, wait=False))
        assert queued.status_code == 202, queued.text
        assert queued.json()["job"]["state"] == "queued"
        t = time.perf_counter()
        full = api.client.post("/v1/segmentations", json=_box_request(phantom))
        assert full.status_code == 503
        assert full.headers["retry-after"] == "7"
        assert "queue is full" in full.json()["error"]
        for path in ("/health", "/v1/status", "/metrics", "/v1/models"):
            assert api.client.get(path).status_code == 200
        assert time.perf_counter() - t < 2.0
        status = api.client.get("/v1/status").json()["queues"]["litemedsam"]
        assert status["running"]["kind"] == "blocker" and status["queued"] == 1 and status["rejected"] == 1
        assert status["backends"] == {"encoder": "onnx", "decoder": "onnx"}  # ONNX Runtime for both: nothing compiles
        assert 'ainode_inference_queued{model="litemedsam"} 1' in api.client.get("/metrics").text

        cancel = api.client.delete(f"/v1/jobs/{queued.json()['id']}")
        assert cancel.status_code == 202
        state = api.client.get(f"/v1/segmentations/{queued.json()['id']}").json()
        assert state["state"] == "cancelled"
        assert api.client.delete(f"/v1/jobs/{queued.json()['id']}").status_code == 409
    finally:
        release.set()
    job.future.result(10)


def test_no_wait_job_completes_in_background(api: Api, phantom: PhantomSeries) -> None:
    r = api.client.post("/v1/segmentations", json=_box_request(phantom, wait=False, outputs=["nifti"]))
    assert r.status_code == 202
    rid = r.json()["id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = api.client.get(f"/v1/segmentations/{rid}").json()
        if state["state"] == "done":
            break
        time.sleep(0.1)
    assert state["state"] == "done" and state["voxel_count"] > 0
    assert api.client.get(f"/v1/jobs/{rid}").json()["state"] == "done"


def test_running_job_cancelled_between_slices(api: Api, phantom: PhantomSeries) -> None:
    x0, y0, x1, y1 = phantom.box
    calls: list[int] = []

    def progress_then_cancel(seg: Any, ctx: Any) -> None:
        for n in range(100):
            calls.append(n)
            if n == 2:
                api.ctx.inference.cancel(ctx.job.id)
            ctx.progress(n, 100)

    job = api.ctx.inference.submit(None, progress_then_cancel, kind="cancel-test")
    with pytest.raises(Exception, match="cancelled"):
        job.future.result(10)
    assert job.state == "cancelled" and len(calls) == 3


def test_bearer_tokens_and_per_user_sessions(make_api: Any, tmp_path: Any, phantom: PhantomSeries) -> None:
    from config.settings import Secret

    api = make_api(api_settings(tmp_path / "auth", tokens=(Secret("alice:tok-a"), Secret("bob:tok-b"))),
                   series=[phantom])
    c = api.client
    r = c.post("/v1/sessions", json={"series": {"series_instance_uid": phantom.series_instance_uid}})
    assert r.status_code == 401 and "bearer token is required" in r.json()["error"]
    assert r.headers["www-authenticate"].startswith("Bearer")
    bad = c.get("/v1/status", headers={"Authorization": "Bearer wrong"})
    assert bad.status_code == 401 and "not valid" in bad.json()["error"]
    assert c.get("/openapi.json").status_code == 200
    assert c.get("/health").status_code == 200
    alice = {"Authorization": "Bearer tok-a"}
    r = c.post("/v1/sessions", json={"series": {"series_instance_uid": phantom.series_instance_uid}},
               headers=alice)
    assert r.status_code == 201 and r.json()["user"] == "alice"
    sid = r.json()["id"]
    assert c.get(f"/v1/sessions/{sid}", headers=alice).status_code == 200
    assert c.get(f"/v1/sessions/{sid}", headers={"Authorization": "Bearer tok-b"}).status_code == 404
    assert "tok-a" not in repr(api.settings) and "tok-a" not in str(api.settings.api)


def test_openapi_describes_every_route(api: Api) -> None:
    doc = api.client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    for path in ("/v1/segmentations", "/v1/sessions/{id}/prompts", "/v1/sessions/{id}/commit", "/infer/{model}",
                 "/info/", "/session/", "/v1/models", "/v1/deepgrow", "/v1/dextr3d"):
        assert path in doc["paths"], path
    assert doc["paths"]["/v1/segmentations"]["post"]["requestBody"]["content"]["application/json"]
    assert "SegmentationRequest" in doc["components"]["schemas"]


def test_cors_preflight_for_configured_origin(make_api: Any, tmp_path: Any, phantom: PhantomSeries) -> None:
    from config.settings import HttpSettings

    s = api_settings(tmp_path / "cors")
    s = type(s)(**{**s.__dict__, "http": HttpSettings(cors_origins=("http://viewer.example",))})
    api = make_api(s, series=[phantom])
    r = api.client.options("/infer/sam_2d", headers={"Origin": "http://viewer.example",
                                                    "Access-Control-Request-Method": "POST"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://viewer.example"
    other = api.client.options("/infer/sam_2d", headers={"Origin": "http://evil.example",
                                                        "Access-Control-Request-Method": "POST"})
    assert other.status_code == 400


def test_unreachable_archive_is_502(make_api: Any, tmp_path: Any) -> None:
    import peers
    from config.settings import DestinationSettings

    dead = f"http://127.0.0.1:{peers.free_port()}/dicom-web"
    api = make_api(api_settings(tmp_path / "dead", destinations={"PACSWEB": DestinationSettings(kind="dicomweb",
                                                                                               url=dead)}))
    r = api.client.post("/v1/segmentations", json={
        "series": {"series_instance_uid": "1.2.3.4", "archive": "PACSWEB"},
        "prompts": {"points": [{"ijk": [1, 1, 1]}]}})
    assert r.status_code == 502, r.text
    assert "PACSWEB" in r.json()["error"]
    r = api.client.post("/infer/sam_2d?image=1.2.3.4&output=json",
                        files={"params": (None, '{"foreground": [[1,1,1]]}')})
    assert r.status_code == 502 and "PACSWEB" in r.json()["detail"]
    r = api.client.post("/v1/segmentations", json={
        "series": {"series_instance_uid": "1.2.3.4", "archive": "NOPE"}, "prompts": {"points": [{"ijk": [1, 1, 1]}]}})
    assert r.status_code == 422 and "series.archive" in r.json()["error"]


def test_interactive_jobs_overtake_queued_batch_jobs(api: Api, phantom: PhantomSeries) -> None:
    from node.inference import BATCH, INTERACTIVE

    job, release = _blocker(api)
    order: list[str] = []
    batch = api.ctx.inference.submit(None, lambda seg, ctx: order.append("batch"), priority=BATCH)
    click = api.ctx.inference.submit(None, lambda seg, ctx: order.append("click"), priority=INTERACTIVE)
    release.set()
    batch.future.result(10)
    click.future.result(10)
    assert order == ["click", "batch"]
    assert click.describe()["priority"] == INTERACTIVE


def test_model_load_leaves_long_lived_objects_out_of_garbage_collection(api: Api,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """After a model load the objects alive then are frozen; garbage made afterwards is still collected.

    The freeze is the service entry point's (node.service.serve sets node.inference.after_model_load; a
    served node's log shows it, tests/node/test_load_at_start.py): set here as serve sets it.
    """
    import gc
    import weakref

    from node import inference
    from node.service import _freeze_long_lived

    monkeypatch.setattr(inference, "after_model_load", _freeze_long_lived)

    class Node:
        ref: Any = None

    alive = Node()
    alive.ref = alive  # a cycle that is still referenced when the model loads
    api.ctx.inference.submit(None, lambda seg, ctx: None).future.result(60)
    assert not any(o is alive for o in gc.get_objects()), "objects alive at load time are not frozen"
    later = Node()
    later.ref = later
    gone = weakref.ref(later)
    del later
    gc.collect()
    assert gone() is None, "a reference cycle made after the load was not collected"
