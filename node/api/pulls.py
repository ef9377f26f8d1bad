"""Pulls of series from a DICOMweb archive by UID, and their resume markers (docs/reliability.md)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from config.settings import Settings
from dicom_io.store import Store, is_valid_uid
from node.api.errors import ApiError, bad
from node.api.parsing import SeriesRef
from node.errors import ConfigError

logger = logging.getLogger(__name__)


class Pulls:
    """Pulls a series the node lacks from its archive; a marker names a pull until it completes, so a pull
    cut short (crash, archive failure) is resumed by the next request for the series.

    ``origins``: returns the node's origins index (where each series came from).
    """

    def __init__(self, settings: Settings, store: Store, origins: Callable[[], Any]) -> None:
        self.settings = settings
        self.store = store
        self._origins = origins

    @property
    def origins(self) -> Any:
        return self._origins()

    def archive_name(self) -> str:
        """The DICOMweb archive MONAI Label image ids are resolved through.

        Raises
        ------
        ApiError
            503 when no ``dicomweb`` destination is configured.
        """
        if self.settings.api.archive:
            return self.settings.api.archive
        for name, dest in self.settings.destinations.items():
            if dest.kind == "dicomweb":
                return name
        raise ApiError(404, "image: the series is not stored on the node and no DICOMweb archive is configured "
                            "(set api.archive or a [destinations.NAME] with kind = \"dicomweb\").", "image")

    def pull(self, ref: SeriesRef, where: str) -> None:
        from dicom_io.dicomweb import DicomwebError, first_value
        from node.archives import destination, open_dicomweb, pull_dicomweb

        archive = ref.archive or self.archive_name()
        try:
            dest = destination(archive, self.settings)
        except ConfigError as exc:
            raise bad(f"{where}.archive", str(exc)) from exc
        if dest.kind != "dicomweb":
            raise bad(f"{where}.archive", f"destination '{archive}' is of kind '{dest.kind}'; only dicomweb "
                                          "archives can be pulled from by UID.")
        study = ref.study_instance_uid
        t0 = time.perf_counter()
        try:
            if not study:
                with open_dicomweb(archive, self.settings) as client:
                    found = client.search_for_series(search_filters={"SeriesInstanceUID": ref.series_instance_uid},
                                                     fields=["StudyInstanceUID"])
                if not found:
                    raise ApiError(404, f"{where}: series {ref.series_instance_uid} is neither stored on the node "
                                        f"nor found on archive '{archive}'.", where)
                study = str(first_value(found[0], "0020000D") or "")
                if not study:
                    raise ApiError(502, f"{where}: archive '{archive}' found series {ref.series_instance_uid} but "
                                        "did not return its StudyInstanceUID.", where)
            marker = self.marker(ref.series_instance_uid)
            _write_durably(marker, json.dumps({"archive": archive, "study_instance_uid": study}))
            result = pull_dicomweb(self.settings, self.store, archive, study, ref.series_instance_uid,
                                   origins=self.origins)
            if not result.error:
                marker.unlink(missing_ok=True)
        except DicomwebError as exc:
            raise ApiError(502, f"{where}: archive '{archive}' failed: {exc}", where) from exc
        except ConfigError as exc:
            raise bad(f"{where}.archive", str(exc)) from exc
        except ValueError as exc:
            raise bad(where, str(exc)) from exc
        if result.error:  # the series is incomplete: the marker stays, the next request resumes the pull
            raise ApiError(502, f"{where}: pulling series {ref.series_instance_uid} from '{archive}' failed "
                                f"({result.held} instance(s) held, retrying resumes the pull): {result.error}", where)
        if not result.held:
            raise ApiError(404, f"{where}: series {ref.series_instance_uid} was not found on archive '{archive}'.",
                           where)
        logger.info("Pulled series %s from %s for the API in %.2f s", ref.series_instance_uid, archive,
                    time.perf_counter() - t0)

    def marker(self, series_instance_uid: str) -> Path:
        """``<data_dir>/pulls/<series>.json``: present from the start of a pull until it completes."""
        return self.settings.data_path / "pulls" / f"{series_instance_uid}.json"

    def unfinished(self, ref: SeriesRef) -> SeriesRef | None:
        """``ref`` completed with the archive and study of a pull of it that never finished, else None."""
        if not is_valid_uid(ref.series_instance_uid):
            return None
        try:
            data = json.loads(self.marker(ref.series_instance_uid).read_text())
        except (OSError, ValueError):
            return None
        return SeriesRef(ref.series_instance_uid, ref.study_instance_uid or str(data.get("study_instance_uid") or ""),
                         ref.archive or str(data.get("archive") or ""))

    def has_archive(self) -> bool:
        return bool(self.settings.api.archive) or any(
            d.kind == "dicomweb" for d in self.settings.destinations.values())


def _write_durably(path: Path, text: str) -> None:
    """Write ``path`` atomically and fsync it (and its folder) before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)



__all__ = ["Pulls"]
