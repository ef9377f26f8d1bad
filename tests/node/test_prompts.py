"""CLI prompt syntax and millimetre → voxel conversion."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_io.geometry import Geometry
from models.base import BoxPrompt, PointPrompt, PromptError, Prompts
from node.prompts import parse_box, parse_box_mm, parse_point, parse_point_mm


def test_parse_voxel_prompts() -> None:
    assert parse_point("12,34.5@7") == PointPrompt(12.0, 34.5, 7, True)
    assert parse_point(" 1 , 2 @ 0", positive=False) == PointPrompt(1.0, 2.0, 0, False)
    assert parse_box("1,2,30,40@3") == BoxPrompt(1, 2, 30, 40, 3, True)


@pytest.mark.parametrize("text", ["12,34", "a,b@1", "1,2@-1", "1,2,3@4", ""])
def test_malformed_point_is_refused(text: str) -> None:
    with pytest.raises(PromptError, match="x,y@k"):
        parse_point(text)


def test_malformed_box_is_refused() -> None:
    with pytest.raises(PromptError, match="x0,y0,x1,y1@k"):
        parse_box("1,2,3@4")


def _oblique() -> Geometry:
    a = np.deg2rad(25)
    row = np.array([np.cos(a), np.sin(a), 0.0])
    col = np.array([0.0, 0.0, -1.0])  # coronal-ish, tilted
    normal = np.cross(row, col)
    return Geometry.from_plane([10.0, -20.0, 30.0], list(row) + list(col), (0.9, 0.7), normal * 3.0, (10, 40, 50))


def test_mm_prompts_land_on_the_voxel_they_name() -> None:
    g = _oblique()
    lps = g.voxel_to_lps([7.0, 11.0, 4.0])
    p = parse_point_mm(",".join(f"{v:.6f}" for v in lps), g)
    assert (p.x, p.y, p.k) == pytest.approx((7.0, 11.0, 4))
    a, b = g.voxel_to_lps([2.0, 3.0, 5.0]), g.voxel_to_lps([20.0, 30.0, 5.0])
    box = parse_box_mm(",".join(f"{v:.6f}" for v in [*b, *a]), g)
    assert (box.x0, box.y0, box.x1, box.y1, box.k) == pytest.approx((2, 3, 20, 30, 5))


def test_mm_prompt_between_slices_or_outside_is_refused() -> None:
    g = _oblique()
    off = g.voxel_to_lps([5.0, 5.0, 20.0])
    with pytest.raises(PromptError, match="not on a slice"):
        parse_point_mm(",".join(map(str, off)), g)
    a, b = g.voxel_to_lps([2.0, 3.0, 1.0]), g.voxel_to_lps([20.0, 30.0, 6.0])
    with pytest.raises(PromptError, match="different slices"):
        parse_box_mm(",".join(map(str, [*a, *b])), g)


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        (Prompts(), "At least one positive"),
        (Prompts(points=(PointPrompt(1, 1, 0, False),)), "At least one positive"),
        (Prompts(points=(PointPrompt(1, 1, 10),)), r"slice 10 is outside the volume \(0..9\)"),
        (Prompts(points=(PointPrompt(60, 1, 2),)), "outside the slice"),
        (Prompts(boxes=(BoxPrompt(5, 5, 5.5, 20, 1),)), "the box is empty"),
        (Prompts(boxes=(BoxPrompt(9, 5, 3, 20, 1),)), "must not be smaller"),
        (Prompts(boxes=(BoxPrompt(100, 100, 120, 120, 1),)), "outside the slice"),
    ],
)
def test_prompt_validation_names_the_problem(prompts: Prompts, message: str) -> None:
    with pytest.raises(PromptError, match=message):
        prompts.validate((10, 40, 50))
