"""The ``ainode`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config.logging import configure_logging
from config.settings import ConfigError, Settings, iter_fields

if TYPE_CHECKING:
    from dicom_io.geometry import Geometry
    from dicom_io.series import Series
    from models.base import Prompts, Segmenter
    from node.pipeline import SegmentationOutcome

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML settings file (default: $AINODE_CONFIG)")
    p.add_argument("--log-level", metavar="LEVEL", help="override the configured log level")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ainode",
        description="PACS-side AI node: prompt-driven segmentation of DICOM series to NIfTI and DICOM SEG.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    seg = sub.add_parser(
        "segment",
        help="segment a DICOM series from prompts; write NIfTI and DICOM SEG",
        description=(
            "Segment one object in a DICOM series. Prompts use x = column, y = row and k = 0-based slice "
            "index in the series sorted by position along the slice normal (ascending). Millimetre "
            "prompts are DICOM patient coordinates (LPS)."
        ),
    )
    seg.add_argument("series", nargs="+", metavar="SERIES",
                     help="a directory, DICOM files, or a .zip archive holding the series")
    seg.add_argument("--series-uid", metavar="UID", help="which series to use when the input holds several")
    seg.add_argument("--box", action="append", default=[], metavar="x0,y0,x1,y1@k", help="positive box")
    seg.add_argument("--point", action="append", default=[], metavar="x,y@k", help="positive point (click)")
    seg.add_argument("--negative-point", action="append", default=[], metavar="x,y@k",
                     help="point on something to leave out")
    seg.add_argument("--negative-box", action="append", default=[], metavar="x0,y0,x1,y1@k",
                     help="region to leave out on slice k")
    seg.add_argument("--point-mm", action="append", default=[], metavar="X,Y,Z",
                     help="positive point in patient mm (LPS); snapped to the nearest slice")
    seg.add_argument("--negative-point-mm", action="append", default=[], metavar="X,Y,Z")
    seg.add_argument("--box-mm", action="append", default=[], metavar="X0,Y0,Z0,X1,Y1,Z1",
                     help="positive box by two opposite corners in patient mm (LPS), on one slice")
    seg.add_argument("--model", metavar="NAME", help="litemedsam (default) or sam2")
    seg.add_argument("--2d", dest="two_d", action="store_true", help="restrict the result to the prompted slice(s)")
    seg.add_argument("--label", metavar="NAME", help="segment label (default from settings)")
    seg.add_argument("--color", metavar="COLOUR", help="display colour name or #rrggbb")
    seg.add_argument("--category", metavar="SCHEME^VALUE^MEANING", help="segmented property category code")
    seg.add_argument("--type", dest="type_code", metavar="SCHEME^VALUE^MEANING", help="segmented property type code")
    seg.add_argument("--out", required=True, metavar="DIR", help="output directory")
    seg.add_argument("--name", metavar="NAME", help="output base name (default: <SeriesInstanceUID>_<label>)")
    seg.add_argument("--save-image", action="store_true", help="also write the image volume as <name>.image.nii.gz")
    seg.add_argument("--no-nifti", action="store_true", help="do not write the NIfTI mask")
    seg.add_argument("--no-seg", action="store_true", help="do not write the DICOM SEG")
    seg.add_argument("--no-progress", action="store_true", help="no progress bars")
    seg.add_argument("--send", action="append", default=[], metavar="DEST",
                     help="deliver the SEG to this configured destination via the outbox (repeatable; "
                          "default: settings deliver_to)")
    _add_common(seg)

    demo = sub.add_parser(
        "demo",
        help="write a synthetic CT series and segment it end to end with the embedded model",
    )
    demo.add_argument("--out", metavar="DIR", help="output directory (default: <data_dir>/demo)")
    demo.add_argument("--model", metavar="NAME", help="model to use (default from settings)")
    demo.add_argument("--no-progress", action="store_true")
    _add_common(demo)

    cfg = sub.add_parser("config", help="print the effective settings and where each can be set")
    _add_common(cfg)

    sub.add_parser("version", help="print the version")

    from node.netcli import add_parsers as _add_network_parsers

    _add_network_parsers(sub, _add_common)
    from node.pullcli import add_parsers as _add_pull_parsers

    _add_pull_parsers(sub, _add_common)
    from node.scaleout import add_parsers as _add_scaleout_parsers

    _add_scaleout_parsers(sub, _add_common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "version":
        from node import __version__

        print(f"ainode {__version__}")
        return EXIT_OK
    try:
        settings = Settings.load(args.config)
        configure_logging(args.log_level or settings.log_level, settings.log_format)
    except (ConfigError, ValueError) as exc:
        print(f"ainode: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "config":
        return _cmd_config(settings)
    if args.command == "segment":
        return _cmd_segment(args, settings)
    if args.command == "demo":
        return _cmd_demo(args, settings)
    from node import netcli

    if args.command in netcli.COMMANDS:
        return netcli.run(args, settings)
    from node import pullcli

    if args.command in pullcli.COMMANDS:
        return pullcli.run(args, settings)
    if args.command == "scaleout":
        from node.scaleout import run_command

        return run_command(args, settings)
    parser.error(f"unknown command {args.command}")  # pragma: no cover - argparse rejects it first
    return EXIT_USAGE


def _cmd_config(settings: Settings) -> int:
    from collections.abc import Mapping

    for key, env, _default in iter_fields():
        if ".NAME." in key:  # named tables ([destinations.X], [routes.X]) are printed below
            continue
        obj: object = settings
        for part in key.split("."):
            obj = getattr(obj, part)
        print(f"{key:36} {env:40} {obj!r}")
    for name in ("destinations", "routes"):
        tables = getattr(settings, name, {})
        if isinstance(tables, Mapping):
            for table, value in tables.items():
                print(f"[{name}.{table}] {value!r}")
    return EXIT_OK


class _Progress:
    """A tqdm bar driven by ``progress(done, total)`` callbacks."""

    def __init__(self, desc: str, enabled: bool) -> None:
        self.desc, self.enabled = desc, enabled
        self.bar: Any = None  # a tqdm bar, made at the first callback

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="slice", file=sys.stderr, leave=False)
        if total != self.bar.total:
            self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _collect_prompts(args: argparse.Namespace, geometry: Geometry) -> Prompts:
    from models.base import Prompts
    from node.prompts import parse_box, parse_box_mm, parse_point, parse_point_mm

    points = [parse_point(t) for t in args.point]
    points += [parse_point(t, positive=False) for t in args.negative_point]
    points += [parse_point_mm(t, geometry) for t in args.point_mm]
    points += [parse_point_mm(t, geometry, positive=False) for t in args.negative_point_mm]
    boxes = [parse_box(t) for t in args.box]
    boxes += [parse_box(t, positive=False) for t in args.negative_box]
    boxes += [parse_box_mm(t, geometry) for t in args.box_mm]
    return Prompts(points=tuple(points), boxes=tuple(boxes))


def _cmd_segment(args: argparse.Namespace, settings: Settings) -> int:
    from dicom_io.errors import DicomInputError
    from dicom_io.seg import SegmentSpec
    from dicom_io.series import load_series
    from models.base import ModelError, PromptError
    from models.registry import load_segmenter
    from node.netcli import deliver_files, resolve_series_args
    from node.pipeline import run_segmentation

    if not (args.box or args.point or args.point_mm or args.box_mm):
        print("ainode segment: give at least one positive --box, --point, --point-mm or --box-mm.", file=sys.stderr)
        return EXIT_USAGE
    timings: dict[str, float] = {}
    try:
        segment = SegmentSpec(
            label=args.label or settings.seg.label,
            color=args.color or settings.seg.color,
            category=args.category or settings.seg.category,
            type=args.type_code or settings.seg.type,
        )
        segment.validate()
        t = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="ainode-") as work:
            series = load_series(
                resolve_series_args(args.series, settings),
                series_uid=args.series_uid,
                workdir=Path(work),
                spacing_tolerance=settings.input.spacing_tolerance,
                max_zip_bytes=settings.input.max_zip_bytes,
                max_zip_members=settings.input.max_zip_members,
                max_zip_ratio=settings.input.max_zip_ratio,
            )
        timings["load"] = time.perf_counter() - t
        for warning in series.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        prompts = _collect_prompts(args, series.geometry)
        prompts.validate(series.voxels.shape)
        t = time.perf_counter()
        segmenter = load_segmenter(args.model or settings.model.default, settings)
        timings["model_load"] = time.perf_counter() - t
        destinations = list(args.send) or list(settings.deliver_to)
        if not destinations and not args.no_seg:
            destinations = _origin_destinations(settings, series.series_instance_uid)
        bar = _Progress(f"{segmenter.name} {'2D' if args.two_d else '3D'}", not args.no_progress)
        try:
            outcome = run_segmentation(
                series, prompts, segmenter, settings,
                out_dir=Path(args.out), name=args.name, mode="2d" if args.two_d else "3d",
                segment=segment, write_nifti_mask=not args.no_nifti, write_dicom_seg=not args.no_seg,
                save_image=args.save_image, progress=bar, destinations=destinations,
            )
        finally:
            bar.close()
    except (DicomInputError, PromptError, ValueError) as exc:
        print(f"ainode segment: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ModelError as exc:
        print(f"ainode segment: model error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    timings.update(outcome.timings)
    _report(series, segmenter, outcome, timings)
    if destinations and outcome.seg_path:
        binary = {outcome.seg_path: outcome.seg_binary_path} if outcome.seg_binary_path else None
        return deliver_files([outcome.seg_path], destinations, settings, binary=binary)
    return EXIT_OK


def _origin_destinations(settings: Settings, series_instance_uid: str) -> list[str]:
    """Unless configured otherwise, a result goes back to the archive the series came from."""
    from node.archives import Origins, result_destinations
    from node.service import open_store

    known = settings.data_path / "origins.sqlite"
    origins = Origins(known) if known.exists() else None
    store = open_store(settings, recover=False) if settings.store_path.exists() else None
    try:
        return result_destinations(settings, series_instance_uid, origins, store)
    finally:
        if origins is not None:
            origins.close()
        if store is not None:
            store.close()


def _report(s: Series, m: Segmenter, o: SegmentationOutcome, timings: dict[str, float]) -> None:
    shape = s.voxels.shape
    sp = s.geometry.spacing
    print(f"series      {s.series_instance_uid} ({s.modality}, {shape[0]} slices of {shape[1]}x{shape[2]}, "
          f"{sp[0]:.3g}x{sp[1]:.3g}x{sp[2]:.3g} mm)")
    print(f"model       {m.name} {m.version} on {m.device}")
    slices = o.slices
    span = f"slices {slices[0]}..{slices[-1]} ({len(slices)})" if slices else "no slice"
    print(f"voxels      {o.voxel_count}   volume {o.volume_ml:.2f} mL   {span}")
    if o.nifti_path:
        print(f"nifti       {o.nifti_path}")
    if o.image_nifti_path:
        print(f"image       {o.image_nifti_path}")
    if o.seg_path:
        print(f"seg         {o.seg_path}  (SOP Instance {o.seg_sop_instance_uid})")
    print("time        " + "  ".join(f"{k} {v:.2f}s" for k, v in timings.items()))


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    import numpy as np

    from dicom_io.phantom import write_phantom_series
    from dicom_io.series import load_series
    from models.base import ModelError, PointPrompt, Prompts
    from models.registry import load_segmenter
    from node.pipeline import run_segmentation

    out = Path(args.out) if args.out else settings.data_path / "demo"
    sample_dir = out / "sample-ct"
    print(f"Writing a synthetic CT series (40 slices, 256x256, a 'lesion' in the left lung) to {sample_dir}")
    phantom = write_phantom_series(sample_dir, shape=(40, 256, 256), spacing=(1.2, 1.2, 2.5))
    t = time.perf_counter()
    series = load_series([sample_dir])
    load_time = time.perf_counter() - t
    # A user's click: the centre of the lesion on its largest slice.
    areas = phantom.mask.sum(axis=(1, 2))
    k = int(np.argmax(areas))
    ys, xs = np.nonzero(phantom.mask[k])
    click = PointPrompt(float(np.round(xs.mean())), float(np.round(ys.mean())), k)
    print(f"Prompt: one click at x={click.x:g}, y={click.y:g} on slice {k} (as a viewer would send)")
    try:
        t = time.perf_counter()
        segmenter = load_segmenter(args.model or settings.model.default, settings)
        model_time = time.perf_counter() - t
        bar = _Progress(f"{segmenter.name} 3D", not args.no_progress)
        try:
            outcome = run_segmentation(
                series, Prompts(points=(click,)), segmenter, settings,
                out_dir=out / "results", name="demo-lesion", save_image=True, progress=bar,
            )
        finally:
            bar.close()
    except ModelError as exc:
        print(f"ainode demo: model error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    truth = phantom.mask
    dice = 2 * float((outcome.mask & truth).sum()) / max(1.0, float(outcome.mask.sum() + truth.sum()))
    _report(series, segmenter, outcome, {"load": load_time, "model_load": model_time, **outcome.timings})
    print(f"dice        {dice:.3f} against the phantom's ground truth")
    print(f"\nDone. NIfTI: {outcome.nifti_path}\n      SEG:   {outcome.seg_path}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
