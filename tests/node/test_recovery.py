"""`ainode serve` as a process: kill -9 in the middle of a transfer loses nothing acknowledged; SIGTERM is clean."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import CTImageStorage

import peers
from dicom_io.scu import Peer, echo, send_instances
from dicom_io.store import Store


def _body(path: Path) -> bytes:
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def test_kill_9_mid_transfer_keeps_every_acknowledged_instance(tmp_path: Path) -> None:
    series = peers.make_ct_series(tmp_path / "ct", n=200, rows=512, cols=512)
    data_dir = tmp_path / "data"
    node = peers.start_node(data_dir)
    acked: list[str] = []
    try:
        ae = AE("KILLTEST")
        ae.dimse_timeout = 5  # a kill that lands while a response is awaited: give up quickly
        ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
        assert assoc.is_established
        killer = threading.Timer(0.0, lambda: None)
        for i, (path, uid) in enumerate(zip(series.paths, series.sop_uids, strict=True)):
            if i == 15:
                # Kill while the next instances are on the wire / being written.
                killer = threading.Timer(0.005, node.stop, args=(signal.SIGKILL,))
                killer.start()
            try:
                rsp = assoc.send_c_store(path)
            except Exception:
                break
            if not assoc.is_established or "Status" not in rsp:
                break
            assert rsp.Status == 0
            acked.append(uid)
        killer.join()
        sock = assoc.dul.socket.socket if assoc.dul.socket else None
        assoc.abort()
        if sock is not None:
            sock.close()
    finally:
        node.stop(signal.SIGKILL)
    assert node.popen.returncode == -signal.SIGKILL, node.log_text()[-2000:]
    assert 15 <= len(acked) < len(series.paths), len(acked)

    # A crash can also leave a half-written temp file that nobody acknowledged.
    store_dir = data_dir / "store" / "instances" / series.study_uid / series.series_uid
    planted = store_dir / f".{series.sop_uids[-1]}.0000.partial"
    planted.write_bytes(series.paths[-1].read_bytes()[:1000])

    node = peers.start_node(data_dir)
    try:
        assert echo(Peer("AINODE", "127.0.0.1", node.port, calling_ae_title="CHECK")).ok
        store = Store(data_dir / "store")  # a reader beside the running node, as `ainode ls` is
        by_uid = {p.name: p for p in series.paths}
        for uid, path in zip(series.sop_uids, series.paths, strict=True):
            rec = store.instance(uid)
            if uid in acked:
                assert rec is not None, f"acknowledged instance {uid} lost"
            if rec is not None:  # anything indexed is complete
                assert _body(rec.path) == _body(path)
        assert not list((data_dir / "store").rglob("*.partial"))
        files = {p.name for p in store_dir.glob("*.dcm")}
        indexed = {f"{i.sop_instance_uid}.dcm" for i in store.instances(series.series_uid)}
        assert files == indexed, (files ^ indexed, node.log_text()[-3000:])
        assert len(by_uid) == len(series.paths)
        # The restarted node goes on receiving: dcmtk's storescu sends the whole series again (the
        # acknowledged part as duplicates) and completes it.
        r = subprocess.run(["storescu", "-aet", "RESEND", "-aec", "AINODE", "+sd", "127.0.0.1", str(node.port),
                            str(series.paths[0].parent)], capture_output=True, text=True,
                           env={**os.environ, "TCP_NODELAY": "1"}, timeout=300)
        assert r.returncode == 0, (r.stderr[-2000:], node.log_text()[-3000:])
        assert peers.wait_until(lambda: len(store.instances(series.series_uid)) == len(series.paths), timeout=30)
        store.close()
    finally:
        node.stop()


def test_sigterm_shuts_down_cleanly(tmp_path: Path) -> None:
    series = peers.make_ct_series(tmp_path / "ct", n=3, rows=16, cols=16)
    node = peers.start_node(tmp_path / "data")
    try:
        results = send_instances(Peer("AINODE", "127.0.0.1", node.port, calling_ae_title="T"), series.paths)
        assert all(r.status == 0 for r in results)
    finally:
        code = node.stop(signal.SIGTERM, timeout=15)
    assert code == 0, node.log_text()[-2000:]
    assert "ainode stopped" in node.log_text()
    store = Store.open(tmp_path / "data" / "store")
    assert store.count() == 3
    store.close()


@pytest.mark.parametrize("kill_after", [12, 90])
def test_kill_9_during_four_concurrent_associations_loses_nothing_acknowledged(tmp_path: Path,
                                                                              kill_after: int) -> None:
    """Four associations send at once (their acknowledgements share journal flushes); kill -9 of the node once
    ``kill_after`` instances were acknowledged in all: every instance any sender got Success for is there after
    the restart, byte for byte."""
    senders = 4
    series = [peers.make_ct_series(tmp_path / f"ct{k}", n=40, rows=512, cols=512, seed=k) for k in range(senders)]
    data_dir = tmp_path / "data"
    node = peers.start_node(data_dir)
    acked: list[list[str]] = [[] for _ in range(senders)]
    lock = threading.Lock()
    total = [0]
    enough = threading.Event()
    failures: list[BaseException] = []

    def send(k: int) -> None:
        ae = AE(f"KILL{k}")
        ae.dimse_timeout = 5
        ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
        try:
            assert assoc.is_established
            for path, uid in zip(series[k].paths, series[k].sop_uids, strict=False):
                try:
                    rsp = assoc.send_c_store(path)
                except Exception:
                    break
                if not assoc.is_established or "Status" not in rsp:
                    break
                assert rsp.Status == 0
                acked[k].append(uid)
                with lock:
                    total[0] += 1
                    if total[0] >= kill_after:
                        enough.set()
        except BaseException as exc:  # asserted on below
            failures.append(exc)
        finally:
            sock = assoc.dul.socket.socket if assoc.dul.socket else None
            assoc.abort()
            if sock is not None:
                sock.close()

    threads = [threading.Thread(target=send, args=(k,)) for k in range(senders)]
    try:
        for t in threads:
            t.start()
        assert enough.wait(120), node.log_text()[-2000:]
        node.stop(signal.SIGKILL)
        for t in threads:
            t.join(timeout=60)
    finally:
        node.stop(signal.SIGKILL)
    assert not failures, failures
    assert node.popen.returncode == -signal.SIGKILL, node.log_text()[-2000:]
    n_acked = sum(map(len, acked))
    assert kill_after <= n_acked < senders * 40, n_acked

    node = peers.start_node(data_dir)
    try:
        assert echo(Peer("AINODE", "127.0.0.1", node.port, calling_ae_title="CHECK")).ok
        store = Store(data_dir / "store")
        for k in range(senders):
            for uid, path in zip(series[k].sop_uids, series[k].paths, strict=False):
                rec = store.instance(uid)
                if uid in acked[k]:
                    assert rec is not None, f"acknowledged instance {uid} (association {k}) lost"
                if rec is not None:  # anything indexed is complete
                    assert _body(rec.path) == _body(path)
            files = {p.name for p in (data_dir / "store" / "instances" / series[k].study_uid
                                      / series[k].series_uid).glob("*.dcm")}
            indexed = {f"{i.sop_instance_uid}.dcm" for i in store.instances(series[k].series_uid)}
            assert files == indexed, (files ^ indexed, node.log_text()[-3000:])
        assert not list((data_dir / "store").rglob("*.partial"))
        store.close()
    finally:
        node.stop()
