"""Series completion: a watcher that emits ``SeriesStable`` after a quiet period, and auto-routing rules."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from config.settings import Settings
from dicom_io.store import SeriesRecord, Store

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesStable:
    """A received series had no new instance for the quiet period (it is taken to be complete).

    Emitted at least once per quiet period that ends: an instance arriving later makes the series
    unstable again and it is emitted again. The state lives in the store's index, so a restart
    never loses a pending event.
    """

    series_instance_uid: str
    study_instance_uid: str
    modality: str
    num_instances: int
    calling_ae_title: str
    first_received: float
    last_received: float

    @classmethod
    def from_record(cls, r: SeriesRecord) -> SeriesStable:
        return cls(r.series_instance_uid, r.study_instance_uid, r.modality, r.num_instances,
                   r.calling_ae_title, r.first_received, r.last_received)


SeriesCallback = Callable[[SeriesStable], None]


class SeriesWatcher:
    """Polls the store for series that became stable and calls the subscribed callbacks.

    Parameters
    ----------
    store
        The store whose index records each series' last arrival.
    quiet_seconds
        Quiet period after which a series is stable (``store.stable_after_seconds``).
    poll_seconds
        How often to look.
    """

    def __init__(self, store: Store, quiet_seconds: float, poll_seconds: float = 1.0) -> None:
        self.store = store
        self.quiet_seconds = quiet_seconds
        self.poll_seconds = poll_seconds
        self._callbacks: list[SeriesCallback] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def subscribe(self, callback: SeriesCallback) -> None:
        """Call ``callback(event)`` for each stable series (in the watcher's thread)."""
        self._callbacks.append(callback)

    def check(self, now: float | None = None) -> list[SeriesStable]:
        """Emit events for every series stable at ``now``; returns them.

        A series is marked stable after its callbacks ran, so a crash in between emits it again
        on restart (at least once). A callback's exception is logged and does not stop the others.
        """
        events = []
        for record in self.store.unstable_series(self.quiet_seconds, now):
            event = SeriesStable.from_record(record)
            for callback in self._callbacks:
                try:
                    callback(event)
                except Exception:
                    logger.exception("Series-stable callback %r failed for %s", callback, event.series_instance_uid)
            if self.store.mark_stable(record.series_instance_uid, record.last_received):
                logger.info("Series %s stable: %d instance(s), modality %s",
                            event.series_instance_uid, event.num_instances, event.modality or "-")
                events.append(event)
        return events

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="series-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.check(time.time())
            except Exception:
                logger.exception("Series watcher pass failed")


def routing_callback(settings: Settings, store: Store,
                     enqueue: Callable[[str, str, list[str]], object]) -> SeriesCallback:
    """A callback applying ``settings.routes``: matching stable series are queued for their destinations.

    Parameters
    ----------
    enqueue
        ``enqueue(sop_instance_uid, path, destinations)``, e.g. :meth:`node.outbox.Outbox.enqueue`.
    """
    routes = dict(settings.routes)

    def route(event: SeriesStable) -> None:
        for name, rule in routes.items():
            if rule.modality and rule.modality.upper() != event.modality.upper():
                continue
            if rule.calling_ae_title and rule.calling_ae_title != event.calling_ae_title:
                continue
            dests = list(rule.destinations)
            if not dests:
                continue
            instances = store.instances(event.series_instance_uid)
            for inst in instances:
                enqueue(inst.sop_instance_uid, str(inst.path), dests)
            logger.info("Route %s: series %s (%d instance(s)) queued for %s",
                        name, event.series_instance_uid, len(instances), ", ".join(dests))

    return route
