"""Disk nearly full, on a real 16 MB file system: C-STORE 0xA700, STOW-RS 507, pulls fail clearly, nothing
half-written, and the node accepts again once space returns (no restart)."""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import peers
from config.settings import HttpSettings, Settings, StoreSettings
from dicom_io.dicomweb import DicomwebClient
from dicom_io.multipart import encode_files, new_boundary
from dicom_io.scu import Peer, send_instances
from node import status

MB = 1024 * 1024


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB tmpfs mounted under tmp_path (needs root / CAP_SYS_ADMIN), unmounted at teardown."""
    mnt = tmp_path / "small_fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"This test mounts a 16 MB tmpfs and needs root (or CAP_SYS_ADMIN); mount failed: "
                    f"{(r.stderr or r.stdout).strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(mnt: Path, leave: int) -> Path:
    """A ballast file that leaves about ``leave`` bytes free (0: fill until ENOSPC)."""
    ballast = mnt / "ballast"
    chunk = b"\xa5" * (256 * 1024)
    with open(ballast, "wb") as fh:
        while True:
            room = _free(mnt) - leave
            if room <= 0:
                break
            try:
                fh.write(chunk[:min(len(chunk), room)] if leave else chunk)
                fh.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    if not leave:  # top up the last pages
        try:
            with open(ballast, "ab") as fh:
                while True:
                    fh.write(b"\xa5" * 4096)
                    fh.flush()
        except OSError:
            pass
    return ballast


def _node_settings(data_dir: Path, min_free_bytes: int) -> Settings:
    base = peers.node_settings(data_dir)
    return dataclasses.replace(
        base,
        store=StoreSettings(stable_after_seconds=0.5, stable_poll_seconds=0.1, min_free_gb=min_free_bytes / 1024**3,
                            journal_mb=2),
        http=HttpSettings(host="127.0.0.1", port=peers.free_port()),
    )


def _stow(node: Any, paths: list[Path]) -> httpx.Response:
    boundary = new_boundary()
    _length, body = encode_files(paths, boundary)
    return httpx.post(f"http://127.0.0.1:{node.settings.http.port}/dicomweb/studies", content=b"".join(body),
                      headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary="{boundary}"',
                               "Accept": "application/dicom+json"}, timeout=30)


def _leftovers(root: Path) -> list[Path]:
    """Half-written things: temp files in the store and anything left in the spool."""
    partials = list((root / "instances").rglob("*.partial"))
    spool = list((root / "spool").iterdir()) if (root / "spool").is_dir() else []
    return partials + spool


def _source_node(start_node: Any, tmp_path: Path, series: peers.CtSeries) -> tuple[Any, str]:
    """A second node on the ordinary disk holding ``series``: the DICOMweb archive pulls come from."""
    settings = dataclasses.replace(peers.node_settings(tmp_path / "source"),
                                   http=HttpSettings(host="127.0.0.1", port=peers.free_port()))
    src = start_node(settings)
    results = send_instances(Peer("AINODE", "127.0.0.1", src.port, calling_ae_title="FILL"), series.paths)
    assert all(r.status == status.SUCCESS for r in results)
    return src, f"http://127.0.0.1:{settings.http.port}/dicomweb"


def _check_everything_refused(node: Any, series: peers.CtSeries, source_url: str, reason: str) -> None:
    store = node.store
    results = send_instances(Peer("AINODE", "127.0.0.1", node.port, calling_ae_title="FULL"), series.paths)
    assert [r.status for r in results] == [status.OUT_OF_RESOURCES] * len(series.paths), (reason, results)

    rsp = _stow(node, series.paths)
    assert rsp.status_code == 507, (reason, rsp.status_code, rsp.text)
    doc = rsp.json()
    reasons = [item["00081197"]["Value"][0] for item in doc["00081198"]["Value"]]
    assert reasons and set(reasons) == {status.OUT_OF_RESOURCES}
    assert doc.get("00081199", {}).get("Value", []) == []

    with DicomwebClient(source_url) as client:
        pulled = client.pull_series(store, series.study_uid, series.series_uid)
    assert not pulled.complete and pulled.stored == 0
    assert "store is full" in pulled.error, pulled

    assert store.count() == 0 and store.instance(series.sop_uids[0]) is None
    assert _leftovers(store.root) == []


def _check_everything_accepted(node: Any, series: peers.CtSeries, more: peers.CtSeries, source_url: str) -> None:
    store = node.store
    with DicomwebClient(source_url) as client:
        pulled = client.pull_series(store, series.study_uid, series.series_uid)
    assert pulled.complete and pulled.stored == len(series.paths), pulled
    results = send_instances(Peer("AINODE", "127.0.0.1", node.port, calling_ae_title="AGAIN"), more.paths[:2])
    assert [r.status for r in results] == [status.SUCCESS] * 2
    rsp = _stow(node, more.paths[2:])
    assert rsp.status_code == 200, rsp.text
    assert store.count() == len(series.paths) + len(more.paths)
    for uid in more.sop_uids:
        rec = store.instance(uid)
        assert rec is not None and rec.path.read_bytes()[132:] != b"" and rec.size > 0
    assert _leftovers(store.root) == []


def test_below_the_free_space_reserve_everything_is_refused_then_accepted(
        small_fs: Path, start_node: Any, tmp_path: Path) -> None:
    series = peers.make_ct_series(tmp_path / "ct", n=3, rows=64, cols=64)
    more = peers.make_ct_series(tmp_path / "more", n=4, rows=64, cols=64)
    _src, url = _source_node(start_node, tmp_path, series)
    node = start_node(_node_settings(small_fs / "data", min_free_bytes=4 * MB))
    ballast = _fill(small_fs, leave=2 * MB)  # plenty for these instances, but below the 4 MB reserve
    _check_everything_refused(node, series, url, "below the reserve")
    ballast.unlink()  # space returns: no restart needed
    _check_everything_accepted(node, series, more, url)


def test_disk_full_enospc_everything_is_refused_then_accepted(
        small_fs: Path, start_node: Any, tmp_path: Path) -> None:
    series = peers.make_ct_series(tmp_path / "ct", n=3, rows=64, cols=64)
    big = peers.make_ct_series(tmp_path / "big", n=2, rows=512, cols=512)  # 0.5 MB each: bypasses the 2 MB journal
    more = peers.make_ct_series(tmp_path / "more", n=4, rows=64, cols=64)
    _src, url = _source_node(start_node, tmp_path, series)
    node = start_node(_node_settings(small_fs / "data", min_free_bytes=0))  # no reserve: writes hit ENOSPC
    ballast = _fill(small_fs, leave=0)
    assert _free(small_fs) < 64 * 1024
    _check_everything_refused(node, series, url, "ENOSPC")
    results = send_instances(Peer("AINODE", "127.0.0.1", node.port, calling_ae_title="FULL"), big.paths)
    assert [r.status for r in results] == [status.OUT_OF_RESOURCES] * 2
    assert _leftovers(node.store.root) == [] and node.store.count() == 0
    ballast.unlink()
    _check_everything_accepted(node, series, more, url)
    results = send_instances(Peer("AINODE", "127.0.0.1", node.port, calling_ae_title="AGAIN"), big.paths)
    assert [r.status for r in results] == [status.SUCCESS] * 2
