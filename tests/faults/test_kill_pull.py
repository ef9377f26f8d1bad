"""kill -9 of ``ainode serve`` while it pulls a series from Orthanc (DICOMweb) for an API request."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import peers
from faults_helpers import (
    ThrottledProxy,
    assert_consistent,
    indexed_sops,
    orthanc_dicomweb,
    orthanc_upload,
    start_node,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.peers


def test_kill_9_during_a_pull_then_the_pull_resumes(tmp_path: Path) -> None:
    series = peers.make_ct_series(tmp_path / "ct", n=60, rows=256, cols=256, seed=3)
    orthanc = orthanc_dicomweb(tmp_path / "orthanc")
    proxy = ThrottledProxy(orthanc.http_port, bytes_per_second=1.5e6)  # ~5 s for the 7.9 MB series
    node = None
    try:
        orthanc_upload(orthanc, series.paths)
        config = write_config(tmp_path / "node.toml", f"""
[destinations.ARCHIVE]
kind = "dicomweb"
url = "http://127.0.0.1:{proxy.port}/dicom-web"
timeout = 30

[store]
spare_files = 100
""")
        data_dir = tmp_path / "data"
        node = start_node(data_dir, config=config)
        spare = data_dir / "store" / "spare"
        wait_for(lambda: len(list(spare.glob("*.spare"))) >= 100, 60, "the spare files to be created")
        body = {"series": {"series_instance_uid": series.series_uid, "study_instance_uid": series.study_uid,
                           "archive": "ARCHIVE"}}
        answers: list[object] = []

        def open_session() -> None:
            try:
                answers.append(node.call("POST", "/v1/sessions", body, timeout=60))  # type: ignore[union-attr]
            except OSError as exc:  # the node dies under the request
                answers.append(exc)

        client = threading.Thread(target=open_session)
        client.start()
        total = sum(p.stat().st_size for p in series.paths)
        wait_for(lambda: proxy.forwarded >= 0.4 * total, 60, "the pull to be under way")
        node.kill9()
        assert proxy.forwarded < 0.9 * total  # killed mid-transfer
        client.join(30)
        assert answers and isinstance(answers[0], OSError), answers  # nothing was answered
        held = indexed_sops(data_dir, series.series_uid)
        assert any(p.stat().st_size for p in spare.glob("*.spare"))  # the pull was writing into spare files

        node = node.restart()
        assert_consistent(data_dir)  # (and the spare files it had written are empty again)
        recovered = indexed_sops(data_dir, series.series_uid)
        assert held <= recovered  # recovery kept every stored instance
        assert len(recovered) < len(series.paths)  # (a pull's instances become visible together, at its end)
        # The same request again: the node sees its pull never finished and completes it (only the missing ones).
        code, answer = node.call("POST", "/v1/sessions", body, timeout=120)
        assert code == 201, answer
        assert answer["shape"][0] == len(series.paths), answer
        assert indexed_sops(data_dir, series.series_uid) == set(series.sop_uids)
        assert not list((data_dir / "pulls").glob("*.json"))
        assert_consistent(data_dir)
        if recovered:  # the part that survived is completed instance by instance, not fetched again
            assert "fetching the" in node.proc.log_text()
    finally:
        if node is not None:
            node.proc.stop()
        proxy.stop()
        orthanc.stop(timeout=15)
