"""The ``ainode serve`` runner: store, DIMSE listener, HTTP (DICOMweb + REST API), outbox, series watcher, retention."""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from config.settings import Settings
from dicom_io.store import Store
from node.app import HttpServer, create_app
from node.errors import StoreBusyError
from node.events import SeriesCallback, SeriesWatcher, routing_callback
from node.outbox import Outbox, OutboxWorker, recover_results
from node.scp import DimseServer

logger = logging.getLogger(__name__)


def open_store(settings: Settings, *, recover: bool = True) -> Store:
    """The store configured in ``settings`` (recovered unless a node is serving it)."""
    return Store.open(settings.store_path, recover=recover,
                      min_free_bytes=int(settings.store.min_free_gb * 1024**3))


def open_outbox(settings: Settings, store: Store | None) -> Outbox:
    """The outbox configured in ``settings`` (``<data_dir>/outbox.sqlite``)."""
    return Outbox(settings.data_path / "outbox.sqlite", settings, store)


class NodeService:
    """Everything ``ainode serve`` runs, startable and stoppable in-process (tests do that).

    Parameters
    ----------
    settings
        Node settings.
    on_series_stable
        Extra callbacks for :class:`~node.events.SeriesStable` events (pre-encoding subscribes itself when HTTP is on).
    """

    def __init__(self, settings: Settings, on_series_stable: tuple[SeriesCallback, ...] = ()) -> None:
        self.settings = settings
        self.extra_callbacks = on_series_stable
        self.store: Store | None = None
        self.outbox: Outbox | None = None
        self.dimse: DimseServer | None = None
        self.watcher: SeriesWatcher | None = None
        self.worker: OutboxWorker | None = None
        self.addresses: list[tuple[str, int]] = []
        self.http: HttpServer | None = None
        self.http_address: tuple[str, int] | None = None
        #: The REST API's shared state (inference queues, sessions); None while HTTP is off.
        self.api: Any = None
        self._stop = threading.Event()
        self._retention: threading.Thread | None = None

    def start(self) -> None:
        """Open and recover the store, then start the listener and the background workers.

        Raises
        ------
        StoreBusyError
            When another node serves the same store.
        config.settings.ConfigError
            When the DIMSE settings are unusable (TLS files).
        OSError
            When the port cannot be bound.
        """
        s = self.settings
        from config.logging import protect_loggers

        protect_loggers()  # no patient identifiers from third-party loggers at any level (docs/security.md)
        store = Store(s.store_path, min_free_bytes=int(s.store.min_free_gb * 1024**3))
        if not store.acquire_owner_lock():
            store.close()
            raise StoreBusyError(f"Store {s.store_path} is already served by another ainode process.")
        self.store = store
        try:
            report = store.recover()
            logger.info("Store %s: %d instance(s) indexed (recovery: %d replayed from the journal, %d partial(s) "
                        "removed, %d re-indexed)", s.store_path, store.count(), report.replayed,
                        report.partials_removed, report.reindexed)
            store.start_journal(s.store.journal_mb * 1024**2)
            store.start_spares(s.store.spare_files)
            self.outbox = open_outbox(s, store)
            self.outbox.release_claims()
            # Crash leftovers: spooled parts of transfers in flight and upload folders (never
            # acknowledged), and API results whose job died with the process (docs/reliability.md).
            _clear_leftovers(store.root / "spool", s.data_path / "uploads")
            recover_results(s.data_path / "results", store, self.outbox)
            self.watcher = SeriesWatcher(store, s.store.stable_after_seconds, s.store.stable_poll_seconds)
            if s.routes:
                self.watcher.subscribe(routing_callback(s, store, self.outbox.enqueue))
            for cb in self.extra_callbacks:
                self.watcher.subscribe(cb)
            self.dimse = DimseServer(s, store)
            self.addresses = self.dimse.start()
            if s.http.port:
                from node.api import api_routes, build_context
                from node.scaleout import inference_pool

                self.api = build_context(s, store, inference_pool(s), outbox=self.outbox)
                if s.litemedsam.preencode:  # embeddings are computed while the series waits to be opened
                    self.watcher.subscribe(self.api.preencoder.on_series_stable)
                app = create_app(s, store, on_stored=self.dimse.listeners,
                                 routes=api_routes(s, store, context=self.api))
                self.http = HttpServer(app, s.http.host, s.http.port, tls_cert=s.http.tls_cert,
                                       tls_key=s.http.tls_key, tls_ca=s.http.tls_ca)
                self.http_address = self.http.start()
            self.worker = OutboxWorker(self.outbox, s.outbox.poll_seconds)
            self.worker.start()
            self.watcher.start()
            if s.store.retention_days or s.store.max_disk_gb:
                self._retention = threading.Thread(target=self._retention_loop, name="retention", daemon=True)
                self._retention.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop accepting, finish background work and close the store (idempotent)."""
        self._stop.set()
        if self.http is not None:
            self.http.stop()
            self.http = None
        if self.api is not None:
            self.api.close()  # stops the inference workers too
            self.api = None
        if self.dimse is not None:
            self.dimse.stop()
            self.dimse = None
        for part in (self.watcher, self.worker):
            if part is not None:
                part.stop()
        self.watcher = self.worker = None
        if self._retention is not None:
            self._retention.join(timeout=5)
            self._retention = None
        if self.outbox is not None:
            self.outbox.close()
            self.outbox = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def apply_retention(self) -> None:
        s = self.settings.store
        if self.store is None:
            return
        self.store.apply_retention(
            max_age_seconds=s.retention_days * 86400 if s.retention_days else None,
            max_bytes=int(s.max_disk_gb * 1024**3) if s.max_disk_gb else None,
        )

    def _retention_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.apply_retention()
            except Exception:
                logger.exception("Retention pass failed")
            self._stop.wait(self.settings.store.retention_interval_seconds)


def _clear_leftovers(*folders: Path) -> None:
    """Empty folders that only hold data of transfers in flight (called while no transfer runs)."""
    import shutil

    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _freeze_long_lived() -> None:
    """Leave everything alive now (torch, the model, the node's modules) out of later garbage collections.

    With a model loaded the process tracks about 400 000 objects, and a full collection walks all of them
    while holding the GIL: about 0.2 s on this machine's CPU, a pause for every request and association
    running at that moment. Objects still reachable after the collection here are frozen (gc.freeze):
    later collections skip them, and they are still freed when their last reference goes.
    """
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    logger.info("%d long-lived objects left out of garbage collection (%.2f s)", gc.get_freeze_count(),
                time.perf_counter() - t0)


def inductor_cache_dir(settings: Settings) -> Path:
    """Where ``ainode serve`` keeps TorchInductor's cache: ``inductor`` in the LiteMedSAM encoder's cache folder
    (``litemedsam.encoder_cache_dir``, else ``encoder-cache`` in the data dir, as ``models.litemedsam`` picks it)."""
    c = settings.litemedsam.encoder_cache_dir
    return (Path(c).expanduser() if c else settings.data_path / "encoder-cache") / "inductor"


def serve(settings: Settings) -> int:
    """Run the node until SIGTERM or SIGINT; returns the process exit code.

    The process-wide switches live here, in the entry point: the background encoder compile, and the
    garbage-collection freezes (after each model load, and before the interpreter's exit).
    """
    from models.encoders import enable_background_compile
    from node import inference

    enable_background_compile()  # a long-running node: `auto` may compile the encoder in the background
    inference.after_model_load = _freeze_long_lived
    # Inductor's cache (process-wide, read from the environment): under the data dir, so restarts are warm
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache_dir(settings)))
    service = NodeService(settings)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("Received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        service.start()
        d = settings.dimse
        logger.info("ainode serving: AE %s on %s; store %s", d.ae_title,
                    ", ".join(f"{h}:{p}" for h, p in service.addresses), settings.store_path)
        if service.api is not None and settings.model.load_at_start:
            # loaded on the model's worker thread; a failure shows in /v1/status and in the first request
            service.api.inference.queue(settings.model.default).warm_up()
            logger.info("loading model %s in the background", settings.model.default)
        if service.http_address:
            scheme = "https" if settings.http.tls_cert else "http"
            logger.info("ainode serving DICOMweb at %s://%s:%d/dicomweb and the REST API at %s://%s:%d/v1",
                        scheme, *service.http_address, scheme, *service.http_address)
        while not stop.wait(0.5):
            pass
    finally:
        t0 = time.perf_counter()
        service.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        logger.info("ainode stopped in %.2f s", time.perf_counter() - t0)
    # Everything is closed. The interpreter's exit collects garbage several times, and each pass walked
    # every object torch and the model had created: about 3 s on two cores between "stopped" and the
    # process's end. Frozen objects are left out of those passes (nothing is skipped: atexit handlers,
    # buffered logs and open files are still finalized).
    gc.freeze()
    from models.encoders import compiling

    if compiling():
        # Everything durable is closed. A compile thread still inside native code would abort the
        # interpreter's shutdown ("terminate called without an active exception"): leave directly.
        logger.info("leaving while the encoder compile is still running (its cache stays partial)")
        logging.shutdown()
        os._exit(0)
    return 0
