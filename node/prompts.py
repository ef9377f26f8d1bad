"""Prompt parsing (CLI syntax) and conversion from patient millimetres to voxel indices."""

from __future__ import annotations

import re

from dicom_io.geometry import Geometry
from models.base import BoxPrompt, PointPrompt, PromptError

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_POINT_RE = re.compile(rf"^\s*({_NUM})\s*,\s*({_NUM})\s*@\s*(\d+)\s*$")
_BOX_RE = re.compile(rf"^\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*@\s*(\d+)\s*$")
_MM3_RE = re.compile(rf"^\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*$")
_MM6_RE = re.compile(rf"^\s*{','.join([f'({_NUM})'] * 6)}\s*$".replace(",", r"\s*,\s*"))

#: How far (in slices) a millimetre prompt may sit off a slice centre and still count as on it.
_SLICE_TOLERANCE = 0.5 + 1e-6


def parse_point(text: str, positive: bool = True) -> PointPrompt:
    """Parse ``x,y@k`` (column, row, 0-based slice).

    Raises
    ------
    PromptError
        When the text is not of that form.
    """
    m = _POINT_RE.match(text)
    if not m:
        raise PromptError(f"Point '{text}' is not of the form x,y@k (column,row@slice), e.g. 120,88@21.")
    return PointPrompt(float(m[1]), float(m[2]), int(m[3]), positive)


def parse_box(text: str, positive: bool = True) -> BoxPrompt:
    """Parse ``x0,y0,x1,y1@k``.

    Raises
    ------
    PromptError
        When the text is not of that form.
    """
    m = _BOX_RE.match(text)
    if not m:
        raise PromptError(
            f"Box '{text}' is not of the form x0,y0,x1,y1@k (columns,rows@slice), e.g. 90,60,150,120@21."
        )
    return BoxPrompt(float(m[1]), float(m[2]), float(m[3]), float(m[4]), int(m[5]), positive)


def _to_slice(geometry: Geometry, lps: list[float], what: str) -> tuple[float, float, int]:
    x, y, k = geometry.lps_to_voxel(lps)
    kr = int(round(float(k)))
    if abs(k - kr) > _SLICE_TOLERANCE or not (0 <= kr < geometry.shape[0]):
        raise PromptError(
            f"{what} at LPS ({', '.join(f'{v:g}' for v in lps)}) mm is not on a slice of the series "
            f"(it falls at slice position {float(k):.2f}; valid 0..{geometry.shape[0] - 1})."
        )
    return float(x), float(y), kr


def parse_point_mm(text: str, geometry: Geometry, positive: bool = True) -> PointPrompt:
    """Parse ``X,Y,Z`` patient coordinates in mm (DICOM LPS) into a point on the nearest slice.

    Raises
    ------
    PromptError
        When the text is malformed or the point is off every slice.
    """
    m = _MM3_RE.match(text)
    if not m:
        raise PromptError(f"Point '{text}' is not of the form X,Y,Z in millimetres (LPS).")
    x, y, k = _to_slice(geometry, [float(m[1]), float(m[2]), float(m[3])], f"Point '{text}'")
    return PointPrompt(x, y, k, positive)


def parse_box_mm(text: str, geometry: Geometry, positive: bool = True) -> BoxPrompt:
    """Parse ``X0,Y0,Z0,X1,Y1,Z1``: two opposite box corners in LPS mm on one slice.

    Raises
    ------
    PromptError
        When the text is malformed or the corners are not on the same slice.
    """
    m = _MM6_RE.match(text)
    if not m:
        raise PromptError(f"Box '{text}' is not of the form X0,Y0,Z0,X1,Y1,Z1 in millimetres (LPS).")
    v = [float(m[i]) for i in range(1, 7)]
    xa, ya, ka = _to_slice(geometry, v[:3], f"Box '{text}' corner 1")
    xb, yb, kb = _to_slice(geometry, v[3:], f"Box '{text}' corner 2")
    if ka != kb:
        raise PromptError(f"Box '{text}': the corners lie on different slices ({ka} and {kb}).")
    return BoxPrompt(min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb), ka, positive)
