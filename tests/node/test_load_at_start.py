"""`ainode serve` loads the default model at start (model.load_at_start), so the first request waits for neither
the load nor (LiteMedSAM under serve) the background compile; off, the model loads on first use."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import httpx

import peers


def _queue(port: int) -> dict[str, Any] | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/v1/status", timeout=5).json()["queues"].get("litemedsam")
    except httpx.HTTPError:
        return None  # the HTTP server starts right after the DIMSE listener


def test_serve_loads_the_default_model_at_start_when_asked(tmp_path: Path) -> None:
    http = peers.free_port()
    node = peers.start_node(tmp_path / "node", extra_env={"AINODE_HTTP_PORT": str(http),
                                                          "AINODE_MODEL_LOAD_AT_START": "true"})
    try:
        assert peers.wait_until(lambda: (_queue(http) or {}).get("loaded"), timeout=180), node.log.read_text()[-2000:]
        q = _queue(http)
        assert q is not None and q["available"] and q["failed"] == 0
        # the suite runs the `fused` encoder, so nothing compiles; under serve's default it would be compiling
        assert q["backends"] == {"encoder": "fused", "decoder": "eager"}
        # the entry point (node.service.serve) freezes the long-lived objects once the model has loaded
        assert peers.wait_until(lambda: "left out of garbage collection" in node.log.read_text(), timeout=60)
    finally:
        node.stop(signal.SIGTERM)
    assert "loading model litemedsam in the background" in node.log.read_text()


def test_without_it_the_model_waits_for_the_first_request(tmp_path: Path) -> None:
    http = peers.free_port()
    node = peers.start_node(tmp_path / "node", extra_env={"AINODE_HTTP_PORT": str(http),
                                                          "AINODE_MODEL_LOAD_AT_START": "false"})
    try:
        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{http}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        assert peers.wait_until(up, timeout=30)
        time.sleep(3.0)  # what the other test's node needs to load the model
        status = httpx.get(f"http://127.0.0.1:{http}/v1/status", timeout=5).json()["queues"]
        assert not status.get("litemedsam", {}).get("loaded", False), status
    finally:
        node.stop(signal.SIGTERM)
    assert "loading model" not in node.log.read_text()
