"""Fixtures for the DICOMweb tests: Orthanc with its DICOMweb plugin (one open, one with HTTP basic auth)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import peers
from dw_helpers import AUTH_PASSWORD, AUTH_USER, DICOMWEB_PLUGIN, start_orthanc_dicomweb


def _need_orthanc() -> None:
    if not peers.have(peers.ORTHANC) or not DICOMWEB_PLUGIN.exists():
        pytest.fail("Orthanc and its DICOMweb plugin are not installed (apt-get install orthanc orthanc-dicomweb): "
                    "scripts/install.sh --test installs the peers the tests need")


@pytest.fixture(scope="session")
def orthanc_dw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Proc]:
    """One Orthanc with the DICOMweb plugin for the session, no authentication."""
    _need_orthanc()
    proc = start_orthanc_dicomweb(tmp_path_factory.mktemp("orthanc-dw"))
    yield proc
    proc.stop(timeout=15)


@pytest.fixture(scope="session")
def orthanc_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Proc]:
    """Orthanc with the DICOMweb plugin and HTTP basic authentication on."""
    _need_orthanc()
    proc = start_orthanc_dicomweb(tmp_path_factory.mktemp("orthanc-auth"), users={AUTH_USER: AUTH_PASSWORD})
    yield proc
    proc.stop(timeout=15)
