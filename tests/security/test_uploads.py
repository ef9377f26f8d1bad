"""Uploads and paths: body size limits (Content-Length and chunked), path tricks, unsafe zip archives."""

from __future__ import annotations

import dataclasses
import io
import json
import socket
import stat
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

import peers
from api_helpers import make_phantom_series
from config.settings import ApiSettings, HttpSettings
from dicom_io.errors import UnsafeArchiveError
from dicom_io.sources import RATIO_FLOOR_BYTES, extract_zip
from sec_helpers import settings_for

LIMIT = 64 * 1024


@pytest.fixture
def http_node(start_node: Any, tmp_path: Path) -> Any:
    s = peers.node_settings(tmp_path / "node")
    s = dataclasses.replace(s, http=HttpSettings(host="127.0.0.1", port=peers.free_port()),
                            api=ApiSettings(max_upload_bytes=LIMIT))
    node = start_node(s)
    node.http_port = node.service.http_address[1]
    return node


def _raw(port: int, head: bytes, body_chunks: list[bytes] = (), timeout: float = 20.0) -> tuple[int, bytes, float]:
    """Send a raw HTTP/1.1 request; returns (status, answer, seconds until the answer's first byte)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.monotonic()
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the whole body was sent
        data = b""
        first = None
        try:
            while chunk := sock.recv(65536):
                first = first or time.monotonic() - t0
                data += chunk
                if b"\r\n\r\n" in data:
                    head_end = data.index(b"\r\n\r\n")
                    length = [int(line.split(b":")[1]) for line in data[:head_end].split(b"\r\n")
                              if line.lower().startswith(b"content-length:")]
                    if length and len(data) >= head_end + 4 + length[0]:
                        break
        except ConnectionResetError:
            pass
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data, first or timeout


@pytest.mark.parametrize("path", ["/v1/segmentations", "/session/", "/infer/segmentation", "/v1/deepgrow"])
def test_content_length_above_limit_is_refused_before_the_body(http_node: Any, path: str) -> None:
    method = "PUT" if path == "/session/" else "POST"
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {10 ** 12}\r\n\r\n").encode()
    status, answer, _ = _raw(http_node.http_port, head)  # no body is sent: a server reading it would hang
    assert status == 413, answer[:300]
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["field"] == "body" and "api.max_upload_bytes" in body["error"]


@pytest.mark.parametrize("path,ctype", [
    ("/infer/segmentation", "multipart/form-data; boundary=b0"),
    ("/v1/segmentations", "application/json"),
    ("/session/", "multipart/form-data; boundary=b0"),
])
def test_chunked_body_is_counted_as_it_streams(http_node: Any, path: str, ctype: str) -> None:
    method = "PUT" if path == "/session/" else "POST"
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    piece = b"A" * 16384
    pieces = [piece] * 12
    if ctype.startswith("multipart/"):
        # a well-formed multipart start, so the parser keeps streaming the file part until the limit
        # trips (a malformed start could be refused with a 400 before the limit is reached)
        pieces[0] = (b'--b0\r\nContent-Disposition: form-data; name="file"; filename="x.zip"\r\n'
                     b"Content-Type: application/octet-stream\r\n\r\n") + piece
    chunks = [f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces] + [b"0\r\n\r\n"]
    status, answer, _ = _raw(http_node.http_port, head, chunks)
    assert status == 413, answer[:300]
    assert b"more than api.max_upload_bytes" in answer
    # The node is fine, and a body under the limit is still served.
    small = json.dumps({"series": "1.2.3", "prompts": {"points": [{"ijk": [1, 1, 0]}]}}).encode()
    head = (f"POST /v1/segmentations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(small)}\r\n\r\n").encode()
    status, answer, _ = _raw(http_node.http_port, head + small)
    assert status in (404, 422, 502), answer[:300]


@pytest.mark.parametrize("raw_path", [
    "/v1/segmentations/../nifti",
    "/v1/segmentations/..%2F..%2Fetc%2Fpasswd/nifti",
    "/v1/segmentations/%2e%2e/nifti",
    "/v1/sessions/%2E%2E%2Fx/mask",
    "/dicomweb/studies/1.2.3/series/..%5C..%5Cx",
    "/dicomweb/studies/1.2.3%00/metadata",
    "/session/./x",
    "/v1/jobs/..",
])
def test_path_tricks_are_refused(http_node: Any, raw_path: str) -> None:
    head = f"GET {raw_path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    status, answer, _ = _raw(http_node.http_port, head)
    assert status == 400, answer[:300]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["field"] == "path"


def _zip(members: dict[str, bytes], symlink: str | None = None, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def test_unsafe_zip_uploads_are_refused(make_app: Any, tmp_path: Path) -> None:
    ph = make_phantom_series(tmp_path / "ph")
    good = {f"s/{p.name}": p.read_bytes() for p in ph.paths}
    app = make_app(settings_for(tmp_path / "node", max_upload_bytes=8 * 1024 * 1024))
    c = app.client
    cases = {
        "slip": (_zip({**good, "../../evil.dcm": b"x"}), "escapes the archive folder"),
        "absolute": (_zip({**good, "/tmp/evil.dcm": b"x"}), "absolute path"),
        "symlink": (_zip(good, symlink="s/link.dcm"), "symbolic link"),
        "bomb": (_zip({**good, "bomb.bin": b"\0" * (RATIO_FLOOR_BYTES + 1)}), "zip bomb"),
        "not a zip": (b"PK\x03\x04" + b"\0" * 100, "not one usable image series"),
    }
    uploads = app.ctx.uploads_dir
    for name, (data, reason) in cases.items():
        r = c.put("/session/", files={"files": ("series.zip", data, "application/zip")})
        assert r.status_code == 422, (name, r.status_code, r.text[:300])
        assert reason in r.json()["error"], (name, r.json()["error"])
        assert r.json()["field"]
        assert not (tmp_path / "evil.dcm").exists() and not Path("/tmp/evil.dcm").exists()
    # Nothing was left behind, and a good zip still works.
    assert not uploads.exists() or not any(uploads.iterdir())
    r = c.put("/session/", files={"files": ("series.zip", _zip(good), "application/zip")})
    assert r.status_code == 200, r.text[:300]
    # A body over api.max_upload_bytes is refused as a whole.
    small = make_app(settings_for(tmp_path / "small", max_upload_bytes=4096))
    r = small.client.put("/session/", files={"files": ("series.zip", _zip(good), "application/zip")})
    assert r.status_code == 413 and r.json()["field"] == "body"


def test_zip_ratio_and_encryption_limits(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.zip"
    bomb.write_bytes(_zip({"a.dcm": b"\0" * (RATIO_FLOOR_BYTES + 1)}))
    with pytest.raises(UnsafeArchiveError, match=r"inflates \d+:1 .* more than the 200:1 allowed"):
        extract_zip(bomb, tmp_path / "out")
    assert not (tmp_path / "out" / "a.dcm").exists()
    # The same bytes stored (no compression) are fine: the ratio, not the size, is the signal.
    stored = tmp_path / "stored.zip"
    stored.write_bytes(_zip({"a.dcm": b"\0" * (RATIO_FLOOR_BYTES + 1)}, compression=zipfile.ZIP_STORED))
    assert len(extract_zip(stored, tmp_path / "out2")) == 1
    # An encrypted member (flag bit 0) is refused with a clear reason.
    enc = bytearray(_zip({"e.dcm": b"secret"}, compression=zipfile.ZIP_STORED))
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):
        at = enc.find(sig)
        flag_at = at + (6 if sig == b"PK\x03\x04" else 8)
        enc[flag_at] |= 0x1
    (tmp_path / "enc.zip").write_bytes(bytes(enc))
    with pytest.raises(UnsafeArchiveError, match="encrypted"):
        extract_zip(tmp_path / "enc.zip", tmp_path / "out3")


def test_stow_is_not_bound_by_the_api_upload_limit(http_node: Any, tmp_path: Path) -> None:
    """STOW-RS streams part by part into the store (bounded by store.min_free_gb), so a PACS can forward a
    study larger than api.max_upload_bytes, chunked or with a Content-Length."""
    ph = make_phantom_series(tmp_path / "ph")
    parts = [p.read_bytes() for p in ph.paths]
    boundary = "stowlimit"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
                    for part in parts) + f"--{boundary}--\r\n".encode()
    assert len(body) > LIMIT
    head = (f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f'Content-Type: multipart/related; type="application/dicom"; boundary={boundary}\r\n'
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    status, answer, _ = _raw(http_node.http_port, head + body)
    assert status == 200, answer[:300]
    assert http_node.store.count() == len(parts)
