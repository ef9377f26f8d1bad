"""The acknowledgement journal's group commit: concurrent appenders share flushes; a failed flush fails its batch."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

import peers
from dicom_io.store import InstanceInfo, Store, _Journal, read_journal


def _record(i: int, size: int) -> bytes:
    return (f"record {i:05d} ".encode() * (size // 13 + 1))[:size]


def _journal(tmp_path: Path) -> _Journal:
    return _Journal(tmp_path / "journal", 4 << 20, tmp_path, after_seq=0, idle_checkpoint_seconds=3600)


def _append_during_first_flush(journal: _Journal, payloads: list[bytes]) -> list[int | BaseException]:
    """Append ``payloads[0]`` alone; while its flush is held on its way to the disk, append the others from one
    thread each, and let the flush go only once they are all written (so they wait for the next flush)."""
    held, go = threading.Event(), threading.Event()

    def before_flush() -> None:
        if not held.is_set():
            held.set()
            go.wait(20)

    journal.before_flush = before_flush
    results: list[int | BaseException] = [0] * len(payloads)

    def run(i: int) -> None:
        try:
            seq = journal.append(b'{"i": %d}' % i, [payloads[i]])
            assert seq is not None
            results[i] = seq
        except BaseException as exc:  # collected and asserted on by the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(payloads))]
    threads[0].start()
    assert held.wait(20)
    for t in threads[1:]:
        t.start()
    assert peers.wait_until(lambda: len(journal._written) == len(payloads), timeout=20)
    go.set()
    for t in threads:
        t.join(timeout=60)
    return results


def test_appends_arriving_during_a_flush_join_the_next_one(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    payloads = [_record(i, 40_000 + i) for i in range(4)]
    results = _append_during_first_flush(journal, payloads)
    assert results[0] == 1 and sorted(results[1:]) == [2, 3, 4], results  # type: ignore[type-var]
    # The first record's flush was on its way while the three others were written: one more flush for all three.
    assert (journal.appended, journal.flushes) == (4, 2)
    journal.close()
    _checkpoint, highest, records = read_journal(tmp_path / "journal")
    assert highest == 4
    by_seq = {r.seq: r for r in records}
    for i, seq in enumerate(results):
        assert by_seq[seq].data == payloads[i] and by_seq[seq].meta == {"i": i}  # type: ignore[index]


def test_many_concurrent_appenders_each_get_their_own_intact_record(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    payloads = [_record(i, 1000 + 7919 * i % 60_000) for i in range(160)]  # wraps the 1 MiB segments
    results: list[int] = []
    bypassed: list[int] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        for i in range(k, len(payloads), 8):
            seq = journal.append(b'{"i": %d}' % i, [payloads[i][:10], payloads[i][10:]])
            with lock:
                (results if seq is not None else bypassed).append(seq if seq is not None else i)
            if seq is not None:
                journal.done(seq)  # placed: the checkpointer may free segments behind it

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    # Every append acknowledged with its own number, or sent to the direct path while the ring was full.
    assert sorted(results) == list(range(1, len(results) + 1)) and len(results) + len(bypassed) == 160
    assert journal.appended == len(results) >= 40 and 1 <= journal.flushes <= len(results)
    last = read_journal(tmp_path / "journal")
    # Whatever is newer than the checkpoint is intact and exactly what its appender wrote.
    for rec in last[2]:
        assert rec.data == payloads[rec.meta["i"]]
    journal.close()


def test_a_failed_flush_fails_every_waiter_of_its_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = _journal(tmp_path)
    segment_fds = {s.fd for s in journal._segments}
    real = os.fdatasync
    calls: list[int] = []

    def fdatasync(fd: int) -> None:
        if fd in segment_fds:
            calls.append(fd)
            if len(calls) == 2:  # the second flush: the batch of the three records that waited
                raise OSError(errno.EIO, "Input/output error (injected)")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    payloads = [_record(i, 50_000) for i in range(4)]
    results = _append_during_first_flush(journal, payloads)
    assert results[0] == 1, results
    # Every record of the failed batch gets the error (its sender a failure status), none a sequence number.
    assert all(isinstance(e, OSError) and e.errno == errno.EIO for e in results[1:]), results
    assert (journal.appended, journal.flushes) == (1, 2)
    # The segment that failed is retired: the next record goes to another one and is acknowledged.
    first_segment = journal._segments[0]
    assert first_segment.state == "full" and first_segment.poisoned_from is not None
    # A spare segment is created by the journal's background thread; on a loaded machine it may not be there
    # yet (the record would then take the direct path, seq None): wait for it.
    deadline = time.monotonic() + 30
    while not any(s.state == "free" for s in journal._segments) and time.monotonic() < deadline:
        time.sleep(0.05)
    segment_fds.update(s.fd for s in journal._segments)
    seq = journal.append(b"{}", [b"after the failure"])
    assert seq == 5 and journal._active is not first_segment
    # Failed records do not hold the checkpoint back; acknowledged ones do until they are placed.
    assert journal._inflight == {1, 5}
    journal.done(1)
    journal.done(5)
    monkeypatch.setattr(os, "fdatasync", real)
    journal.close()
    assert read_journal(tmp_path / "journal")[0] == 5


def test_a_failed_write_fails_the_later_records_of_its_segment(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A record after a hole is unreadable at replay (a segment is read up to its first damaged record): it
    must not be acknowledged even when it was written and flushed."""
    journal = _journal(tmp_path)
    real = os.pwritev
    release = threading.Event()
    second_started = threading.Event()

    def pwritev(fd: int, buffers: list[bytes], offset: int) -> int:
        if b'{"i": 1}' in buffers:  # the second record: fails, but only after the third is written
            second_started.set()
            release.wait(20)
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", pwritev)
    assert journal.append(b'{"i": 0}', [b"zero"]) == 1
    results: dict[int, int | BaseException] = {}

    def run(i: int) -> None:
        try:
            results[i] = journal.append(b'{"i": %d}' % i, [b"payload %d" % i])  # type: ignore[assignment]
        except OSError as exc:
            results[i] = exc

    second = threading.Thread(target=run, args=(1,))
    second.start()
    assert second_started.wait(20)
    third = threading.Thread(target=run, args=(2,))
    third.start()
    assert peers.wait_until(lambda: 3 in journal._written, timeout=20)  # written, waiting behind record 2
    release.set()
    second.join(20)
    third.join(20)
    assert isinstance(results[1], OSError) and isinstance(results[2], OSError), results
    assert journal.appended == 1
    journal.done(1)
    journal.close()


def test_a_store_with_concurrent_puts_keeps_every_acknowledged_instance(tmp_path: Path) -> None:
    series = [peers.make_ct_series(tmp_path / f"s{k}", n=12, rows=64, cols=64, seed=k) for k in range(4)]
    root = tmp_path / "store"
    store = Store.open(root)
    assert store.acquire_owner_lock()
    assert store.start_journal(8 << 20, idle_checkpoint_seconds=3600)
    errors: list[BaseException] = []

    def send(paths: list[Path]) -> None:
        try:
            for p in paths:
                assert not store.put(p.read_bytes(), InstanceInfo.from_file(p)).duplicate
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(s.paths,)) for s in series]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    journal = store._journal
    assert journal is not None and journal.appended == 48
    store.close()
    store = Store.open(root)
    assert store.count() == 48
    for s in series:
        for p, uid in zip(s.paths, s.sop_uids, strict=False):
            rec = store.instance(uid)
            assert rec is not None and rec.path.read_bytes() == p.read_bytes()
    store.close()


def test_records_checksummed_with_zlib_crc32_are_still_replayed(tmp_path: Path) -> None:
    """Journals written before CRC-32C (zlib CRC-32, zero padding after the header CRC) replay as before; a
    damaged payload is still a torn record."""
    import struct
    import zlib

    from dicom_io.store import _JOURNAL_HEADER_SIZE

    journal = _journal(tmp_path)
    assert journal.append(b'{"new": 1}', [b"checksummed with CRC-32C"]) == 1
    journal.done(1)
    journal.close()
    seg = sorted((tmp_path / "journal").glob("seg-*.bin"))[0]
    data = bytearray(seg.read_bytes())
    payload, meta = b"an older record", b'{"old": 2}'
    head = struct.pack("<8sQIQI", b"AINJRNL1", 2, len(meta), len(payload), zlib.crc32(meta + payload))
    head += zlib.crc32(head).to_bytes(4, "little")
    data[4096:4096 + _JOURNAL_HEADER_SIZE + len(meta) + len(payload)] = (
        head.ljust(_JOURNAL_HEADER_SIZE, b"\0") + meta + payload)
    (tmp_path / "journal" / "checkpoint").unlink()
    seg.write_bytes(bytes(data))
    _c, highest, records = read_journal(tmp_path / "journal")
    assert highest == 2 and [(r.seq, r.meta, r.data) for r in records] == [
        (1, {"new": 1}, b"checksummed with CRC-32C"), (2, {"old": 2}, payload)]
    data[4096 + _JOURNAL_HEADER_SIZE + len(meta)] ^= 1  # one payload bit flipped: torn
    seg.write_bytes(bytes(data))
    assert [r.seq for r in read_journal(tmp_path / "journal")[2]] == [1]
