"""The compose deployment's config files, run natively (no Docker engine here).

Debian's Orthanc 1.10 runs docker/orthanc/orthanc.json + route.lua, and ``ainode serve`` (the image's entry
point) runs docker/ainode.toml, each with only the host-specific values changed (docker_helpers.py says
which and how), all on 127.0.0.1. A series sent to Orthanc by storescu must reach the node through the
Lua routing of the stable series; a SEG the node makes through its REST API must reach Orthanc through
the node's configured destination, and must not be routed back to the node.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import docker_helpers as dh  # noqa: E402
import peers  # noqa: E402

pytestmark = pytest.mark.peers


def _http_json(port: int, method: str, path: str, body: Any = None, timeout: float = 300.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as rsp:
        raw = rsp.read()
    return json.loads(raw) if raw else None


def _healthcheck(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """docker/healthcheck.py exactly as the image's HEALTHCHECK runs it (with the native AINODE_* overrides)."""
    return subprocess.run([sys.executable, str(dh.HEALTHCHECK), "--config", str(config)], capture_output=True,
                          text=True, timeout=60, env=dh.clean_env(**env))


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    for program in (peers.ORTHANC, "storescu", "wget"):
        if not peers.have(program):
            pytest.fail(f"{program} is not installed: scripts/install.sh --test installs the peers the tests need")
    if not Path(dh.ORTHANC_HOST_VARIABLES["ORTHANC_PLUGINS_DIR"], "libOrthancDicomWeb.so").exists():
        pytest.fail("Orthanc's DICOMweb plugin is missing "
                    "(apt-get install orthanc-dicomweb; scripts/install.sh --test)")
    node_dimse, node_http = peers.free_port(), peers.free_port()
    started: list[peers.Proc] = []
    try:
        orthanc = dh.start_orthanc(tmp_path / "orthanc", node_port=node_dimse)
        started.append(orthanc)
        config = dh.native_node_toml(tmp_path / "ainode.toml", orthanc_dicom_port=orthanc.port,
                                     orthanc_http_port=orthanc.http_port)
        node = dh.start_node(tmp_path / "data", config, node_dimse, node_http)
        started.append(node)
        yield {"orthanc": orthanc, "node": node, "config": config,
               "env": dh.node_env(tmp_path / "data", node_dimse, node_http), "tmp": tmp_path}
    finally:
        for proc in reversed(started):
            proc.stop(timeout=20)


def test_orthanc_routes_stable_series_to_node_and_seg_comes_back(stack: dict[str, Any]) -> None:
    from dicom_io.phantom import write_phantom_series

    orthanc, node = stack["orthanc"], stack["node"]
    # Orthanc's DICOMweb plugin is loaded from the path the config names, and its Lua routing is live.
    assert "dicom-web" in peers.orthanc_get(orthanc, "/plugins")
    phantom = write_phantom_series(stack["tmp"] / "ct", shape=(3, 64, 64), spacing=(1.5, 1.5, 3.0))
    series_uid, study_uid = phantom.series_instance_uid, phantom.study_instance_uid
    subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "ORTHANC", "127.0.0.1", str(orthanc.port),
                    *map(str, phantom.paths)], check=True, capture_output=True, timeout=120,
                   env=dh.clean_env(TCP_NODELAY="1"))

    # StableAge (5 s) later, route.lua sends the series to the node; the node's store then holds all of it.
    def node_instances() -> list[Any]:
        try:
            return _http_json(node.http_port, "GET", f"/dicomweb/studies/{study_uid}/series/{series_uid}/instances",
                              timeout=10) or []
        except urllib.error.HTTPError:
            return []

    assert peers.wait_until(lambda: len(node_instances()) == len(phantom.paths), timeout=60, interval=0.5), (
        "the node did not receive the series from Orthanc\n"
        f"{dh.orthanc_log(orthanc)[-3000:]}\n{node.log_text()[-3000:]}")
    orthanc_series = peers.orthanc_request(orthanc, "POST", "/tools/lookup", series_uid.encode())
    orthanc_series_id = orthanc_series[0]["ID"]
    assert f"ainode-route: series {orthanc_series_id} -> AINODE, job " in dh.orthanc_log(orthanc)
    sent = {i["00080018"]["Value"][0] for i in node_instances()}
    assert sent == set(_sop_uids(phantom.paths))

    # A SEG made on the node goes to Orthanc through deliver_to = ["ORTHANC"] (the outbox, C-STORE).
    k = int(np.argmax(phantom.mask.sum(axis=(1, 2))))
    ys, xs = np.nonzero(phantom.mask[k])
    box = [[int(xs.min()) - 3, int(ys.min()) - 3, k], [int(xs.max()) + 3, int(ys.max()) + 3, k]]
    result = _http_json(node.http_port, "POST", "/v1/segmentations", {
        "series": {"series_instance_uid": series_uid}, "prompts": {"boxes": [{"ijk": box}]}, "mode": "2d",
        "segment": {"label": "Lesion"}})
    assert result["state"] == "done" and result["voxel_count"] > 0, result
    assert set(result["deliveries"]) == {"ORTHANC"}
    seg_series = result["seg_series_instance_uid"]

    def delivered() -> bool:
        doc = _http_json(node.http_port, "GET", f"/v1/segmentations/{result['id']}", timeout=10)
        return bool(doc["deliveries"]["ORTHANC"]["state"] == "delivered")

    assert peers.wait_until(delivered, timeout=60, interval=0.5), node.log_text()[-3000:]
    found = peers.orthanc_request(orthanc, "POST", "/tools/find", {
        "Level": "Series", "Query": {"SeriesInstanceUID": seg_series}, "Expand": True})
    assert len(found) == 1 and found[0]["MainDicomTags"]["Modality"] == "SEG"
    assert found[0]["ParentStudy"] == peers.orthanc_get(orthanc, f"/series/{orthanc_series_id}")["ParentStudy"]
    seg_id = found[0]["ID"]

    # The SEG becomes stable in Orthanc too; route.lua must not send it back to the node.
    assert peers.wait_until(lambda: f"ainode-route: series {seg_id} (SEG) is a result, not routed"
                            in dh.orthanc_log(orthanc), timeout=30, interval=0.5), dh.orthanc_log(orthanc)[-3000:]
    jobs = peers.orthanc_get(orthanc, "/jobs?expand")
    routed = [j for j in jobs if j["Type"] == "DicomModalityStore"]
    assert len(routed) == 1 and routed[0]["State"] == "Success", routed
    assert routed[0]["Content"]["RemoteAet"] == "AINODE"
    assert routed[0]["Content"]["ParentResources"] == [orthanc_series_id]

    # compose's Orthanc health check (wget on /system), with the host's port for the container's 8042.
    check = dh.compose()["services"]["orthanc"]["healthcheck"]["test"][1:]
    assert subprocess.run([a.replace(":8042/", f":{orthanc.http_port}/") for a in check], timeout=30).returncode == 0
    assert subprocess.run([a.replace(":8042/", f":{peers.free_port()}/") for a in check], timeout=30).returncode != 0

    # docker/healthcheck.py, as the image's HEALTHCHECK runs it: healthy, then not once the node stops.
    ok = _healthcheck(stack["config"], stack["env"])
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"healthy: http://127.0.0.1:{node.http_port}/health"
    disabled = _healthcheck(stack["config"], {**stack["env"], "AINODE_HTTP_PORT": "0"})
    assert disabled.returncode == 2 and "disabled" in disabled.stderr
    # OHIF served by the node ([viewer] archive = ORTHANC_WEB): its data source is the node's proxy to Orthanc,
    # which lists the study's CT and the SEG.
    with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/ohif/app-config.js", timeout=30) as rsp:
        assert "/ohif-archive" in rsp.read().decode()
    with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/ohif/", timeout=30) as rsp:
        assert rsp.status == 200 and b"<html" in rsp.read().lower()
    listed = _http_json(node.http_port, "GET", f"/ohif-archive/studies/{study_uid}/series", timeout=30)
    assert {s["0020000E"]["Value"][0]: s["00080060"]["Value"][0] for s in listed} == {series_uid: "CT",
                                                                                      seg_series: "SEG"}

    node.stop(timeout=20)
    down = _healthcheck(stack["config"], stack["env"])
    assert down.returncode == 1 and down.stderr.startswith("unhealthy: http://127.0.0.1:"), down.stderr


def _sop_uids(paths: list[Path]) -> list[str]:
    import pydicom

    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]


def test_routing_failure_is_reported_and_resubmit_delivers(tmp_path: Path) -> None:
    """Node down when the series becomes stable: the failed job is logged with how to re-send it, and
    re-submitting it (what the log line says) delivers the series once the node is up. A series the node
    itself sent to Orthanc is never routed back to it."""
    if not peers.have(peers.ORTHANC) or not peers.have("storescu"):
        pytest.fail("Orthanc and dcmtk are needed: scripts/install.sh --test")
    from dicom_io.phantom import write_phantom_series

    node_dimse, node_http = peers.free_port(), peers.free_port()
    orthanc = dh.start_orthanc(tmp_path / "orthanc", node_port=node_dimse)
    node = None
    try:
        phantom = write_phantom_series(tmp_path / "ct", shape=(3, 32, 32))
        # A series that comes from the node itself (calling AE AINODE, e.g. a forwarded one) is not routed back.
        echo = write_phantom_series(tmp_path / "from-node", shape=(2, 32, 32), seed=1)
        for calling, series in (("MODALITY", phantom), ("AINODE", echo)):
            subprocess.run(["storescu", "-aet", calling, "-aec", "ORTHANC", "127.0.0.1", str(orthanc.port),
                            *map(str, series.paths)], check=True, capture_output=True, timeout=120,
                           env=dh.clean_env(TCP_NODELAY="1"))
        echo_id = peers.orthanc_request(orthanc, "POST", "/tools/lookup", echo.series_instance_uid.encode())[0]["ID"]
        assert peers.wait_until(lambda: f"ainode-route: series {echo_id} came from the node, not routed"
                                in dh.orthanc_log(orthanc), timeout=60, interval=0.5), dh.orthanc_log(orthanc)[-3000:]
        assert peers.wait_until(lambda: "failed (" in dh.orthanc_log(orthanc), timeout=60, interval=0.5), \
            dh.orthanc_log(orthanc)[-3000:]
        log = dh.orthanc_log(orthanc)
        line = next(ln for ln in log.splitlines() if "ainode-route: job " in ln and "failed" in ln)
        job_id = line.split("ainode-route: job ", 1)[1].split()[0]
        assert f"/jobs/{job_id}/resubmit" in line
        assert peers.orthanc_get(orthanc, f"/jobs/{job_id}")["State"] == "Failure"
        assert [j["ID"] for j in peers.orthanc_get(orthanc, "/jobs?expand")
                if j["Type"] == "DicomModalityStore"] == [job_id]

        config = dh.native_node_toml(tmp_path / "ainode.toml", orthanc_dicom_port=orthanc.port,
                                     orthanc_http_port=orthanc.http_port)
        node = dh.start_node(tmp_path / "data", config, node_dimse, node_http)
        peers.orthanc_request(orthanc, "POST", f"/jobs/{job_id}/resubmit", b"")
        assert peers.wait_until(lambda: peers.orthanc_get(orthanc, f"/jobs/{job_id}")["State"] == "Success",
                                timeout=60, interval=0.5)
        got = _http_json(node.http_port, "GET", f"/dicomweb/studies/{phantom.study_instance_uid}/series/"
                         f"{phantom.series_instance_uid}/instances", timeout=10)
        assert len(got) == len(phantom.paths)
    finally:
        if node is not None:
            node.stop(timeout=20)
        orthanc.stop(timeout=20)
