"""The ``ainode pull`` subcommand: fetch a series from a DICOMweb archive or an XNAT scan into the store."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from config.settings import Settings

logger = logging.getLogger(__name__)

COMMANDS = ("pull",)
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def add_parsers(sub: argparse._SubParsersAction, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the ``pull`` subcommand."""
    pull = sub.add_parser(
        "pull", help="fetch a series from a configured archive (DICOMweb or XNAT) into the store",
        description=("Fetch a series into the node's durable store. DICOMweb archives: --study and --series "
                     "(WADO-RS, streamed; a series already complete is not fetched again, a partial one is "
                     "completed). XNAT: --session (accession ID or label) and --scan, or --study and --series "
                     "(looked up in the project's session and scan listings)."),
    )
    pull.add_argument("archive", metavar="ARCHIVE", help="a configured destination of kind dicomweb or xnat")
    pull.add_argument("--study", metavar="UID", help="StudyInstanceUID (DICOMweb)")
    pull.add_argument("--series", metavar="UID", help="SeriesInstanceUID (DICOMweb)")
    pull.add_argument("--session", metavar="ID", help="XNAT image session: accession ID or label (XNAT)")
    pull.add_argument("--scan", metavar="ID", help="XNAT scan ID (XNAT)")
    pull.add_argument("--project", metavar="ID", help="XNAT project (default: the archive's project)")
    pull.add_argument("--no-progress", action="store_true", help="no progress bar")
    pull.add_argument("--json", action="store_true", help="print the result as JSON")
    add_common(pull)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``ainode pull``; returns the exit code (0 when the series is complete in the store)."""
    from config.settings import ConfigError
    from node.archives import Origins, destination, pull_dicomweb, pull_xnat, pull_xnat_by_uid
    from node.service import open_store

    try:
        dest = destination(args.archive, settings)
    except ConfigError as exc:
        print(f"ainode pull: {exc}", file=sys.stderr)
        return EXIT_USAGE
    bar = _Bar(enabled=not args.no_progress and sys.stderr.isatty())
    store = open_store(settings)
    origins = Origins.for_settings(settings)
    try:
        if dest.kind == "dicomweb":
            if not (args.study and args.series):
                print("ainode pull: a DICOMweb archive needs --study and --series.", file=sys.stderr)
                return EXIT_USAGE
            r = pull_dicomweb(settings, store, args.archive, args.study, args.series,
                              progress=bar.instances, origins=origins)
            summary: dict[str, Any] = {
                "archive": args.archive, "study": r.study_instance_uid, "series": r.series_instance_uid,
                "expected": r.expected, "stored": r.stored, "already_held": r.duplicates, "bytes": r.bytes,
                "failed": r.failed, "error": r.error, "skipped": r.skipped, "seconds": round(r.seconds, 3),
                "complete": r.complete,
            }
            ok = r.complete
        elif dest.kind == "xnat":
            if args.session and args.scan:
                x = pull_xnat(settings, store, args.archive, args.session, args.scan, progress=bar.bytes,
                              origins=origins, project=args.project)
            elif args.study and args.series:
                x = pull_xnat_by_uid(settings, store, args.archive, args.study, args.series, progress=bar.bytes,
                                     origins=origins, project=args.project)
            else:
                print("ainode pull: an XNAT archive needs --session and --scan (or --study and --series).",
                      file=sys.stderr)
                return EXIT_USAGE
            summary = {
                "archive": args.archive, "session": x.session, "scan": x.scan, "series": x.series_instance_uids,
                "stored": x.stored, "already_held": x.duplicates, "bytes": x.bytes, "failed": x.failed,
                "error": x.error, "seconds": round(x.seconds, 3), "complete": x.complete,
            }
            ok = x.complete
        else:
            print(f"ainode pull: destination '{args.archive}' is a DIMSE peer; pulling needs dicomweb or xnat.",
                  file=sys.stderr)
            return EXIT_USAGE
    except ConfigError as exc:
        print(f"ainode pull: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        bar.close()
        origins.close()
        store.close()
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        what = summary.get("series") if dest.kind == "dicomweb" else f"{summary['session']}/{summary['scan']}"
        state = "complete" if ok else "INCOMPLETE"
        print(f"{args.archive}: {what}: {summary['stored']} stored, {summary['already_held']} already held, "
              f"{len(summary['failed'])} failed in {summary['seconds']} s -> {state}"
              + (f" ({summary['error']})" if summary["error"] else ""))
    return EXIT_OK if ok else EXIT_FAILURE


class _Bar:
    """A tqdm progress bar fed by pull callbacks (instances, or bytes for XNAT zips)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def _ensure(self, unit: str, total: int | None) -> Any:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, unit_scale=unit == "B", file=sys.stderr, leave=False)
        return self.bar

    def instances(self, done: int, total: int | None) -> None:
        if self.enabled:
            bar = self._ensure("inst", total)
            bar.total = total
            bar.n = done
            bar.refresh()

    def bytes(self, done: int) -> None:
        if self.enabled:
            bar = self._ensure("B", None)
            bar.n = done
            bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


__all__ = ["COMMANDS", "add_parsers", "run"]
