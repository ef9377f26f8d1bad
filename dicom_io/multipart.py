"""Streaming multipart/related (RFC 2387) parsing and writing for DICOMweb message bodies (PS3.18 8.6)."""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

#: Parts up to this size stay in memory; larger ones spill to a file in the spool folder.
DEFAULT_SPOOL_BYTES = 32 * 1024 * 1024

_CRLF = b"\r\n"


class MultipartError(ValueError):
    """A multipart body is malformed (no boundary, broken part headers, or truncated)."""


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """Split a Content-Type header into its lower-cased media type and parameters (quotes removed).

    Parameters
    ----------
    value
        e.g. ``multipart/related; type="application/dicom"; boundary=abc``.

    Returns
    -------
    tuple
        ``("multipart/related", {"type": "application/dicom", "boundary": "abc"})``.
    """
    media, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for item in _split_params(rest):
        key, sep, val = item.partition("=")
        if not sep:
            continue
        val = val.strip()
        if len(val) >= 2 and val[0] == val[-1] == '"':
            val = val[1:-1].replace('\\"', '"')
        params[key.strip().lower()] = val
    return media.strip().lower(), params


def _split_params(text: str) -> Iterator[str]:
    buf: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == ";" and not quoted:
            yield "".join(buf).strip()
            buf = []
        else:
            buf.append(ch)
    if "".join(buf).strip():
        yield "".join(buf).strip()


def new_boundary() -> str:
    """A random boundary that cannot occur in DICOM data by chance."""
    return "ainode-" + secrets.token_hex(16)


class SpooledPart:
    """One part's body: kept in memory up to ``max_memory`` bytes, then written to a file.

    Parameters
    ----------
    headers
        The part's headers, names lower-cased.
    spool_dir
        Folder for the spill file (should be on the store's file system so a rename is cheap).
    max_memory
        Bytes kept in memory before spilling.
    """

    def __init__(self, headers: dict[str, str], spool_dir: Path | None, max_memory: int = DEFAULT_SPOOL_BYTES) -> None:
        self.headers = headers
        self.size = 0
        self._spool_dir = spool_dir
        self._max_memory = max_memory
        self._chunks: list[bytes | memoryview] = []
        self._file: BinaryIO | None = None
        self.path: Path | None = None

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    @property
    def in_memory(self) -> bool:
        return self._file is None and self.path is None

    def write(self, data: bytes | memoryview) -> None:
        """Append body bytes (a memoryview is kept as is, without copying)."""
        if not data:
            return
        self.size += len(data)
        if self._file is None and self.size > self._max_memory:
            fd, name = tempfile.mkstemp(prefix=".part-", suffix=".partial", dir=self._spool_dir)
            self._file = os.fdopen(fd, "wb")
            self.path = Path(name)
            for chunk in self._chunks:
                self._file.write(chunk)
            self._chunks = []
        if self._file is not None:
            self._file.write(data)
        else:
            self._chunks.append(data)

    def finish(self) -> None:
        """Close the spill file (if any); the body is then complete."""
        if self._file is not None:
            self._file.flush()
            self._file.close()
            self._file = None

    def chunks(self) -> list[bytes | memoryview]:
        """The body as in-memory chunks (only when :attr:`in_memory`)."""
        if not self.in_memory:
            raise RuntimeError("Part was spilled to a file; read it from 'path'.")
        return self._chunks

    def read(self) -> bytes:
        if self.in_memory:
            return b"".join(self._chunks)
        assert self.path is not None
        return self.path.read_bytes()

    def discard(self) -> None:
        """Drop the body and delete a spill file."""
        self.finish()
        self._chunks = []
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None


@dataclass
class _State:
    buf: bytearray = field(default_factory=bytearray)
    stage: str = "preamble"  # preamble | after_delim | headers | body | done


class MultipartParser:
    """Push parser: :meth:`feed` it the body as it arrives; each complete part is handed to ``on_part``.

    Only the bytes of the current part (and, for large parts, a spill file) are held, so a whole
    series is never in memory. The boundary is matched strictly (``CRLF--boundary``), so parts
    without a Content-Length (dcm4chee) are split correctly.

    Parameters
    ----------
    boundary
        The boundary parameter of the message's Content-Type.
    on_part
        Called with each complete :class:`SpooledPart`; it owns the part afterwards.
    spool_dir
        Where large parts spill.
    max_memory
        Bytes of one part kept in memory before spilling.
    max_header_bytes
        Largest accepted part header block.

    Raises
    ------
    ValueError
        When ``boundary`` is empty.
    """

    def __init__(
        self,
        boundary: str,
        on_part: Callable[[SpooledPart], None],
        *,
        spool_dir: Path | None = None,
        max_memory: int = DEFAULT_SPOOL_BYTES,
        max_header_bytes: int = 16384,
    ) -> None:
        if not boundary:
            raise ValueError("Multipart boundary '' is empty.")
        self._delim = b"\r\n--" + boundary.encode("latin-1")
        self._on_part = on_part
        self._spool_dir = spool_dir
        self._max_memory = max_memory
        self._max_header = max_header_bytes
        self._s = _State()
        # A body may start with the boundary without a preceding CRLF: pretend there was one.
        self._s.buf += _CRLF
        self._part: SpooledPart | None = None
        self.parts = 0

    @property
    def done(self) -> bool:
        return self._s.stage == "done"

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Consume the next bytes of the body.

        Body bytes are handed to the parts as slices of ``data``, without copying: a ``bytearray``
        passed here must not be changed afterwards (a ``memoryview`` is copied once).

        Raises
        ------
        MultipartError
            When a part's header block is malformed or too large.
        """
        s = self._s
        if s.stage == "done" or not data:
            return  # an epilogue after the close delimiter is ignored (RFC 2046 5.1.1)
        raw = data if isinstance(data, (bytes, bytearray)) else bytes(data)
        view = memoryview(raw)
        n, pos = len(raw), 0
        delim = self._delim
        keep = len(delim) - 1
        while pos < n and s.stage != "done":
            if s.stage != "body":
                # Preamble, delimiter line, part headers: through the state machine, but only up to the
                # end of this header block when it is in this chunk, so the body after it is not copied.
                end = raw.find(b"\r\n\r\n", pos)
                stop = n if end < 0 else end + 4
                s.buf += view[pos:stop]
                pos = stop
                self._run()
                continue
            if s.buf and delim in bytes(s.buf) + raw[pos:pos + keep]:
                s.buf += view[pos:]  # a delimiter across two chunks (rare): the state machine takes the rest
                pos = n
                self._run()
                continue
            part = self._part
            assert part is not None
            idx = raw.find(delim, pos)
            if s.buf:
                part.write(bytes(s.buf))
                s.buf.clear()
            if idx < 0:
                # All but the last few bytes (they may start a delimiter) go to the part.
                cut = max(pos, n - keep)
                part.write(view[pos:cut])
                s.buf += view[cut:]
                pos = n
            else:
                part.write(view[pos:idx])
                self._part = None
                part.finish()
                self.parts += 1
                self._on_part(part)
                s.stage = "after_delim"
                pos = idx + len(delim)

    def close(self) -> None:
        """Signal the end of the body.

        Raises
        ------
        MultipartError
            When the close delimiter was not seen (truncated body); the partial part is discarded.
        """
        if self._s.stage != "done":
            if self._part is not None:
                self._part.discard()
                self._part = None
            raise MultipartError(f"Multipart body truncated after {self.parts} complete part(s).")

    def abort(self) -> None:
        """Discard the part being received (e.g. the connection broke)."""
        if self._part is not None:
            self._part.discard()
            self._part = None

    def _run(self) -> None:
        s = self._s
        delim = self._delim
        while True:
            if s.stage in ("preamble", "body"):
                idx = s.buf.find(delim)
                if idx < 0:
                    keep = len(delim) - 1
                    if s.stage == "body" and len(s.buf) > keep:
                        assert self._part is not None
                        cut = len(s.buf) - keep
                        self._part.write(bytes(s.buf[:cut]))
                        del s.buf[:cut]
                    elif s.stage == "preamble" and len(s.buf) > keep:
                        del s.buf[:len(s.buf) - keep]
                    return
                if s.stage == "body":
                    assert self._part is not None
                    self._part.write(bytes(s.buf[:idx]))
                    part, self._part = self._part, None
                    part.finish()
                    self.parts += 1
                    self._on_part(part)
                del s.buf[:idx + len(delim)]
                s.stage = "after_delim"
            elif s.stage == "after_delim":
                if len(s.buf) < 2:
                    return
                if s.buf[:2] == b"--":
                    s.stage = "done"
                    s.buf.clear()
                    return
                eol = s.buf.find(_CRLF)
                if eol < 0:
                    if len(s.buf) > 1024:
                        raise MultipartError("Garbage after a multipart boundary.")
                    return
                if s.buf[:eol].strip(b" \t"):
                    raise MultipartError("Garbage after a multipart boundary.")
                del s.buf[:eol + 2]
                s.stage = "headers"
            elif s.stage == "headers":
                if s.buf[:2] == _CRLF:  # a part without headers
                    head, rest_at = b"", 2
                else:
                    end = s.buf.find(b"\r\n\r\n")
                    if end < 0:
                        if len(s.buf) > self._max_header:
                            raise MultipartError("Multipart part headers too large or not terminated.")
                        return
                    head, rest_at = bytes(s.buf[:end]), end + 4
                self._part = SpooledPart(_parse_headers(head), self._spool_dir, self._max_memory)
                del s.buf[:rest_at]
                # Keep the CRLF convention for the delimiter search: the body is followed by CRLF--boundary.
                s.stage = "body"
            else:
                return


def _parse_headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in raw.split(_CRLF):
        if not line.strip():
            continue
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise MultipartError(f"Malformed multipart part header line {line[:80]!r}.")
        headers[name.strip().lower()] = value.strip()
    return headers


def iter_parts(
    chunks: Iterable[bytes], boundary: str, *, spool_dir: Path | None = None, max_memory: int = DEFAULT_SPOOL_BYTES
) -> Iterator[SpooledPart]:
    """Parse a multipart body given as an iterable of byte chunks; yields parts as they complete.

    Raises
    ------
    MultipartError
        When the body is malformed or truncated.
    """
    ready: list[SpooledPart] = []
    parser = MultipartParser(boundary, ready.append, spool_dir=spool_dir, max_memory=max_memory)
    try:
        for chunk in chunks:
            parser.feed(chunk)
            while ready:
                yield ready.pop(0)
        parser.close()
    finally:
        parser.abort()
        for part in ready:
            part.discard()


def part_header(content_type: str, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    lines = [f"Content-Type: {content_type}"] + [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def encode_files(
    paths: Sequence[Path], boundary: str, content_type: str = "application/dicom", chunk_size: int = 1 << 20
) -> tuple[int, Iterator[bytes]]:
    """A multipart/related body streaming ``paths`` from disk; returns (Content-Length, chunk iterator)."""
    head = part_header(content_type)
    sep = f"--{boundary}\r\n".encode()
    tail = f"--{boundary}--\r\n".encode()
    sizes = [os.path.getsize(p) for p in paths]
    length = sum(len(sep) + len(head) + n + 2 for n in sizes) + len(tail)

    def gen() -> Iterator[bytes]:
        for p in paths:
            yield sep + head
            with open(p, "rb") as fh:
                while chunk := fh.read(chunk_size):
                    yield chunk
            yield _CRLF
        yield tail

    return length, gen()


__all__ = [
    "DEFAULT_SPOOL_BYTES", "MultipartError", "MultipartParser", "SpooledPart", "encode_files", "iter_parts",
    "new_boundary", "parse_content_type", "part_header",
]
