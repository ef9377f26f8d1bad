"""``ainode serve`` runs the DICOMweb server next to the DIMSE listener; ``ainode pull`` from the command line."""

from __future__ import annotations

from pathlib import Path

import httpx
import pydicom

import peers
from config.settings import DimseSettings, HttpSettings, Settings, StoreSettings
from dicom_io.phantom import write_phantom_series
from dicom_io.scu import Peer, send_instances
from dw_helpers import upload


def test_serve_accepts_stow_and_c_store_into_one_store(start_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(
        data_dir=str(tmp_path / "node"),
        dimse=DimseSettings(host="127.0.0.1", port=peers.free_port()),
        store=StoreSettings(stable_after_seconds=0.5, stable_poll_seconds=0.1, min_free_gb=0.0),
        http=HttpSettings(host="127.0.0.1", port=peers.free_port()),
    )
    node = start_node(settings)
    host, port = node.service.http_address
    ph = write_phantom_series(tmp_path / "ph", shape=(4, 16, 16), seed=12)
    boundary = "bnd"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p.read_bytes() + b"\r\n"
                    for p in ph.paths[:2]) + f"--{boundary}--\r\n".encode()
    r = httpx.post(f"http://{host}:{port}/dicomweb/studies", content=body,
                   headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert r.status_code == 200 and len(r.json()["00081199"]["Value"]) == 2
    results = send_instances(Peer(settings.dimse.ae_title, "127.0.0.1", node.port, calling_ae_title="MOD"),
                             ph.paths[2:])
    assert all(res.ok for res in results)
    r = httpx.get(f"http://{host}:{port}/dicomweb/studies/{ph.study_instance_uid}/series",
                  headers={"Accept": "application/dicom+json"})
    assert r.json()[0]["00201209"]["Value"] == [4]


def test_pull_command(orthanc_dw: peers.Proc, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from node.cli import main

    ph = write_phantom_series(tmp_path / "ph", shape=(3, 16, 16), seed=13)
    upload(orthanc_dw, ph.paths)
    cfg = tmp_path / "ainode.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\n[store]\nmin_free_gb = 0\n'
                   f'[destinations.orthanc]\nkind = "dicomweb"\nurl = "http://127.0.0.1:{orthanc_dw.http_port}/dicom-web"\n')
    args = ["pull", "orthanc", "--study", ph.study_instance_uid, "--series", ph.series_instance_uid,
            "--config", str(cfg), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "3 stored, 0 already held, 0 failed" in out and "complete" in out
    assert main(args + ["--json"]) == 0
    assert '"skipped": true' in capsys.readouterr().out
    assert main(["pull", "orthanc", "--session", "E", "--scan", "1", "--config", str(cfg)]) == 2
    assert main(["pull", "nowhere", "--study", "1", "--series", "2", "--config", str(cfg)]) == 2
    stored = sorted((tmp_path / "data" / "store" / "instances").rglob("*.dcm"))
    assert len(stored) == 3 and pydicom.dcmread(stored[0]).SeriesInstanceUID == ph.series_instance_uid


def test_serve_process_stops_cleanly_with_http(tmp_path: Path) -> None:
    """``ainode serve`` as a process: DICOMweb answers, SIGTERM stops DIMSE and HTTP and exits 0."""
    import signal

    port = peers.free_port()
    node = peers.start_node(tmp_path / "node", extra_env={"AINODE_HTTP_PORT": str(port)})
    try:
        peers.wait_tcp(port, timeout=30, proc=node.popen)
        assert httpx.get(f"http://127.0.0.1:{port}/dicomweb/studies").json() == []
    finally:
        code = node.stop(signal.SIGTERM, timeout=20)
    assert code == 0, node.log_text()[-2000:]
    assert f"DICOMweb at http://127.0.0.1:{port}/dicomweb" in node.log_text()
