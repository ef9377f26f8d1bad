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


# --- the acknowledgement journal ------------------------------------------------------------------

_CRASHER = r"""
import os, signal, sys
from pathlib import Path
from dicom_io.store import InstanceInfo, Store

root, mode, *files = sys.argv[1:]
store = Store.open(root)
assert store.acquire_owner_lock()
store.start_journal(8 << 20, idle_checkpoint_seconds=3600)  # no checkpoint: everything stays in the journal
if mode == "before-placement":
    # kill -9 after the last instance's journal flush and acknowledgement, before its file is written
    import threading
    acked_all = threading.Event()
    original = store._write_tmp
    def crash_on_last(series_dir, info, parts, **kw):
        if info.sop_instance_uid == InstanceInfo.from_file(files[-1]).sop_instance_uid:
            acked_all.wait(30)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(series_dir, info, parts, **kw)
    store._write_tmp = crash_on_last
for f in files:
    store.put(Path(f).read_bytes(), InstanceInfo.from_file(f), calling_ae_title="CRASHER")
    print("acked", f, flush=True)
if mode == "before-placement":
    import time
    acked_all.set()
    time.sleep(30)  # the placer thread kills the process
store.settle()  # every file placed (not flushed): what a power cut then damages
os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint
"""


def _crash_after_puts(root: Path, mode: str, files: list[Path]) -> list[str]:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", _CRASHER, str(root), mode, *map(str, files)], capture_output=True,
                       text=True, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, timeout=120)
    assert r.returncode == -9, r.stderr[-2000:]
    return [line.split(" ", 1)[1] for line in r.stdout.splitlines() if line.startswith("acked ")]


def test_journal_replays_acknowledged_instances_lost_in_a_power_cut(tmp_path: Path, series: peers.CtSeries) -> None:
    root = tmp_path / "store"
    acked = _crash_after_puts(root, "all", series.paths)
    assert len(acked) == 4
    # What a power cut can do to files that were placed but not yet checkpointed (never flushed):
    # gone, empty, cut short; and the index rows (synchronous=NORMAL) lost.
    placed = sorted((root / "instances").rglob("*.dcm"))
    assert len(placed) == 4
    placed[0].unlink()
    placed[1].write_bytes(b"")
    placed[2].write_bytes(placed[2].read_bytes()[:300])
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        (root / name).unlink(missing_ok=True)

    store = Store.open(root)
    report = store.recover()  # open() recovered already: nothing left to replay
    assert report.replayed == 0
    assert store.count() == 4 and not store.quarantined()
    for path, uid in zip(series.paths, series.sop_uids, strict=True):
        rec = store.instance(uid)
        assert rec is not None and rec.path.read_bytes() == path.read_bytes()
        assert rec.calling_ae_title in ("CRASHER", "")  # re-indexed from the file or from the journal
    assert not list(root.rglob("*.partial"))
    store.close()
    # The journal was checkpointed after the replay: a second start has nothing to replay.
    from dicom_io.store import read_journal

    checkpoint, highest, records = read_journal(root / "journal")
    assert records == [] and checkpoint == highest >= 4


def test_journal_kill_between_flush_and_placement(tmp_path: Path, series: peers.CtSeries) -> None:
    root = tmp_path / "store"
    acked = _crash_after_puts(root, "before-placement", series.paths)
    # All four acknowledged; the fourth only in the journal: the process died before its file was written.
    assert len(acked) == 4
    last_dir = root / "instances" / series.study_uid / series.series_uid
    assert not (last_dir / f"{series.sop_uids[3]}.dcm").exists()
    store = Store.open(root)
    assert store.count() == 4
    rec = store.instance(series.sop_uids[3])
    assert rec is not None and rec.path.read_bytes() == series.paths[3].read_bytes()
    assert rec.calling_ae_title == "CRASHER"
    store.close()


def test_journal_torn_tail_is_ignored(tmp_path: Path, series: peers.CtSeries) -> None:
    from dicom_io.store import read_journal

    root = tmp_path / "store"
    _crash_after_puts(root, "all", series.paths)
    checkpoint, highest, records = read_journal(root / "journal")
    assert [len(r.data) for r in records] == [p.stat().st_size for p in series.paths]
    # Tear the last record as a crash during its write would (its flush never completed, so it was
    # never acknowledged): half its bytes are still the old (zero) content.
    seg = sorted((root / "journal").glob("seg-*.bin"))[0]
    data = bytearray(seg.read_bytes())
    last = data.rfind(b"AINJRNL1")
    mid = last + 64 + len(records[-1].data) // 2
    data[mid:mid + 4096] = bytes(4096)
    seg.write_bytes(bytes(data))
    for p in (root / "instances").rglob("*.dcm"):
        p.unlink()  # nothing placed survived
    (root / "index.sqlite").unlink()
    for name in ("index.sqlite-wal", "index.sqlite-shm"):
        (root / name).unlink(missing_ok=True)

    _c, _h, intact = read_journal(root / "journal")
    assert len(intact) == 3
    store = Store.open(root)
    assert {i.sop_instance_uid for i in store.instances(series.series_uid)} == set(series.sop_uids[:3])
    for uid, path in zip(series.sop_uids[:3], series.paths[:3], strict=True):
        rec = store.instance(uid)
        assert rec is not None and rec.path.read_bytes() == path.read_bytes()
    store.close()


def test_journal_checkpoint_and_retention_do_not_resurrect(tmp_path: Path, series: peers.CtSeries) -> None:
    root = tmp_path / "store"
    store = Store.open(root)
    assert store.acquire_owner_lock()
    assert store.start_journal(4 << 20, idle_checkpoint_seconds=3600)
    for p in series.paths:
        _put(store, p)
    assert store.count() == 4
    # Retention checkpoints first, so the deleted instances cannot come back from the journal.
    report = store.apply_retention(max_age_seconds=1, now=time.time() + 60)
    assert report.deleted == 4 and store.count() == 0
    store.release_owner_lock()
    store._db.close()  # a crash: the journal is not closed
    store = Store.open(root)
    assert store.count() == 0
    store.close()


def test_journal_ring_wraps_and_large_instances_bypass(tmp_path: Path) -> None:
    src = peers.make_ct_series(tmp_path / "big", n=24, rows=256, cols=256)  # ~130 KB each
    root = tmp_path / "store"
    store = Store.open(root)
    assert store.acquire_owner_lock()
    # 4 segments of 1 MiB: ~7 records each, so 24 instances wrap the ring (checkpoints free segments).
    assert store.start_journal(4 << 20, idle_checkpoint_seconds=3600)
    journal = store._journal
    assert journal is not None
    for p in src.paths:
        _put(store, p)
    assert journal.appended + journal.bypassed == 24 and journal.appended >= 12
    big = peers.make_ct_series(tmp_path / "huge", n=1, rows=1024, cols=1024)  # 2 MB > half a segment
    _put(store, big.paths[0])
    assert journal.bypassed >= 1
    store.close()  # final checkpoint
    from dicom_io.store import read_journal

    assert read_journal(root / "journal")[2] == []
    store = Store.open(root)
    assert store.count() == 25
    for p, uid in zip(src.paths, src.sop_uids, strict=True):
        rec = store.instance(uid)
        assert rec is not None and rec.path.read_bytes() == p.read_bytes()
    store.close()


def test_journaled_instance_whose_placement_fails_waits_in_the_journal(tmp_path: Path,
                                                                     series: peers.CtSeries) -> None:
    from dicom_io.store import read_journal

    root = tmp_path / "store"
    store = Store.open(root)
    assert store.acquire_owner_lock()
    assert store.start_journal(4 << 20, idle_checkpoint_seconds=0.2)
    series_dir = root / "instances" / series.study_uid / series.series_uid
    with store._lock:  # holds the placer back until the obstacle is in place
        res = _put(store, series.paths[0])  # acknowledged: durable in the journal
        assert not res.duplicate
        series_dir.rmdir()
        series_dir.write_bytes(b"not a directory")  # the placer cannot create the series directory
    assert peers.wait_until(lambda: store._placer_failing, timeout=10)
    assert store.count() == 0  # reads do not hang on a failing placement
    time.sleep(0.5)
    # Not checkpointed while it waits: a crash now would replay it.
    assert [r.data for r in read_journal(root / "journal")[2]] == [series.paths[0].read_bytes()]
    series_dir.unlink()  # the obstacle goes: the placer's retry succeeds
    assert peers.wait_until(lambda: store.count() == 1, timeout=10)
    rec = store.instance(series.sop_uids[0])
    assert rec is not None and rec.path.read_bytes() == series.paths[0].read_bytes()
    store.close()
    assert read_journal(root / "journal")[2] == []


def test_a_staged_batch_is_flushed_with_one_syncfs_only_when_little_else_waits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pull's batch: one syncfs when the machine has little other data to write back, else one fdatasync per
    file (syncfs would first write other programs' data); either way the batch is then renamed and indexed."""
    from dicom_io import store as store_mod

    store = Store.open(tmp_path / "store", durable=True)
    calls: list[tuple[str, object]] = []
    real_syncfs, real_files = store_mod.syncfs, store_mod._flush_files

    def syncfs(root: Path) -> None:
        if root == store.instances_dir:
            calls.append(("syncfs", root))
        real_syncfs(root)

    monkeypatch.setattr(store_mod, "syncfs", syncfs)
    monkeypatch.setattr(store_mod, "_flush_files",
                        lambda paths: calls.append(("files", len(paths))) or real_files(paths))
    src = peers.make_ct_series(tmp_path / "src", n=9, rows=16, cols=16)
    staged = [store.stage(p.read_bytes(), InstanceInfo.from_file(p)) for p in src.paths]
    batches = [staged[0:3], staged[3:6], staged[6:9]]
    for pending, batch in zip((0, 10 << 30, None), batches, strict=True):
        monkeypatch.setattr(store_mod, "_writeback_pending_bytes", lambda pending=pending: pending)
        assert not any(r.duplicate for r in store.commit_staged(batch))
    assert calls == [("syncfs", store.instances_dir), ("files", 3), ("files", 3)]
    assert {r.sop_instance_uid for r in store.instances(src.series_uid)} == set(src.sop_uids)
    assert not list(store.instances_dir.rglob("*.partial"))
    pending = store_mod._writeback_pending_bytes()  # the real reading
    assert pending is None or pending >= 0
    store.close()


def test_staging_writes_into_spare_files_and_commits_them_into_place(tmp_path: Path) -> None:
    """With a spare pool, staged instances are written into files created in advance and renamed into the series
    folder at the commit; the pool is refilled once no spare has been taken for a while."""
    from dicom_io import store as store_mod

    store = Store.open(tmp_path / "store")
    assert store.start_spares(6)
    assert store.wait_spares(30) and store.spares_ready() == 6
    spares_before = {p.stat().st_ino: p.name for p in store.spare_dir.glob("*.spare")}
    src = peers.make_ct_series(tmp_path / "src", n=4, rows=16, cols=16)
    staged = [store.stage(p.read_bytes(), InstanceInfo.from_file(p)) for p in src.paths]
    assert all(isinstance(st, store_mod.StagedInstance) and st.spare for st in staged)
    assert store.spares_ready() <= 2  # taken (the refill waits for the store to be idle)
    assert not list(store.instances_dir.rglob("*.dcm"))  # nothing visible before the commit
    results = store.commit_staged(staged)  # type: ignore[arg-type]
    assert not any(r.duplicate for r in results)
    for path, r in zip(src.paths, results, strict=True):
        assert r.path.read_bytes() == path.read_bytes()
        assert r.path.parent == store.instances_dir / src.study_uid / src.series_uid
        assert r.path.stat().st_ino in spares_before  # the very file created in advance
    assert {r.sop_instance_uid for r in store.instances(src.series_uid)} == set(src.sop_uids)
    assert store.wait_spares(30) and store.spares_ready() == 6  # refilled
    assert all(p.stat().st_size == 0 for p in store.spare_dir.glob("*.spare"))
    store.close()


def test_spare_pool_runs_dry_then_files_are_created(tmp_path: Path) -> None:
    from dicom_io import store as store_mod

    store = Store.open(tmp_path / "store")
    assert store.start_spares(2) and store.wait_spares(30)
    src = peers.make_ct_series(tmp_path / "src", n=5, rows=16, cols=16)
    staged = [store.stage(p.read_bytes(), InstanceInfo.from_file(p)) for p in src.paths]
    assert [st.spare for st in staged] == [True, True, False, False, False]  # type: ignore[union-attr]
    assert all(isinstance(st, store_mod.StagedInstance) for st in staged)
    store.commit_staged(staged)  # type: ignore[arg-type]
    assert store.count() == 5 and not list(store.instances_dir.rglob("*.partial"))
    store.close()


def test_discarded_and_duplicate_spares_go_back_to_the_pool_empty(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    assert store.start_spares(3) and store.wait_spares(30)
    src = peers.make_ct_series(tmp_path / "src", n=3, rows=16, cols=16)
    _put(store, src.paths[0])  # already held: its staged copy is a duplicate at the commit
    staged = [store.stage(p.read_bytes(), InstanceInfo.from_file(p), check_duplicate=False) for p in src.paths]
    results = store.commit_staged(staged[:2])  # type: ignore[arg-type]
    assert [r.duplicate for r in results] == [True, False]
    store.discard_staged(staged[2:])  # type: ignore[arg-type]
    assert store.count() == 2
    names = sorted(p.name for p in store.spare_dir.glob("*.spare"))
    assert all((store.spare_dir / n).stat().st_size == 0 for n in names)
    assert store.spares_ready() >= 2  # the duplicate's and the discarded one's spare files, emptied
    store.close()


def test_spares_left_with_data_by_a_crash_are_emptied_and_one_process_owns_the_pool(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    assert store.start_spares(3) and store.wait_spares(30)
    other = Store.open(tmp_path / "store")
    assert not other.start_spares(3)  # the pool has one owner at a time; the other creates its files
    src = peers.make_ct_series(tmp_path / "src", n=1, rows=16, cols=16)
    st = other.stage(src.paths[0].read_bytes(), InstanceInfo.from_file(src.paths[0]))
    assert not st.spare  # type: ignore[union-attr]
    other.discard_staged([st])  # type: ignore[list-item]
    other.close()
    # A crash after writing into a spare file, before the commit: the file keeps its data, nothing is indexed.
    crashed = store.stage(src.paths[0].read_bytes(), InstanceInfo.from_file(src.paths[0]))
    assert crashed.spare and crashed.tmp.stat().st_size > 0  # type: ignore[union-attr]
    # A rename cut short by a crash: a spare name still linked to an instance's file.
    other_series = peers.make_ct_series(tmp_path / "src2", n=1, rows=16, cols=16)
    linked = store.instances_dir / other_series.study_uid / other_series.series_uid / f"{other_series.sop_uids[0]}.dcm"
    linked.parent.mkdir(parents=True)
    linked.write_bytes(other_series.paths[0].read_bytes())
    os.link(linked, store.spare_dir / "99.spare")
    outside = tmp_path / "outside.bin"  # and something that is not a plain file: never followed
    outside.write_bytes(b"not the store's")
    os.symlink(outside, store.spare_dir / "98.spare")
    store.stop_spares()  # the process "dies": the pool is released as it was
    again = Store.open(tmp_path / "store")  # recovery indexes the complete file, as any unindexed one
    assert again.start_spares(3)
    assert crashed.tmp.stat().st_size == 0  # type: ignore[union-attr]  # emptied, back in the pool
    assert not (store.spare_dir / "99.spare").exists()  # unlinked, not emptied
    assert not os.path.lexists(store.spare_dir / "98.spare") and outside.read_bytes() == b"not the store's"
    assert linked.read_bytes() == other_series.paths[0].read_bytes()
    assert again.wait_spares(30) and again.spares_ready() >= 3
    assert not again.instances(src.series_uid)  # the crashed staging never became visible
    assert [r.sop_instance_uid for r in again.instances(other_series.series_uid)] == other_series.sop_uids
    again.close()
    store.close()
