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


def parse_ohif_ai_fork(body: bytes, content_type: str) -> tuple[Any, np.ndarray, list[int], int]:
    """A port of anandpreshob/OHIF-AI's ``parseMultipart`` + ``parseNifti`` (its ``output=all`` answer).

    Parts named ``meta`` or ``params`` (``application/json``) and ``seg`` or ``image``
    (``application/octet-stream`` or ``application/gzip``), gunzipped when the part's
    ``Content-Encoding`` or ``Content-Type`` says gzip. ``parseNifti`` reads ``dim[1..3]`` as
    [Z, Y, X], takes the bytes from ``vox_offset`` (at least 352) as one byte per voxel with Z
    varying fastest, and never looks at the affine. Returns (meta, volume (Z, Y, X) in the order the
    viewer writes slices, dims as read, NIfTI datatype code).
    """
    m = re.search(r"boundary=([^;]+)", content_type, re.I)
    if not m:
        raise ValueError("No boundary in Content-Type")
    boundary = m.group(1).strip().strip('"').encode()
    dash = b"--" + boundary
    marker = b"\r\n--" + boundary
    parts = []
    i = 0
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
    meta: Any = None
    seg = b""
    for p in parts:
        split = p.find(b"\r\n\r\n")
        headers = {}
        for line in p[:split].decode().split("\r\n"):
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        data = p[split + 4:]
        ctype = headers.get("content-type", "").lower()
        if "gzip" in headers.get("content-encoding", "").lower() or "gzip" in ctype:
            data = gzip.decompress(data)
        found = re.search(r'name="([^"]+)"', headers.get("content-disposition", ""), re.I)
        name = found.group(1) if found else ""
        if name in ("meta", "params") and "application/json" in ctype:
            meta = json.loads(data.decode())
        elif name in ("seg", "image") and ("application/octet-stream" in ctype or "application/gzip" in ctype):
            seg = data
    if meta is None:
        raise ValueError("meta part not found")
    if not seg:
        raise ValueError("seg part not found")
    if isinstance(meta, str):
        meta = json.loads(meta)
    # parseNifti
    if np.frombuffer(seg[:4], "<i4")[0] != 348:
        raise ValueError("not a NIfTI-1 file")
    ndim = int(np.frombuffer(seg[40:42], "<i2")[0])
    dims = [int(v) for v in np.frombuffer(seg[42:42 + 2 * min(ndim, 7)], "<i2")]
    datatype = int(np.frombuffer(seg[70:72], "<i2")[0])
    vox_offset = float(np.frombuffer(seg[108:112], "<f4")[0])
    voxels = np.frombuffer(seg, np.uint8)[max(int(np.ceil(vox_offset)), 352):]
    dim_z, dim_y, dim_x = dims[:3]
    # input index z + dimZ * (y + dimY * x)  ->  output x + dimX * (y + dimY * z)
    volume = voxels[:dim_z * dim_y * dim_x].reshape(dim_x, dim_y, dim_z).transpose(2, 1, 0)
    return meta, np.ascontiguousarray(volume), dims, datatype


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
