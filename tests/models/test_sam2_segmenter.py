"""SAM2 through our loader with a random-weights checkpoint built from the real SAM 2.1 tiny config.

Real weights are never available offline, so mask content is meaningless here: the tests check the
loading contract, the numpy frame feeding, propagation in both directions, shapes and dtypes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sam2")

import torch  # noqa: E402

from config.settings import ModelSettings, Sam2Settings  # noqa: E402
from models.base import BoxPrompt, ImageVolume, ModelError, PointPrompt, PromptError, Prompts  # noqa: E402

CPU = ModelSettings(device="cpu")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sam2.build_sam import build_sam2

    torch.manual_seed(0)
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu")
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny_random.pt"
    torch.save({"model": model.state_dict()}, path)  # the official checkpoint layout
    return path


@pytest.fixture(scope="module")
def segmenter(tiny_checkpoint: Path):
    from models.sam2 import SAM2Segmenter

    # 256 instead of 1024 keeps the test fast (~0.1-0.2 s per frame instead of ~7 s)
    return SAM2Segmenter(Sam2Settings(size="tiny", checkpoint=str(tiny_checkpoint), image_size=256), CPU)


@pytest.fixture(scope="module")
def volume() -> ImageVolume:
    rng = np.random.default_rng(0)
    vol = rng.normal(40, 20, (5, 64, 64)).astype(np.float32)
    vol[:, 20:40, 22:44] += 110
    return ImageVolume(vol, modality="CT", key="sam2-test")


def test_identity(segmenter, tiny_checkpoint: Path) -> None:
    assert segmenter.name == "sam2" and segmenter.device == "cpu"
    assert segmenter.version.startswith("sam2 1.1.0 sam2.1_hiera_tiny+")
    assert segmenter.checkpoint_path == str(tiny_checkpoint)


def test_3d_propagates_both_ways(segmenter, volume: ImageVolume) -> None:
    import sam2.sam2_video_predictor as svp

    original_loader = svp.load_video_frames
    calls: list[tuple[int, int]] = []
    prompts = Prompts(
        points=(PointPrompt(30, 30, 2), PointPrompt(5, 5, 2, positive=False)),
        boxes=(BoxPrompt(0, 0, 10, 10, 3, positive=False),),
    )
    r = segmenter.segment(volume, prompts, "3d", progress=lambda d, t: calls.append((d, t)))
    assert svp.load_video_frames is original_loader  # the patch is scoped and undone
    assert r.mask.shape == volume.shape and r.mask.dtype == bool
    assert not r.mask[3, 0:11, 0:11].any()  # negative box applied
    frames = segmenter.last_frames
    assert frames is not None
    visited = frames.accessed
    # forward 2->4 and backward 2->0 (frame 0 is also read by init_state's warm-up)
    assert {3, 4} <= set(visited) and {0, 1} <= set(visited)
    assert calls[-1] == (6, 6) and [c[0] for c in calls] == list(range(1, 7))
    assert {"init", "prompt", "propagate", "total"} <= set(r.timings)
    assert all(0.0 <= s <= 1.0 for s in r.slice_scores.values())
    print(f"\nSAM2 tiny random weights, 5x64x64 @256: timings {r.timings}")


def test_2d_box(segmenter, volume: ImageVolume) -> None:
    r = segmenter.segment(volume, Prompts(boxes=(BoxPrompt(20, 18, 46, 42, 1),)), "2d")
    assert r.mask.shape == volume.shape and r.mask.dtype == bool
    assert not np.delete(r.mask, 1, axis=0).any()  # only the prompted slice


def test_prompt_error(segmenter, volume: ImageVolume) -> None:
    with pytest.raises(PromptError, match="point 0"):
        segmenter.segment(volume, Prompts(points=(PointPrompt(99, 5, 1),)))


def test_missing_checkpoint(tmp_path: Path) -> None:
    from models.sam2 import SAM2Segmenter

    with pytest.raises(ModelError, match="none is configured.*AINODE_SAM2_CHECKPOINT"):
        SAM2Segmenter(Sam2Settings(checkpoint=""), CPU)
    with pytest.raises(ModelError, match="absent.pt' does not exist.*AINODE_SAM2_CHECKPOINT"):
        SAM2Segmenter(Sam2Settings(checkpoint=str(tmp_path / "absent.pt")), CPU)


def test_checkpoint_with_missing_key(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from models.sam2 import SAM2Segmenter

    sd = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)["model"]
    sd.pop("maskmem_tpos_enc")
    bad = tmp_path / "broken.pt"
    torch.save({"model": sd}, bad)
    with pytest.raises(ModelError, match=r"broken.pt' does not match the SAM 2.1 'tiny' model.*maskmem_tpos_enc"):
        SAM2Segmenter(Sam2Settings(size="tiny", checkpoint=str(bad), image_size=256), CPU)


def test_checkpoint_of_another_size(tiny_checkpoint: Path) -> None:
    from models.sam2 import SAM2Segmenter

    with pytest.raises(ModelError, match=r"does not match the SAM 2.1 'small' model.*sam2.size"):
        SAM2Segmenter(Sam2Settings(size="small", checkpoint=str(tiny_checkpoint), image_size=256), CPU)


def test_not_official_layout_and_bad_settings(tmp_path: Path) -> None:
    from models.sam2 import SAM2Segmenter

    raw = tmp_path / "raw.pt"
    torch.save({"image_encoder.weight": torch.zeros(1)}, raw)
    with pytest.raises(ModelError, match="official layout"):
        SAM2Segmenter(Sam2Settings(checkpoint=str(raw)), CPU)
    with pytest.raises(ValueError, match="sam2.size 'huge'"):
        SAM2Segmenter(Sam2Settings(size="huge", checkpoint=str(raw)), CPU)
    with pytest.raises(ValueError, match="image_size"):
        SAM2Segmenter(Sam2Settings(checkpoint=str(raw), image_size=100), CPU)
