"""Numpy/scipy helpers for turning clicks into boxes and for removing what negative clicks mark.

Everything here works on one 2D slice of the uint8 model input (rows, columns) and is
model-independent, so it can be unit-tested without torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

#: Gaussian sigma (pixels) applied before region growing.
SMOOTH_SIGMA = 1.0
#: Tolerances for region growing, in multiples of the (smoothed) noise sigma.
TOLERANCE_FACTORS = (2.5, 4.0, 6.0)
#: Smallest tolerance in uint8 units (~6 HU with the default CT window).
MIN_TOLERANCE = 4.0
#: Fixed tolerances (uint8 units; ~19 and ~38 HU with the default CT window) tried in addition,
#: for textured structures whose spread exceeds the noise (e.g. cord + CSF in the spinal canal).
FIXED_TOLERANCES = (12.0, 24.0)


@dataclass(frozen=True)
class Region:
    """A region grown from a click."""

    mask: np.ndarray  # bool (rows, cols)
    tolerance: float
    #: The region reached the size cap (it probably leaked into surroundings).
    leaked: bool

    def bbox(self) -> tuple[int, int, int, int] | None:
        return mask_bbox(self.mask)


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) inclusive bounding box of a 2D mask, or None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean arrays (1.0 when both are empty)."""
    sa, sb = int(a.sum()), int(b.sum())
    if sa + sb == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / (sa + sb)


def pixel(x: float, y: float, shape: tuple[int, ...]) -> tuple[int, int]:
    """Nearest in-image pixel (row, col) of a point."""
    r = int(np.clip(np.rint(y), 0, shape[0] - 1))
    c = int(np.clip(np.rint(x), 0, shape[1] - 1))
    return r, c


def noise_sigma(image: np.ndarray) -> float:
    """Fast robust noise estimate (Immerkaer 1996) of a 2D image, in its units."""
    from scipy import ndimage

    img = image.astype(np.float32)
    if min(img.shape) < 3:
        return 0.0
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)
    resp = np.abs(ndimage.convolve(img, kernel, mode="reflect"))[1:-1, 1:-1]
    return float(np.sqrt(np.pi / 2.0) * resp.mean() / 6.0)


def smooth(image: np.ndarray) -> np.ndarray:
    """Light Gaussian smoothing used before region growing."""
    from scipy import ndimage

    out: np.ndarray = ndimage.gaussian_filter(image.astype(np.float32), SMOOTH_SIGMA)
    return out


def tolerances(image: np.ndarray) -> list[float]:
    """Region-growing tolerances (uint8 units) adapted to the slice's noise."""
    # Gaussian smoothing with sigma s divides white-noise sigma by ~2*sqrt(pi)*s.
    sigma_s = noise_sigma(image) / (2.0 * np.sqrt(np.pi) * SMOOTH_SIGMA)
    adaptive = {round(max(MIN_TOLERANCE, f * sigma_s), 1) for f in TOLERANCE_FACTORS}
    return sorted(adaptive | set(FIXED_TOLERANCES))


def removal_tolerance(image: np.ndarray) -> float:
    """Tolerance used to grow the structure a negative click marks (uint8 units)."""
    sigma_s = noise_sigma(image) / (2.0 * np.sqrt(np.pi) * SMOOTH_SIGMA)
    return float(max(FIXED_TOLERANCES[0], 4.0 * sigma_s))


def voronoi_cell(
    shape: tuple[int, int], own: list[tuple[int, int]], others: list[tuple[int, int]]
) -> np.ndarray:
    """Pixels at least as close to one of ``own`` (row, col) points as to any of ``others``."""
    if not others:
        return np.ones(shape, dtype=bool)
    rr, cc = np.mgrid[0 : shape[0], 0 : shape[1]]

    def nearest(points: list[tuple[int, int]]) -> np.ndarray:
        d = np.full(shape, np.inf, dtype=np.float32)
        for r, c in points:
            d = np.minimum(d, ((rr - r) ** 2 + (cc - c) ** 2).astype(np.float32))
        return d

    return nearest(own) <= nearest(others)


def grow_region(
    smoothed: np.ndarray,
    seed: tuple[int, int],
    tolerance: float,
    allowed: np.ndarray | None = None,
    cap_half: int | None = None,
) -> Region:
    """Connected region of pixels within ``tolerance`` of the seed neighbourhood's median.

    Parameters
    ----------
    smoothed
        Smoothed slice (float).
    seed
        (row, col) of the click.
    tolerance
        Largest absolute difference to the reference intensity.
    allowed
        Optional bool mask the region must stay inside (e.g. a Voronoi cell that keeps it away
        from negative clicks).
    cap_half
        Half-size of the square window (pixels) the region is confined to; touching the window's
        border (where it is not the image border) marks the region as leaked.
    """
    from scipy import ndimage

    h, w = smoothed.shape
    r, c = seed
    r0, r1 = max(0, r - 2), min(h, r + 3)
    c0, c1 = max(0, c - 2), min(w, c + 3)
    ref = float(np.median(smoothed[r0:r1, c0:c1]))
    cand = np.abs(smoothed - ref) <= tolerance
    if allowed is not None:
        cand &= allowed
    win = (slice(0, h), slice(0, w))
    if cap_half is not None:
        win = (slice(max(0, r - cap_half), min(h, r + cap_half + 1)),
               slice(max(0, c - cap_half), min(w, c + cap_half + 1)))
    sub = np.zeros_like(cand)
    sub[win] = cand[win]
    sub[r, c] = True
    lab, _ = ndimage.label(sub)
    region = lab == lab[r, c]
    region = ndimage.binary_fill_holes(region)
    leaked = False
    if cap_half is not None:
        ys, xs = win
        edges = []
        if ys.start > 0:
            edges.append(region[ys.start, :].any())
        if ys.stop < h:
            edges.append(region[ys.stop - 1, :].any())
        if xs.start > 0:
            edges.append(region[:, xs.start].any())
        if xs.stop < w:
            edges.append(region[:, xs.stop - 1].any())
        leaked = any(edges)
    return Region(mask=region, tolerance=tolerance, leaked=leaked)


def remove_marked(
    mask: np.ndarray,
    smoothed: np.ndarray,
    negatives: list[tuple[int, int]],
    positives: list[tuple[int, int]],
    tolerance: float,
) -> np.ndarray:
    """Part of ``mask`` that belongs to the structures marked by negative clicks.

    For each negative click inside the mask: the connected part of the mask, within the click's
    Voronoi cell (closer to it than to any positive click), whose intensity is within ``tolerance``
    of the click's neighbourhood; when that finds only the clicked pixel (e.g. a textured
    structure), the connected part of the mask inside the Voronoi cell is used instead.

    Returns
    -------
    numpy.ndarray
        bool mask of the pixels to remove (a subset of ``mask``).
    """
    from scipy import ndimage

    removed = np.zeros_like(mask)
    for n in negatives:
        if not mask[n]:
            continue
        cell = voronoi_cell(mask.shape, [n], positives)
        allowed = mask & cell
        part = grow_region(smoothed, n, tolerance, allowed=allowed).mask & allowed
        if part.sum() <= 1:
            lab, _ = ndimage.label(allowed)
            part = lab == lab[n]
        # close small gaps left by noise inside the marked structure
        part = ndimage.binary_closing(part, iterations=2) & allowed
        part = ndimage.binary_fill_holes(part) & allowed
        removed |= part
    return removed


def drop_fragments(mask: np.ndarray, keep: list[tuple[int, int]], fraction: float = 0.05) -> np.ndarray:
    """Remove connected components smaller than ``fraction`` of the mask (and < 10 px) unless they
    hold one of the ``keep`` (row, col) pixels."""
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    limit = max(10.0, fraction * float(mask.sum()))
    keep_labels = {int(lab[p]) for p in keep if lab[p] > 0}
    small = [i for i in range(1, n + 1) if sizes[i] < limit and i not in keep_labels]
    if not small:
        return mask
    return mask & ~np.isin(lab, small)
