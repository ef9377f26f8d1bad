"""NIfTI-1 (.nii.gz) writer and reader for (slices, rows, columns) volumes with a DICOM geometry."""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import numpy.typing as npt
from nibabel.filebasedimages import ImageFileError

from dicom_io.geometry import Geometry

logger = logging.getLogger(__name__)

#: NIfTI xform code "scanner-based anatomical coordinates".
XFORM_SCANNER = 1

_INT16 = np.iinfo(np.int16)


def has_shear(affine: np.ndarray, tol: float = 1e-6) -> bool:
    """Return True when the 3x3 part of ``affine`` has non-orthogonal columns (e.g. tilted gantry)."""
    rzs = np.asarray(affine, dtype=np.float64)[:3, :3]
    unit = rzs / np.linalg.norm(rzs, axis=0)
    gram = unit.T @ unit
    return bool(np.max(np.abs(gram - np.eye(3))) > tol)


def _choose_dtype(array: np.ndarray, dtype: npt.DTypeLike | None) -> np.dtype:
    if dtype is not None:
        return np.dtype(dtype)
    if array.dtype == np.bool_:
        return np.dtype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.size == 0 or (array.min() >= _INT16.min and array.max() <= _INT16.max):
            return np.dtype(np.int16)
        return np.dtype(np.float32)
    return np.dtype(np.float32)


def write_nifti(
    array: np.ndarray,
    geometry: Geometry,
    path: str | os.PathLike[str],
    *,
    dtype: npt.DTypeLike | None = None,
    axes: Literal["xyk", "kyx"] = "xyk",
) -> Path:
    """Write a (slices, rows, columns) array as NIfTI-1 with the series' patient geometry.

    By default (``axes="xyk"``) the data are stored transposed to (x, y, k) = (column, row, slice) so
    that the NIfTI voxel index is the DICOM (x, y, k) index, and the affine is ``geometry.affine_ras``
    (LPS → RAS). With ``axes="kyx"`` the array is stored as given, (k, y, x): the first NIfTI axis is the
    slice (it varies fastest in the file), and the affine is ``geometry.affine_ras`` with its first and
    third columns swapped, so every voxel still maps to the same patient point (for clients that read
    the data as [slices, rows, columns] without looking at the affine, e.g. anandpreshob/OHIF-AI). The
    sform holds the affine exactly (code 1, scanner). The qform (code 1) cannot represent shear:
    for a sheared affine (tilted gantry) it holds the closest rotation + zooms (nibabel's polar
    decomposition) and a message is logged; readers should prefer the sform.

    Parameters
    ----------
    array
        Volume (slices, rows, columns), shaped like ``geometry.shape``.
    geometry
        Geometry of the volume.
    path
        Output file; ``.nii.gz`` (compressed) or ``.nii``.
    dtype
        Stored data type. Default: uint8 for bool masks, int16 for integer data that fits, else float32.
    axes
        Order of the stored axes: ``"xyk"`` (column, row, slice) or ``"kyx"`` (slice, row, column).

    Returns
    -------
    Path
        The path written.

    Raises
    ------
    ValueError
        When the array is not 3-D, its shape differs from ``geometry.shape`` or ``axes`` is unknown.
    """
    arr = np.asarray(array)
    if arr.ndim != 3 or tuple(arr.shape) != tuple(geometry.shape):
        raise ValueError(f"Array shape {arr.shape} does not match the geometry shape {geometry.shape}.")
    if axes not in ("xyk", "kyx"):
        raise ValueError(f'axes must be "xyk" or "kyx", got {axes!r}.')
    out_dtype = _choose_dtype(arr, dtype)
    affine = geometry.affine_ras
    if axes == "xyk":
        data = np.ascontiguousarray(arr.transpose(2, 1, 0)).astype(out_dtype, copy=False)
    else:
        data = np.ascontiguousarray(arr).astype(out_dtype, copy=False)
        affine = affine[:, [2, 1, 0, 3]]
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=XFORM_SCANNER)
    img.set_qform(affine, code=XFORM_SCANNER, strip_shears=True)
    img.set_data_dtype(out_dtype)
    img.header.set_xyzt_units(xyz="mm")
    if has_shear(affine):
        logger.info(
            "%s: affine has shear (tilted gantry); sform is exact, qform holds the nearest rigid+zoom approximation",
            Path(path).name,
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    logger.debug("Wrote NIfTI %s %s %s", path.name, data.shape, out_dtype)
    return path


def read_nifti(path: str | os.PathLike[str], max_bytes: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file written by :func:`write_nifti`.

    Parameters
    ----------
    path
        .nii or .nii.gz file.
    max_bytes
        Largest size of the image data its header declares (checked before a voxel is read, so a
        small gzip'd file cannot inflate into gigabytes); 0 = no limit.

    Returns
    -------
    tuple of ndarray
        The array as (slices, rows, columns) in its stored dtype (scaling applied as float when the
        header has a slope), and the RAS affine (sform when set, else qform) indexed (x, y, k).

    Raises
    ------
    ValueError
        When the file is not a readable 3-D NIfTI image (damaged, truncated, not NIfTI), or its image
        data would pass ``max_bytes``.
    """
    name = Path(path).name
    try:
        img = nib.load(os.fspath(path))
        if not isinstance(img, nib.Nifti1Image) or len(img.shape) != 3:
            raise ValueError(f"{name}: not a 3-D NIfTI-1 image.")
        size = int(np.prod(img.shape, dtype=np.float64) * img.get_data_dtype().itemsize)
        if max_bytes and size > max_bytes:
            shape = "x".join(map(str, img.shape))
            raise ValueError(f"{name}: its header declares {size} bytes of image data ({shape}), "
                             f"more than the {max_bytes} allowed (input.max_zip_bytes).")
        slope, inter = img.header.get_slope_inter()
        data = img.get_fdata() if slope not in (None, 1.0) or inter not in (None, 0.0) else np.asarray(img.dataobj)
    except ValueError:
        raise
    except (ImageFileError, OSError, EOFError, zlib.error, TypeError) as exc:
        why = str(exc).replace(os.fspath(path), name)[:200]  # the server's folder is not echoed
        raise ValueError(f"{name}: not a readable NIfTI image ({type(exc).__name__}: {why}).") from exc
    return np.ascontiguousarray(data.transpose(2, 1, 0)), np.asarray(img.affine, dtype=np.float64)
