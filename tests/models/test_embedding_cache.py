"""The on-disk embedding cache: round trip, crash safety (truncated / corrupt entries), eviction by size."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from models.embedding_cache import DiskEmbeddingCache

ENTRY = (8, 16, 16)  # small embeddings keep the test fast; the format does not care about the shape
ENTRY_BYTES = 8 * 16 * 16 * 2


def _emb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=ENTRY).astype(np.float32)


def test_round_trip_is_float16_and_survives_a_new_instance(tmp_path: Path) -> None:
    cache = DiskEmbeddingCache(tmp_path, "model-abc", max_bytes=10**7)
    a = _emb(0)
    cache.put("series-1", b"k" * 16, a, (200, 256), 0.5)
    again = DiskEmbeddingCache(tmp_path, "model-abc", max_bytes=10**7)  # a restart
    got = again.get("series-1", b"k" * 16)
    assert got is not None and got.array.dtype == np.float16 and got.array.shape == ENTRY
    assert np.array_equal(got.array, a.astype(np.float16))
    assert got.new_hw == (200, 256) and got.scale == 0.5
    assert again.total_bytes > ENTRY_BYTES
    # another namespace (other weights, encoder or preprocessing) never sees the entry
    assert DiskEmbeddingCache(tmp_path, "model-xyz", max_bytes=10**7).get("series-1", b"k" * 16) is None
    assert again.get("series-2", b"k" * 16) is None and again.get("series-1", b"j" * 16) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_damaged_entry_is_a_miss_and_removed(tmp_path: Path, damage: str) -> None:
    cache = DiskEmbeddingCache(tmp_path, "m", max_bytes=10**7)
    cache.put("s", b"a" * 16, _emb(1), (256, 256), 1.0)
    path = cache.path("s", b"a" * 16)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-7] ^= 0x40
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(os.urandom(len(data)))
    path.write_bytes(bytes(data))
    assert cache.get("s", b"a" * 16) is None
    assert cache.corrupt == 1 and not path.exists()
    cache.put("s", b"a" * 16, _emb(1), (256, 256), 1.0)  # recomputed and stored again
    assert cache.get("s", b"a" * 16) is not None


def test_crash_leftovers_are_ignored_and_cleaned(tmp_path: Path) -> None:
    cache = DiskEmbeddingCache(tmp_path, "m", max_bytes=10**7)
    cache.put("s", b"a" * 16, _emb(1), (256, 256), 1.0)
    folder = cache.path("s", b"a" * 16).parent
    stale = folder / ".deadbeef.emb.123.456.tmp"  # a write cut short by a crash, never renamed
    stale.write_bytes(b"AINEMB01partial")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    again = DiskEmbeddingCache(tmp_path, "m", max_bytes=10**7)
    assert not stale.exists()
    assert again.get("s", b"a" * 16) is not None


def test_eviction_removes_least_recently_used_series_first(tmp_path: Path) -> None:
    per_entry = ENTRY_BYTES + 40
    cache = DiskEmbeddingCache(tmp_path, "m", max_bytes=int(per_entry * 6.5))
    for i in range(3):
        cache.put("old", bytes([i]) * 16, _emb(i), (256, 256), 1.0)
    for i in range(3):
        cache.put("used", bytes([i]) * 16, _emb(10 + i), (256, 256), 1.0)
    # make "old" the least recently used series, then read "used" (refreshes its entries)
    past = time.time() - 100
    for i in range(3):
        os.utime(cache.path("old", bytes([i]) * 16), (past, past))
    assert cache.get("used", bytes([0]) * 16) is not None
    assert cache.evicted == 0
    cache.put("new", b"n" * 16, _emb(20), (256, 256), 1.0)  # 7 entries > 6.5: evict down to 90 %
    assert cache.evicted == 3
    assert all(cache.get("old", bytes([i]) * 16) is None for i in range(3))
    assert all(cache.get("used", bytes([i]) * 16) is not None for i in range(3))
    assert cache.get("new", b"n" * 16) is not None
    assert cache.total_bytes <= cache.max_bytes


def test_series_larger_than_the_cache_keeps_its_newest_entries(tmp_path: Path) -> None:
    per_entry = ENTRY_BYTES + 40
    cache = DiskEmbeddingCache(tmp_path, "m", max_bytes=int(per_entry * 3.5))
    for i in range(6):
        cache.put("big", bytes([i]) * 16, _emb(i), (256, 256), 1.0)
        t = time.time() - 100 + i
        os.utime(cache.path("big", bytes([i]) * 16), (t, t))
    kept = [i for i in range(6) if cache.contains("big", bytes([i]) * 16)]
    assert kept and kept[-1] == 5 and len(kept) <= 3
    assert cache.total_bytes <= cache.max_bytes


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        DiskEmbeddingCache(tmp_path, "m", max_bytes=0)
    cache = DiskEmbeddingCache(tmp_path, "m", max_bytes=10**6)
    with pytest.raises(ValueError, match="channels, height, width"):
        cache.put("s", b"a" * 16, np.zeros((4, 4)), (4, 4), 1.0)
