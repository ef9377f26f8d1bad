"""Collect DICOM files from folders, file lists and (safely extracted) zip archives."""

from __future__ import annotations

import io
import logging
import os
import stat
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import MediaStorageDirectoryStorage

from dicom_io.errors import DicomInputError, NotDicomError, UnsafeArchiveError

logger = logging.getLogger(__name__)

#: Defaults shared with ``config.settings.InputSettings`` (dicom_io does not import config).
DEFAULT_MAX_ZIP_BYTES = 4 * 1024**3
DEFAULT_MAX_ZIP_MEMBERS = 20000
#: Largest compression ratio (uncompressed : compressed) of a member bigger than :data:`RATIO_FLOOR_BYTES`.
#: Real DICOM compresses a few times, a synthetic phantom with much air some tens of times; 200:1 is a bomb.
DEFAULT_MAX_ZIP_RATIO = 200.0
#: Members (and archives, uncompressed) up to this size are not checked for their ratio (a small all-zero file is
#: no threat). Above it, a member and the archive as a whole must stay within the ratio, so many small bombs
#: (200 members of 8 MB of zeros) are refused like one big one.
RATIO_FLOOR_BYTES = 1024 * 1024
#: Bytes of a file without a DICM preamble that :func:`is_dicom_file` parses, and data elements it reads, at
#: most: a non-DICOM member costs a bounded probe, never a forced read of the whole file.
PROBE_BYTES = 64 * 1024
PROBE_ELEMENTS = 256

_CHUNK = 1024 * 1024


def has_dicm_preamble(path: Path) -> bool:
    """Return True when ``path`` has the 128-byte preamble followed by ``DICM`` (PS3.10 7.1)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_dicom_file(path: Path) -> bool:
    """Return True when ``path`` is a DICOM file: a DICM preamble, or a readable preamble-less dataset.

    A file without preamble is accepted only if pydicom can parse its header (forced read) and it
    carries a SOPClassUID and a SOPInstanceUID, so text files and other junk are rejected.
    """
    if has_dicm_preamble(path):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(PROBE_BYTES)
    except OSError:
        return False
    # A data set starts with its lowest group: 0x0008 (SOP Common, Identification) in practice, or 0x0002
    # (file meta without preamble), in either byte order. Anything else (zeros, text) is not read further.
    if len(head) < 8 or head[:2] not in (b"\x08\x00", b"\x02\x00", b"\x00\x08", b"\x00\x02"):
        return False
    seen = 0

    def stop(tag: Any, vr: Any, length: Any) -> bool:  # parse the head only, up to SOPInstanceUID (0008,0018)
        nonlocal seen
        seen += 1
        return seen > PROBE_ELEMENTS or int(tag) > 0x00080018

    try:
        # Forced reads of junk may emit pydicom parsing warnings; they are expected for non-DICOM
        # files, which we reject anyway, so they are silenced just for this probe.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.filereader.read_partial(io.BytesIO(head), stop_when=stop, defer_size=1024, force=True)
            return bool(ds.get("SOPClassUID")) and bool(ds.get("SOPInstanceUID"))
    except Exception:  # noqa: BLE001 - any parse failure means "not DICOM"
        return False


def _is_dicomdir(path: Path) -> bool:
    if path.name.upper() == "DICOMDIR":
        return True
    if not has_dicm_preamble(path):
        return False
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except (InvalidDicomError, OSError, ValueError):
        return False
    return bool(meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage)


def _scan_folder(folder: Path) -> Iterable[Path]:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            yield Path(root) / name


def _member_target(info: zipfile.ZipInfo, archive: Path, dest: Path) -> Path | None:
    """Validate one member name; return its extraction path (None for folders)."""
    name = info.filename
    mode = (info.external_attr >> 16) & 0xFFFF
    if stat.S_ISLNK(mode):
        raise UnsafeArchiveError(f"{archive.name}: member '{name}' is a symbolic link; refused.")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":" and norm[0].isalpha()) or norm.startswith("//"):
        raise UnsafeArchiveError(f"{archive.name}: member '{name}' has an absolute path; refused.")
    parts = PurePosixPath(norm).parts
    if any(p == ".." for p in parts):
        raise UnsafeArchiveError(f"{archive.name}: member '{name}' escapes the archive folder ('..'); refused.")
    if "\x00" in norm:
        raise UnsafeArchiveError(f"{archive.name}: member '{name}' has a NUL byte in its name; refused.")
    if info.is_dir() or norm.endswith("/"):
        return None
    target = dest.joinpath(*[p for p in parts if p not in ("", ".")])
    # Belt and braces: the resolved path must stay inside dest.
    if not target.resolve().is_relative_to(dest.resolve()):
        raise UnsafeArchiveError(f"{archive.name}: member '{name}' resolves outside the extraction folder.")
    return target


def extract_zip(
    archive: Path,
    dest: Path,
    *,
    max_zip_bytes: int = DEFAULT_MAX_ZIP_BYTES,
    max_zip_members: int = DEFAULT_MAX_ZIP_MEMBERS,
    max_zip_ratio: float = DEFAULT_MAX_ZIP_RATIO,
) -> list[Path]:
    """Safely extract a zip archive into ``dest`` and return the extracted file paths.

    Every member name is validated before anything is written (no absolute paths, no ``..``, no
    symbolic links). The total size is bounded twice: by the sizes the archive declares, and by the
    bytes actually decompressed (a member that inflates beyond its declared size is refused), so a
    zip bomb cannot fill the disk; a member above :data:`RATIO_FLOOR_BYTES` that inflates more than
    ``max_zip_ratio`` times its compressed size is refused before it is extracted, and so is an
    archive above :data:`RATIO_FLOOR_BYTES` whose members together do (many small bombs). Encrypted
    members are refused.

    Parameters
    ----------
    archive
        The .zip file.
    dest
        Folder to extract into (created if needed); the caller owns and cleans it.
    max_zip_bytes
        Largest total uncompressed size accepted.
    max_zip_members
        Largest number of members (files and folders) accepted.
    max_zip_ratio
        Largest compression ratio of a member bigger than :data:`RATIO_FLOOR_BYTES` (0 = no check).

    Returns
    -------
    list of Path
        The extracted regular files, in archive order.

    Raises
    ------
    UnsafeArchiveError
        For an unreadable archive, an unsafe member, too many members or too many bytes.
    """
    archive = Path(archive)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UnsafeArchiveError(f"{archive.name}: not a readable zip archive ({exc}).") from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > max_zip_members:
            raise UnsafeArchiveError(
                f"{archive.name}: {len(infos)} members, more than the {max_zip_members} allowed "
                "(input.max_zip_members)."
            )
        targets = [(info, _member_target(info, archive, dest)) for info in infos]
        declared = sum(info.file_size for info in infos)
        if declared > max_zip_bytes:
            raise UnsafeArchiveError(
                f"{archive.name}: declares {declared} uncompressed bytes, more than the {max_zip_bytes} allowed "
                "(input.max_zip_bytes)."
            )
        for info in infos:
            if info.flag_bits & 0x1:
                raise UnsafeArchiveError(f"{archive.name}: member '{info.filename}' is encrypted; refused.")
            if max_zip_ratio and info.file_size > RATIO_FLOOR_BYTES:
                ratio = info.file_size / max(info.compress_size, 1)
                if ratio > max_zip_ratio:
                    raise UnsafeArchiveError(
                        f"{archive.name}: member '{info.filename}' inflates {ratio:.0f}:1 ({info.compress_size} to "
                        f"{info.file_size} bytes), more than the {max_zip_ratio:.0f}:1 allowed "
                        "(input.max_zip_ratio; a zip bomb?); refused."
                    )
        compressed = sum(info.compress_size for info in infos)
        if max_zip_ratio and declared > RATIO_FLOOR_BYTES and declared / max(compressed, 1) > max_zip_ratio:
            raise UnsafeArchiveError(
                f"{archive.name}: its {len(infos)} members inflate {declared / max(compressed, 1):.0f}:1 "
                f"({compressed} to {declared} bytes), more than the {max_zip_ratio:.0f}:1 allowed "
                "(input.max_zip_ratio; a zip bomb?); refused."
            )
        seen: set[Path] = set()
        out: list[Path] = []
        total = 0
        for info, target in targets:
            if target is None:
                continue
            if target in seen:
                raise UnsafeArchiveError(f"{archive.name}: member '{info.filename}' appears twice; refused.")
            seen.add(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            try:
                with zf.open(info) as src, open(target, "wb") as dst:
                    while chunk := src.read(_CHUNK):
                        written += len(chunk)
                        total += len(chunk)
                        if written > info.file_size:
                            raise UnsafeArchiveError(
                                f"{archive.name}: member '{info.filename}' inflates beyond its declared "
                                f"size of {info.file_size} bytes; refused."
                            )
                        if total > max_zip_bytes:
                            raise UnsafeArchiveError(
                                f"{archive.name}: more than the {max_zip_bytes} uncompressed bytes allowed "
                                f"(input.max_zip_bytes; at member '{info.filename}')."
                            )
                        dst.write(chunk)
            except UnsafeArchiveError:
                target.unlink(missing_ok=True)
                raise
            except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, EOFError,
                    RuntimeError, ValueError, zlib.error) as exc:
                target.unlink(missing_ok=True)
                raise UnsafeArchiveError(
                    f"{archive.name}: member '{info.filename}' cannot be extracted ({exc}).") from exc
            out.append(target)
    logger.debug("Extracted %d files (%d bytes) from %s", len(out), total, archive.name)
    return out


def _filter_dicom(paths: Iterable[Path], where: str) -> list[Path]:
    found: list[Path] = []
    for p in paths:
        if _is_dicomdir(p):
            logger.debug("Skipping DICOMDIR %s in %s", p.name, where)
        elif is_dicom_file(p):
            found.append(p)
        else:
            logger.debug("Skipping non-DICOM file %s in %s", p.name, where)
    return found


def collect_files(
    inputs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    workdir: Path | None = None,
    *,
    max_zip_bytes: int = DEFAULT_MAX_ZIP_BYTES,
    max_zip_members: int = DEFAULT_MAX_ZIP_MEMBERS,
    max_zip_ratio: float = DEFAULT_MAX_ZIP_RATIO,
) -> list[Path]:
    """Find the DICOM files in folders (recursively), explicit files and zip archives.

    Non-DICOM files and DICOMDIR files inside folders and archives are skipped (debug log); an
    explicitly given file that is neither DICOM nor a zip archive is an error.

    Parameters
    ----------
    inputs
        Paths of folders, DICOM files and/or .zip archives (a single path is accepted too).
    workdir
        Folder where zip archives are extracted (each into its own subfolder); required only when
        an archive is among the inputs. The caller owns and removes it.
    max_zip_bytes, max_zip_members, max_zip_ratio
        Limits per archive, see :func:`extract_zip`.

    Returns
    -------
    list of Path
        DICOM files, without duplicates, in input order.

    Raises
    ------
    DicomInputError
        When an input does not exist, when a zip archive is given without a workdir, or when no
        DICOM file is found at all.
    NotDicomError
        When an explicitly listed file is neither DICOM nor a zip archive.
    UnsafeArchiveError
        When an archive is refused (see :func:`extract_zip`).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: list[Path] = []
    n_zip = 0
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found.extend(_filter_dicom(_scan_folder(path), f"folder {path}"))
        elif path.is_file():
            if has_dicm_preamble(path):
                if _is_dicomdir(path):
                    logger.debug("Skipping DICOMDIR %s", path.name)
                else:
                    found.append(path)
            elif zipfile.is_zipfile(path):
                if workdir is None:
                    raise DicomInputError(f"{path.name}: a zip archive needs a work folder to extract into.")
                n_zip += 1
                dest = Path(workdir) / f"zip{n_zip:03d}_{path.stem}"
                members = extract_zip(
                    path, dest, max_zip_bytes=max_zip_bytes, max_zip_members=max_zip_members,
                    max_zip_ratio=max_zip_ratio,
                )
                found.extend(_filter_dicom(members, f"archive {path.name}"))
            elif is_dicom_file(path):
                found.append(path)
            else:
                raise NotDicomError(
                    f"{path.name}: not a DICOM file (no DICM preamble, unreadable as DICOM) nor a zip archive.")
        else:
            raise DicomInputError(f"Input '{path}' does not exist.")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        names = ", ".join(str(Path(p)) for p in inputs) or "(no inputs)"
        raise DicomInputError(f"No DICOM files found in {names}.")
    logger.info("Found %d DICOM files", len(unique))
    return unique
