"""Shared fixtures: an in-process node on 127.0.0.1, Orthanc and dcmtk peers started as plain processes."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Every `ainode serve` a test starts would otherwise compile the encoder in the background (a minute
# of both cores per fresh data dir). Tests run the exact float32 `fused` encoder unless they ask for
# another one; tests/models/test_encoder_backends.py covers `compile` itself.
os.environ.setdefault("AINODE_LITEMEDSAM_ENCODER_BACKEND", "fused")
# ... and load the model on first use: dozens of nodes start during a run, most never segment
os.environ.setdefault("AINODE_MODEL_LOAD_AT_START", "false")

import peers  # noqa: E402
from config.settings import Settings  # noqa: E402

node_settings = peers.node_settings


@dataclasses.dataclass
class RunningNode:
    settings: Settings
    service: object  # node.service.NodeService

    @property
    def port(self) -> int:
        return self.settings.dimse.port

    @property
    def store(self):  # type: ignore[no-untyped-def]
        return self.service.store  # type: ignore[attr-defined]

    @property
    def outbox(self):  # type: ignore[no-untyped-def]
        return self.service.outbox  # type: ignore[attr-defined]


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[object]:
    """Factory: ``start_node(settings=None, **dimse)`` starts a NodeService in-process; stopped at teardown."""
    from node.service import NodeService

    running: list[NodeService] = []

    def _start(settings: Settings | None = None, **dimse: object) -> RunningNode:
        settings = settings or node_settings(tmp_path / f"node{len(running)}", **dimse)
        service = NodeService(settings)
        service.start()
        running.append(service)
        return RunningNode(settings, service)

    yield _start
    for service in running:
        service.stop()


@pytest.fixture
def node(start_node) -> RunningNode:  # type: ignore[no-untyped-def]
    return start_node()  # type: ignore[no-any-return]


@pytest.fixture
def ct_series(tmp_path: Path) -> peers.CtSeries:
    return peers.make_ct_series(tmp_path / "ct", n=6)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Proc]:
    """One Orthanc for the session (its own config and storage, HTTP and DICOM on free ports)."""
    if not peers.have(peers.ORTHANC):
        pytest.fail("Orthanc is not installed (apt-get install orthanc): "
                    "scripts/install.sh --test installs the peers the tests need")
    proc = peers.start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield proc
    proc.stop(timeout=15)

