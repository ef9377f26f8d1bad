"""Queueing fit for interactive use: session clicks wait instead of 503, and a click whose client left is cancelled."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from api_helpers import Api, PhantomSeries, api_settings


def _blocker(api: Api) -> tuple[Any, threading.Event]:
    """A real job that holds the model's worker until released (so later jobs wait in the queue)."""
    release = threading.Event()
    job = api.ctx.inference.submit(None, lambda seg, ctx: release.wait(60), kind="blocker")
    deadline = time.monotonic() + 10
    while job.state != "running" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job.state == "running"
    return job, release


def _click(ph: PhantomSeries) -> dict[str, Any]:
    return {"points": [{"ijk": [ph.center[0], ph.center[1], ph.k]}]}


def test_session_clicks_wait_rather_than_503_and_one_shots_still_bounded(make_api: Any, tmp_path: Any,
                                                                         phantom: PhantomSeries) -> None:
    users = 5
    api = make_api(api_settings(tmp_path / "q", queue_size=1, max_sessions=users), series=[phantom])
    c = api.client
    sids = [c.post("/v1/sessions", json={"series": phantom.series_instance_uid}).json()["id"] for _ in range(users)]
    job, release = _blocker(api)
    try:
        with ThreadPoolExecutor(users) as pool:
            clicks = [pool.submit(c.post, f"/v1/sessions/{sid}/prompts", json=_click(phantom)) for sid in sids]
            deadline = time.monotonic() + 20
            while c.get("/v1/status").json()["queues"]["litemedsam"]["queued"] < users and time.monotonic() < deadline:
                time.sleep(0.05)
            status = c.get("/v1/status").json()["queues"]["litemedsam"]
            assert status["queued"] == users and status["rejected"] == 0, status
            # A one-shot job still takes the queue's one place, and the next one is refused (memory bound).
            first = c.post("/v1/segmentations", json={"series": phantom.series_instance_uid, "mode": "2d",
                                                      "prompts": _click(phantom), "outputs": ["nifti"], "wait": False})
            assert first.status_code == 202, first.text
            full = c.post("/v1/segmentations", json={"series": phantom.series_instance_uid, "mode": "2d",
                                                     "prompts": _click(phantom), "outputs": ["nifti"]})
            assert full.status_code == 503 and "api.queue_size" in full.json()["error"], full.text
            release.set()
            answers = [f.result(120) for f in clicks]
        assert [a.status_code for a in answers] == [200] * users, [a.text[:200] for a in answers]
    finally:
        release.set()
    job.future.result(10)


def _raw_post(port: int, path: str, body: dict[str, Any]) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_click_of_a_client_that_disconnected_is_cancelled(make_api: Any, tmp_path: Any,
                                                          phantom: PhantomSeries) -> None:
    from node.app import HttpServer

    api = make_api(api_settings(tmp_path / "d"), series=[phantom])
    server = HttpServer(api.app, "127.0.0.1", 0)
    _, port = server.start()
    try:
        sid = api.client.post("/v1/sessions", json={"series": phantom.series_instance_uid}).json()["id"]
        job, release = _blocker(api)
        q = api.ctx.inference.queue()
        try:
            sock = _raw_post(port, f"/v1/sessions/{sid}/prompts", _click(phantom))
            deadline = time.monotonic() + 20
            while q.status()["queued"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert q.status()["queued"] == 1
            sock.close()  # the user moved on
            deadline = time.monotonic() + 20
            while q.status()["cancelled"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert q.status()["cancelled"] == 1, q.status()
        finally:
            release.set()
        job.future.result(10)
        time.sleep(0.3)
        assert q.status()["queued"] == 0
        clicks = [j for j in api.ctx.inference._jobs.values() if j.kind == "session"]
        assert [(j.state, j.started) for j in clicks] == [("cancelled", None)]  # dropped, never ran
        assert api.client.get(f"/v1/sessions/{sid}").json()["steps"] == 0
        # The session still works for a client that stays.
        r = api.client.post(f"/v1/sessions/{sid}/prompts", json=_click(phantom))
        assert r.status_code == 200, r.text
    finally:
        server.stop()


def test_running_one_shot_is_recorded_as_running(make_api: Any, tmp_path: Any, phantom: PhantomSeries,
                                                 segmenter: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart reports a job that was running as interrupted while running (it said 'was queued')."""
    import shutil

    from node.outbox import recover_results

    # The model call waits until the record has been seen saying "running": with the session's embeddings
    # cached, a 2D click can otherwise finish between two looks at the record.
    seen_running = threading.Event()
    real_segment = segmenter.segment

    def held_segment(*args: Any, **kwargs: Any) -> Any:
        seen_running.wait(60)
        return real_segment(*args, **kwargs)

    monkeypatch.setattr(segmenter, "segment", held_segment)
    api = make_api(api_settings(tmp_path / "r"), series=[phantom])
    job, release = _blocker(api)
    try:
        r = api.client.post("/v1/segmentations", json={"series": phantom.series_instance_uid, "mode": "2d",
                                                       "prompts": _click(phantom), "outputs": ["nifti"], "wait": False})
        assert r.status_code == 202
        rid = r.json()["id"]
        record = api.ctx.results_dir / rid / "result.json"
        assert json.loads(record.read_text())["state"] == "queued"
        snapshot = tmp_path / "at-crash-queued" / rid
        shutil.copytree(record.parent, snapshot)
        rjob = api.ctx.inference.job(rid)
        # Let the job start, and catch it as it runs: its record says so before the model finishes.
        seen: list[str] = []

        def watch() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and rjob.state != "done":
                try:
                    seen.append(json.loads(record.read_text())["state"])
                except (OSError, ValueError):
                    pass
                if "running" in seen:
                    shutil.copytree(record.parent, tmp_path / "at-crash-running" / rid, dirs_exist_ok=True)
                    seen_running.set()
                    return
                time.sleep(0.001)

        watcher = threading.Thread(target=watch)
        watcher.start()
        release.set()
        watcher.join(70)
    finally:
        release.set()
        seen_running.set()
    assert "running" in seen, seen[-5:]
    for name, state in (("at-crash-queued", "queued"), ("at-crash-running", "running")):
        recover_results(tmp_path / name, api.store, _NoOutbox())
        data = json.loads((tmp_path / name / rid / "result.json").read_text())
        assert data["state"] == "interrupted" and f"was {state}" in data["error"], data


class _NoOutbox:
    def entry(self, sop: str, dest: str) -> None:
        return None


def test_running_click_stops_at_its_next_slice_when_the_client_disconnects(make_api: Any, tmp_path: Any) -> None:
    import dataclasses

    from api_helpers import make_phantom_series
    from config.settings import LiteMedSAMSettings
    from node.app import HttpServer

    ph = make_phantom_series(tmp_path / "tall", shape=(40, 64, 64), seed=1818)  # 3D: one slice after another
    settings = dataclasses.replace(api_settings(tmp_path / "t"), litemedsam=LiteMedSAMSettings(preencode=False))
    api = make_api(settings, series=[ph])
    server = HttpServer(api.app, "127.0.0.1", 0)
    _, port = server.start()
    try:
        sid = api.client.post("/v1/sessions", json={"series": ph.series_instance_uid, "mode": "3d"}).json()["id"]
        sock = _raw_post(port, f"/v1/sessions/{sid}/prompts", _click(ph))
        deadline = time.monotonic() + 60

        def click() -> Any:
            found = [j for j in api.ctx.inference._jobs.values() if j.kind == "session"]
            return found[0] if found else None

        while (click() is None or click().progress[0] < 1) and time.monotonic() < deadline:
            time.sleep(0.005)
        job = click()
        assert job is not None and job.state == "running", job and job.describe()
        sock.close()
        while job.state == "running" and time.monotonic() < deadline:
            time.sleep(0.01)
        # It had started (the model reported progress) and ended cancelled, at a progress callback.
        assert job.state == "cancelled" and job.started is not None and "cancelled" in job.error, job.describe()
        assert api.client.get(f"/v1/sessions/{sid}").json()["steps"] == 0
    finally:
        server.stop()
