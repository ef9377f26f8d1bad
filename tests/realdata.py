"""Real CT and MR volumes with reference masks, for accuracy tests and ``benchmarks/accuracy``.

The data are the test files of the TotalSegmentator 2.18.0 source distribution on PyPI (real CT and
MR series with multi-organ reference segmentations; TotalSegmentator's class map names the labels).
``scripts/install.sh --test`` fetches that sdist once, at set-up time, checks its SHA-256 and keeps
``tests/reference_files`` and the class map under ``build/fixtures/totalsegmentator-2.18.0`` (or
``$AINODE_REALDATA``). Nothing here downloads anything.

Volumes are returned as the node sees a series: float32 (slices, rows, columns) in modality units,
axial slices ascending toward the head, rows toward posterior, columns toward the patient's left,
with the :class:`dicom_io.geometry.Geometry` that places them in patient space (LPS).
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dicom_io.geometry import Geometry

ROOT = Path(__file__).resolve().parents[1]
#: Where the set-up command unpacks the fixture.
FIXTURE = Path(os.environ.get("AINODE_REALDATA") or ROOT / "build" / "fixtures" / "totalsegmentator-2.18.0")


class MissingFixture(RuntimeError):
    """The real-data fixture is not installed."""


@dataclass
class Case:
    """One real volume and its reference masks (bool, same shape as ``volume``)."""

    name: str
    volume: np.ndarray
    geometry: Geometry
    modality: str
    refs: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.geometry.spacing


def reference_files() -> Path:
    """The fixture's ``tests/reference_files`` folder.

    Raises
    ------
    MissingFixture
        When it is not there (run ``bash scripts/install.sh --test``).
    """
    path = FIXTURE / "tests" / "reference_files"
    if not (FIXTURE / ".complete").is_file() or not path.is_dir():
        raise MissingFixture(
            f"the real-data fixture is missing at {FIXTURE}; run 'bash scripts/install.sh --test' "
            "(it fetches the TotalSegmentator 2.18.0 sdist from PyPI once)."
        )
    return path


def class_map(task: str) -> dict[int, str]:
    """TotalSegmentator's label ids for ``task`` (``total``, ``total_mr``...), read without importing it."""
    source = (FIXTURE / "totalsegmentator" / "map_to_binary.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "class_map" for t in node.targets):
            return {int(k): str(v) for k, v in ast.literal_eval(node.value)[task].items()}
    raise MissingFixture("class_map not found in the fixture's map_to_binary.py")


def load_nifti(path: Path) -> tuple[np.ndarray, Geometry]:
    """A NIfTI as axial (slices, rows, columns) LPS display order plus its patient geometry."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))  # RAS+: i toward R... j toward A, k toward S
    data = np.asanyarray(img.dataobj)
    nx, ny, nz = data.shape[:3]
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    # columns toward the patient's left (i reversed), rows toward posterior (j reversed)
    vol = np.ascontiguousarray(data[::-1, ::-1, :].transpose(2, 1, 0))
    ras0 = img.affine @ np.array([nx - 1, ny - 1, 0, 1.0])
    origin = np.array([-ras0[0], -ras0[1], ras0[2]])
    geometry = Geometry.from_plane(origin, np.array([1.0, 0, 0, 0, 1, 0]), (zooms[1], zooms[0]),
                                   np.array([0, 0, zooms[2]]), vol.shape)
    return vol, geometry


def _case(name: str, image: Path, modality: str, refs: dict[str, np.ndarray]) -> Case:
    vol, geometry = load_nifti(image)
    for key, ref in refs.items():
        if ref.shape != vol.shape:
            raise ValueError(f"{name}: reference {key} has shape {ref.shape}, volume {vol.shape}")
    return Case(name, vol.astype(np.float32), geometry, modality, refs)


#: Structures scored per case (compact structures with a reference of at least a few slices).
STRUCTURES = {
    "ct_sm": ("total", ["spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach",
                        "vertebrae_L1", "vertebrae_L2", "aorta", "inferior_vena_cava", "autochthon_left",
                        "colon"]),
    "mr_sm": ("total_mr", ["spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach",
                           "pancreas", "vertebrae", "aorta", "inferior_vena_cava", "autochthon_left",
                           "autochthon_right"]),
}
#: Cases in the order the benchmark runs them.
CASES = ("ct15", "ct15crop", "ct_sm", "mr_sm")


def load_case(name: str, structures: list[str] | None = None) -> Case:
    """One case by name (see :data:`CASES`).

    * ``ct15``: CT thorax/abdomen, 1.5 mm isotropic, 191 axial slices of 167×233; heart.
    * ``ct15crop``: the same CT cropped around the aorta, 164 slices; aorta, T12, arch branches.
    * ``ct_sm``: abdominal CT at 3 mm, 30 slices; 12 organs.
    * ``mr_sm``: abdominal MR at 3 mm, 20 slices; 12 organs.
    """
    ref_dir = reference_files()

    def mask(path: Path) -> np.ndarray:
        vol, _ = load_nifti(path)
        return vol > 0

    if name == "ct15":
        return _case(name, ref_dir / "aorta_report" / "example_ct.nii.gz", "CT",
                     {"heart": mask(ref_dir / "pulmonary_report" / "models" / "heart.nii.gz")})
    if name == "ct15crop":
        models = ref_dir / "aorta_report" / "test_result" / "models"
        names = ["aorta", "vertebrae_T12", "brachiocephalic_trunk", "subclavian_artery_left",
                 "common_carotid_artery_left"]
        return _case(name, models / "ct_cropped.nii.gz", "CT",
                     {n: mask(models / f"{n}.nii.gz") for n in names if not structures or n in structures})
    if name in STRUCTURES:
        task, names = STRUCTURES[name]
        image = ref_dir / f"example_{name}.nii.gz"
        seg_file = ref_dir / ("example_seg.nii.gz" if name == "ct_sm" else "example_seg_mr.nii.gz")
        labels, _ = load_nifti(seg_file)
        ids = {v: k for k, v in class_map(task).items()}
        return _case(name, image, "CT" if name.startswith("ct") else "MR",
                     {n: labels == ids[n] for n in names if not structures or n in structures})
    raise ValueError(f"unknown case {name!r}; choose from {', '.join(CASES)}")


def sagittal(case: Case) -> Case:
    """The same voxels as a sagittal series (ImageOrientationPatient 0\\1\\0\\0\\0\\-1), references too."""
    def turn(a: np.ndarray) -> np.ndarray:
        # (k toward S, r toward P, c toward L) -> (slices toward R, rows toward I, columns toward P)
        return np.ascontiguousarray(a[::-1, :, ::-1].transpose(2, 0, 1))

    g = case.geometry
    dc, dr, dz = g.spacing
    n_k, _, n_c = case.volume.shape
    origin = g.voxel_to_lps([n_c - 1, 0, n_k - 1])
    geometry = Geometry.from_plane(origin, np.array([0, 1.0, 0, 0, 0, -1]), (dz, dr),
                                   np.array([-dc, 0, 0]), turn(case.volume).shape)
    return Case(case.name + "_sag", turn(case.volume), geometry, case.modality,
                {k: turn(v) for k, v in case.refs.items()})


def resample_to(mask: np.ndarray, source: Geometry, target: Geometry) -> np.ndarray:
    """Nearest-neighbour copy of a mask on ``source``'s grid onto ``target``'s grid (patient space)."""
    n_k, n_r, n_c = target.shape
    kk, rr, cc = np.meshgrid(np.arange(n_k), np.arange(n_r), np.arange(n_c), indexing="ij")
    xyk1 = np.stack([cc.ravel(), rr.ravel(), kk.ravel(), np.ones(cc.size)])
    to_source = np.linalg.inv(source.affine) @ target.affine
    sx, sy, sk = np.rint(to_source[:3] @ xyk1).astype(np.int64)
    s_k, s_r, s_c = mask.shape
    inside = (sx >= 0) & (sx < s_c) & (sy >= 0) & (sy < s_r) & (sk >= 0) & (sk < s_k)
    out = np.zeros(n_k * n_r * n_c, dtype=bool)
    out[inside] = mask[sk[inside], sy[inside], sx[inside]]
    return out.reshape(target.shape)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap (1.0 when both are empty)."""
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s
