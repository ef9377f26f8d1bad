"""The Ray backend (inference.backend = "ray"): a real local Ray cluster with 2 CPU replicas, the node in front.

One cluster (head + Serve, ``--num-cpus 2``) is started for the module and stopped by its process group at
the end; the node is a real :class:`~node.service.NodeService` (DIMSE, DICOMweb, REST) that the replicas read
series pixels from over WADO-RS.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import peers
from config.settings import Settings
from dicom_io.phantom import write_phantom_series
from dicom_io.scu import Peer, send_instances
from dicom_io.series import load_series
from models.base import BoxPrompt, PointPrompt, Prompts
from models.registry import load_segmenter
from node.api.native import unpack_mask
from node.pipeline import image_volume
from node.service import NodeService

RAY = str(Path(sys.executable).with_name("ray"))


@dataclass
class Phantom:
    paths: list[Path]
    study: str
    series: str
    k: int
    center: tuple[float, float]
    box: tuple[float, float, float, float]


def _phantom(out: Path, shape: tuple[int, int, int], seed: int) -> Phantom:
    p = write_phantom_series(out, shape=shape, spacing=(1.2, 1.2, 3.0), seed=seed)
    k = int(np.argmax(p.mask.sum(axis=(1, 2))))
    ys, xs = np.nonzero(p.mask[k])
    return Phantom(p.paths, p.study_instance_uid, p.series_instance_uid, k, (float(xs.mean()), float(ys.mean())),
                   (float(xs.min() - 3), float(ys.min() - 3), float(xs.max() + 3), float(ys.max() + 3)))


def _toml(data_dir: Path, dimse: int, http: int, serve: int, ray_port: int) -> str:
    return f"""
data_dir = "{data_dir}"
[model]
device = "cpu"
threads = 1
load_at_start = false
[litemedsam]
encoder_backend = "fused"
preencode = false
[store]
min_free_gb = 0.0
stable_after_seconds = 0.5
stable_poll_seconds = 0.1
spare_files = 32
[dimse]
host = "127.0.0.1"
port = {dimse}
[http]
host = "127.0.0.1"
port = {http}
[inference]
backend = "ray"
ray_address = "127.0.0.1:{ray_port}"
serve_url = "http://127.0.0.1:{serve}/ainode"
serve_port = {serve}
replicas = 2
replica_cpus = 1.0
replica_concurrency = 2
request_timeout_seconds = 120.0
"""


@dataclass
class Cluster:
    settings: Settings
    node: NodeService
    base: str
    series: dict[str, Phantom]
    log: Path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("scaleout")
    ray_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay short
    ray_port, serve_port = peers.free_port(), peers.free_port()
    config = root / "ainode.toml"
    config.write_text(_toml(root / "data", peers.free_port(), peers.free_port(), serve_port, ray_port))
    settings = Settings.load(config, environ={})
    env = {**os.environ, "PYTHONPATH": str(peers.ROOT), "RAY_USAGE_STATS_ENABLED": "0",
           "AINODE_CONFIG": str(config), "OMP_NUM_THREADS": "1"}
    log = root / "ray.log"
    with log.open("wb") as out:
        head = subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--port={ray_port}", "--num-cpus=2", "--num-gpus=0",
             "--include-dashboard=false", "--disable-usage-stats", "--object-store-memory=150000000",
             f"--temp-dir={ray_dir}"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    node = NodeService(settings)
    try:
        node.start()
        series = {name: _phantom(root / name, shape, seed)
                  for name, shape, seed in (("a", (8, 64, 64), 1), ("b", (8, 64, 64), 2), ("c", (16, 64, 64), 3))}
        peer = Peer("AINODE", "127.0.0.1", settings.dimse.port)
        for ph in series.values():
            assert all(r.ok for r in send_instances(peer, ph.paths))
        deadline = time.monotonic() + 240
        while True:  # the head takes a few seconds to accept drivers
            done = subprocess.run([sys.executable, "-m", "node.cli", "scaleout", "deploy", "--config", str(config)],
                                  env=env, cwd=peers.ROOT, check=False, capture_output=True, text=True, timeout=300)
            if done.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + log.read_text()[-2000:]
        assert node.http_address is not None
        yield Cluster(settings, node, f"http://127.0.0.1:{node.http_address[1]}", series, log)
    finally:
        node.stop()
        try:
            os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops what it started
            head.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)
        except ProcessLookupError:
            pass
        shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(cluster: Cluster) -> Any:
    """The local backend's model (same settings) for voxel-for-voxel comparisons."""
    return load_segmenter("litemedsam", cluster.settings)


def _local(reference: Any, ph: Phantom, prompts: Prompts, mode: str) -> np.ndarray:
    volume = image_volume(load_series(ph.paths, series_uid=ph.series))
    return np.asarray(reference.segment(volume, prompts, mode=mode).mask, dtype=bool)


def _session(c: Cluster, ph: Phantom, mode: str = "2d") -> str:
    r = httpx.post(f"{c.base}/v1/sessions", json={"series": {"series_instance_uid": ph.series}, "mode": mode},
                   timeout=60)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _click(c: Cluster, sid: str, body: dict[str, Any], timeout: float = 180) -> httpx.Response:
    return httpx.post(f"{c.base}/v1/sessions/{sid}/prompts", json=body, timeout=timeout)


def _mask(c: Cluster, sid: str, shape: tuple[int, int, int]) -> np.ndarray:
    r = httpx.get(f"{c.base}/v1/sessions/{sid}/mask?output=bin", timeout=60)
    assert r.status_code == 200, r.text
    return unpack_mask(r.content, shape)


def _running(c: Cluster) -> int:
    status = httpx.get(f"{c.base}/v1/status", timeout=10).json()["queues"].get("litemedsam", {})
    return int(status.get("running_count") or 0)


def _shape(ph: Phantom) -> tuple[int, int, int]:
    return (len(ph.paths), 64, 64)


def test_results_equal_the_local_backend_voxel_for_voxel(cluster: Cluster, reference: Any) -> None:
    ph = cluster.series["a"]
    sid = _session(cluster, ph)
    x, y = ph.center
    first = _click(cluster, sid, {"points": [{"ijk": [x, y, ph.k]}]})
    assert first.status_code == 200, first.text
    want = _local(reference, ph, Prompts(points=(PointPrompt(x, y, ph.k),)), "2d")
    got = _mask(cluster, sid, _shape(ph))
    assert want.any() and np.array_equal(got, want)
    x0, y0, x1, y1 = ph.box
    second = _click(cluster, sid, {"boxes": [{"ijk": [[x0, y0, ph.k], [x1, y1, ph.k]]}], "mode": "3d"})
    assert second.status_code == 200, second.text
    want3 = _local(reference, ph, Prompts(points=(PointPrompt(x, y, ph.k),), boxes=(BoxPrompt(x0, y0, x1, y1, ph.k),)),
                   "3d")
    got3 = _mask(cluster, sid, _shape(ph))
    assert len(np.flatnonzero(want3.any(axis=(1, 2)))) > 1 and np.array_equal(got3, want3)
    stats = second.json()["stats"]
    assert stats["replica_pid"] > 0 and stats["replica_series_loaded"] == 0  # the series stayed on its replica


def _sticks(c: Cluster, ph: Phantom) -> int:
    """Three clicks on the series; all answered by one replica, whose pid is returned."""
    sid = _session(c, ph)
    x, y = ph.center
    pids = set()
    for dx in (0.0, 1.0, -1.0):
        r = _click(c, sid, {"points": [{"ijk": [x + dx, y, ph.k]}]})
        assert r.status_code == 200, r.text
        pids.add(int(r.json()["stats"]["replica_pid"]))
    assert len(pids) == 1, f"series {ph.series} was answered by replicas {pids}"
    return pids.pop()


def test_a_series_sticks_to_one_replica_another_goes_to_the_other(cluster: Cluster, tmp_path: Path) -> None:
    first = _sticks(cluster, cluster.series["a"])
    # Serve sends a series no replica holds to the replica holding the fewest; which one that is depends on
    # what the module's other tests (in random order) loaded, so new series are opened until one goes to
    # the other replica: within three, as the test's replicas differ by at most two series.
    others = []
    for n in range(3):
        ph = _phantom(tmp_path / f"new{n}", (6, 64, 64), 10 + n)
        assert all(r.ok for r in send_instances(Peer("AINODE", "127.0.0.1", cluster.settings.dimse.port), ph.paths))
        others.append(_sticks(cluster, ph))
        if others[-1] != first:
            break
    assert others[-1] != first, (first, others)
    assert _sticks(cluster, cluster.series["a"]) == first  # and the first series stayed where it was


def test_a_replica_killed_mid_request_retries_or_503_never_a_wrong_mask(cluster: Cluster, reference: Any) -> None:
    ph = cluster.series["c"]
    x0, y0, x1, y1 = ph.box
    warm = _session(cluster, ph)  # where series c lives
    r = _click(cluster, warm, {"points": [{"ijk": [ph.center[0], ph.center[1], ph.k]}]})
    assert r.status_code == 200, r.text
    victim = int(r.json()["stats"]["replica_pid"])
    sid = _session(cluster, ph, mode="3d")
    body = {"boxes": [{"ijk": [[x0, y0, ph.k], [x1, y1, ph.k]]}]}
    answer: dict[str, Any] = {}

    def send() -> None:
        answer["r"] = _click(cluster, sid, body)
        answer["at"] = time.monotonic()

    worker = threading.Thread(target=send)
    worker.start()
    assert peers.wait_until(lambda: _running(cluster) > 0, timeout=60)
    time.sleep(0.3)  # the 3D request runs on the replica holding series c (16 slices to encode)
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)  # a process of the cluster this module started
    worker.join(300)
    rsp = answer["r"]
    assert answer["at"] > killed, "the request finished before the kill: the test proved nothing"
    want = _local(reference, ph, Prompts(boxes=(BoxPrompt(x0, y0, x1, y1, ph.k),)), "3d")
    if rsp.status_code == 200:
        assert rsp.json()["stats"]["replica_pid"] != victim
        assert np.array_equal(_mask(cluster, sid, _shape(ph)), want)
    else:
        assert rsp.status_code == 503 and int(rsp.headers["Retry-After"]) > 0, rsp.text
    again = _click(cluster, _session(cluster, ph, mode="3d"), body)
    assert again.status_code == 200, again.text
    assert again.json()["stats"]["replica_pid"] != victim


def test_ray_unreachable_inference_503_while_c_store_still_stores(tmp_path: Path, cluster: Cluster) -> None:
    closed = peers.free_port()  # nothing listens there: the cluster as a node sees it when Ray is down
    s = cluster.settings
    import dataclasses

    settings = dataclasses.replace(
        s, data_dir=str(tmp_path / "node"),
        dimse=dataclasses.replace(s.dimse, port=peers.free_port()),
        http=dataclasses.replace(s.http, port=peers.free_port()),
        inference=dataclasses.replace(s.inference, serve_url=f"http://127.0.0.1:{closed}/ainode"))
    node = NodeService(settings)
    node.start()
    try:
        ph = cluster.series["a"]
        results = send_instances(Peer("AINODE", "127.0.0.1", settings.dimse.port), ph.paths)
        assert all(r.ok for r in results)
        assert node.store is not None and node.store.get_series(ph.series).num_instances == len(ph.paths)
        base = f"http://127.0.0.1:{settings.http.port}"
        sid = httpx.post(f"{base}/v1/sessions", json={"series": {"series_instance_uid": ph.series}}, timeout=60)
        assert sid.status_code == 201, sid.text
        r = httpx.post(f"{base}/v1/sessions/{sid.json()['id']}/prompts",
                       json={"points": [{"ijk": [ph.center[0], ph.center[1], ph.k]}]}, timeout=60)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) == s.api.retry_after_seconds, r.text
        assert "inference replicas" in r.json()["error"]
    finally:
        node.stop()


def test_preencoding_on_arrival_runs_on_the_replica_that_then_serves_the_series(tmp_path: Path,
                                                                                 cluster: Cluster) -> None:
    import dataclasses

    s = cluster.settings
    # A second node in front of the same replicas, with pre-encoding on. Its series are not on the node the
    # replicas read WADO-RS from (inference.series_url), so they also prove the fallback: the voxels are sent.
    settings = dataclasses.replace(
        s, data_dir=str(tmp_path / "node"), dimse=dataclasses.replace(s.dimse, port=peers.free_port()),
        http=dataclasses.replace(s.http, port=peers.free_port()),
        litemedsam=dataclasses.replace(s.litemedsam, preencode=True))
    node = NodeService(settings)
    node.start()
    try:
        ph = _phantom(tmp_path / "arrival", (6, 64, 64), 20)
        assert all(r.ok for r in send_instances(Peer("AINODE", "127.0.0.1", settings.dimse.port), ph.paths))
        assert node.api is not None

        def encoded() -> bool:
            st = node.api.inference.status().get("litemedsam", {})
            return st.get("completed", 0) >= 1 and st["background"] == 0 and st["running_count"] == 0
        assert peers.wait_until(encoded, timeout=120, interval=0.2), node.api.inference.status()
        base = f"http://127.0.0.1:{settings.http.port}"
        sid = httpx.post(f"{base}/v1/sessions", json={"series": {"series_instance_uid": ph.series}}, timeout=60)
        assert sid.status_code == 201, sid.text
        r = httpx.post(f"{base}/v1/sessions/{sid.json()['id']}/prompts",
                       json={"points": [{"ijk": [ph.center[0], ph.center[1], ph.k]}]}, timeout=120)
        assert r.status_code == 200, r.text
        stats = r.json()["stats"]
        assert stats["slices_encoded"] == 0 and stats["replica_series_loaded"] == 0, stats
    finally:
        node.stop()


def test_a_series_that_grew_is_read_again_never_answered_from_the_old_copy(tmp_path: Path, cluster: Cluster,
                                                                             reference: Any) -> None:
    ph = _phantom(tmp_path / "grows", (8, 64, 64), 30)
    peer = Peer("AINODE", "127.0.0.1", cluster.settings.dimse.port)
    order = list(ph.paths)  # in slice order: the later ones extend the series at its end
    assert all(r.ok for r in send_instances(peer, order[:6]))  # the first six instances arrive
    x, y = ph.center
    k = min(ph.k, 5)
    click = {"points": [{"ijk": [x, y, k]}]}
    first = _click(cluster, _session(cluster, ph), click)
    assert first.status_code == 200, first.text
    assert first.json()["shape"][0] == 6 and first.json()["stats"]["replica_series_loaded"] == 1
    assert all(r.ok for r in send_instances(peer, order[6:]))  # the rest arrive later
    sid = _session(cluster, ph)
    again = _click(cluster, sid, click)
    assert again.status_code == 200, again.text
    assert again.json()["shape"][0] == 8
    assert again.json()["stats"]["replica_series_loaded"] == 1  # same routing key, new fingerprint: read again
    want = _local(reference, ph, Prompts(points=(PointPrompt(x, y, k),)), "2d")
    assert want.any() and np.array_equal(_mask(cluster, sid, _shape(ph)), want)
