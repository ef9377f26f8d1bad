"""The whole pydicom-data corpus sent file by file to the node: valid instances stored, broken ones refused."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom.dsutils import split_dataset

from dicom_io.scu import Peer, echo, send_instances
from dicom_io.store import Store, is_valid_uid
from node import status

DATA = Path(__import__("data_store").__file__).parent / "data"

#: The corpus files that are damaged, and why (checked independently of the node below).
BROKEN = {
    # Encapsulated pixel data cut short: the sequence delimiter is missing.
    "emri_small_jpeg_2k_lossless_too_short.dcm": status.CANNOT_DECODE,
    # Study/Series/SOP Instance UIDs replaced by hex digests: not UIDs (and unsafe as file names).
    "bad_sequence.dcm": status.INVALID_UID,
}


def _independent_validity(path: Path) -> bool:
    """Valid = pydicom reads it without a warning and all four identifying UIDs are UIDs."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            ds = dcmread(path, force=True)
            for _ in ds.iterall():
                pass
        except Exception:
            return False
    return all(is_valid_uid(str(ds.get(k, ""))) for k in
               ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"))


def test_pydicom_data_corpus_file_by_file(node: Any) -> None:
    files = sorted(p for p in DATA.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert len(files) >= 60
    peer = Peer("AINODE", "127.0.0.1", node.port, calling_ae_title="CORPUS", timeout=10)
    results = {}
    for f in files:  # one association per file, as "file by file" means
        [res] = send_instances(peer, [f])
        results[f.name] = res

    refused = {name: r.status for name, r in results.items() if not r.ok}
    assert refused == BROKEN
    for name in BROKEN:
        assert not _independent_validity(DATA / name)
    stored_uids = set()
    for name, r in results.items():
        if name in BROKEN:
            continue
        assert r.status == status.SUCCESS, (name, r)
        assert _independent_validity(DATA / name), name
        rec = node.store.instance(r.sop_instance_uid)
        assert rec is not None and rec.path.exists(), name
        stored_uids.add(r.sop_instance_uid)
    # Several corpus files share a SOP Instance UID (same image, other transfer syntax): stored once each.
    assert node.store.count() == len(stored_uids)
    # The first file sent for each UID is stored byte for byte (data set part).
    first: dict[str, str] = {}
    for name, r in results.items():
        if name not in BROKEN:
            first.setdefault(r.sop_instance_uid, name)
    for uid, name in first.items():
        src = DATA / name
        rec = node.store.instance(uid)
        assert dcmread(rec.path, stop_before_pixels=True).SOPInstanceUID == uid
        try:
            _meta, off = split_dataset(src)
        except Exception:
            continue  # no file meta: re-encoded by the sender
        _m, off2 = split_dataset(rec.path)
        assert rec.path.read_bytes()[off2:] == src.read_bytes()[off:], name
    # Broken ones are quarantined with a reason; the node is alive and consistent.
    assert len(node.store.quarantined()) == len(BROKEN)
    assert echo(peer).ok
    assert not list(node.store.instances_dir.rglob("*.partial"))
    other = Store(node.store.root)  # e.g. `ainode ls` while serving: recovery must not touch anything
    assert other.recover().skipped
    other.close()
