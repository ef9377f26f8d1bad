"""DIMSE: refused associations (wrong calling AE, wrong host, plain DIMSE to a TLS-only node) are logged, and
the log lines carry no patient data (the refused data sets hold canary identifiers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peers
from api_helpers import make_phantom_series
from dicom_io.scu import Peer, client_tls_context, echo, send_instances
from phi import all_loggers_at_debug, scan, with_canary


def test_refused_associations_are_logged_without_patient_data(start_node: Any, tmp_path: Path) -> None:
    ph = make_phantom_series(tmp_path / "ph", shape=(3, 16, 16))
    files = with_canary(ph.paths)
    ca = peers.make_test_ca(tmp_path / "ca")
    with all_loggers_at_debug() as lines:
        # Allow-list: AE GOOD from 127.0.0.1, AE FAR only from another host.
        node = start_node(allowed_callers=("GOOD@127.0.0.1", "FAR@192.0.2.7"))
        intruder = Peer("AINODE", "127.0.0.1", node.port, calling_ae_title="INTRUDER", timeout=10)
        wrong_ae = send_instances(intruder, files)
        wrong_host = send_instances(Peer("AINODE", "127.0.0.1", node.port, calling_ae_title="FAR", timeout=10), files)
        assert not any(r.ok for r in wrong_ae + wrong_host)
        assert all(r.ok for r in send_instances(Peer("AINODE", "127.0.0.1", node.port, calling_ae_title="GOOD"), files))
        # TLS required: a plain association is refused, a TLS one works.
        tls_node = start_node(tls_cert=str(ca["server_cert"]), tls_key=str(ca["server_key"]), require_tls=True)
        plain = send_instances(Peer("AINODE", "127.0.0.1", tls_node.port, calling_ae_title="PLAIN", timeout=5), files)
        assert not any(r.ok for r in plain)
        tls = client_tls_context(str(ca["ca"]))
        assert echo(Peer("AINODE", "127.0.0.1", tls_node.port, calling_ae_title="TLSSCU", tls=tls, timeout=10)).ok
        captured = list(lines)
    text = "\n".join(captured)
    assert "'INTRUDER' at 127.0.0.1" in text and "not allowed" in text
    assert "'FAR' at 127.0.0.1" in text
    assert "TLS handshake with 127.0.0.1 failed" in text
    assert node.store.count() == len(files) and tls_node.store.count() == 0
    scan(captured)
