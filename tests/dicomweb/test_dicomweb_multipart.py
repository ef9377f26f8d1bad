"""The streaming multipart/related parser and writer."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from dicom_io.multipart import (
    MultipartError,
    MultipartParser,
    SpooledPart,
    encode_files,
    iter_parts,
    parse_content_type,
)


def _body(parts: list[bytes], boundary: str = "b0und", preamble: bytes = b"") -> bytes:
    out = preamble
    for p in parts:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
    return out + f"--{boundary}--\r\nepilogue".encode()


@pytest.mark.parametrize("max_chunk", [700, 60000])
@pytest.mark.parametrize("seed", range(5))
def test_any_chunking_gives_the_same_parts(seed: int, max_chunk: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    # Bodies that contain near-boundaries, CRLFs and dashes; one part without header lines, a preamble
    # with a blank line; chunks small and large, bytes or (fresh) bytearrays.
    parts = [b"", b"\r\n--b0un", b"x" * 5000 + b"\r\n--b0unx", bytes(rng.randrange(256) for _ in range(20000)),
             b"\r\n\r\n--b0un\r\n\r\n" * 50, bytes(rng.randrange(256) for _ in range(70000))]
    body = _body(parts[:4], preamble=b"ignored\r\n\r\npreamble\r\n")
    body = body[: body.rindex(b"--b0und--")] + b"--b0und\r\n\r\n" + parts[4] + b"\r\n" + _body(parts[5:])
    got: list[bytes] = []

    def on_part(part: SpooledPart) -> None:
        got.append(part.read())
        part.discard()

    parser = MultipartParser("b0und", on_part, spool_dir=tmp_path, max_memory=4096)
    pos = 0
    while pos < len(body):
        n = rng.randint(1, max_chunk)
        chunk = body[pos:pos + n]
        parser.feed(bytearray(chunk) if rng.random() < 0.5 else chunk)
        pos += n
    parser.close()
    assert got == parts
    assert not list(tmp_path.iterdir())


def test_large_parts_spill_to_disk(tmp_path: Path) -> None:
    kept: list[SpooledPart] = []
    parser = MultipartParser("b0und", kept.append, spool_dir=tmp_path, max_memory=1000)
    parser.feed(_body([b"a" * 10, b"b" * 5000]))
    parser.close()
    assert kept[0].in_memory and not kept[1].in_memory
    assert kept[1].path is not None and kept[1].path.read_bytes() == b"b" * 5000
    kept[1].discard()
    assert not list(tmp_path.iterdir())


def test_truncated_body_is_an_error_and_leaves_no_file(tmp_path: Path) -> None:
    body = _body([b"a" * 10, b"b" * 5000])
    with pytest.raises(MultipartError, match="truncated after 1"):
        list(iter_parts([body[:3000]], "b0und", spool_dir=tmp_path, max_memory=100))
    assert not list(tmp_path.iterdir())


def test_content_type_parameters() -> None:
    media, params = parse_content_type('Multipart/Related; type="application/dicom"; boundary="a;b"')
    assert media == "multipart/related" and params == {"type": "application/dicom", "boundary": "a;b"}


def test_encode_files_round_trip(tmp_path: Path) -> None:
    files = []
    for i, size in enumerate((0, 10, 100000)):
        f = tmp_path / f"f{i}"
        f.write_bytes(bytes([i]) * size)
        files.append(f)
    length, chunks = encode_files(files, "zz")
    body = b"".join(chunks)
    assert len(body) == length
    assert [p.read() for p in iter_parts([body], "zz")] == [f.read_bytes() for f in files]
