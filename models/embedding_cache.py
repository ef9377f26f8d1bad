"""On-disk cache of slice embeddings: reused across restarts, grouped by series, bounded by size.

Layout: ``<root>/<namespace>/<group>/<key>.emb``. The namespace names everything the embeddings
depend on besides the slice's content (model, weights hash, encoder arithmetic, preprocessing
version); the key is a digest of the slice's model input (so a changed CT window never hits a stale
entry); the group is a digest of the series key, so a whole series can be evicted at once.

An entry is a small header (magic, resized shape, scale, array shape, CRC-32 of the payload)
followed by the float16 embedding. Entries are written to a temporary file in the same folder and
renamed into place, so a crash never leaves a half-written entry under a real name; an entry that
is truncated or fails its CRC anyway (disk error, foreign file) is deleted and reported as a miss,
so the caller recomputes it.

Eviction: when the total size exceeds the limit, whole series are removed, least recently used
first (reading an entry refreshes its modification time); the series being written is removed
last, oldest entries first. Several processes may share a folder (renames are atomic); each
keeps its own running total and rescans the folder when it evicts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

_MAGIC = b"AINEMB01"
_HEADER = struct.Struct("<8sIIdIIII")  # magic, new_h, new_w, scale, channels, height, width, crc32
_SUFFIX = ".emb"
#: Temporary files older than this (seconds) are left-overs of a crash and are removed on open.
_STALE_TMP_SECONDS = 600.0


@dataclass(frozen=True)
class CachedEmbedding:
    """One cached slice embedding: float16 array (C, H, W), the resized slice shape and the scale."""

    array: np.ndarray
    new_hw: tuple[int, int]
    scale: float


class DiskEmbeddingCache:
    """Slice embeddings on disk (see the module docstring).

    Parameters
    ----------
    root
        Cache folder (created if needed).
    namespace
        What the embeddings depend on besides the slice content (model, weights hash, encoder...);
        becomes a sub-folder, so changing any of it never reads old entries.
    max_bytes
        Size limit of the whole ``root`` folder's entries of this namespace.
    """

    def __init__(self, root: str | os.PathLike[str], namespace: str, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}.")
        self.root = Path(root).expanduser()
        self.namespace = namespace
        self.dir = self.root / _safe(namespace)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._total = self._scan_total()
        #: Counters for diagnostics and tests.
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        self.evicted = 0

    # ------------------------------------------------------------------ entries

    def path(self, group: str, key: bytes) -> Path:
        """Where the entry for slice digest ``key`` of series ``group`` lives."""
        return self.dir / _group_dir(group) / (key.hex() + _SUFFIX)

    def get(self, group: str, key: bytes) -> CachedEmbedding | None:
        """The cached embedding, or None when absent, truncated or corrupt (a bad entry is deleted)."""
        path = self.path(group, key)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            self.misses += 1
            return None
        except OSError as exc:
            logger.warning("embedding cache entry %s cannot be read (%s); recomputing", path.name, exc)
            self.misses += 1
            return None
        entry = _decode(data)
        if entry is None:
            logger.warning("embedding cache entry %s is truncated or corrupt; removing it and recomputing", path)
            self.corrupt += 1
            self.misses += 1
            self._remove(path)
            return None
        try:
            os.utime(path)  # least-recently-used bookkeeping
            os.utime(path.parent)
        except OSError:
            pass
        self.hits += 1
        return entry

    def contains(self, group: str, key: bytes) -> bool:
        return self.path(group, key).is_file()

    def put(self, group: str, key: bytes, array: np.ndarray, new_hw: tuple[int, int], scale: float) -> None:
        """Store an embedding (C, H, W) as float16; write errors are logged, never raised."""
        a = np.ascontiguousarray(array, dtype=np.float16)
        if a.ndim != 3:
            raise ValueError(f"an embedding must be (channels, height, width), got shape {a.shape}.")
        payload = a.tobytes()
        header = _HEADER.pack(_MAGIC, int(new_hw[0]), int(new_hw[1]), float(scale), *a.shape,
                              zlib.crc32(payload))
        path = self.path(group, key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            old = path.stat().st_size if path.exists() else 0
            with open(tmp, "wb") as fh:
                fh.write(header)
                fh.write(payload)
            os.replace(tmp, path)
            os.utime(path.parent)
        except OSError as exc:
            logger.warning("embedding cache: cannot write %s (%s)", path, exc)
            self._remove(tmp)
            return
        with self._lock:
            self._total += len(header) + len(payload) - old
            over = self._total > self.max_bytes
        if over:
            self.evict(keep=group)

    # ------------------------------------------------------------------ size

    @property
    def total_bytes(self) -> int:
        """Bytes of entries (as last counted by this process)."""
        with self._lock:
            return self._total

    def evict(self, keep: str | None = None) -> int:
        """Remove least recently used series until the cache is under 90 % of its limit; returns files removed.

        ``keep``'s series goes last (its oldest entries first).
        """
        with self._lock:
            groups: dict[str, list[tuple[float, int, Path]]] = {}
            total = 0
            for gdir in _dirs(self.dir):
                files = []
                for entry in _files(gdir):
                    try:
                        st = entry.stat()
                    except OSError:
                        continue
                    files.append((st.st_mtime, st.st_size, Path(entry.path)))
                    total += st.st_size
                groups[gdir.name] = files
            target = int(self.max_bytes * 0.9)
            keep_dir = _group_dir(keep) if keep is not None else None
            order = sorted((g for g in groups if g != keep_dir),
                           key=lambda g: max((f[0] for f in groups[g]), default=0.0))
            removed = 0
            for g in order:
                if total <= target:
                    break
                for _, size, path in groups[g]:
                    self._remove(path)
                    total -= size
                    removed += 1
                try:
                    (self.dir / g).rmdir()
                except OSError:
                    pass
            if total > target and keep_dir in groups:
                for _, size, path in sorted(groups[keep_dir]):
                    if total <= target:
                        break
                    self._remove(path)
                    total -= size
                    removed += 1
            self._total = total
            self.evicted += removed
        if removed:
            logger.info("embedding cache: evicted %d entr%s; %.1f MB kept (limit %.1f MB)", removed,
                        "y" if removed == 1 else "ies", total / 1e6, self.max_bytes / 1e6)
        return removed

    def clear(self) -> None:
        """Remove every entry of this namespace."""
        import shutil

        with self._lock:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(parents=True, exist_ok=True)
            self._total = 0

    # ------------------------------------------------------------------ internals

    def _scan_total(self) -> int:
        total = 0
        now = time.time()
        for gdir in _dirs(self.dir):
            with os.scandir(gdir) as it:
                for entry in it:
                    try:
                        st = entry.stat()
                    except OSError:
                        continue
                    if entry.name.endswith(".tmp"):
                        if now - st.st_mtime > _STALE_TMP_SECONDS:
                            self._remove(Path(entry.path))
                        continue
                    if entry.name.endswith(_SUFFIX):
                        total += st.st_size
        return total

    def _remove(self, path: Path) -> None:
        try:
            path.unlink()
        except OSError:
            pass


def _decode(data: bytes) -> CachedEmbedding | None:
    if len(data) < _HEADER.size:
        return None
    magic, nh, nw, scale, c, h, w, crc = _HEADER.unpack_from(data)
    payload = memoryview(data)[_HEADER.size:]
    if magic != _MAGIC or len(payload) != c * h * w * 2 or zlib.crc32(payload) != crc:
        return None
    arr = np.frombuffer(payload, dtype=np.float16).reshape(c, h, w)
    return CachedEmbedding(array=arr, new_hw=(nh, nw), scale=scale)


def _group_dir(group: str) -> str:
    return hashlib.sha1(group.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name) or "default"


def _dirs(folder: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _files(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            return [e for e in it if e.name.endswith(_SUFFIX) and e.is_file(follow_symlinks=False)]
    except OSError:
        return []


__all__ = ["CachedEmbedding", "DiskEmbeddingCache"]
