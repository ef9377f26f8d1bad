"""Response parsing the way the viewer clients do it (MONAI Label multipart, OHIF-AI streamed parts, NRRD)."""

from __future__ import annotations

import gzip
import json
import re
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import numpy as np


def parse_form_multipart(body: bytes, content_type: str) -> dict[str, tuple[dict[str, str], bytes]]:
    """MONAI Label's ``multipart/form-data`` answer → {name: (headers, body)} (a standards MIME parser)."""
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise ValueError("not multipart")
    out = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        headers = {k.lower(): str(v) for k, v in part.items()}
        out[str(name)] = (headers, part.get_payload(decode=True) or b"")
    return out


def parse_ohif_ai(body: bytes, content_type: str) -> tuple[Any, bytes]:
    """A port of OHIF-AI's ``parseMultipart`` (Viewers/extensions/default/src/utils/multipart.ts)."""
    m = re.search(r"boundary=([^;]+)", content_type, re.I)
    if not m:
        raise ValueError("No boundary in Content-Type")
    boundary = m.group(1).strip('"').encode()
    marker = b"\r\n--" + boundary
    parts = []
    i = 0
    dash = b"--" + boundary
    while i < len(body):
        if body[i:i + 2] == b"\r\n":
            i += 2
        if body[i:i + len(dash) + 2] == dash + b"--":
            break
        if body[i:i + len(dash)] != dash:
            i += 1
            continue
        j = i + len(dash)
        if body[j:j + 2] == b"\r\n":
            j += 2
        split = body.find(b"\r\n\r\n", j)
        if split < 0:
            break
        end = body.find(marker, split + 4)
        end = len(body) if end < 0 else end
        parts.append(body[j:end])
        i = end + 2
    meta, seg = None, b""
    for p in parts:
        split = p.find(b"\r\n\r\n")
        headers = {}
        for line in p[:split].decode().split("\r\n"):
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        data = p[split + 4:]
        if "gzip" in headers.get("content-encoding", ""):
            data = gzip.decompress(data)
        name = re.search(r'name="([^"]+)"', headers.get("content-disposition", ""))
        if name and name.group(1) == "meta" and "application/json" in headers.get("content-type", ""):
            meta = json.loads(data.decode())
            if isinstance(meta, str):  # OHIF-AI parses twice when the server double-encodes
                meta = json.loads(meta)
        elif name and name.group(1) == "seg" and "application/octet-stream" in headers.get("content-type", ""):
            seg = data
    if meta is None:
        raise ValueError("meta part not found")
    if not seg:
        raise ValueError("seg part not found")
    return meta, seg


def parse_nrrd(data: bytes) -> tuple[dict[str, str], np.ndarray]:
    """A minimal NRRD reader (what the OHIF v3 MONAI Label plugin's ``parseNrrdData`` needs): header + array."""
    head, _, raw = data.partition(b"\n\n")
    lines = head.decode("ascii").split("\n")
    if not lines[0].startswith("NRRD000"):
        raise ValueError("not NRRD")
    fields = {}
    for line in lines[1:]:
        if ":" in line and not line.startswith("#"):
            k, v = line.split(":", 1)
            fields[k.strip()] = v.strip()
    if fields.get("encoding") == "gzip":
        raw = gzip.decompress(raw)
    sizes = [int(v) for v in fields["sizes"].split()]
    arr = np.frombuffer(raw, dtype=np.dtype(fields["type"]).newbyteorder("<")).reshape(sizes[::-1])
    return fields, arr
