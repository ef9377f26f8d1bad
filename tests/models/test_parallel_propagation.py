"""3D propagation runs its chains (each prompted slice, up and down) side by side on the ONNX Runtime decoder's two
single-threaded lanes (models/litemedsam.py ``_run_chains``). The result must be exactly what one chain after the
other gives, every lane must be used, and an error in one chain (a cancelled job) must stop the others and reach
the caller."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from model_test_utils import MID, bbox_prompt_coords, dice
from models.base import BoxPrompt, PointPrompt, Prompts
from models.litemedsam import LiteMedSAM


def _box(mask2d: np.ndarray, k: int) -> BoxPrompt:
    x0, y0, x1, y1 = bbox_prompt_coords(mask2d)
    return BoxPrompt(float(x0), float(y0), float(x1), float(y1), k)


def _segment(model: LiteMedSAM, image, prompts: Prompts):
    model._memo.clear()  # every run decodes (the memo would otherwise answer the second run)
    model._memo_bytes = 0
    return model.segment(image, prompts, "3d")


@pytest.mark.slow
def test_parallel_chains_give_exactly_the_sequential_result(litemedsam: LiteMedSAM, phantom, monkeypatch) -> None:
    image, a, b = phantom
    dec = litemedsam._decoder
    assert dec.backend == "onnx" and dec.lanes == 2
    lanes = list(dec._lane_fns)
    used = [0, 0]

    def counting(i):
        def run(*args):
            used[i] += 1
            return lanes[i](*args)
        return run

    cases = {
        "box": Prompts(boxes=(_box(a[MID], MID),)),
        "click": Prompts(points=(PointPrompt(83, 58, MID),)),
        "two prompted slices (four chains)": Prompts(boxes=(_box(a[MID - 4], MID - 4), _box(a[MID + 4], MID + 4))),
        "negative click": Prompts(boxes=(_box(a[MID] | b[MID], MID),),
                                  points=(PointPrompt(83, 58, MID, positive=False),)),
    }
    for name, prompts in cases.items():
        monkeypatch.setattr(dec, "_lane_fns", [counting(0), counting(1)])
        used[:] = [0, 0]
        ticks: list[tuple[int, int]] = []
        litemedsam._memo.clear()
        litemedsam._memo_bytes = 0
        side_by_side = litemedsam.segment(image, prompts, "3d", progress=lambda d, t, ticks=ticks: ticks.append((d, t)))
        assert used[0] > 0 and used[1] > 0, (name, used)  # both lanes decoded
        monkeypatch.setattr(dec, "_lane_fns", [])  # no lanes: one chain after the other
        assert dec.lanes == 0
        one_by_one = _segment(litemedsam, image, prompts)
        assert np.array_equal(side_by_side.mask, one_by_one.mask), name
        assert side_by_side.slice_scores == pytest.approx(one_by_one.slice_scores, abs=1e-5), name
        assert side_by_side.stats["decoder_calls"] == one_by_one.stats["decoder_calls"], name
        # progress stays ordered and complete although two threads report it
        assert [d for d, _ in ticks] == list(range(1, len(ticks) + 1)) and ticks[-1][0] == ticks[-1][1], name
    assert dice(side_by_side.mask, a) >= 0.9


class _Cancelled(Exception):
    pass


@pytest.mark.slow
def test_an_error_in_one_chain_stops_the_others_and_reaches_the_caller(litemedsam: LiteMedSAM, phantom) -> None:
    image, a, _ = phantom
    assert litemedsam._decoder.lanes == 2
    seen: list[int] = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        if done == 4:  # the prompted slice and a few propagated ones: both chains are under way
            raise _Cancelled("job cancelled")

    litemedsam._memo.clear()
    litemedsam._memo_bytes = 0
    with pytest.raises(_Cancelled):
        litemedsam.segment(image, Prompts(boxes=(_box(a[MID], MID),)), "3d", progress=progress)
    assert max(seen) <= 5  # the other chain stopped at its next slice (at most one more report)
    assert not [t for t in threading.enumerate() if t.name.startswith("propagate-")]
    # the model keeps answering afterwards
    again = _segment(litemedsam, image, Prompts(boxes=(_box(a[MID], MID),)))
    assert dice(again.mask, a) >= 0.9
