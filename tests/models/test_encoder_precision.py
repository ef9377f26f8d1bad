"""The opt-in bfloat16 encoder: Dice >= 0.99 against float32 on the phantom; measured on a real CT slice.

On the real slice, bf16 and fp32 masks differ more on ambiguous boxes (measured 0.94-0.98), which is why
float32 stays the default (docs/models.md).
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from config.settings import LiteMedSAMSettings, ModelSettings
from model_test_utils import bbox_prompt_coords, dice
from models.base import BoxPrompt, ImageVolume, Prompts
from models.litemedsam import LiteMedSAM, native_bf16


@pytest.fixture(scope="module")
def pair() -> tuple[LiteMedSAM, LiteMedSAM]:
    fp32 = LiteMedSAM(LiteMedSAMSettings(encoder_precision="fp32"), ModelSettings(device="cpu"))
    bf16 = LiteMedSAM(LiteMedSAMSettings(encoder_precision="bf16"), ModelSettings(device="cpu"))
    assert (fp32.encoder_precision, bf16.encoder_precision) == ("float32", "bfloat16")
    return fp32, bf16


def _box_2d(model: LiteMedSAM, image: ImageVolume, box: tuple[float, ...], k: int) -> np.ndarray:
    r = model.segment(image, Prompts(boxes=(BoxPrompt(*box, k=k),)), mode="2d")
    return r.mask[k]


def test_bf16_matches_fp32_on_the_phantom(pair, phantom) -> None:
    fp32, bf16 = pair
    image, a, b = phantom
    checked = 0
    for k in np.flatnonzero(a.any(axis=(1, 2)))[::4]:
        for obj in (a, b):
            if not obj[k].any():
                continue
            box = bbox_prompt_coords(obj[k])
            m32, m16 = _box_2d(fp32, image, box, int(k)), _box_2d(bf16, image, box, int(k))
            assert m32.any()
            assert dice(m32, m16) >= 0.99, (int(k), dice(m32, m16))
            checked += 1
    assert checked >= 4


def test_bf16_on_a_real_ct_tight_box(pair) -> None:
    fp32, bf16 = pair
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    image = ImageVolume(hu[None], modality="CT")
    box = (44, 38, 72, 64)  # tight around the spinal canal
    m32, m16 = _box_2d(fp32, image, box, 0), _box_2d(bf16, image, box, 0)
    print(f"\nCT_small canal box: fp32 {m32.sum()} px, bf16 {m16.sum()} px, Dice {dice(m32, m16):.4f}")
    assert m32.sum() > 50
    assert dice(m32, m16) >= 0.97


def test_default_is_fp32_and_bf16_needs_native_support_to_be_fast() -> None:
    import torch

    model = LiteMedSAM(LiteMedSAMSettings(), ModelSettings(device="cpu"))
    assert model.encoder_precision == "float32"
    assert isinstance(native_bf16(torch.device("cpu")), bool)


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="encoder_precision must be .fp32. or .bf16."):
        LiteMedSAM(LiteMedSAMSettings(encoder_precision="int4"), ModelSettings(device="cpu"))
