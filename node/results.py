"""The one result writer: segments over a series → NIfTI (+ JSON sidecar) and DICOM SEG files (CLI and API alike)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from config.settings import Settings
from dicom_io.seg import (
    SEG_FORMATS,
    AlgorithmSpec,
    SegmentSpec,
    build_seg,
    label_map,
    resolve_format,
    segments_overlap,
    stack_masks,
    write_seg,
)
from dicom_io.series import Series
from node import __version__

logger = logging.getLogger(__name__)

#: Output names a result may ask for.
OUTPUTS = ("nifti", "seg")
#: Most segments in one result (a bitmask NIfTI of overlapping segments holds 32 in uint32).
MAX_SEGMENTS = 32


@dataclass
class Written:
    """Files written for one result."""

    nifti: Path | None = None
    image_nifti: Path | None = None
    #: ``<name>.segments.json``: the NIfTI's values → label, colour, codes (results of several segments).
    segments_json: Path | None = None
    seg: Path | None = None
    seg_sop_instance_uid: str | None = None
    seg_series_instance_uid: str | None = None
    #: ``binary`` or ``labelmap``: the form of ``seg``.
    seg_format: str | None = None
    #: A BINARY SEG of the same segments, for destinations that do not take the label map ``seg``.
    seg_binary: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)


def destination_format(settings: Settings, name: str) -> str:
    """``seg.format`` as it applies to destination ``name`` (its ``seg_format``, else the global one)."""
    dest = settings.destinations.get(name)
    return (dest.seg_format if dest is not None and dest.seg_format else settings.seg.format) or "auto"


def check_formats(settings: Settings) -> None:
    """Refuse an unknown ``seg.format`` or ``destinations.NAME.seg_format``.

    Raises
    ------
    ValueError
        Naming the setting and its value.
    """
    if settings.seg.format not in SEG_FORMATS:
        raise ValueError(f"Config 'seg.format' has value {settings.seg.format!r}; use one of {', '.join(SEG_FORMATS)}.")
    for name, dest in settings.destinations.items():
        if dest.seg_format and dest.seg_format not in SEG_FORMATS:
            raise ValueError(f"Config 'destinations.{name}.seg_format' has value {dest.seg_format!r}; use one of "
                             f"{', '.join(SEG_FORMATS)} (or leave it empty for seg.format).")


def plan_seg(settings: Settings, destinations: Sequence[str], overlap: bool,
             refuses_labelmap: Callable[[str], bool] | None = None) -> tuple[str, bool]:
    """What to write: (form of the SEG, whether a BINARY copy is needed as well).

    Overlapping segments are BINARY. Otherwise each destination's format is resolved (``auto`` → label
    map unless it is known to refuse one, see ``refuses_labelmap``); without destinations the node's
    own store is the destination and it takes label maps. The SEG is a label map when one is wanted;
    a BINARY copy is written too when a destination wants BINARY or is ``auto`` (its refusal of the
    label map then falls back to the copy, see :class:`node.outbox.Outbox`).
    """
    check_formats(settings)
    if overlap:
        return "binary", False
    refuses = refuses_labelmap or (lambda _name: False)
    if not destinations:
        return resolve_format(settings.seg.format, False), False
    wanted = {name: resolve_format(destination_format(settings, name), False, not refuses(name))
              for name in destinations}
    if "labelmap" not in wanted.values():
        return "binary", False
    fallback = any(w == "binary" or destination_format(settings, n) == "auto" for n, w in wanted.items())
    return "labelmap", fallback


def segments_sidecar(specs: Sequence[SegmentSpec], encoding: str) -> dict[str, object]:
    """The JSON sidecar of a NIfTI of several segments: its encoding and each segment's value, label, colour, codes.

    ``labelmap``: voxel value n is segment n (0 = background). ``bitmask`` (overlapping segments): bit n-1
    of a voxel's value is set when it belongs to segment n.
    """
    import highdicom as hd

    items = []
    for n, spec in enumerate(specs, start=1):
        rgb = hd.color.CIELabColor.from_string(spec.color).to_rgb()
        entry: dict[str, object] = {"segment_number": n, "label": spec.label,
                                    "color": "#" + "".join(f"{int(v):02x}" for v in rgb),
                                    "category": spec.category, "type": spec.type}
        entry["value" if encoding == "labelmap" else "bit"] = n if encoding == "labelmap" else n - 1
        items.append(entry)
    return {"encoding": encoding, "background": 0, "segments": items}


def write_outputs(series: Series, mask: np.ndarray | Sequence[np.ndarray], segment: SegmentSpec | Sequence[SegmentSpec],
                  settings: Settings, segmenter_name: str, segmenter_version: str, out_dir: Path, name: str,
                  outputs: Sequence[str], *, save_image: bool = False, algorithm_type: str = "SEMIAUTOMATIC",
                  destinations: Sequence[str] = (), refuses_labelmap: Callable[[str], bool] | None = None,
                  seg_format: str | None = None) -> Written:
    """Write ``<name>.nii.gz`` and/or ``<name>.seg.dcm`` for the segments over ``series`` (blocking).

    One segment: the NIfTI is a 0/1 mask. Several: the NIfTI is a label map (voxel value = segment
    number) with ``<name>.segments.json`` naming each value's label, colour and codes; overlapping
    segments are never flattened: their NIfTI is a bitmask (bit n-1 = segment n, said so in the
    sidecar) and their SEG is BINARY. The SEG's form follows ``seg.format`` per destination (see
    :func:`plan_seg`); a BINARY copy ``<name>.binary.seg.dcm`` is written when a destination may need it.

    Parameters
    ----------
    mask
        bool (slices, rows, columns) for one segment, or (segments, slices, rows, columns) / a sequence.
    segment
        One :class:`SegmentSpec` per segment.
    outputs
        Any of :data:`OUTPUTS`.
    save_image
        Also write the image itself as ``<name>.image.nii.gz`` (with ``nifti``).
    destinations
        Where the SEG will be delivered (decides its form).
    refuses_labelmap
        Tells a destination known to refuse Label Map SEGs (the outbox remembers them).
    seg_format
        Force ``binary`` or ``labelmap`` (overlapping segments stay BINARY); default: :func:`plan_seg`.

    Raises
    ------
    ValueError
        When the masks do not fit the series, the segments are invalid or more than :data:`MAX_SEGMENTS`,
        or ``seg.format`` is unknown.
    """
    from dicom_io.nifti import write_nifti

    masks = stack_masks(mask)
    specs = [segment] if isinstance(segment, SegmentSpec) else list(segment)
    if len(specs) > MAX_SEGMENTS:
        raise ValueError(f"{len(specs)} segments; a result holds at most {MAX_SEGMENTS}.")
    if len(specs) != masks.shape[0]:
        raise ValueError(f"{masks.shape[0]} mask(s) but {len(specs)} segment description(s); give one per mask.")
    overlap = segments_overlap(masks)
    out = Written()
    out_dir.mkdir(parents=True, exist_ok=True)
    if "nifti" in outputs:
        t = time.perf_counter()
        if len(specs) == 1:
            values = masks[0].astype(np.uint8)
        elif not overlap:
            values = label_map(masks)
        else:
            dtype = np.uint8 if len(specs) <= 8 else np.uint16 if len(specs) <= 16 else np.uint32
            values = np.zeros(masks.shape[1:], dtype=dtype)
            for n, m in enumerate(masks):
                values[m] |= dtype(1 << n)
        out.nifti = write_nifti(values, series.geometry, out_dir / f"{name}.nii.gz", dtype=values.dtype)
        if len(specs) > 1:
            sidecar = segments_sidecar(specs, "bitmask" if overlap else "labelmap")
            out.segments_json = out_dir / f"{name}.segments.json"
            out.segments_json.write_text(json.dumps(sidecar, indent=1))
        if save_image:
            out.image_nifti = write_nifti(series.voxels, series.geometry, out_dir / f"{name}.image.nii.gz")
        out.timings["nifti"] = time.perf_counter() - t
    if "seg" in outputs:
        t = time.perf_counter()
        if seg_format is not None:
            form, fallback = resolve_format(seg_format, overlap), False
        else:
            form, fallback = plan_seg(settings, destinations, overlap, refuses_labelmap)
        algorithm = AlgorithmSpec(name=segmenter_name, version=segmenter_version, algorithm_type=algorithm_type)
        common: dict[str, Any] = {"manufacturer": settings.seg.manufacturer, "software_version": __version__,
                                  "series_description": settings.seg.series_description,
                                  "series_number": settings.seg.series_number}
        seg = build_seg(masks, series, specs, algorithm, seg_format=form, **common)
        out.seg = write_seg(seg, out_dir / f"{name}.seg.dcm")
        out.seg_format = form
        out.seg_sop_instance_uid = str(seg.SOPInstanceUID)
        out.seg_series_instance_uid = str(seg.SeriesInstanceUID)
        out.timings["seg"] = time.perf_counter() - t
        if fallback:
            t = time.perf_counter()
            binary = build_seg(masks, series, specs, algorithm, seg_format="binary", **common)
            out.seg_binary = write_seg(binary, out_dir / f"{name}.binary.seg.dcm")
            out.timings["seg_binary"] = time.perf_counter() - t
    return out


def queue_result(outbox: Any, settings: Settings, sop_instance_uid: str, path: Path, destinations: Sequence[str],
                 binary_path: Path | None = None) -> list[int]:
    """Queue a stored result SEG in the outbox for each destination, with its BINARY copy where one is needed.

    Without ``binary_path`` every destination gets ``path``. With it (``path`` is then a Label Map SEG):
    destinations set to ``binary`` or known to refuse label maps get the copy; those set to ``auto`` get
    the label map with the copy as their fallback; those set to ``labelmap`` get the label map.
    """
    if binary_path is None:
        return list(outbox.enqueue(sop_instance_uid, path, list(destinations)))
    kept = outbox.keep_file(binary_path, f"{sop_instance_uid}.binary.seg.dcm")
    ids: list[int] = []
    for name in destinations:
        fmt = destination_format(settings, name)
        if fmt == "binary" or (fmt == "auto" and outbox.refuses_labelmap(name)):
            ids += outbox.enqueue(sop_instance_uid, kept, [name])
        else:
            ids += outbox.enqueue(sop_instance_uid, path, [name], fallback=kept if fmt == "auto" else None)
    return ids


__all__ = [
    "MAX_SEGMENTS",
    "OUTPUTS",
    "Written",
    "check_formats",
    "destination_format",
    "plan_seg",
    "queue_result",
    "segments_sidecar",
    "write_outputs",
]
