"""Collecting DICOM files from folders, lists and zip archives, and refusing unsafe archives."""

from __future__ import annotations

import logging
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dicom_io.errors import DicomInputError, NotDicomError, UnsafeArchiveError
from dicom_io.phantom import Phantom, write_phantom_series
from dicom_io.series import load_series
from dicom_io.sources import collect_files, extract_zip, is_dicom_file


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Phantom:
    return write_phantom_series(tmp_path_factory.mktemp("src") / "series", shape=(6, 16, 16), seed=2)


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_folder_recursive_skips_junk_and_dicomdir(small: Phantom, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    for i, p in enumerate(small.paths):
        (root / ("a/b" if i % 2 else "a") / p.name).write_bytes(p.read_bytes())
    (root / "README.txt").write_text("not dicom")
    (root / "a" / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    with caplog.at_level(logging.DEBUG, logger="dicom_io.sources"):
        files = collect_files([root])
    assert sorted(f.name for f in files) == sorted(p.name for p in small.paths)
    assert "README.txt" in caplog.text and "DICOMDIR" in caplog.text
    s = load_series([root])
    np.testing.assert_array_equal(s.voxels, small.volume)


def test_explicit_non_dicom_file_is_an_error(tmp_path: Path) -> None:
    junk = tmp_path / "notes.dcm"
    junk.write_text("hello, not a DICOM file\n" * 20)
    assert not is_dicom_file(junk)
    with pytest.raises(NotDicomError, match=r"notes\.dcm: not a DICOM file"):
        load_series([junk])


def test_empty_and_missing_inputs(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomInputError, match="No DICOM files found"):
        load_series([tmp_path / "empty"])
    with pytest.raises(DicomInputError, match="No DICOM files found"):
        load_series([])
    with pytest.raises(DicomInputError, match="does not exist"):
        load_series([tmp_path / "nope"])


def test_zip_loads_with_and_without_workdir(small: Phantom, tmp_path: Path) -> None:
    archive = _zip(tmp_path / "study.zip", {f"DICOM/{p.name}": p.read_bytes() for p in small.paths}
                   | {"DICOM/readme.txt": b"hi", "DICOMDIR": b"\0" * 128 + b"DICM"})
    work = tmp_path / "work"
    s = load_series([archive], workdir=work)
    np.testing.assert_array_equal(s.voxels, small.volume)
    assert len(list(work.rglob("*.dcm"))) == len(small.paths)
    s2 = load_series([archive])  # private temporary folder
    np.testing.assert_array_equal(s2.voxels, small.volume)
    with pytest.raises(DicomInputError, match="work folder"):
        collect_files([archive])


@pytest.mark.parametrize(
    ("member", "reason"),
    [("../evil.dcm", r"'\.\./evil\.dcm' escapes"), ("a/../../evil.dcm", "escapes"),
     ("/etc/evil.dcm", "absolute path"), ("C:/evil.dcm", "absolute path"), ("..\\evil.dcm", "escapes")],
)
def test_zip_slip_refused(tmp_path: Path, member: str, reason: str) -> None:
    archive = _zip(tmp_path / "evil.zip", {"ok.dcm": b"x", member: b"payload"})
    with pytest.raises(UnsafeArchiveError, match=reason):
        extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "evil.dcm").exists()
    assert not any(p.is_file() for p in (tmp_path / "out").rglob("*"))  # validated before writing


def test_zip_symlink_member_refused(tmp_path: Path) -> None:
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("link.dcm")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        load_series([archive], workdir=tmp_path / "w")


def test_zip_too_many_members(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "many.zip", {f"f{i}.dcm": b"x" for i in range(6)})
    with pytest.raises(UnsafeArchiveError, match="6 members, more than the 5 allowed"):
        load_series([archive], workdir=tmp_path / "w", max_zip_members=5)


def test_zip_declared_total_too_large(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "big.zip", {"a.dcm": b"\0" * 5000, "b.dcm": b"\0" * 5000})
    with pytest.raises(UnsafeArchiveError, match="declares 10000 uncompressed bytes"):
        load_series([archive], workdir=tmp_path / "w", max_zip_bytes=8000)


def test_zip_bomb_lying_about_its_size(tmp_path: Path) -> None:
    """A member whose central directory declares 10 bytes but inflates to 1 MB."""
    archive = _zip(tmp_path / "bomb.zip", {"bomb.dcm": b"\0" * 1_000_000})
    raw = bytearray(archive.read_bytes())
    # Patch the uncompressed size in the central directory header (offset 24 from its signature).
    cd = raw.rfind(b"PK\x01\x02")
    raw[cd + 24: cd + 28] = (10).to_bytes(4, "little")
    lh = raw.find(b"PK\x03\x04")
    raw[lh + 22: lh + 26] = (10).to_bytes(4, "little")
    archive.write_bytes(bytes(raw))
    out = tmp_path / "w"
    # zipfile itself stops reading at the declared size (then fails the CRC); our own byte counting
    # is the backstop. Either way the archive is refused and nothing large is left on disk.
    with pytest.raises(UnsafeArchiveError, match=r"bomb\.dcm.*(inflates beyond its declared size|CRC)"):
        extract_zip(archive, out, max_zip_bytes=100_000)
    assert sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) == 0


def test_not_a_zip(tmp_path: Path) -> None:
    bad = tmp_path / "x.zip"
    bad.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(UnsafeArchiveError, match="not a readable zip"):
        extract_zip(bad, tmp_path / "w")
