"""No patient identifiers in any log line at any level, on every path (canary values, all loggers at DEBUG).

In-process: a NodeService (DIMSE + HTTP + outbox + real LiteMedSAM) with every logger at DEBUG captured
by a handler on the root. Subprocesses (``ainode serve``, ``ainode segment``): their stderr/log files,
started with ``--log-level DEBUG`` / ``AINODE_LOG_LEVEL=DEBUG``.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

import peers
from api_helpers import make_phantom_series
from config.settings import ApiSettings, DestinationSettings, HttpSettings
from dicom_io.scu import Peer, send_instances
from dw_helpers import DICOMWEB_PLUGIN, start_orthanc_dicomweb, upload
from phi import CANARY, all_loggers_at_debug, leaks, make_sr, scan, with_canary

pytestmark = pytest.mark.peers


def _stow(base: str, paths: list[Path] = (), raw: list[bytes] = ()) -> httpx.Response:
    boundary = "canaryboundary"
    parts = [p.read_bytes() for p in paths] + list(raw)
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
                    for part in parts) + f"--{boundary}--\r\n".encode()
    return httpx.post(f"{base}/dicomweb/studies", content=body, timeout=60,
                      headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Any:
    if not peers.have(peers.ORTHANC) or not DICOMWEB_PLUGIN.exists():
        pytest.fail("Orthanc and its DICOMweb plugin are not installed: scripts/install.sh --test installs them")
    proc = start_orthanc_dicomweb(tmp_path_factory.mktemp("orthanc-phi"))
    yield proc
    proc.stop(timeout=15)


def _box(ph: Any) -> dict[str, Any]:
    x0, y0, x1, y1 = ph.box
    return {"boxes": [{"ijk": [[x0, y0, ph.k], [x1, y1, ph.k]]}]}


def test_in_process_paths_log_no_patient_identifiers(start_node: Any, orthanc: Any, tmp_path: Path) -> None:
    a = make_phantom_series(tmp_path / "a")  # C-STORE
    b = make_phantom_series(tmp_path / "b")  # STOW-RS
    c = make_phantom_series(tmp_path / "c")  # on Orthanc: pulled by the node
    for s in (a, b, c):
        with_canary(s.paths)
    sr = make_sr(tmp_path / "sr" / "sr.dcm", a.study_instance_uid)
    truncated = a.paths[0].read_bytes()[:1500]  # the patient module is in there, the pixels are not
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "truncated.dcm").write_bytes(truncated)
    upload(orthanc, c.paths)

    s = peers.node_settings(tmp_path / "node", allowed_callers=("MODALITY@127.0.0.1", "ORTHANCDW"))
    orthanc_dw = DestinationSettings(kind="dicomweb", url=f"http://127.0.0.1:{orthanc.http_port}/dicom-web")
    s = dataclasses.replace(s, http=HttpSettings(host="127.0.0.1", port=peers.free_port()),
                            destinations={"ORTHANC": orthanc_dw}, api=ApiSettings(archive="ORTHANC"),
                            log_level="DEBUG")
    with all_loggers_at_debug() as lines:
        node = start_node(s)
        base = f"http://127.0.0.1:{node.service.http_address[1]}"
        peer = Peer("AINODE", "127.0.0.1", node.port, calling_ae_title="MODALITY")
        # C-STORE: the series, an SR, and a truncated instance (refused, quarantined).
        assert all(r.ok for r in send_instances(peer, [*a.paths, sr]))
        bad = send_instances(peer, [tmp_path / "bad" / "truncated.dcm"])
        assert not bad[0].ok
        # A refused association (calling AE not allowed).
        intruder = send_instances(Peer("AINODE", "127.0.0.1", node.port, calling_ae_title="INTRUDER"), [a.paths[0]])
        assert not intruder[0].ok
        # STOW-RS: a series plus a truncated part.
        r = _stow(base, b.paths, [truncated])
        assert r.status_code == 202, r.text
        # Pull from Orthanc and segment (SEG delivered back to Orthanc by STOW-RS through the outbox).
        r = httpx.post(f"{base}/v1/segmentations", timeout=300, json={
            "series": {"series_instance_uid": c.series_instance_uid, "study_instance_uid": c.study_instance_uid,
                       "archive": "ORTHANC"}, "prompts": _box(c), "mode": "2d", "destinations": ["ORTHANC"]})
        assert r.status_code == 201, r.text
        # Segment the C-STOREd series, with bad prompts first; then an SR series (wrong SOP class).
        r = httpx.post(f"{base}/v1/segmentations", timeout=300, json={
            "series": a.series_instance_uid, "prompts": {"points": [{"ijk": [5, 5, 99]}]}})
        assert r.status_code == 422
        r = httpx.post(f"{base}/v1/segmentations", timeout=300, json={
            "series": a.series_instance_uid, "prompts": _box(a), "mode": "2d", "destinations": []})
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        assert httpx.get(f"{base}/v1/segmentations/{rid}/seg", timeout=60).status_code == 200
        sr_uid = pydicom.dcmread(sr).SeriesInstanceUID
        r = httpx.post(f"{base}/v1/segmentations", timeout=300, json={"series": sr_uid, "prompts": _box(a)})
        assert 400 <= r.status_code < 500, r.text
        # A session on the STOWed series (the MONAI Label / OHIF-AI flavour).
        r = httpx.post(f"{base}/infer/sam_2d?image={b.series_instance_uid}&output=json", timeout=300,
                       files={"params": (None, json.dumps({"foreground": [[*(int(v) for v in b.center), b.k]]}))})
        assert r.status_code == 200, r.text
        # QIDO / WADO on the node (answers carry the identifiers; the logs must not).
        assert httpx.get(f"{base}/dicomweb/studies", params={"PatientID": CANARY["PatientID"]}).status_code == 200
        assert httpx.get(f"{base}/dicomweb/studies/{a.study_instance_uid}/metadata").status_code == 200
        # Wait for the SEG of the pulled series to reach Orthanc.
        assert peers.wait_until(lambda: node.outbox.counts().get("delivered", 0) >= 1, timeout=60), \
            node.outbox.counts()
        # The admin view of the outbox (authentication is off here: every role).
        out = httpx.get(f"{base}/v1/outbox", params={"state": "delivered"}, timeout=30).json()
        assert out["counts"]["delivered"] >= 1 and out["entries"][0]["destination"] == "ORTHANC"
        node.service.stop()
        captured = list(lines)
    assert len(captured) > 50  # DEBUG really was on
    assert any("pynetdicom" in line for line in captured)
    assert any(line.startswith("DEBUG") for line in captured)
    scan(captured)


def test_subprocess_node_and_cli_log_no_patient_identifiers(tmp_path: Path) -> None:
    if not peers.have("storescu"):
        pytest.fail("dcmtk is not installed: scripts/install.sh --test installs the peers the tests need")
    a = make_phantom_series(tmp_path / "a")
    with_canary(a.paths)
    truncated = tmp_path / "bad" / "truncated.dcm"
    truncated.parent.mkdir()
    truncated.write_bytes(a.paths[1].read_bytes()[:1500])
    http_port = peers.free_port()
    node = peers.start_node(tmp_path / "node", extra_env={"AINODE_LOG_LEVEL": "DEBUG",
                                                          "AINODE_HTTP_PORT": str(http_port)})
    try:
        peers.wait_tcp(http_port, timeout=60, proc=node.popen)
        env = {"TCP_NODELAY": "1"}
        r = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "AINODE", "127.0.0.1", str(node.port),
                            *map(str, a.paths)], capture_output=True, text=True, timeout=120,
                           env={**__import__("os").environ, **env})
        assert r.returncode == 0, r.stderr
        subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "AINODE", "127.0.0.1", str(node.port),
                        str(truncated)], capture_output=True, text=True, timeout=120)
        base = f"http://127.0.0.1:{http_port}"
        assert _stow(base, [], [truncated.read_bytes()]).status_code in (200, 202, 409)
        r = httpx.post(f"{base}/v1/segmentations", timeout=300, json={
            "series": a.series_instance_uid, "prompts": {"boxes": [{"ijk": [[1, 1, 0], [1, 1, 1]]}]}})
        assert r.status_code == 422
    finally:
        node.stop()
    log = node.log_text()
    assert "DEBUG   asyncio" in log and "pynetdicom" in log, log[-3000:]  # third parties at DEBUG too
    scan(log)
    # The CLI: ``ainode segment`` at DEBUG, a good run and a bad prompt.
    x0, y0, x1, y1 = a.box
    cli = [sys.executable, "-m", "node.cli", "segment", str(a.paths[0].parent), "--log-level", "DEBUG",
           "--no-progress", "--2d", "--out", str(tmp_path / "out")]
    # encoder_backend fused: exact and quick to start (this test is about the logs, not the encoder).
    env = {**__import__("os").environ, "AINODE_DATA_DIR": str(tmp_path / "cli-data"),
           "AINODE_LITEMEDSAM_ENCODER_BACKEND": "fused"}
    ok = subprocess.run([*cli, "--box", f"{x0:.0f},{y0:.0f},{x1:.0f},{y1:.0f}@{a.k}"], capture_output=True,
                        text=True, timeout=600, cwd=peers.ROOT, env=env)
    wrong = subprocess.run([*cli, "--point", "5,5@99"], capture_output=True, text=True, timeout=600,
                           cwd=peers.ROOT, env=env)
    for out in (ok.stdout, ok.stderr, wrong.stdout, wrong.stderr):
        assert not leaks(out), leaks(out)
    assert "DEBUG" in ok.stderr
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert wrong.returncode == 2, wrong.stderr[-2000:]  # bad input
