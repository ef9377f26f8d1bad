"""kill -9 of ``ainode serve`` while a REST 3D segmentation runs, with results waiting for an archive that is down."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

import peers
from dicom_io.scu import Peer, send_instances
from faults_helpers import (
    Node,
    assert_consistent,
    delivered_count,
    make_phantom,
    orthanc_copies,
    restart_orthanc,
    start_node,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.peers, pytest.mark.slow]


def test_kill_9_during_inference_then_results_delivered_once(tmp_path: Path) -> None:
    orthanc = peers.start_orthanc(tmp_path / "orthanc")
    orthanc.stop()  # the archive is down while the results are produced (its ports and storage are kept)
    config = write_config(tmp_path / "node.toml", f"""
[destinations.PACS]
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {orthanc.port}
timeout = 5
""")
    data_dir = tmp_path / "data"
    ph = make_phantom(tmp_path / "ph", shape=(6, 64, 64), seed=4)
    nodes: list[Node] = []
    try:
        node = start_node(data_dir, config=config)
        nodes.append(node)
        sent = send_instances(Peer("AINODE", "127.0.0.1", node.port, calling_ae_title="MODALITY"), ph.paths)
        assert all(r.status == 0 for r in sent)
        body = {"series": ph.series_instance_uid, "prompts": ph.box_prompt(), "destinations": ["PACS"]}
        results = []
        for _ in range(2):  # two finished results whose SEG waits in the outbox
            code, rec = node.call("POST", "/v1/segmentations", {**body, "mode": "2d"})
            assert code == 201, rec
            assert rec["deliveries"]["PACS"]["state"] == "pending"
            results.append(rec)
        code, running = node.call("POST", "/v1/segmentations", {**body, "mode": "3d", "wait": False})
        assert code == 202, running

        def job_running() -> bool:
            _, r = node.call("GET", f"/v1/segmentations/{running['id']}")
            return bool(r.get("job", {}).get("state") == "running")

        wait_for(job_running, 60, "the 3D job to run")
        time.sleep(0.3)  # into the job (a 3D job on this phantom runs for seconds on a CPU)
        node.kill9()
        # The crash window between "result written" and "SEG queued": drop the second result's outbox row
        # as if the node had died just before queueing it.
        with sqlite3.connect(data_dir / "outbox.sqlite") as db:
            assert db.execute("DELETE FROM outbox WHERE sop_instance_uid=?",
                              (results[1]["seg_sop_instance_uid"],)).rowcount == 1
        db.close()

        orthanc = restart_orthanc(orthanc)
        node = node.restart()
        nodes.append(node)
        # The job that was running is reported, with a clear state; its in-memory job is gone.
        code, lost = node.call("GET", f"/v1/segmentations/{running['id']}")
        assert code == 200 and lost["state"] == "interrupted", lost
        assert "interrupted" in lost["error"] and "submit it again" in lost["error"]
        assert "was running" in lost["error"], lost["error"]  # not "was queued": the record follows the job
        assert node.call("GET", f"/v1/jobs/{running['id']}")[0] == 404
        assert node.call("GET", f"/v1/segmentations/{running['id']}/seg")[0] == 409
        assert [p.name for p in (data_dir / "results" / running["id"]).iterdir()] == ["result.json"]
        # Both finished results are delivered after the restart.
        for rec in results:
            wait_for(lambda rec=rec: node.call("GET", f"/v1/segmentations/{rec['id']}")[1]
                     ["deliveries"]["PACS"]["state"] == "delivered", 30, "a pending result to be delivered")
        # The client submits the interrupted job again.
        code, again = node.call("POST", "/v1/segmentations", {**body, "mode": "3d"})
        assert code == 201 and again["state"] == "done", again
        wait_for(lambda: node.call("GET", f"/v1/segmentations/{again['id']}")[1]["deliveries"]["PACS"]["state"]
                 == "delivered", 30, "the new result to be delivered")
        segs = [r["seg_sop_instance_uid"] for r in (*results, again)]
        for uid in segs:
            assert orthanc_copies(orthanc, uid) == (1, 1), uid
        assert len(peers.orthanc_get(orthanc, "/instances")) == len(segs)
        assert delivered_count(*nodes) == len(segs)  # each SEG acknowledged by Orthanc exactly once
        assert_consistent(data_dir)
    finally:
        for n in nodes:
            n.proc.stop()
        orthanc.stop(timeout=15)
