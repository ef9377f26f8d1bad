"""Shared fixtures for the model tests: a synthetic CT phantom and one LiteMedSAM per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

# Make the repository importable however pytest was started (rootdir-less runs, IDEs).
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from model_test_utils import make_phantom  # noqa: E402
from models.base import ImageVolume  # noqa: E402


@pytest.fixture(scope="session")
def phantom() -> tuple[ImageVolume, np.ndarray, np.ndarray]:
    vol, a, b = make_phantom()
    return ImageVolume(vol, spacing=(0.8, 0.8, 2.5), modality="CT", key="phantom-ct"), a, b


@pytest.fixture(scope="session")
def litemedsam():
    """One LiteMedSAM for the whole session, so its embedding cache is shared across tests."""
    from config.settings import LiteMedSAMSettings, ModelSettings
    from models.litemedsam import LiteMedSAM

    return LiteMedSAM(LiteMedSAMSettings(), ModelSettings(device="cpu"))


@pytest.fixture(scope="session")
def compile_cache_dir(tmp_path_factory):
    """One encoder-cache folder for every test that compiles: Inductor picks its cache folder once per process.

    Inductor caches where TORCHINDUCTOR_CACHE_DIR points; ``ainode serve`` sets it to ``<folder>/inductor``
    (node.service.serve), and so does this fixture, for the rest of the test process.
    """
    folder = tmp_path_factory.mktemp("encoder-cache")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    return folder
