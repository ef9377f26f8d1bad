"""Uploaded series: DICOM files, a zip of them, or one NIfTI volume, in a folder per upload."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np

from config.settings import Settings
from dicom_io.errors import DicomInputError
from dicom_io.series import Series, load_series
from node.api.errors import ApiError


class Uploads:
    """Folders under ``uploads_dir`` that uploads are written to, and the series loaded from them."""

    def __init__(self, settings: Settings, uploads_dir: Path) -> None:
        self.settings = settings
        self.uploads_dir = uploads_dir

    def upload_dir(self) -> Path:
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="up-", dir=self.uploads_dir))

    def load_upload_blocking(self, folder: Path, where: str) -> Series:
        """Load a series from uploaded files (DICOM files, a zip of them, or one NIfTI volume).

        Raises
        ------
        ApiError
            422 when the files are not one usable series.
        """
        files = [p for p in folder.rglob("*") if p.is_file()]
        niftis = [p for p in files if p.name.endswith((".nii", ".nii.gz"))]
        try:
            if niftis and len(files) == 1:
                return series_from_nifti(niftis[0], self.settings.input.max_zip_bytes)
            zips = [p for p in files if p.name.lower().endswith(".zip")]
            inputs: list[Path] = zips + ([folder] if len(zips) < len(files) else [])
            return load_series(inputs, spacing_tolerance=self.settings.input.spacing_tolerance,
                               max_zip_bytes=self.settings.input.max_zip_bytes,
                               max_zip_members=self.settings.input.max_zip_members,
                               max_zip_ratio=self.settings.input.max_zip_ratio)
        except (DicomInputError, ValueError, OSError) as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise ApiError(422, f"{where}: the uploaded files are not one usable image series: {exc}", where) from exc


def series_from_nifti(path: Path, max_bytes: int = 0) -> Series:
    """A :class:`Series` over a NIfTI volume (no DICOM sources: NIfTI results only, no SEG).

    Raises
    ------
    ValueError
        When the file is not a readable 3-D NIfTI image, or declares more than ``max_bytes`` of image data.
    """
    from dicom_io.geometry import LPS_TO_RAS, Geometry
    from dicom_io.nifti import read_nifti

    array, affine_ras = read_nifti(path, max_bytes=max_bytes)
    geometry = Geometry(affine=LPS_TO_RAS @ affine_ras, shape=(int(array.shape[0]), int(array.shape[1]),
                                                               int(array.shape[2])))
    uid = "2.25." + str(uuid.uuid4().int)
    return Series(voxels=np.asarray(array, dtype=np.float32), geometry=geometry, series_instance_uid=uid,
                  study_instance_uid=uid, frame_of_reference_uid="", modality="OT", source_datasets=[],
                  frame_refs=[])


__all__ = ["Uploads", "series_from_nifti"]
