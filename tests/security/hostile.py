"""Hostile inputs of the independent attack (issue 18), built fast enough for CI: zips, NIfTI, JSON, prompts."""

from __future__ import annotations

import struct
import zlib


def zip_of_copies(data: bytes, count: int, name: str = "m{:04d}.bin") -> bytes:
    """A zip archive of ``count`` deflated members holding ``data`` each, compressed once (a many-member bomb)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = comp.compress(data) + comp.flush()
    crc = zlib.crc32(data)
    local, central = bytearray(), bytearray()
    for n in range(count):
        fname = name.format(n).encode()
        offset = len(local)
        local += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, len(packed), len(data),
                             len(fname), 0) + fname + packed
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, crc, len(packed),
                               len(data), len(fname), 0, 0, 0, 0, 0, offset) + fname
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(central), len(local), 0)
    return bytes(local + central + end)


def damaged_nifti_gz() -> bytes:
    """The attack's damaged ``.nii.gz``: a gzip magic followed by 100 zero bytes."""
    return b"\x1f\x8b" + b"\0" * 100


def nested_json(depth: int = 100_000) -> bytes:
    """``depth`` opening brackets, then as many closing ones: valid JSON, deeper than any parser recurses."""
    return b"[" * depth + b"]" * depth
