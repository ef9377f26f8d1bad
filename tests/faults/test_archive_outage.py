"""Archive outage: Orthanc killed while SEGs are produced, the node restarted meanwhile, Orthanc back."""

from __future__ import annotations

import signal
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

pytestmark = pytest.mark.peers


def test_outage_and_node_restart_each_seg_delivered_exactly_once(tmp_path: Path) -> None:
    orthanc = peers.start_orthanc(tmp_path / "orthanc")
    config = write_config(tmp_path / "node.toml", f"""
[destinations.PACS]
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {orthanc.port}
timeout = 5
""")
    data_dir = tmp_path / "data"
    ph = make_phantom(tmp_path / "ph", shape=(4, 48, 48), seed=5)
    nodes: list[Node] = []
    try:
        node = start_node(data_dir, config=config)
        nodes.append(node)
        sent = send_instances(Peer("AINODE", "127.0.0.1", node.port, calling_ae_title="MODALITY"), ph.paths)
        assert all(r.status == 0 for r in sent)
        body = {"series": ph.series_instance_uid, "prompts": ph.box_prompt(), "destinations": ["PACS"], "mode": "2d"}

        def segment() -> dict:
            code, rec = node.call("POST", "/v1/segmentations", body)
            assert code == 201, (rec, node.proc.log_text()[-3000:])
            return rec

        def delivery(rec: dict) -> dict:
            return node.call("GET", f"/v1/segmentations/{rec['id']}")[1]["deliveries"]["PACS"]

        first = segment()
        wait_for(lambda: delivery(first)["state"] == "delivered", 30, "delivery while Orthanc is up")

        orthanc.stop(signal.SIGKILL)
        second = segment()
        wait_for(lambda: delivery(second)["attempts"] >= 2, 30, "failed delivery attempts during the outage")
        assert delivery(second)["state"] == "pending" and delivery(second)["detail"]

        node.proc.stop(signal.SIGTERM, timeout=30)  # the node is restarted during the outage
        assert node.proc.popen.returncode == 0, node.proc.log_text()[-2000:]
        node = node.restart()
        nodes.append(node)
        third = segment()
        assert delivery(second)["state"] == "pending" and delivery(third)["state"] == "pending"

        orthanc = restart_orthanc(orthanc)  # same storage and ports
        for rec in (second, third):
            wait_for(lambda rec=rec: delivery(rec)["state"] == "delivered", 30, "delivery after the outage")
        segs = [r["seg_sop_instance_uid"] for r in (first, second, third)]
        for uid in segs:
            assert orthanc_copies(orthanc, uid) == (1, 1), uid
        assert len(peers.orthanc_get(orthanc, "/instances")) == len(segs)
        assert delivered_count(*nodes) == len(segs)
        assert_consistent(data_dir)
    finally:
        for n in nodes:
            n.proc.stop()
        orthanc.stop(timeout=15)
