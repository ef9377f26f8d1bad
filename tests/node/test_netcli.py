"""`ainode ls / send / echo` and store-series resolution, against an in-process node and a recorder peer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import peers
from node.cli import main
from node.netcli import resolve_series_args


@pytest.fixture
def recorder() -> Iterator[peers.RecorderSCP]:
    rec = peers.RecorderSCP().start()
    yield rec
    rec.stop()


def _config(tmp_path: Path, node: Any, rec: peers.RecorderSCP | None = None, port: int | None = None) -> Path:
    cfg = tmp_path / "ainode.toml"
    text = (f'data_dir = "{node.settings.data_dir}"\n[dimse]\nhost = "127.0.0.1"\nport = {node.port}\n'
            f"[store]\nmin_free_gb = 0\n")
    if rec is not None or port is not None:
        text += (f'[destinations.PEER]\nae_title = "RECORDER"\nhost = "127.0.0.1"\n'
                 f"port = {port or rec.port}\ntimeout = 3\n")  # type: ignore[union-attr]
    text += '[destinations.SELF]\nae_title = "AINODE"\nhost = "127.0.0.1"\n' f"port = {node.port}\n"
    cfg.write_text(text)
    return cfg


def test_echo_send_ls(node: Any, recorder: peers.RecorderSCP, tmp_path: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(_config(tmp_path, node, recorder))
    series = peers.make_ct_series(tmp_path / "ct", n=3, rows=8, cols=8)
    assert main(["echo", "SELF", "--config", cfg]) == 0
    assert main(["echo", f"AINODE@127.0.0.1:{node.port}", "--config", cfg]) == 0
    assert "0x0000 Success" in capsys.readouterr().out

    # send a directory to the node itself, then list it
    assert main(["send", "SELF", str(series.paths[0].parent), "--config", cfg]) == 0
    assert "3/3 instance(s) stored" in capsys.readouterr().out
    assert main(["ls", "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert series.study_uid in out and series.series_uid in out and "3 inst" in out
    assert "PEERS-SECRET-ID" not in out and "Peers^Secret" not in out
    assert main(["ls", "--json", "--config", cfg]) == 0
    [study] = json.loads(capsys.readouterr().out)
    assert study["num_instances"] == 3 and study["series"][0]["modality"] == "CT"

    # send a stored series by UID to another peer
    assert main(["send", "PEER", series.series_uid, "--config", cfg]) == 0
    assert recorder.counts == {uid: 1 for uid in series.sop_uids}
    assert resolve_series_args([series.series_uid], node.settings) == node.store.series_paths(series.series_uid)


def test_send_reports_refusals_and_unknown_destinations(node: Any, recorder: peers.RecorderSCP, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(_config(tmp_path, node, recorder))
    series = peers.make_ct_series(tmp_path / "ct", n=2, rows=8, cols=8)
    recorder.refuse = {series.sop_uids[0]: 0xA700}
    assert main(["send", "PEER", *map(str, series.paths), "--config", cfg]) == 1
    out = capsys.readouterr().out
    assert "FAIL 0xA700 Out of resources" in out and "1/2 instance(s) stored" in out
    assert main(["send", "NOPE", str(series.paths[0]), "--config", cfg]) == 2
    assert main(["echo", "NOPE", "--config", cfg]) == 2
    assert main(["send", "PEER", "1.2.3.4.5.6", "--config", cfg]) == 2  # neither a file nor a stored series


def test_queue_for_a_peer_that_is_down(node: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(_config(tmp_path, node, port=peers.free_port()))
    series = peers.make_ct_series(tmp_path / "ct", n=1, rows=8, cols=8)
    assert main(["send", "--queue", "PEER", str(series.paths[0]), "--config", cfg]) == 1
    captured = capsys.readouterr()
    assert "pending" in captured.out and "retries" in captured.err
    assert main(["echo", "PEER", "--config", cfg]) == 1
    assert main(["ls", "--outbox", "--config", cfg]) == 0
    assert "pending" in capsys.readouterr().out
    # The running node's outbox worker holds it and the store keeps it as an undelivered result.
    entry = node.outbox.entry(series.sop_uids[0], "PEER")
    assert entry is not None and entry.state == "pending"
    assert node.store.instance(series.sop_uids[0]).kind == "result"


@pytest.mark.slow
def test_segment_a_stored_series_and_deliver_the_seg(node: Any, recorder: peers.RecorderSCP, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    from dicom_io.phantom import write_phantom_series
    from dicom_io.scu import Peer, send_instances

    ph = write_phantom_series(tmp_path / "phantom", shape=(8, 64, 64), spacing=(2.0, 2.0, 3.0))
    results = send_instances(Peer("AINODE", "127.0.0.1", node.port, calling_ae_title="MOD"), ph.paths)
    assert all(r.ok for r in results)
    [series] = node.store.series()
    series_uid = series.series_instance_uid
    k = int(np.argmax(ph.mask.sum(axis=(1, 2))))
    ys, xs = np.nonzero(ph.mask[k])
    box = f"{xs.min() - 2},{ys.min() - 2},{xs.max() + 2},{ys.max() + 2}@{k}"
    cfg = str(_config(tmp_path, node, recorder))
    code = main(["segment", series_uid, "--box", box, "--2d", "--out", str(tmp_path / "out"), "--no-progress",
                 "--no-nifti", "--send", "PEER", "--config", cfg])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "delivered" in out
    [seg_uid] = [u for u, c in recorder.sop_classes.items() if c == "1.2.840.10008.5.1.4.1.1.66.4"]
    assert recorder.counts[seg_uid] == 1
    assert node.outbox.entry(seg_uid, "PEER").state == "delivered"
