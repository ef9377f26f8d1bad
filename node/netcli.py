"""The networking subcommands of ``ainode``: serve, ls, send, echo (and store/outbox helpers for segment)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from config.settings import Settings

if TYPE_CHECKING:
    from dicom_io.scu import Peer

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

COMMANDS = ("serve", "ls", "send", "echo")


def add_parsers(sub: argparse._SubParsersAction, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the ``serve``, ``ls``, ``send`` and ``echo`` subcommands."""
    serve = sub.add_parser(
        "serve", help="run the node: DIMSE listener, HTTP (DICOMweb + REST API), durable store, outbox, series watcher",
        description="Run the node until SIGTERM or SIGINT. Settings come from --config / AINODE_* variables.",
    )
    serve.add_argument("--port", type=int, metavar="N", help="DIMSE port (overrides dimse.port)")
    serve.add_argument("--host", metavar="ADDR", help="DIMSE bind address (overrides dimse.host)")
    serve.add_argument("--ae-title", metavar="AE", help="the node's AE title (overrides dimse.ae_title)")
    add_common(serve)

    ls = sub.add_parser("ls", help="list the studies and series held in the store")
    ls.add_argument("uid", nargs="?", metavar="UID", help="a StudyInstanceUID (its series) or SeriesInstanceUID "
                                                        "(its instances)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.add_argument("--outbox", action="store_true", help="list the outbox instead")
    add_common(ls)

    send = sub.add_parser("send", help="C-STORE DICOM files (or stored series) to a destination")
    send.add_argument("destination", metavar="DESTINATION", help="a configured destination name or AE@host:port")
    send.add_argument("files", nargs="+", metavar="FILE",
                      help="files, directories, or SeriesInstanceUIDs held in the store")
    send.add_argument("--queue", action="store_true",
                      help="queue in the outbox (delivered with retries, by this command and by 'serve')")
    add_common(send)

    echo = sub.add_parser("echo", help="C-ECHO a destination")
    echo.add_argument("destination", metavar="DESTINATION", help="a configured destination name or AE@host:port")
    add_common(echo)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Dispatch one of :data:`COMMANDS`."""
    if args.command == "serve":
        return cmd_serve(args, settings)
    if args.command == "ls":
        return cmd_ls(args, settings)
    if args.command == "send":
        return cmd_send(args, settings)
    if args.command == "echo":
        return cmd_echo(args, settings)
    raise ValueError(f"Command '{args.command}' is not a network command.")


def resolve_peer(name: str, settings: Settings) -> Peer:
    """A configured destination name, or ``AE@host:port``.

    Raises
    ------
    ValueError
        When ``name`` is neither.
    """
    from dicom_io.scu import Peer
    from node.outbox import destination_peer

    if name in settings.destinations:
        return destination_peer(name, settings)
    if "@" in name:
        return Peer.parse(name, calling_ae_title=settings.dimse.ae_title)
    known = ", ".join(sorted(settings.destinations)) or "none configured"
    raise ValueError(f"Destination '{name}' is neither a configured destination ({known}) nor AE@host:port.")


def resolve_series_args(items: Sequence[str], settings: Settings) -> list[Path]:
    """Paths for command-line inputs: existing paths as given, SeriesInstanceUIDs via the store.

    Raises
    ------
    ValueError
        When an item is neither an existing path nor a series held in the store.
    """
    from dicom_io.store import is_valid_uid

    out: list[Path] = []
    store = None
    try:
        for item in items:
            path = Path(item)
            if path.exists() or not is_valid_uid(item):
                out.append(path)
                continue
            if store is None:
                if not settings.store_path.exists():
                    raise ValueError(f"'{item}' is not a file and there is no store at {settings.store_path}.")
                from node.service import open_store

                store = open_store(settings, recover=False)
            paths = store.series_paths(item)
            if not paths:
                raise ValueError(f"'{item}' is neither a file nor a series held in the store {settings.store_path}.")
            out.extend(paths)
    finally:
        if store is not None:
            store.close()
    return out


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import dataclasses

    from config.settings import ConfigError
    from node.errors import NodeError
    from node.service import serve

    overrides = {k: v for k, v in (("port", args.port), ("host", args.host), ("ae_title", args.ae_title))
                 if v is not None}
    if overrides:
        settings = dataclasses.replace(settings, dimse=dataclasses.replace(settings.dimse, **overrides))
    try:
        return serve(settings)
    except (NodeError, ConfigError, OSError) as exc:
        logger.error("Cannot serve: %s", exc)
        return EXIT_FAILURE


def cmd_ls(args: argparse.Namespace, settings: Settings) -> int:
    from node.service import open_outbox, open_store

    if not settings.store_path.exists():
        print(f"ainode ls: no store at {settings.store_path}", file=sys.stderr)
        return EXIT_FAILURE
    store = open_store(settings, recover=False)
    try:
        if args.outbox:
            outbox = open_outbox(settings, None)
            try:
                rows = [e.__dict__ | {"path": str(e.path)} for e in outbox.entries()]
            finally:
                outbox.close()
            if args.json:
                print(json.dumps(rows, indent=1))
            else:
                for r in rows:
                    print(f"{r['state']:9} {r['destination']:12} {r['sop_instance_uid']}  attempts {r['attempts']}"
                          f"  {r['last_error']}")
            return EXIT_OK
        if args.uid and store.get_series(args.uid):
            inst = store.instances(args.uid)
            if args.json:
                print(json.dumps([i.__dict__ | {"path": str(i.path)} for i in inst], indent=1))
            else:
                for i in inst:
                    print(f"{i.instance_number if i.instance_number is not None else '-':>5} {i.sop_instance_uid}  "
                          f"{i.size:>9} B  {i.path}")
            return EXIT_OK
        studies = [st for st in store.studies() if not args.uid or st.study_instance_uid == args.uid]
        if args.uid and not studies:
            print(f"ainode ls: no study or series {args.uid} in the store", file=sys.stderr)
            return EXIT_FAILURE
        tree = [(st, store.series(st.study_instance_uid)) for st in studies]
        if args.json:
            print(json.dumps([st.__dict__ | {"series": [s.__dict__ for s in ser]} for st, ser in tree], indent=1))
            return EXIT_OK
        for st, ser in tree:
            print(f"study  {st.study_instance_uid}  {st.study_date or '-'}  {st.study_description or ''}  "
                  f"({st.num_series} series, {st.num_instances} instances)")
            for s in ser:
                state = "stable" if s.stable_at else "receiving"
                print(f"  series {s.series_instance_uid}  {s.modality or '-':4} #{s.series_number or '-'}  "
                      f"{s.num_instances:5} inst  {s.size / 1e6:8.1f} MB  {state:9}  {s.kind}  "
                      f"{s.series_description or ''}")
        if not tree:
            print("(store is empty)")
        return EXIT_OK
    finally:
        store.close()


def cmd_echo(args: argparse.Namespace, settings: Settings) -> int:
    from dicom_io.scu import echo
    from node import status

    try:
        peer = resolve_peer(args.destination, settings)
    except ValueError as exc:
        print(f"ainode echo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    result = echo(peer)
    if result.ok:
        print(f"C-ECHO {peer}: {status.describe(result.status)} in {result.seconds * 1000:.0f} ms")
        return EXIT_OK
    print(f"C-ECHO {peer}: {result.error or status.describe(result.status)}", file=sys.stderr)
    return EXIT_FAILURE


def cmd_send(args: argparse.Namespace, settings: Settings) -> int:
    from dicom_io.scu import send_instances
    from dicom_io.store import iter_dicom_files
    from node import status

    try:
        peer = resolve_peer(args.destination, settings)
        paths = list(iter_dicom_files(resolve_series_args(args.files, settings)))
    except ValueError as exc:
        print(f"ainode send: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.queue:
        if args.destination not in settings.destinations:
            print("ainode send: --queue needs a configured destination name", file=sys.stderr)
            return EXIT_USAGE
        return deliver_files(paths, [args.destination], settings)
    t0 = time.perf_counter()
    results = send_instances(peer, paths)
    dt = time.perf_counter() - t0
    failed = 0
    for r in results:
        ok = r.ok
        failed += not ok
        text = status.describe(r.status) if r.status is not None else r.error
        print(f"{'ok  ' if ok else 'FAIL'} {text:50} {r.sop_instance_uid or '-'}  {r.source}")
    print(f"{len(results) - failed}/{len(results)} instance(s) stored by {peer} in {dt:.2f} s")
    return EXIT_OK if failed == 0 else EXIT_FAILURE


def deliver_files(paths: Sequence[Path], destinations: Sequence[str], settings: Settings,
                  kind: str = "result", binary: Mapping[Path, Path] | None = None) -> int:
    """Put files into the store, queue them in the outbox for ``destinations`` and try once now.

    ``binary`` maps a Label Map SEG among ``paths`` to its BINARY copy (see :func:`node.results.queue_result`).
    Whatever is not delivered stays queued; ``ainode serve`` retries it with backoff.
    """
    from config.settings import ConfigError
    from node import status
    from node.outbox import DELIVERED, queue_destinations
    from node.results import queue_result
    from node.service import open_outbox, open_store

    try:
        dests = queue_destinations(destinations, settings)
    except ConfigError as exc:
        print(f"ainode: {exc}", file=sys.stderr)
        return EXIT_USAGE
    store = open_store(settings, recover=False)
    outbox = open_outbox(settings, store)
    try:
        ids = []
        for path in paths:
            put = store.put_file(path, kind=kind)
            ids += queue_result(outbox, settings, put.sop_instance_uid, put.path, dests, (binary or {}).get(path))
            for dest in dests:
                e = outbox.entry(put.sop_instance_uid, dest)
                if e is not None and e.state == "pending" and e.id not in ids:
                    ids.append(e.id)
        outbox.deliver_due(only_ids=ids)
        rc = EXIT_OK
        for e in outbox.entries():
            if e.id not in ids:
                continue
            text = status.describe(e.last_status) if e.last_status is not None else (e.last_error or "queued")
            print(f"{e.state:9} -> {e.destination}: {text}  ({e.sop_instance_uid})")
            if e.state != DELIVERED:
                rc = EXIT_FAILURE
        if rc != EXIT_OK:
            print("Undelivered results stay in the outbox; 'ainode serve' retries them.", file=sys.stderr)
        return rc
    finally:
        outbox.close()
        store.close()
