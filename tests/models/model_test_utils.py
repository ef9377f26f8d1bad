"""Helpers shared by the model tests (imported by conftest and test modules)."""

from __future__ import annotations

from typing import Any

import numpy as np

#: Phantom geometry: object A (large, 150 HU) and object B (smaller, 110 HU) on the middle slice 12,
#: 8 px apart, in 40 HU "tissue" with noise sigma 20 HU, inside an elliptic body surrounded by air.
PHANTOM_SHAPE = (24, 112, 112)
MID = 12
A_CENTRE = (12, 56, 44)  # (k, y, x)
B_CENTRE = (12, 58, 83)


def make_phantom(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (volume HU float32, mask A, mask B), all (k, y, x)."""
    rng = np.random.default_rng(seed)
    k, y, x = np.mgrid[0 : PHANTOM_SHAPE[0], 0 : PHANTOM_SHAPE[1], 0 : PHANTOM_SHAPE[2]].astype(np.float32)
    a = ((k - 12) / 8.5) ** 2 + ((y - 56) / 26) ** 2 + ((x - 44) / 20) ** 2 <= 1
    b = ((k - 12) / 6.5) ** 2 + ((y - 58) / 13) ** 2 + ((x - 83) / 10) ** 2 <= 1
    vol = np.full(PHANTOM_SHAPE, 40.0, np.float32)
    vol[a] = 150.0
    vol[b] = 110.0
    body = ((y[0] - 56) / 54) ** 2 + ((x[0] - 56) / 55) ** 2 <= 1
    vol[:, ~body] = -1000.0
    vol += rng.normal(0, 20, PHANTOM_SHAPE).astype(np.float32)
    return vol, a, b


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def bbox_prompt_coords(mask2d: np.ndarray, margin: int = 3) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask2d)
    return xs.min() - margin, ys.min() - margin, xs.max() + margin, ys.max() + margin


def model_input(sl: np.ndarray) -> tuple[Any, tuple[int, int], float]:
    """LiteMedSAM preprocessing of a uint8 slice (as models/litemedsam.py): longest side to 256, min-max to [0, 1],
    zero padding bottom/right, 3 channels. Returns (tensor (1, 3, 256, 256), unpadded (h, w), scale)."""
    import torch
    import torch.nn.functional as F

    h, w = sl.shape
    s = 256 / max(h, w)
    nh, nw = max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))
    x = torch.from_numpy(sl.astype(np.float32))[None, None]
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=s < 1)
    x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-8)
    return F.pad(x, (0, 256 - nw, 0, 256 - nh)).expand(-1, 3, -1, -1).contiguous(), (nh, nw), s
