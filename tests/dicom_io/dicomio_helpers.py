"""Helpers for dicom_io tests (imported by module name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid


def rotation(deg_x: float, deg_z: float) -> np.ndarray:
    """Rotation by deg_z about z, then deg_x about x."""
    a, b = np.deg2rad(deg_z), np.deg2rad(deg_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rx @ rz


def oblique_orientation(deg_x: float = 20.0, deg_z: float = 20.0) -> list[float]:
    r = rotation(deg_x, deg_z)
    return [*r[:, 0], *r[:, 1]]


AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
SAGITTAL = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
CORONAL = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]


def sorted_paths(paths: list[Path]) -> list[Path]:
    """Single-frame files sorted along their own slice normal (independent of dicom_io)."""
    def key(p: Path) -> float:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        n = np.cross(iop[:3], iop[3:])
        return float(np.dot([float(v) for v in ds.ImagePositionPatient], n))
    return sorted(paths, key=key)


def edit(path: Path, change: Callable[[Dataset], None], dest: Path | None = None) -> Path:
    """Read a file, apply ``change``, write it to ``dest`` (default: in place)."""
    ds = pydicom.dcmread(path)
    change(ds)
    out = dest or path
    ds.save_as(out, enforce_file_format=True)
    return out


def new_instance(ds: Dataset) -> None:
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid


def dciodvfy_errors(path: Path) -> list[str]:
    assert shutil.which("dciodvfy"), "dciodvfy (Debian dicom3tools) is installed by scripts/install.sh --test"
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]


#: Marks tests that run Debian's dciodvfy (installed by scripts/install.sh --test; they fail without it).
requires_dciodvfy = pytest.mark.peers
