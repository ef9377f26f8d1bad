"""Map a volume in modality units to the 0..255 model input range.

CT uses a fixed HU window, everything else a robust percentile range over the whole volume
(upstream MedSAM / LiteMedSAM convention).

Choice of the CT default (centre 40 HU, width 400 HU, i.e. -160..240 HU)
------------------------------------------------------------------------
This is the abdominal soft-tissue window upstream MedSAM uses for most CT targets and the one the
model saw most in training. Soft-tissue organs and most lesions (roughly -100..+200 HU, contrast
enhanced or not) keep their full contrast. Structures outside the window are still separable from
soft tissue, they just saturate: lung parenchyma and air clip to 0, so a lung nodule (soft-tissue
density) is a bright blob on black and segments well; cortical bone clips to 255, so a box around a
bone yields its outline but internal bone texture (e.g. lytic lesions) is lost. For bone or lung
*internal* structure use a bone (400/1800) or lung (-600/1500) window through
``[litemedsam] ct_window_center / ct_window_width``.

MR and other modalities: 0.5-99.5th percentiles computed over the *volume* (not per slice) so that
slices stay comparable during 3D propagation; large volumes are subsampled for the percentile
estimate (exact enough for a clip range, and ~100x cheaper).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    from config.settings import LiteMedSAMSettings

logger = logging.getLogger(__name__)

#: Above this many voxels, percentiles are estimated on a regular subsample of the volume.
PERCENTILE_SAMPLE_VOXELS = 4_000_000


@dataclass(frozen=True)
class IntensityParams:
    """Normalisation knobs (CT window in HU, percentiles for other modalities)."""

    ct_window_center: float = 40.0
    ct_window_width: float = 400.0
    percentile_low: float = 0.5
    percentile_high: float = 99.5

    @classmethod
    def from_settings(cls, settings: LiteMedSAMSettings) -> IntensityParams:
        """Take the knobs from ``[litemedsam]`` settings (shared by all models)."""
        return cls(
            ct_window_center=float(settings.ct_window_center),
            ct_window_width=float(settings.ct_window_width),
            percentile_low=float(settings.percentile_low),
            percentile_high=float(settings.percentile_high),
        )

    def validate(self) -> None:
        """Check ranges.

        Raises
        ------
        ValueError
            When the window width is not positive or the percentiles are not 0 <= low < high <= 100.
        """
        if not self.ct_window_width > 0:
            raise ValueError(f"ct_window_width must be > 0, got {self.ct_window_width}.")
        if not (0.0 <= self.percentile_low < self.percentile_high <= 100.0):
            raise ValueError(
                "percentile_low/percentile_high must satisfy 0 <= low < high <= 100, got "
                f"{self.percentile_low}/{self.percentile_high}."
            )


def intensity_range(
    array: np.ndarray, modality: str, params: IntensityParams = IntensityParams()
) -> tuple[float, float]:
    """Return the (low, high) modality values mapped to 0 and 255.

    Parameters
    ----------
    array
        Volume (slices, rows, columns) or a single slice, in modality units.
    modality
        DICOM Modality; ``CT`` uses the HU window, anything else percentiles.
    params
        Window / percentile settings.

    Returns
    -------
    tuple of float
        ``(low, high)`` with ``high > low``.

    Raises
    ------
    ValueError
        When ``array`` is empty or ``params`` is invalid.
    """
    params.validate()
    if array.size == 0:
        raise ValueError(f"image array is empty (shape {array.shape}).")
    if modality.strip().upper() == "CT":
        c, w = params.ct_window_center, params.ct_window_width
        return c - w / 2.0, c + w / 2.0
    flat = array.reshape(-1)
    if flat.size > PERCENTILE_SAMPLE_VOXELS:
        step = int(np.ceil(flat.size / PERCENTILE_SAMPLE_VOXELS))
        flat = flat[::step]
    finite = flat[np.isfinite(flat)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [params.percentile_low, params.percentile_high])
    lo, hi = float(lo), float(hi)
    if hi <= lo:  # constant image: map everything to 0
        hi = lo + 1.0
    return lo, hi


def to_uint8(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to [low, high] and rescale linearly to uint8 0..255 (NaN -> 0).

    Raises
    ------
    ValueError
        When ``high <= low``.
    """
    if not high > low:
        raise ValueError(f"intensity range high ({high}) must be greater than low ({low}).")
    x = np.asarray(array, dtype=np.float32)
    out = (np.clip(x, low, high) - np.float32(low)) * np.float32(255.0 / (high - low))
    out = np.nan_to_num(out, nan=0.0)
    u8: np.ndarray = np.rint(out).astype(np.uint8)
    return u8


def normalise_volume(
    array: np.ndarray, modality: str, params: IntensityParams = IntensityParams()
) -> np.ndarray:
    """Whole volume to uint8 model input (see the module docstring for the rules).

    Raises
    ------
    ValueError
        When ``array`` is empty or ``params`` is invalid.
    """
    lo, hi = intensity_range(array, modality, params)
    logger.debug("intensity range for %s: %.1f..%.1f", modality, lo, hi)
    return to_uint8(array, lo, hi)
