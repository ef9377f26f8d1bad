"""`ainode segment` and `ainode demo` end to end through the CLI entry point, with the real model."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dicom_io.phantom import Phantom, write_phantom_series
from dicom_io.seg import read_seg_mask
from dicom_io.series import load_series
from node.cli import main


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Phantom:
    out = tmp_path_factory.mktemp("cli-phantom")
    return write_phantom_series(out / "series", shape=(12, 96, 96), spacing=(1.5, 1.5, 3.0),
                                patient_name="Clipatient^Secret", patient_id="CLI-SECRET-ID")


def _lesion_slice_and_box(ph: Phantom) -> tuple[int, tuple[int, int, int, int]]:
    k = int(np.argmax(ph.mask.sum(axis=(1, 2))))
    ys, xs = np.nonzero(ph.mask[k])
    return k, (int(xs.min()) - 3, int(ys.min()) - 3, int(xs.max()) + 3, int(ys.max()) + 3)


@pytest.mark.slow
def test_segment_2d_box_writes_nifti_and_seg(phantom: Phantom, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    k, (x0, y0, x1, y1) = _lesion_slice_and_box(phantom)
    series_dir = phantom.paths[0].parent
    code = main(["segment", str(series_dir), "--box", f"{x0},{y0},{x1},{y1}@{k}", "--2d",
                 "--label", "Lesion", "--out", str(tmp_path), "--name", "les", "--no-progress"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "voxels" in out.out and "mL" in out.out and "inference" in out.out
    nii, seg = tmp_path / "les.nii.gz", tmp_path / "les.seg.dcm"
    assert nii.exists() and seg.exists()
    series = load_series([series_dir])
    mask = np.asarray(nib.load(str(nii)).dataobj).transpose(2, 1, 0).astype(bool)
    assert np.array_equal(read_seg_mask(seg, series), mask)
    assert mask[k].any() and not np.delete(mask, k, axis=0).any()  # --2d: only slice k
    truth = phantom.mask[k]
    dice = 2 * (mask[k] & truth).sum() / (mask[k].sum() + truth.sum())
    assert dice > 0.9
    printed_voxels = int(out.out.split("voxels")[1].split()[0])
    assert printed_voxels == int(mask.sum())
    # No patient identifiers on the terminal.
    assert "Secret" not in out.out + out.err and "CLI-SECRET-ID" not in out.out + out.err


@pytest.mark.slow
def test_segment_from_zip_with_point(phantom: Phantom, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    k, _ = _lesion_slice_and_box(phantom)
    ys, xs = np.nonzero(phantom.mask[k])
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in phantom.paths:
            zf.write(p, f"study/{p.name}")
    code = main(["segment", str(archive), "--point", f"{int(xs.mean())},{int(ys.mean())}@{k}", "--2d",
                 "--out", str(tmp_path / "o"), "--no-progress"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert list((tmp_path / "o").glob("*.seg.dcm")) and list((tmp_path / "o").glob("*.nii.gz"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give at least one positive"),
        (["--point", "5,5"], "x,y@k"),
        (["--point", "5,5@99"], "slice 99 is outside"),
        (["--box", "10,10,10,40@1"], "the box is empty"),
        (["--point", "5,5@1", "--color", "nocolour"], "colour 'nocolour'"),
        (["--point", "5,5@1", "--model", "nosuchmodel"], "nosuchmodel"),
    ],
)
def test_segment_bad_input_exits_2_with_a_message(
    phantom: Phantom, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    code = main(["segment", str(phantom.paths[0].parent), *extra, "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert not list(tmp_path.iterdir())


def test_segment_unreadable_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notdicom.txt").write_text("hello")
    code = main(["segment", str(tmp_path), "--point", "1,1@0", "--out", str(tmp_path / "o")])
    assert code == 2
    assert capsys.readouterr().err.startswith("ainode segment: ")


def test_installed_entry_point_runs() -> None:
    exe = Path(sys.executable).with_name("ainode")
    proc = subprocess.run([str(exe), "version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("ainode ")


@pytest.mark.slow
def test_demo_segments_the_sample_end_to_end(tmp_path: Path) -> None:
    """The README's run command's job: sample series → one click → 3D mask → NIfTI + SEG."""
    exe = Path(sys.executable).with_name("ainode")
    proc = subprocess.run([str(exe), "demo", "--out", str(tmp_path), "--no-progress"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    dice = float(proc.stdout.split("dice")[1].split()[0])
    assert dice >= 0.85, proc.stdout
    assert (tmp_path / "results" / "demo-lesion.nii.gz").exists()
    assert (tmp_path / "results" / "demo-lesion.seg.dcm").exists()
