"""Voxel ↔ patient (LPS) geometry of a sorted image volume."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: LPS → RAS (and back): flip the first two patient axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """Where each voxel of a (slices, rows, columns) array sits in the patient.

    ``affine`` maps homogeneous voxel indices ``(x, y, k, 1)`` — x the column, y the row, k the slice
    (0-based, slices ascending along the slice normal) — to patient coordinates in mm, DICOM LPS
    (PS3.3 C.7.6.2.1.1). The voxel centre of index (0, 0, 0) is ImagePositionPatient of the first slice.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]

    @classmethod
    def from_plane(
        cls,
        first_position: np.ndarray | list[float],
        orientation: np.ndarray | list[float],
        pixel_spacing: tuple[float, float],
        slice_step: np.ndarray | list[float],
        shape: tuple[int, int, int],
    ) -> Geometry:
        """Build from DICOM plane attributes.

        Parameters
        ----------
        first_position
            ImagePositionPatient of slice 0.
        orientation
            ImageOrientationPatient: row direction cosines (along a row, i.e. increasing column),
            then column direction cosines.
        pixel_spacing
            PixelSpacing as in DICOM: (row spacing = between rows, column spacing = between columns).
        slice_step
            Vector in mm from one slice's position to the next.
        shape
            (slices, rows, columns).
        """
        iop = np.asarray(orientation, dtype=np.float64)
        row_cos, col_cos = iop[:3], iop[3:]
        dr, dc = float(pixel_spacing[0]), float(pixel_spacing[1])
        affine = np.eye(4)
        affine[:3, 0] = row_cos * dc
        affine[:3, 1] = col_cos * dr
        affine[:3, 2] = np.asarray(slice_step, dtype=np.float64)
        affine[:3, 3] = np.asarray(first_position, dtype=np.float64)
        return cls(affine=affine, shape=shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm: (column spacing, row spacing, slice spacing)."""
        n = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(n[0]), float(n[1]), float(n[2]))

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    @property
    def affine_ras(self) -> np.ndarray:
        """The same mapping to RAS+ (NIfTI's patient space), still indexed (x, y, k)."""
        out: np.ndarray = LPS_TO_RAS @ self.affine
        return out

    def voxel_to_lps(self, xyk: np.ndarray | list[float]) -> np.ndarray:
        """Map voxel indices (..., 3) as (x, y, k) to LPS mm (..., 3)."""
        v = np.asarray(xyk, dtype=np.float64)
        out: np.ndarray = v @ self.affine[:3, :3].T + self.affine[:3, 3]
        return out

    def lps_to_voxel(self, lps: np.ndarray | list[float]) -> np.ndarray:
        """Map LPS mm (..., 3) to fractional voxel indices (x, y, k)."""
        p = np.asarray(lps, dtype=np.float64)
        inv = np.linalg.inv(self.affine)
        return p @ inv[:3, :3].T + inv[:3, 3]
