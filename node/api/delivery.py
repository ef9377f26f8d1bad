"""Delivery of the API's results: destination choice, the store and the persisted outbox, delivery state."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from config.settings import Settings
from dicom_io.series import Series
from dicom_io.store import Store
from node.api.errors import bad, echo
from node.destinations import lookup
from node.errors import ConfigError
from node.results import queue_result


class Delivery:
    """Where a result goes and how it gets there (``outbox``: the persisted outbox, or ``None``).

    ``origins``: returns the node's origins index (the default destination is where the series came from).
    """

    def __init__(self, settings: Settings, store: Store, outbox: Any | None, origins: Callable[[], Any]) -> None:
        self.settings = settings
        self.store = store
        self.outbox = outbox
        self._origins = origins

    @property
    def origins(self) -> Any:
        return self._origins()

    def destinations_for(self, value: Any, series: Series, where: str = "destinations") -> list[str]:
        """Validated destination names; default: where the series came from (or ``deliver_to``).

        Raises
        ------
        ApiError
            422 naming an unknown destination.
        """
        if value is None:
            from node.archives import result_destinations

            return result_destinations(self.settings, series.series_instance_uid, self.origins, self.store)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad(where, f"a list of destination names is required, got {echo(value)}.")
        out: list[str] = []
        for n, name in enumerate(value):
            if name not in self.settings.destinations:
                known = ", ".join(sorted(self.settings.destinations)) or "none configured"
                raise bad(f"{where}[{n}]", f"destination {echo(name)} is not configured (known: {known}).")
            try:
                lookup(name, self.settings)
            except ConfigError as exc:
                raise bad(f"{where}[{n}]", str(exc)) from exc
            if name not in out:
                out.append(name)
        return out

    def refuses_labelmap(self, destination: str) -> bool:
        """True when ``destination`` is known to refuse Label Map SEGs (remembered by the outbox)."""
        return self.outbox is not None and bool(self.outbox.refuses_labelmap(destination))

    def deliver_blocking(self, seg_path: Path, destinations: Sequence[str],
                         binary_path: Path | None = None) -> dict[str, dict[str, Any]]:
        """Put a SEG into the store and queue it in the persisted outbox for each destination.

        Every result leaves the node this way (C-STORE, STOW-RS, XNAT alike): the outbox row is
        committed before this returns, and ``ainode serve``'s outbox worker delivers it with retries
        and backoff across restarts. Without destinations the node's own store is where the result
        is delivered (its DICOMweb server and viewer show it), so it is marked delivered at once
        (retention may then age it out). An app built without an outbox (embedded, tests) sends
        nothing: each destination is reported ``not queued``.

        ``binary_path``: a BINARY copy of a Label Map SEG ``seg_path`` (see :func:`node.results.plan_seg`);
        it goes to destinations set to ``binary`` or known to refuse label maps, and is the fallback of
        those set to ``auto``.

        Returns
        -------
        dict
            The delivery state per destination (``pending`` or ``not queued``).
        """
        put = self.store.put_file(seg_path, kind="result")
        if not destinations:
            self.store.mark_delivered(put.sop_instance_uid)
            return {}
        if self.outbox is None:
            return {name: {"state": "not queued", "detail": "the node runs without an outbox"}
                    for name in destinations}
        queue_result(self.outbox, self.settings, put.sop_instance_uid, put.path, destinations, binary_path)
        return {name: {"state": "pending"} for name in destinations}

    def delivery_state(self, sop_instance_uid: str | None, destinations: Sequence[str]) -> dict[str, Any]:
        """Current delivery state of a result per destination."""
        out: dict[str, Any] = {}
        if not sop_instance_uid:
            return out
        for name in destinations:
            entry = self.outbox.entry(sop_instance_uid, name) if self.outbox is not None else None
            if entry is None:
                out[name] = {"state": "not queued"}
            else:
                out[name] = {"state": entry.state, "attempts": entry.attempts,
                             "detail": entry.last_error or None}
        return out


__all__ = ["Delivery"]
