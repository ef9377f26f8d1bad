"""Bad input: the pydicom-data corpus and seeded truncated / bit-flipped copies by C-STORE and STOW-RS; wrong
SOP classes, gaps and mixed geometry through the API. Each gets a precise failure; nothing else is affected."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import warnings
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pynetdicom.dsutils import split_dataset

import peers
from api_helpers import make_phantom_series
from config.settings import HttpSettings
from dicom_io.scu import Peer, echo, send_instances
from dicom_io.store import Store
from node import status
from sec_helpers import settings_for

DATA = Path(__import__("data_store").__file__).parent / "data"
SEED = 20261122
#: Files of the corpus that get damaged copies (small ones, so the run stays short).
SAMPLE = 10
#: Precise refusals: every refused instance gets one of these (never the generic 0x0110 / 0xC000).
REFUSALS = {status.CANNOT_DECODE, status.INVALID_UID, status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            status.SOP_INSTANCE_MISMATCH}


def _variants(files: list[Path], out: Path) -> list[tuple[str, Path]]:
    """Seeded truncated and bit-flipped copies (the file meta is kept, so the damage reaches the node)."""
    rng = random.Random(SEED)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for f in files:
        try:
            _meta, offset = split_dataset(f)
        except Exception:
            continue  # no file meta: the sender would have to decode it
        data = f.read_bytes()
        if len(data) - offset < 64:
            continue
        cut = rng.randrange(offset + 1, len(data))
        (out / f"trunc_{f.name}").write_bytes(data[:cut])
        made.append(("truncated", out / f"trunc_{f.name}"))
        flipped = bytearray(data)
        # Flips in the first 2 KiB of the data set (its structure and UIDs) and anywhere else.
        for _ in range(6):
            at = rng.randrange(offset, min(len(data), offset + 2048))
            flipped[at] ^= 1 << rng.randrange(8)
        for _ in range(6):
            at = rng.randrange(offset, len(data))
            flipped[at] ^= 1 << rng.randrange(8)
        (out / f"flip_{f.name}").write_bytes(bytes(flipped))
        made.append(("bit-flipped", out / f"flip_{f.name}"))
    return made


def _stow(base: str, data: bytes) -> httpx.Response:
    boundary = "bad-input-boundary-7"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
            + f"\r\n--{boundary}--\r\n".encode())
    return httpx.post(f"{base}/dicomweb/studies", content=body, timeout=60,
                      headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_corpus_and_damaged_copies_by_cstore_and_stow(start_node: Any, tmp_path: Path) -> None:
    s = peers.node_settings(tmp_path / "node")
    node = start_node(dataclasses.replace(s, http=HttpSettings(host="127.0.0.1", port=peers.free_port())))
    base = f"http://127.0.0.1:{node.service.http_address[1]}"
    peer = Peer("AINODE", "127.0.0.1", node.port, calling_ae_title="FUZZ", timeout=15)
    # A sentinel series stored first: it must come out of all this byte for byte.
    sentinel = peers.make_ct_series(tmp_path / "sentinel", n=4, rows=16, cols=16)
    assert all(r.ok for r in send_instances(peer, sentinel.paths))
    before = {uid: _digest(node.store.instance(uid).path) for uid in sentinel.sop_uids}

    corpus = sorted(p for p in DATA.rglob("*") if p.is_file() and not p.name.startswith("."))
    small = [p for p in corpus if p.stat().st_size < 600_000]
    sample = random.Random(SEED).sample(small, SAMPLE)
    damaged = _variants(sample + sentinel.paths, tmp_path / "damaged")
    assert len(damaged) >= 2 * (SAMPLE - 2)

    outcomes: dict[str, list[str]] = {"stored": [], "refused": []}
    # STOW-RS: the whole corpus, one request per file, then the damaged copies.
    for f in corpus + [p for _k, p in damaged]:
        r = _stow(base, f.read_bytes())
        assert r.status_code in (200, 409), (f.name, r.status_code, r.text[:300])
        doc = r.json()
        if r.status_code == 200:
            [item] = doc["00081199"]["Value"]
            uid = item["00081155"]["Value"][0]
            rec = node.store.instance(uid)
            assert rec is not None and rec.path.exists(), f.name
            outcomes["stored"].append(f.name)
        else:
            [item] = doc["00081198"]["Value"]
            reason = item["00081197"]["Value"][0]
            assert reason in REFUSALS, (f.name, hex(reason))
            outcomes["refused"].append(f.name)
    # C-STORE: the damaged copies (the whole corpus by C-STORE is tests/node/test_corpus.py).
    for kind, f in damaged:
        [res] = send_instances(peer, [f])
        assert res.status is not None, (kind, f.name, res.error)  # an answer, not a dropped association
        if res.ok:
            rec = node.store.instance(res.sop_instance_uid)
            assert rec is not None and rec.path.exists(), f.name
            outcomes["stored"].append(f.name)
        else:
            assert res.status in REFUSALS, (kind, f.name, hex(res.status))
            outcomes["refused"].append(f.name)
    # Both outcomes happened (the damage is real, and not everything is refused).
    assert any(n.startswith(("trunc_", "flip_")) for n in outcomes["refused"])
    assert len(outcomes["stored"]) > len(corpus) // 2
    # Nothing else is affected: node alive, sentinel intact and indexed, index consistent.
    assert echo(peer).ok
    after = {uid: _digest(node.store.instance(uid).path) for uid in sentinel.sop_uids}
    assert after == before
    r = httpx.get(f"{base}/dicomweb/studies/{sentinel.study_uid}/series", timeout=30)
    assert r.status_code == 200 and sentinel.series_uid in r.text
    assert not list(node.store.instances_dir.rglob("*.partial"))
    assert len(node.store.quarantined()) == len(outcomes["refused"])
    other = Store(node.store.root)  # a second reader finds the index consistent
    assert other.recover().skipped
    other.close()
    for rec_uid in list(before):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert pydicom.dcmread(node.store.instance(rec_uid).path).SOPInstanceUID == rec_uid


def _rt_struct(out: Path, study_uid: str) -> Path:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"  # RT Structure Set Storage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "RTSTRUCT"
    ds.StructureSetLabel = "S"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def test_wrong_sop_class_gaps_and_mixed_geometry_are_clear_4xx(make_app: Any, tmp_path: Path) -> None:
    from phi import make_sr

    good = make_phantom_series(tmp_path / "good")
    gap = make_phantom_series(tmp_path / "gap")
    gap_paths = [p for i, p in enumerate(gap.paths) if i != 4]
    mixed = make_phantom_series(tmp_path / "mixed")
    ds = pydicom.dcmread(mixed.paths[3])
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # one slice sagittal in an axial series
    ds.save_as(mixed.paths[3])
    sizes = make_phantom_series(tmp_path / "sizes")
    ds = pydicom.dcmread(sizes.paths[2])
    ds.PixelSpacing = [0.6, 0.6]
    ds.save_as(sizes.paths[2])
    sr = make_sr(tmp_path / "sr" / "sr.dcm", good.study_instance_uid)
    rt = _rt_struct(tmp_path / "rt" / "rt.dcm", good.study_instance_uid)
    app = make_app(settings_for(tmp_path / "node"),
                   [*good.paths, *gap_paths, *mixed.paths, *sizes.paths, sr, rt])
    c = app.client
    point = {"points": [{"ijk": [40, 40, 2]}]}

    def seg(uid: str) -> Any:
        return c.post("/v1/segmentations", json={"series": uid, "prompts": point, "mode": "2d"})

    cases = {
        "SR": (pydicom.dcmread(sr).SeriesInstanceUID, ("Basic Text SR", "no image")),
        "RTSTRUCT": (pydicom.dcmread(rt).SeriesInstanceUID, ("RT Structure Set", "no image")),
        "gap": (gap.series_instance_uid, ("gap",)),
        "mixed orientation": (mixed.series_instance_uid, ("orientation",)),
        "mixed spacing": (sizes.series_instance_uid, ("spacing",)),
    }
    for name, (uid, words) in cases.items():
        for r in (seg(uid), c.post("/v1/sessions", json={"series": uid}),
                  c.post(f"/infer/sam_2d?image={uid}&output=json",
                         files={"params": (None, '{"foreground": [[40, 40, 2]]}')})):
            assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
            message = r.json()["error"]
            for word in words:
                assert word.lower() in message.lower(), (name, message)
    # Nothing else is affected: the good series still segments.
    r = seg(good.series_instance_uid)
    assert r.status_code == 201, r.text[:300]


@pytest.mark.parametrize("body", [b"{", b"[]", b'{"series": 5}', b'{"series": "1.2.3", "prompts": {"points": "x"}}',
                                  b'{"series": "1.2", "prompts": {"points": [{"ijk": [1e309, 0, 0]}]}}',
                                  "{\"series\": \"\u00e9\"}".encode(), b"\xff\xfe"])
def test_malformed_json_bodies_are_4xx(make_app: Any, tmp_path: Path, body: bytes) -> None:
    app = make_app(settings_for(tmp_path / "node"))
    r = app.client.post("/v1/segmentations", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, (body, r.status_code, r.text[:300])
    assert r.json()["error"]


def test_malformed_multipart_is_a_json_4xx(make_app: Any, tmp_path: Path) -> None:
    """Found by the schemathesis run: Starlette's own 400 for a broken form body was plain text."""
    app = make_app(settings_for(tmp_path / "node"))
    b = "a222103b9b30b1f9e8be6882ecedb1d2"
    for path, method in (("/session/", "PUT"), ("/infer/segmentation", "POST"),
                         ("/v1/deepgrow?model=litemedsam_2d", "POST")):
        r = app.client.request(method, path, content=f"--{b}\r\n[]--{b}--\r\n".encode(),
                               headers={"Content-Type": f"multipart/form-data; boundary={b}"})
        assert r.status_code == 400, (path, r.status_code, r.text[:200])
        assert r.headers["content-type"].startswith("application/json")
        assert r.json()["field"] == "body" and "multipart" in r.json()["error"]
