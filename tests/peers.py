"""Test helpers: free ports, small CT series, and real peer processes (Orthanc, dcmtk, ainode serve) on 127.0.0.1."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from config.settings import DimseSettings, HttpSettings, OutboxSettings, Settings, StoreSettings

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_settings(data_dir: Path, **dimse: object) -> Settings:
    """Settings for a test node: loopback, a free port, quick stability and retries."""
    return Settings(
        data_dir=str(data_dir),
        dimse=DimseSettings(host="127.0.0.1", port=free_port(), **dimse),  # type: ignore[arg-type]
        # A small spare pool: the tests' series are small, and 1024 files per node would only churn /tmp.
        store=StoreSettings(stable_after_seconds=0.5, stable_poll_seconds=0.1, min_free_gb=0.0, spare_files=32),
        outbox=OutboxSettings(retry_base_seconds=0.2, retry_max_seconds=1.0, poll_seconds=0.1),
        http=HttpSettings(host="127.0.0.1", port=0),  # no HTTP server unless a test asks for one
    )


def have(program: str) -> bool:
    return shutil.which(program) is not None or Path(program).exists()


@dataclass
class CtSeries:
    paths: list[Path]
    study_uid: str
    series_uid: str
    sop_uids: list[str]
    datasets: list[Dataset] = field(default_factory=list, repr=False)


def make_ct_series(out: Path, n: int = 6, rows: int = 64, cols: int = 64, seed: int = 0,
                   patient_id: str = "PEERS-SECRET-ID") -> CtSeries:
    """Write ``n`` CT slices (Explicit VR LE, int16) with a shared study/series; returns paths and UIDs."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    today = datetime.date.today().strftime("%Y%m%d")
    paths, uids, dss = [], [], []
    for i in range(n):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Peers^Secret", patient_id, "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = today, "120000", "1", "PEERSACC"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription, ds.SeriesDescription = "peers test", "peers CT"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, i + 1
        ds.Manufacturer = "tests"
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PixelSpacing = [1.0, 1.0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(i) * 2.0]
        ds.SliceThickness = 2.0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.KVP = 120
        ds.PixelData = rng.integers(0, 2000, size=(rows, cols), dtype=np.int16).tobytes()
        path = out / f"CT_{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        uids.append(sop)
        dss.append(ds)
    return CtSeries(paths, study, series, uids, dss)


# --- processes ----------------------------------------------------------------------------------


@dataclass
class Proc:
    """A peer started as a plain background process; stopped by PID."""

    popen: subprocess.Popen[bytes]
    log: Path
    port: int = 0
    http_port: int = 0
    workdir: Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        return self.popen.returncode

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


def start(args: list[str], log: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen[bytes]:
    fh = open(log, "wb")
    try:
        return subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                cwd=cwd, start_new_session=True)
    finally:
        fh.close()


def wait_tcp(port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def start_storescp(out_dir: Path, log: Path, ae_title: str = "STORESCP", port: int | None = None) -> Proc:
    port = port or free_port()
    out_dir.mkdir(parents=True, exist_ok=True)
    p = start(["storescp", "--aetitle", ae_title, "+xa", "-od", str(out_dir), str(port)], log,
              env={"TCP_NODELAY": "1"})
    wait_tcp(port, proc=p)
    return Proc(p, log, port=port)


def start_orthanc(workdir: Path, ae_title: str = "ORTHANC") -> Proc:
    """Orthanc (Debian) with its own config, storage and ports; talk to it on 127.0.0.1 only."""
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "AINODE-TESTS",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"),
        "StorageCompression": False,
        "Plugins": [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": ae_title,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "DicomCheckModalityHost": False,
        "DicomModalities": {},
        "DicomModalitiesInDatabase": False,
        "DicomScuTimeout": 30,
        "StableAge": 2,
        "SaveJobs": False,
        "OverwriteInstances": True,
        "ExecuteLuaEnabled": False,
        "HttpTimeout": 30,
    }
    cfg = workdir / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=1))
    (workdir / "logs").mkdir(exist_ok=True)
    log = workdir / "orthanc.stdout"
    p = start([ORTHANC, f"--logdir={workdir / 'logs'}", str(cfg)], log, env={"TCP_NODELAY": "1"})
    proc = Proc(p, log, port=dicom_port, http_port=http_port, workdir=workdir)
    deadline = time.monotonic() + 20
    while True:
        try:
            orthanc_get(proc, "/system")
            break
        except (OSError, urllib.error.URLError) as exc:
            if p.poll() is not None or time.monotonic() > deadline:
                proc.stop()
                raise RuntimeError("Orthanc did not start:\n" + proc.log_text()[-2000:]) from exc
            time.sleep(0.05)
    wait_tcp(dicom_port, proc=p)
    return proc


def orthanc_request(proc: Proc, method: str, path: str, body: Any = None, timeout: float = 60.0) -> Any:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(f"http://127.0.0.1:{proc.http_port}{path}", data=data, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as rsp:
        raw = rsp.read()
    return json.loads(raw) if raw else None


def orthanc_get(proc: Proc, path: str) -> Any:
    return orthanc_request(proc, "GET", path, timeout=5.0)


def start_node(data_dir: Path, port: int | None = None, extra_env: dict[str, str] | None = None,
               config: Path | None = None) -> Proc:
    """``ainode serve`` as a subprocess (for kill -9 and signal tests)."""
    port = port or free_port()
    env = {"AINODE_DATA_DIR": str(data_dir), "AINODE_DIMSE_HOST": "127.0.0.1", "AINODE_DIMSE_PORT": str(port),
           "AINODE_STORE_MIN_FREE_GB": "0", "PYTHONUNBUFFERED": "1", "AINODE_HTTP_HOST": "127.0.0.1",
           "AINODE_HTTP_PORT": "0", **(extra_env or {})}
    args = [PYTHON, "-m", "node.cli", "serve"]
    if config is not None:
        args += ["--config", str(config)]
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / f"serve-{port}.log"
    p = start(args, log, env=env, cwd=ROOT)
    try:
        wait_tcp(port, timeout=30, proc=p)
    except Exception as exc:
        Proc(p, log).stop(signal.SIGKILL)
        raise RuntimeError("ainode serve did not start:\n" + log.read_text(errors="replace")[-3000:]) from exc
    return Proc(p, log, port=port)


def make_test_ca(out: Path) -> dict[str, Path]:
    """A throw-away CA plus server and client certificates for 127.0.0.1 (``openssl`` CLI)."""
    out.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=out, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=ainode test CA")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={'127.0.0.1' if name == 'server' else 'ainode-test-client'}")
        ext = out / f"{name}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1\n" if name == "server" else "extendedKeyUsage=clientAuth\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", ext.name)
    return {k: out / v for k, v in {
        "ca": "ca.pem", "server_cert": "server.pem", "server_key": "server.key",
        "client_cert": "client.pem", "client_key": "client.key"}.items()}


class RecorderSCP:
    """A pynetdicom storage SCP that counts C-STOREs per SOP Instance UID; can refuse chosen UIDs."""

    def __init__(self, ae_title: str = "RECORDER", port: int | None = None) -> None:
        self.ae_title = ae_title
        self.port = port or free_port()
        self.counts: dict[str, int] = {}
        self.sop_classes: dict[str, str] = {}
        self.refuse: dict[str, int] = {}
        self._server: Any = None

    def _handle(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if uid in self.refuse:
            return self.refuse[uid]
        self.counts[uid] = self.counts.get(uid, 0) + 1
        self.sop_classes[uid] = str(event.request.AffectedSOPClassUID)
        return 0

    def start(self) -> RecorderSCP:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(self.ae_title)
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._handle)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
