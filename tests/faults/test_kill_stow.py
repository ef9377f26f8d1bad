"""kill -9 of ``ainode serve`` while a large chunked STOW-RS request is in flight."""

from __future__ import annotations

import secrets
from pathlib import Path

import numpy as np
import pydicom

import peers
from dicom_io.store import Store
from faults_helpers import assert_consistent, connect, http_call, indexed_sops, start_node, wait_for


def _multipart(paths: list[Path], boundary: str) -> list[bytes]:
    """One chunk per part (the closing delimiter is its own chunk)."""
    chunks = [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p.read_bytes() + b"\r\n"
              for p in paths]
    return [*chunks, f"--{boundary}--\r\n".encode()]


def _stow(port: int, paths: list[Path]) -> tuple[int, object]:
    boundary = secrets.token_hex(8)
    body = b"".join(_multipart(paths, boundary))
    return http_call(port, "POST", "/dicomweb/studies", body, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})


def _data_set_bytes(path: Path) -> bytes:
    """The file's bytes after its File Meta Information (which the node writes itself)."""
    from pynetdicom.dsutils import split_dataset

    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def _big_instance(src: Path, out: Path) -> Path:
    """One instance larger than the STOW parser's in-memory limit (8 MiB), so it is spooled to disk."""
    ds = pydicom.dcmread(src)
    ds.Rows = ds.Columns = 3000
    ds.PixelData = np.zeros((3000, 3000), np.int16).tobytes()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(out, enforce_file_format=True)
    return out


def test_kill_9_during_a_chunked_stow(tmp_path: Path) -> None:
    first = peers.make_ct_series(tmp_path / "first", n=4, rows=32, cols=32, seed=1)
    big = peers.make_ct_series(tmp_path / "big", n=40, rows=256, cols=256, seed=2)
    huge = _big_instance(big.paths[0], tmp_path / "huge.dcm")
    data_dir = tmp_path / "data"
    node = start_node(data_dir)
    request: list[object] = []
    try:
        code, body = _stow(node.http_port, first.paths)
        assert code == 200, body
        acknowledged = set(first.sop_uids)

        # A chunked STOW: 40 instances, then a part too large for memory that never finishes.
        boundary = secrets.token_hex(8)
        chunks = _multipart([*big.paths, huge], boundary)
        conn = connect(node.http_port, timeout=30)
        request.append(conn)
        conn.putrequest("POST", "/dicomweb/studies")
        conn.putheader("Content-Type", f'multipart/related; type="application/dicom"; boundary={boundary}')
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()

        def send_chunk(data: bytes) -> None:
            conn.send(f"{len(data):x}\r\n".encode() + data + b"\r\n")

        for chunk in chunks[:40]:
            send_chunk(chunk)
        half = chunks[40][: len(chunks[40]) * 2 // 3]  # 12 of its 18 MB
        for i in range(0, len(half), 1 << 20):
            send_chunk(half[i:i + (1 << 20)])
        # The node writes each part as it arrives: wait until it holds some, and the big part spills to disk.
        spool = data_dir / "store" / "spool"
        wait_for(lambda: len(indexed_sops(data_dir, big.series_uid)) >= 10, 30, "parts of the STOW to be stored")
        wait_for(lambda: spool.exists() and any(spool.iterdir()), 30, "the large part to be spooled")
        node.kill9()
        stored_before = indexed_sops(data_dir, big.series_uid)
        assert 10 <= len(stored_before) <= 40

        node = node.restart()
        assert_consistent(data_dir)  # integrity ok, no partial file, spool emptied
        held = indexed_sops(data_dir)
        assert acknowledged <= held
        store = Store(data_dir / "store")  # a reader beside the running node
        try:
            # Nothing of the interrupted request was acknowledged; whatever was stored is complete.
            by_uid = dict(zip(big.sop_uids, big.paths, strict=True))
            for uid in held & set(big.sop_uids):
                rec = store.instance(uid)
                assert rec is not None
                assert pydicom.dcmread(rec.path).PixelData == pydicom.dcmread(by_uid[uid]).PixelData
        finally:
            store.close()
        # The client sends the whole request again: every instance is stored (held ones count as stored).
        code, body = _stow(node.http_port, [*big.paths, huge])
        assert code == 200, body
        assert set(big.sop_uids) <= indexed_sops(data_dir, big.series_uid)
        assert_consistent(data_dir)
    finally:
        for conn in request:
            conn.close()  # type: ignore[attr-defined]
        node.proc.stop()


def test_kill_9_during_parallel_stow_requests_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """Four clients STOW at once, one 512×512 instance per request (their acknowledgements share journal
    flushes); kill -9 after 40 answers of 200: every instance in a 200 answer is there after the restart, byte for
    byte."""
    import threading

    clients = 4
    series = [peers.make_ct_series(tmp_path / f"s{k}", n=30, rows=512, cols=512, seed=10 + k) for k in range(clients)]
    data_dir = tmp_path / "data"
    node = start_node(data_dir)
    acked: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()

    def client(k: int) -> None:
        for path, uid in zip(series[k].paths, series[k].sop_uids, strict=False):
            try:
                code, _body = _stow(node.http_port, [path])
            except OSError:
                return  # the node is gone
            if code != 200:
                return
            with lock:
                acked.append(uid)
                if len(acked) >= 40:
                    enough.set()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    try:
        for t in threads:
            t.start()
        assert enough.wait(120), node.proc.log_text()[-2000:]
        node.kill9()
        for t in threads:
            t.join(timeout=60)
        with lock:
            answered = list(acked)
        assert 40 <= len(answered) < clients * 30

        node = node.restart()
        assert_consistent(data_dir)
        store = Store(data_dir / "store")
        try:
            by_uid = {uid: p for s in series for uid, p in zip(s.sop_uids, s.paths, strict=False)}
            for uid in answered:
                rec = store.instance(uid)
                assert rec is not None, f"acknowledged instance {uid} lost"
                assert _data_set_bytes(rec.path) == _data_set_bytes(by_uid[uid])
        finally:
            store.close()
    finally:
        node.proc.stop()
