"""The durable store: atomic puts, idempotence, quarantine, recovery, listing, stability, retention."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest
from pydicom import dcmread

import peers
from dicom_io.store import (
    KIND_RESULT,
    InstanceInfo,
    InstanceValidationError,
    Store,
    StoreFullError,
)


@pytest.fixture
def series(tmp_path: Path) -> peers.CtSeries:
    return peers.make_ct_series(tmp_path / "src", n=4, rows=16, cols=16)


def _put(store: Store, path: Path, **kw: object):  # type: ignore[no-untyped-def]
    return store.put(path.read_bytes(), InstanceInfo.from_file(path), **kw)  # type: ignore[arg-type]


def test_put_writes_file_atomically_and_indexes(tmp_path: Path, series: peers.CtSeries) -> None:
    store = Store.open(tmp_path / "store")
    res = _put(store, series.paths[0], calling_ae_title="SCU")
    assert not res.duplicate
    assert res.path == tmp_path / "store/instances" / series.study_uid / series.series_uid / f"{series.sop_uids[0]}.dcm"
    assert res.path.read_bytes() == series.paths[0].read_bytes()
    assert not list(res.path.parent.glob("*.partial"))
    rec = store.instance(series.sop_uids[0])
    assert rec is not None and rec.calling_ae_title == "SCU" and rec.size == res.size and rec.kind == "received"
    # The index is committed: another connection sees it.
    with sqlite3.connect(store.db_path) as db:
        assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 1
    store.close()


def test_duplicate_is_idempotent(tmp_path: Path, series: peers.CtSeries) -> None:
    store = Store.open(tmp_path / "store")
    first = _put(store, series.paths[0])
    again = _put(store, series.paths[0])
    assert again.duplicate and again.path == first.path
    assert store.count() == 1
    assert len(list(first.path.parent.iterdir())) == 1
    store.close()


def test_put_rejects_unsafe_uids(tmp_path: Path, series: peers.CtSeries) -> None:
    store = Store.open(tmp_path / "store")
    info = InstanceInfo.from_file(series.paths[0])
    bad = InstanceInfo(info.sop_class_uid, "../../etc/passwd", info.study_instance_uid, info.series_instance_uid)
    with pytest.raises(InstanceValidationError):
        store.put(b"x", bad)
    assert store.count() == 0
    store.close()


def test_min_free_space_refuses(tmp_path: Path, series: peers.CtSeries) -> None:
    store = Store.open(tmp_path / "store", min_free_bytes=1 << 62)
    with pytest.raises(StoreFullError):
        _put(store, series.paths[0])
    assert store.count() == 0
    store.close()


def test_from_dataset_validates_uids(series: peers.CtSeries) -> None:
    ds = dcmread(series.paths[0])
    del ds.SeriesInstanceUID
    with pytest.raises(InstanceValidationError) as exc:
        InstanceInfo.from_dataset(ds)
    assert exc.value.kind == "uid" and "SeriesInstanceUID" in str(exc.value)


def test_quarantine_keeps_data_and_reason(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    path = store.quarantine([b"abc", b"def"], "cannot decode", sop_instance_uid="1.2.3", calling_ae_title="X")
    assert path.read_bytes() == b"abcdef"
    [entry] = store.quarantined()
    assert entry["reason"] == "cannot decode" and entry["sop_instance_uid"] == "1.2.3"
    assert store.count() == 0
    store.close()


def test_listing_studies_series_instances(tmp_path: Path, series: peers.CtSeries) -> None:
    store = Store.open(tmp_path / "store")
    for p in series.paths:
        _put(store, p)
    [study] = store.studies()
    assert study.study_instance_uid == series.study_uid and study.num_series == 1 and study.num_instances == 4
    [ser] = store.series(series.study_uid)
    assert ser.modality == "CT" and ser.num_instances == 4 and ser.stable_at is None
    assert [i.instance_number for i in store.instances(series.series_uid)] == [1, 2, 3, 4]
    assert store.series_paths(series.series_uid) == [i.path for i in store.instances(series.series_uid)]
    assert store.series_paths("1.2.3.4") == []
    store.close()


def test_series_stability_and_late_instance(tmp_path: Path, series: peers.CtSeries) -> None:
    store = Store.open(tmp_path / "store")
    for p in series.paths[:3]:
        _put(store, p)
    ser = store.get_series(series.series_uid)
    assert ser is not None
    assert store.unstable_series(5.0, now=ser.last_received + 1) == []
    [due] = store.unstable_series(5.0, now=ser.last_received + 6)
    assert store.mark_stable(due.series_instance_uid, due.last_received)
    assert store.unstable_series(5.0, now=time.time() + 60) == []
    # A late instance makes it unstable again.
    _put(store, series.paths[3])
    [again] = store.unstable_series(0.0, now=time.time() + 1)
    assert again.num_instances == 4
    # mark_stable with an outdated last_received does nothing (an instance arrived meanwhile).
    assert not store.mark_stable(series.series_uid, due.last_received)
    store.close()


def test_recovery_cleans_partials_and_reindexes(tmp_path: Path, series: peers.CtSeries) -> None:
    root = tmp_path / "store"
    store = Store.open(root)
    kept = _put(store, series.paths[0])
    gone = _put(store, series.paths[1])
    store.close()
    series_dir = kept.path.parent
    # A crash mid-write leaves a partial; a crash before the index commit leaves an unindexed file.
    (series_dir / f".{series.sop_uids[2]}.abcd.partial").write_bytes(series.paths[2].read_bytes()[:100])
    unindexed = series_dir / f"{series.sop_uids[3]}.dcm"
    unindexed.write_bytes(series.paths[3].read_bytes())
    garbage = series_dir / "1.2.3.999.dcm"
    garbage.write_bytes(b"\x00" * 10)
    gone.path.unlink()

    store = Store.open(root)
    report = store.recover()  # second pass after open's own: nothing left to do
    assert report.partials_removed == 0 and report.reindexed == 0
    assert not list(series_dir.glob("*.partial"))
    assert store.instance(series.sop_uids[3]) is not None
    assert store.instance(series.sop_uids[1]) is None
    assert store.instance(series.sop_uids[0]) is not None
    assert not garbage.exists() and len(store.quarantined()) == 1
    assert store.count() == 2
    store.close()


def test_index_rebuilt_from_files(tmp_path: Path, series: peers.CtSeries) -> None:
    root = tmp_path / "store"
    store = Store.open(root)
    for p in series.paths:
        _put(store, p)
    store.close()
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        if (root / name).exists():
            os.unlink(root / name)
    store = Store.open(root)
    assert store.count() == 4
    assert {i.sop_instance_uid for i in store.instances(series.series_uid)} == set(series.sop_uids)
    store.close()


def test_recovery_skipped_while_served(tmp_path: Path, series: peers.CtSeries) -> None:
    root = tmp_path / "store"
    owner = Store.open(root)
    assert owner.acquire_owner_lock()
    partial = root / "instances" / ".x.partial"
    partial.write_bytes(b"in flight")
    other = Store.open(root)  # e.g. `ainode ls` while serving: must not touch in-flight files
    assert partial.exists()
    assert other.recover().skipped
    other.close()
    owner.close()


def test_retention_by_age_and_disk_keeps_undelivered(tmp_path: Path, series: peers.CtSeries) -> None:
    store = Store.open(tmp_path / "store")
    for p in series.paths:
        _put(store, p)
    seg_src = tmp_path / "seg.dcm"
    ds = dcmread(series.paths[0])
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(seg_src)
    result = store.put_file(seg_src, kind=KIND_RESULT)
    store.hold(series.sop_uids[0], "outbox:PACS")
    future = time.time() + 10 * 86400

    report = store.apply_retention(max_age_seconds=86400, now=future)
    # Everything is old; the held instance and the undelivered result stay.
    assert report.deleted == 3
    remaining = {i.sop_instance_uid for i in store.instances(series.series_uid)}
    assert remaining == {series.sop_uids[0]}
    assert store.instance(result.sop_instance_uid) is not None and result.path.exists()

    store.release(series.sop_uids[0], "outbox:PACS")
    store.mark_delivered(result.sop_instance_uid)
    report = store.apply_retention(max_bytes=1, now=future)
    assert report.deleted == 2 and store.count() == 0
    assert store.studies() == [] and not any((tmp_path / "store/instances").iterdir())
    store.close()


def test_retention_by_disk_deletes_oldest_first(tmp_path: Path, series: peers.CtSeries) -> None:
    store = Store.open(tmp_path / "store")
    sizes = []
    for p in series.paths:
        sizes.append(_put(store, p).size)
        time.sleep(0.01)
    store.apply_retention(max_bytes=sum(sizes[2:]))
    assert {i.sop_instance_uid for i in store.instances(series.series_uid)} == set(series.sop_uids[2:])
    store.close()


def test_recovery_quarantines_truncated_unindexed_file(tmp_path: Path, series: peers.CtSeries) -> None:
    root = tmp_path / "store"
    Store.open(root).close()
    d = root / "instances" / series.study_uid / series.series_uid
    d.mkdir(parents=True)
    data = series.paths[0].read_bytes()
    (d / f"{series.sop_uids[0]}.dcm").write_bytes(data[:-100])  # header readable, pixel data cut short
    store = Store.open(root)
    assert store.count() == 0 and len(store.quarantined()) == 1
    assert not (d / f"{series.sop_uids[0]}.dcm").exists()
    store.close()
