"""Helpers for the fault tests: a subprocess node with HTTP, small phantoms, HTTP calls, consistency checks.

A module of its own (never ``from conftest import``); ``benchmarks/load`` imports it too.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import signal
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np

import peers

#: Node settings every fault test uses (quick stability and retries; CPU model; loopback).
BASE_ENV = {
    "AINODE_MODEL_DEVICE": "cpu",
    "AINODE_STORE_STABLE_AFTER_SECONDS": "0.5",
    "AINODE_STORE_STABLE_POLL_SECONDS": "0.1",
    "AINODE_OUTBOX_RETRY_BASE_SECONDS": "0.2",
    "AINODE_OUTBOX_RETRY_MAX_SECONDS": "1.0",
    "AINODE_OUTBOX_POLL_SECONDS": "0.1",
    # No background pre-encoding of stored series: the tests time their kills against their own jobs.
    "AINODE_LITEMEDSAM_PREENCODE": "false",
}


@dataclasses.dataclass
class Node:
    """``ainode serve`` running as a subprocess: its DIMSE and HTTP ports, data folder and config."""

    proc: peers.Proc
    data_dir: Path
    http_port: int
    config: Path | None
    env: dict[str, str]

    @property
    def port(self) -> int:
        return self.proc.port

    def kill9(self) -> None:
        self.proc.stop(signal.SIGKILL)
        assert self.proc.popen.returncode == -signal.SIGKILL, self.proc.log_text()[-2000:]

    def restart(self) -> Node:
        """Start a new ``ainode serve`` on the same data folder, ports and config (after a kill).

        This process' log is moved aside first (the new one writes to the same name)."""
        if self.proc.popen.poll() is not None and self.proc.log.exists():
            kept = self.proc.log.with_name(f"{self.proc.log.stem}-{time.time_ns()}.log")
            self.proc.log.rename(kept)
            self.proc.log = kept
        return start_node(self.data_dir, config=self.config, env=self.env, port=self.port, http_port=self.http_port)

    def call(self, method: str, path: str, body: Any = None, timeout: float = 120.0) -> tuple[int, Any]:
        return http_call(self.http_port, method, path, body, timeout=timeout)


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def start_node(data_dir: Path, *, config: Path | None = None, env: dict[str, str] | None = None,
               port: int | None = None, http_port: int | None = None) -> Node:
    """``ainode serve`` (DIMSE and HTTP on 127.0.0.1) as a subprocess; waits until both listen."""
    http_port = http_port or peers.free_port()
    full_env = {**BASE_ENV, **(env or {}), "AINODE_HTTP_PORT": str(http_port)}
    proc = peers.start_node(data_dir, port=port, extra_env=full_env, config=config)
    try:
        peers.wait_tcp(http_port, timeout=30, proc=proc.popen)
    except Exception as exc:
        proc.stop(signal.SIGKILL)
        raise RuntimeError("ainode serve did not open HTTP:\n" + proc.log_text()[-3000:]) from exc
    return Node(proc, data_dir, http_port, config, dict(env or {}))


def connect(port: int, timeout: float) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.connect()
    assert conn.sock is not None
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def http_call(port: int, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None,
              timeout: float = 120.0, conn: http.client.HTTPConnection | None = None) -> tuple[int, Any]:
    """One HTTP request to the node on 127.0.0.1; JSON bodies in and out (raw bytes for other answers)."""
    own = conn is None
    c = conn or connect(port, timeout)
    try:
        hdrs = dict(headers or {})
        data: bytes | None = None
        if isinstance(body, (bytes, bytearray)):
            data = bytes(body)
        elif body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        c.request(method, path, body=data, headers=hdrs)
        rsp = c.getresponse()
        raw = rsp.read()
        ctype = rsp.getheader("content-type", "")
        if "json" in ctype and raw:
            return rsp.status, json.loads(raw)
        return rsp.status, raw
    finally:
        if own:
            c.close()


@dataclasses.dataclass
class Phantom:
    paths: list[Path]
    series_instance_uid: str
    study_instance_uid: str
    sop_uids: list[str]
    k: int
    box: list[list[int]]

    def box_prompt(self) -> dict[str, Any]:
        return {"boxes": [{"ijk": self.box}]}


def make_phantom(out: Path, shape: tuple[int, int, int] = (6, 64, 64), seed: int = 0) -> Phantom:
    """A small CT phantom with a lesion; ``box`` frames the lesion on its largest slice ``k``."""
    import pydicom

    from dicom_io.phantom import write_phantom_series

    p = write_phantom_series(out, shape=shape, spacing=(1.2, 1.2, 3.0), seed=seed)
    k = int(np.argmax(p.mask.sum(axis=(1, 2))))
    ys, xs = np.nonzero(p.mask[k])
    box = [[int(xs.min()) - 3, int(ys.min()) - 3, k], [int(xs.max()) + 3, int(ys.max()) + 3, k]]
    sops = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in p.paths]
    return Phantom(list(p.paths), p.series_instance_uid, p.study_instance_uid, sops, k, box)


# --- consistency checks ---------------------------------------------------------------------------


def integrity_check(db: Path) -> str:
    """``PRAGMA integrity_check`` of an SQLite file (opened read-only, beside a running node)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return str(con.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        con.close()


def assert_consistent(data_dir: Path) -> None:
    """Every SQLite file is intact; no partial file, spooled part or upload folder is left behind, and no spare
    file of the store holds data (a pull cut short had written into them: emptied when the node starts)."""
    for db in ("store/index.sqlite", "outbox.sqlite", "origins.sqlite"):
        path = data_dir / db
        if path.exists():
            assert integrity_check(path) == "ok", db
    leftovers = [p for p in data_dir.rglob("*.partial")]
    assert not leftovers, leftovers
    written = [p for p in (data_dir / "store" / "spare").glob("*.spare") if p.stat().st_size]
    assert not written, written
    for folder in (data_dir / "store" / "spool", data_dir / "uploads"):
        if folder.exists():
            assert not list(folder.iterdir()), list(folder.iterdir())


def indexed_sops(data_dir: Path, series_uid: str | None = None) -> set[str]:
    """SOP Instance UIDs in the store's index whose file exists (read-only, beside a running node)."""
    con = sqlite3.connect(f"file:{data_dir / 'store' / 'index.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        sql, args = "SELECT sop_instance_uid, path FROM instances", ()
        if series_uid:
            sql, args = sql + " WHERE series_instance_uid=?", (series_uid,)
        rows = con.execute(sql, args).fetchall()
    finally:
        con.close()
    return {uid for uid, path in rows if os.path.exists(path)}


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# --- a slow link -------------------------------------------------------------------------------------


class ThrottledProxy:
    """A TCP forwarder on 127.0.0.1 that passes the upstream's answers at ``bytes_per_second``.

    Puts a slow link between the node and an archive so a transfer is still in flight when the
    test acts. Threads only; stopped with :meth:`stop`.
    """

    def __init__(self, upstream_port: int, bytes_per_second: float) -> None:
        import threading

        self.upstream_port = upstream_port
        self.rate = bytes_per_second
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._stopping = threading.Event()
        #: Bytes passed from the upstream to clients so far.
        self.forwarded = 0
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._run, name="proxy-accept", daemon=True)
        self._accept.start()

    def _run(self) -> None:
        import threading

        while not self._stopping.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.settimeout(None)
            self._sockets += [client, upstream]
            for src, dst, rate in ((client, upstream, 0.0), (upstream, client, self.rate)):
                t = threading.Thread(target=self._pump, args=(src, dst, rate), daemon=True, name="proxy-pump")
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, rate: float) -> None:
        try:
            while True:
                data = src.recv(16384)
                if not data:
                    break
                dst.sendall(data)
                if rate:
                    self.forwarded += len(data)
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self._stopping.set()
        self._server.close()
        for s in self._sockets:
            try:
                s.close()
            except OSError:
                pass
        for t in self._threads:
            t.join(5)
        self._accept.join(5)


def orthanc_dicomweb(workdir: Path, http_port: int | None = None) -> peers.Proc:
    """Orthanc with its DICOMweb plugin (the DICOMweb tests' starter)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dicomweb"))
    from dw_helpers import start_orthanc_dicomweb

    if not peers.have(peers.ORTHANC):
        raise AssertionError("Orthanc is not installed: scripts/install.sh --test installs the peers the tests need")
    return start_orthanc_dicomweb(workdir, http_port=http_port)


def orthanc_upload(proc: peers.Proc, paths: list[Path]) -> None:
    for p in paths:
        peers.orthanc_request(proc, "POST", "/instances", p.read_bytes())


def restart_orthanc(old: peers.Proc) -> peers.Proc:
    """Start Orthanc again from the config, storage and ports of a stopped one (``peers.start_orthanc``)."""
    assert old.workdir is not None and old.popen.poll() is not None
    cfg = old.workdir / "orthanc.json"
    log = old.workdir / "orthanc-restart.stdout"
    p = peers.start([peers.ORTHANC, f"--logdir={old.workdir / 'logs'}", str(cfg)], log, env={"TCP_NODELAY": "1"})
    proc = peers.Proc(p, log, port=old.port, http_port=old.http_port, workdir=old.workdir)
    deadline = time.monotonic() + 30
    while True:
        try:
            peers.orthanc_get(proc, "/system")
            break
        except OSError as exc:
            if p.poll() is not None or time.monotonic() > deadline:
                proc.stop()
                raise RuntimeError("Orthanc did not restart:\n" + proc.log_text()[-2000:]) from exc
            time.sleep(0.05)
    peers.wait_tcp(proc.port, proc=p)
    return proc


def orthanc_copies(orthanc: peers.Proc, sop_instance_uid: str) -> tuple[int, int]:
    """(instances Orthanc holds with this SOP Instance UID, times Orthanc logged it as a new instance)."""
    found = peers.orthanc_request(orthanc, "POST", "/tools/find",
                                  {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}})
    ids = set(found)
    changes = peers.orthanc_get(orthanc, "/changes?limit=10000")["Changes"]
    new = sum(1 for c in changes if c["ChangeType"] == "NewInstance" and c["ID"] in ids)
    return len(found), new


def delivered_count(*nodes: Node, destination: str = "PACS") -> int:
    """Instances the nodes' outboxes saw acknowledged by ``destination`` (from their logs)."""
    import re

    text = "".join(n.proc.log_text() for n in nodes)
    return sum(int(m) for m in re.findall(rf"Outbox -> {destination}: (\d+) delivered", text))
