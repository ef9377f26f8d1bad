"""Helpers for the DICOMweb tests: Orthanc with its DICOMweb plugin started as a plain process."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import peers

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
AUTH_USER, AUTH_PASSWORD = "ainode", "s3cret-pw"


def start_orthanc_dicomweb(workdir: Path, *, users: dict[str, str] | None = None,
                           servers: dict[str, Any] | None = None, http_port: int | None = None,
                           dicomweb: dict[str, Any] | None = None) -> peers.Proc:
    """Orthanc (Debian) with the DICOMweb plugin, its own config and storage, on free ports (127.0.0.1 only).

    ``users`` turns HTTP basic authentication on; ``servers`` fills ``DicomWeb.Servers`` (Orthanc as a
    DICOMweb client); ``dicomweb`` adds further ``DicomWeb`` options.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    http_port = http_port or peers.free_port()
    dicom_port = peers.free_port()
    config = {
        "Name": "AINODE-DICOMWEB-TESTS",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"),
        "StorageCompression": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": users or {},
        "DicomServerEnabled": True,
        "DicomAet": "ORTHANCDW",
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomCheckModalityHost": False,
        "DicomModalities": {},
        "StableAge": 2,
        "SaveJobs": False,
        "OverwriteInstances": True,
        "ExecuteLuaEnabled": False,
        "HttpTimeout": 30,
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": False,
            "StudiesMetadata": "Full",
            "SeriesMetadata": "Full",
            "Servers": servers or {},
            **(dicomweb or {}),
        },
    }
    cfg = workdir / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=1))
    (workdir / "logs").mkdir(exist_ok=True)
    log = workdir / "orthanc.stdout"
    p = peers.start([peers.ORTHANC, f"--logdir={workdir / 'logs'}", str(cfg)], log, env={"TCP_NODELAY": "1"})
    proc = peers.Proc(p, log, port=dicom_port, http_port=http_port, workdir=workdir)
    deadline = time.monotonic() + 20
    while True:
        try:
            orthanc_call(proc, "GET", "/system", users=users)
            break
        except (OSError, urllib.error.URLError) as exc:
            if p.poll() is not None or time.monotonic() > deadline:
                proc.stop()
                raise RuntimeError("Orthanc did not start:\n" + proc.log_text()[-2000:]) from exc
            time.sleep(0.05)
    return proc


def orthanc_call(proc: peers.Proc, method: str, path: str, body: Any = None, *,
                 users: dict[str, str] | None = None, timeout: float = 60.0) -> Any:
    """An Orthanc REST call on 127.0.0.1 (with the first user's basic credentials when ``users``)."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(f"http://127.0.0.1:{proc.http_port}{path}", data=data, method=method)
    if users:
        user, password = next(iter(users.items()))
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    with urllib.request.urlopen(req, timeout=timeout) as rsp:
        raw = rsp.read()
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw


def upload(proc: peers.Proc, paths: list[Path], users: dict[str, str] | None = None) -> list[str]:
    """POST files to Orthanc's REST /instances; returns the Orthanc instance ids."""
    ids = []
    for p in paths:
        ids.append(orthanc_call(proc, "POST", "/instances", p.read_bytes(), users=users)["ID"])
    return ids
