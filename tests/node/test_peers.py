"""Real peers on 127.0.0.1: dcmtk echoscu/storescu (plain and TLS) and Orthanc routing a series in and a SEG out."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.sr.codedict import codes

import peers
from node.cli import main

pytestmark = pytest.mark.peers

DCMTK_ENV = {"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}


def _dcmtk(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    if not peers.have("storescu"):
        pytest.fail("dcmtk is not installed: scripts/install.sh --test installs the peers the tests need")
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV)


def test_dcmtk_echoscu_and_storescu_directory(node: Any, tmp_path: Path) -> None:
    series = peers.make_ct_series(tmp_path / "ct", n=12, rows=32, cols=32)
    r = _dcmtk("echoscu", "-aet", "ECHOSCU", "-aec", "AINODE", "127.0.0.1", str(node.port))
    assert r.returncode == 0, r.stderr
    r = _dcmtk("storescu", "-aet", "STORESCU", "-aec", "AINODE", "+sd", "127.0.0.1", str(node.port),
               str(series.paths[0].parent))
    assert r.returncode == 0, r.stderr
    assert {i.sop_instance_uid for i in node.store.instances(series.series_uid)} == set(series.sop_uids)
    assert node.store.get_series(series.series_uid).calling_ae_title == "STORESCU"


def test_dcmtk_calling_ae_not_allowed(start_node: Any, tmp_path: Path) -> None:
    node = start_node(allowed_callers=("PACS@127.0.0.1",))
    series = peers.make_ct_series(tmp_path / "ct", n=2, rows=8, cols=8)
    r = _dcmtk("storescu", "-aet", "INTRUDER", "-aec", "AINODE", "127.0.0.1", str(node.port), str(series.paths[0]))
    assert r.returncode != 0
    assert "Calling AE Title Not Recognized" in r.stderr or "rejected" in r.stderr.lower()
    assert node.store.count() == 0
    r = _dcmtk("storescu", "-aet", "PACS", "-aec", "AINODE", "127.0.0.1", str(node.port), str(series.paths[0]))
    assert r.returncode == 0, r.stderr
    assert node.store.count() == 1


def test_dcmtk_tls(start_node: Any, tmp_path: Path) -> None:
    ca = peers.make_test_ca(tmp_path / "ca")
    node = start_node(tls_cert=str(ca["server_cert"]), tls_key=str(ca["server_key"]), tls_ca=str(ca["ca"]),
                      require_tls=True)
    series = peers.make_ct_series(tmp_path / "ct", n=3, rows=8, cols=8)
    r = _dcmtk("storescu", "+tls", str(ca["client_key"]), str(ca["client_cert"]), "+cf", str(ca["ca"]),
               "-aet", "TLSSCU", "-aec", "AINODE", "+sd", "127.0.0.1", str(node.port), str(series.paths[0].parent))
    assert r.returncode == 0, r.stderr
    assert node.store.count() == 3
    # Plain DIMSE to the TLS-only node is refused.
    other = peers.make_ct_series(tmp_path / "ct2", n=1, rows=8, cols=8)
    r = _dcmtk("storescu", "-to", "5", "-ta", "5", "-aet", "PLAIN", "-aec", "AINODE", "127.0.0.1", str(node.port),
               str(other.paths[0]), timeout=30)
    assert r.returncode != 0
    assert node.store.count() == 3


def _config(tmp_path: Path, node: Any, orthanc: peers.Proc) -> Path:
    cfg = tmp_path / "ainode.toml"
    cfg.write_text(
        f'data_dir = "{node.settings.data_dir}"\n'
        f"[dimse]\nhost = \"127.0.0.1\"\nport = {node.port}\n"
        f"[store]\nmin_free_gb = 0\n"
        f'[destinations.ORTHANC]\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.port}\ntimeout = 30\n'
    )
    return cfg


def _build_seg(paths: list[Path], out: Path) -> tuple[str, str]:
    sources = sorted((dcmread(p) for p in paths), key=lambda d: float(d.ImagePositionPatient[2]))
    mask = np.zeros((len(sources), sources[0].Rows, sources[0].Columns), dtype=bool)
    mask[1:-1, 8:20, 10:24] = True
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="tests", version="0", family=codes.cid7162.ArtificialIntelligence),
    )
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[desc], series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="ainode-tests", manufacturer_model_name="tests", software_versions="0",
        device_serial_number="1",
    )
    seg.save_as(out)
    return str(seg.SeriesInstanceUID), str(seg.SOPInstanceUID)


def test_orthanc_routes_series_to_node_and_receives_seg(
    node: Any, orthanc: peers.Proc, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    series = peers.make_ct_series(tmp_path / "ct", n=8, rows=32, cols=32)
    for p in series.paths:
        peers.orthanc_request(orthanc, "POST", "/instances", p.read_bytes())
    [orthanc_series] = peers.orthanc_request(orthanc, "POST", "/tools/lookup", series.series_uid.encode())
    peers.orthanc_request(orthanc, "PUT", "/modalities/AINODE",
                          {"AET": "AINODE", "Host": "127.0.0.1", "Port": node.port})
    cfg = _config(tmp_path, node, orthanc)

    # Orthanc -> node (C-STORE SCU on Orthanc's side).
    assert main(["echo", "ORTHANC", "--config", str(cfg)]) == 0
    answer = peers.orthanc_request(orthanc, "POST", "/modalities/AINODE/store",
                                   {"Resources": [orthanc_series["ID"]], "Synchronous": True})
    assert answer["FailedInstancesCount"] == 0 and answer["InstancesCount"] == 8
    stored = node.store.instances(series.series_uid)
    assert {i.sop_instance_uid for i in stored} == set(series.sop_uids)
    assert node.store.get_series(series.series_uid).calling_ae_title == "ORTHANC"
    assert main(["ls", series.series_uid, "--config", str(cfg)]) == 0
    assert series.sop_uids[0] in capsys.readouterr().out

    # node -> Orthanc: a SEG built on the stored series, queued and delivered through the outbox.
    seg_path = tmp_path / "seg.dcm"
    seg_series_uid, seg_sop_uid = _build_seg([i.path for i in stored], seg_path)
    assert main(["send", "--queue", "ORTHANC", str(seg_path), "--config", str(cfg)]) == 0
    assert "delivered" in capsys.readouterr().out
    found = peers.orthanc_request(orthanc, "POST", "/tools/find",
                                  {"Level": "Series", "Query": {"Modality": "SEG"}, "Expand": True})
    [seg_series] = [s for s in found if s["MainDicomTags"]["SeriesInstanceUID"] == seg_series_uid]
    assert len(seg_series["Instances"]) == 1
    tags = peers.orthanc_request(orthanc, "GET", f"/instances/{seg_series['Instances'][0]}/simplified-tags")
    assert tags["SOPInstanceUID"] == seg_sop_uid and tags["StudyInstanceUID"] == series.study_uid
    # Queued once, delivered once: sending again through the outbox is a no-op.
    assert main(["send", "--queue", "ORTHANC", str(seg_path), "--config", str(cfg)]) == 0
    entries = node.outbox.entries()
    assert [(e.sop_instance_uid, e.state, e.attempts) for e in entries] == [(seg_sop_uid, "delivered", 1)]
    # Any stored instance can be sent on: the stored CT series by UID.
    assert main(["send", "ORTHANC", series.series_uid, "--config", str(cfg)]) == 0
