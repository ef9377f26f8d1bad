"""HTTPS via uvicorn's TLS options ([http] tls_cert/tls_key/tls_ca), with a throw-away test CA."""

from __future__ import annotations

import dataclasses
import socket
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest

import peers
from config.settings import ApiSettings, ConfigError, HttpSettings, Secret


def _https_node(start_node: Any, tmp_path: Path, ca: dict[str, Path], *, mutual: bool) -> Any:
    s = peers.node_settings(tmp_path / "node")
    http = HttpSettings(host="127.0.0.1", port=peers.free_port(), tls_cert=str(ca["server_cert"]),
                        tls_key=str(ca["server_key"]), tls_ca=str(ca["ca"]) if mutual else "")
    s = dataclasses.replace(s, http=http, api=ApiSettings(tokens=(Secret("alice:read:tok-https"),)))
    return start_node(s)


def _plain_http_answer(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        try:
            while chunk := sock.recv(4096):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return data


def test_https_verified_and_plain_http_refused(start_node: Any, tmp_path: Path) -> None:
    ca = peers.make_test_ca(tmp_path / "ca")
    node = _https_node(start_node, tmp_path, ca, mutual=False)
    host, port = node.service.http_address
    base = f"https://127.0.0.1:{port}"
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca["ca"])), timeout=10) as client:
        assert client.get(base + "/health").json() == {"status": "ok"}
        r = client.get(base + "/v1/status")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert client.get(base + "/v1/status", headers={"Authorization": "Bearer tok-https"}).status_code == 200
    # A client that does not trust the test CA refuses the server.
    with httpx.Client(verify=ssl.create_default_context(), timeout=10) as client:
        with pytest.raises(httpx.ConnectError):
            client.get(base + "/health")
    # Plain HTTP on the TLS port gets no HTTP answer.
    assert not _plain_http_answer(port).startswith(b"HTTP/")
    with httpx.Client(timeout=10) as client:
        with pytest.raises(httpx.HTTPError):
            client.get(f"http://127.0.0.1:{port}/health")
    # The node is still serving.
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca["ca"])), timeout=10) as client:
        assert client.get(base + "/health").status_code == 200


def test_https_client_certificates(start_node: Any, tmp_path: Path) -> None:
    ca = peers.make_test_ca(tmp_path / "ca")
    node = _https_node(start_node, tmp_path, ca, mutual=True)
    base = f"https://127.0.0.1:{node.service.http_address[1]}"
    with_cert = ssl.create_default_context(cafile=str(ca["ca"]))
    with_cert.load_cert_chain(str(ca["client_cert"]), str(ca["client_key"]))
    with httpx.Client(verify=with_cert, timeout=10) as client:
        assert client.get(base + "/health").status_code == 200
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca["ca"])), timeout=10) as client:
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            client.get(base + "/health")


def test_https_settings_errors(tmp_path: Path) -> None:
    from node.app import HttpServer

    with pytest.raises(ConfigError, match="tls_cert .* is not a readable file"):
        HttpServer(object(), "127.0.0.1", 0, tls_cert=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="http.tls_cert is empty"):
        HttpServer(object(), "127.0.0.1", 0, tls_key=str(tmp_path / "k.pem"))


def test_a_series_is_pulled_over_https_with_verification(start_node: Any, tmp_path: Path) -> None:
    """The whole-series read (standard library client) over HTTPS: the archive's certificate is verified
    against the configured CA and the bearer token is sent; a client that does not trust the CA pulls nothing."""
    from dicom_io.dicomweb import DicomwebClient, make_auth
    from dicom_io.phantom import write_phantom_series
    from dicom_io.scu import Peer, send_instances
    from dicom_io.store import Store

    ca = peers.make_test_ca(tmp_path / "ca")
    node = _https_node(start_node, tmp_path, ca, mutual=False)
    ph = write_phantom_series(tmp_path / "ph", shape=(6, 32, 32))
    assert all(r.ok for r in send_instances(Peer("AINODE", "127.0.0.1", node.port, calling_ae_title="SCU"), ph.paths))
    base = f"https://127.0.0.1:{node.service.http_address[1]}/dicomweb"
    store = Store.open(tmp_path / "pulled", durable=True)
    with DicomwebClient(base, auth=make_auth("bearer", token="tok-https"),
                        verify=ssl.create_default_context(cafile=str(ca["ca"]))) as client:
        result = client.pull_series(store, ph.study_instance_uid, ph.series_instance_uid)
    assert result.complete and result.stored == 6, result
    with DicomwebClient(base, auth=make_auth("bearer", token="tok-https")) as client:  # default CAs only
        result = client.pull_series(store, ph.study_instance_uid, "1.2.826.0.1.3680043.8.498.1")
    assert result.error and "CERTIFICATE_VERIFY_FAILED" in result.error and result.stored == 0
    store.close()
