"""XNAT REST client: JSESSION login with CSRF token, scan download as a streamed zip, SEG upload (ROI or import)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from dicom_io.dicomweb import _ssl_context, default_tls_context, spool_dir
from dicom_io.scu import StoreResult
from dicom_io.sources import DEFAULT_MAX_ZIP_BYTES, DEFAULT_MAX_ZIP_MEMBERS, extract_zip, is_dicom_file
from dicom_io.store import KIND_RECEIVED, InstanceInfo, InstanceValidationError, Store, StoreFullError

if TYPE_CHECKING:
    from config.settings import DestinationSettings

logger = logging.getLogger(__name__)

_SUCCESS = 0x0000
_NOT_AUTHORISED = 0x0124
_CANNOT_UNDERSTAND = 0xC000

#: XNAT IDs and labels used in URL paths: letters, digits, ``_``, ``-``, ``.`` (XNAT's own rule is stricter).
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")


class XnatError(RuntimeError):
    """An XNAT request failed; ``status`` is the HTTP status, or None when no response came back."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class XnatSession:
    """An XNAT image session (experiment): its accession ID, label, project and subject."""

    id: str
    label: str = ""
    project: str = ""
    subject: str = ""
    study_instance_uid: str = ""


@dataclass
class XnatPullResult:
    """Outcome of :meth:`XnatClient.pull_scan`."""

    session: str
    scan: str
    stored: int = 0
    duplicates: int = 0
    bytes: int = 0
    skipped_files: int = 0
    series_instance_uids: list[str] = field(default_factory=list)
    study_instance_uids: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    error: str = ""
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return not self.error and not self.failed and self.stored + self.duplicates > 0


def _check_id(kind: str, value: str) -> str:
    if not _SAFE_ID.match(value or ""):
        raise ValueError(f'XNAT {kind} "{value}" is not a valid XNAT identifier.')
    return value


class XnatClient:
    """An XNAT server's REST API (``/data/...`` and ``/xapi/...``).

    Logs in once with HTTP basic credentials (a user's, or an alias token's ``alias``/``secret``)
    at ``POST /data/JSESSION`` and then works with the ``JSESSIONID`` cookie, as XNAT asks of
    scripts (basic auth on every call opens a new server session each time). The CSRF token from
    ``GET /data/JSESSION?CSRF=true`` is sent as ``XNAT_CSRF`` on every state-changing request. An
    expired session (401) is renewed once.

    Parameters
    ----------
    url
        Server root, e.g. ``https://xnat.example.org`` (no ``/data``).
    username, password
        User name and password, or alias token and secret.
    project
        Default project for lookups and imports.
    verify
        True, False, or an :class:`ssl.SSLContext`.
    timeout
        Seconds per request (connect and each read).
    upload
        ``auto`` (ROI collection API, falling back to the import service when the server lacks the
        ROI plugin), ``roi`` or ``import``.
    """

    def __init__(self, url: str, username: str = "", password: str = "", *, project: str = "",
                 verify: Any = True, timeout: float = 60.0, upload: str = "auto", name: str = "",
                 jsessionid: str = "") -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f'XNAT url "{url}" must start with http:// or https://.')
        if upload not in ("auto", "roi", "import"):
            raise ValueError(f'XNAT upload "{upload}" is not supported; use "auto", "roi" or "import".')
        self.url = url.rstrip("/")
        self.project = project
        self.upload = upload
        self.name = name
        self._username = username
        self._password = password
        self._csrf = ""
        self._logged_in = False
        self._roi_available: bool | None = None
        self._jsessionid = jsessionid
        self._http = httpx.Client(verify=default_tls_context() if verify is True else verify,
                                  timeout=httpx.Timeout(timeout), follow_redirects=False)

    @classmethod
    def from_settings(cls, name: str, dest: DestinationSettings) -> XnatClient:
        """The client for a ``kind = "xnat"`` destination.

        Raises
        ------
        ValueError
            When the destination is not an XNAT one or its settings are unusable.
        """
        if dest.kind != "xnat":
            raise ValueError(f'Destination "{name}" has kind "{dest.kind}", not "xnat".')
        if dest.auth not in ("none", "basic", "jsession"):
            raise ValueError(f'XNAT auth "{dest.auth}" is not supported; use "basic" (user or alias token) or '
                             '"jsession" (token = an existing JSESSIONID).')
        return cls(dest.url, dest.username, dest.password.get_secret_value(), project=dest.project,
                   verify=_ssl_context(dest.verify_tls, dest.tls_ca, dest.tls_cert, dest.tls_key),
                   timeout=dest.timeout, upload=dest.xnat_upload, name=name,
                   jsessionid=dest.token.get_secret_value() if dest.auth == "jsession" else "")

    def __repr__(self) -> str:
        return f"XnatClient({self.url!r}, project={self.project!r})"

    def __enter__(self) -> XnatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Log out (``DELETE /data/JSESSION``) and close the connections."""
        if self._logged_in and not self._jsessionid:  # never log out a session we were handed
            try:
                self._http.delete(self.url + "/data/JSESSION", params=self._csrf_params())
            except httpx.HTTPError:
                pass
            self._logged_in = False
        self._http.close()

    # --- session ------------------------------------------------------------------------------

    def login(self) -> None:
        """Open a server session (JSESSIONID cookie) and fetch its CSRF token.

        Raises
        ------
        XnatError
            When the server refuses the credentials (``status`` 401/403) or cannot be reached.
        """
        self._http.cookies.clear()
        if self._jsessionid:
            # A session opened elsewhere (e.g. the XNAT web UI handing its JSESSIONID to the node).
            self._http.cookies.set("JSESSIONID", self._jsessionid)
            self._fetch_csrf()
            self._logged_in = True
            return
        try:
            if self._username:
                rsp = self._http.post(self.url + "/data/JSESSION", auth=httpx.BasicAuth(self._username, self._password))
            else:
                rsp = self._http.post(self.url + "/data/JSESSION")
        except httpx.HTTPError as exc:
            raise XnatError(f"XNAT login at {self.url} failed: {exc}") from exc
        if rsp.status_code != 200:
            raise XnatError(f"XNAT login at {self.url} refused: HTTP {rsp.status_code}.", rsp.status_code)
        if "JSESSIONID" not in self._http.cookies:
            # Some deployments only answer with the session ID in the body.
            session_id = rsp.text.strip()
            if session_id:
                self._http.cookies.set("JSESSIONID", session_id)
        self._fetch_csrf()
        self._logged_in = True
        logger.info("Logged in to XNAT %s", self.url)

    def _fetch_csrf(self) -> None:
        try:
            csrf = self._http.get(self.url + "/data/JSESSION", params={"CSRF": "true"})
        except httpx.HTTPError as exc:
            raise XnatError(f"XNAT CSRF token request failed: {exc}") from exc
        if csrf.status_code >= 500 or csrf.status_code in (401, 403):
            raise XnatError(f"XNAT CSRF token request answered HTTP {csrf.status_code}.", csrf.status_code)
        self._csrf = _parse_csrf(csrf.text) if csrf.status_code == 200 else ""  # older servers: no CSRF

    def _csrf_params(self) -> dict[str, str]:
        return {"XNAT_CSRF": self._csrf} if self._csrf else {}

    def _request(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                 content: Any = None, headers: Mapping[str, str] | None = None) -> httpx.Response:
        if not self._logged_in:
            self.login()
        all_params = dict(params or {})
        if method not in ("GET", "HEAD"):
            all_params.update(self._csrf_params())
        for attempt in (1, 2):
            try:
                rsp = self._http.request(method, self.url + path, params=all_params, content=content,
                                         headers=headers)
            except httpx.HTTPError as exc:
                raise XnatError(f"XNAT {method} {path} failed: {exc}") from exc
            if rsp.status_code == 401 and attempt == 1 and not self._jsessionid:
                logger.info("XNAT session expired; logging in again")
                self.login()
                if method not in ("GET", "HEAD"):
                    all_params.update(self._csrf_params())
                continue
            return rsp
        return rsp

    def _json(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        rsp = self._request("GET", path, params={"format": "json", **(params or {})})
        if rsp.status_code != 200:
            raise XnatError(f"XNAT GET {path} answered HTTP {rsp.status_code}.", rsp.status_code)
        try:
            return rsp.json()
        except ValueError as exc:
            raise XnatError(f"XNAT GET {path}: the answer is not JSON.", rsp.status_code) from exc

    def issue_token(self) -> tuple[str, str]:
        """A new alias token (``GET /data/services/tokens/issue``): (alias, secret).

        Raises
        ------
        XnatError
            When the server refuses.
        """
        data = self._json("/data/services/tokens/issue")
        return str(data["alias"]), str(data["secret"])

    # --- lookups ------------------------------------------------------------------------------

    def get_session(self, session: str, project: str | None = None) -> XnatSession:
        """Find an image session by accession ID (``XNAT_E00001``) or, within ``project``, by label.

        Raises
        ------
        XnatError
            When it does not exist (``status`` 404) or the request fails.
        """
        _check_id("session", session)
        project = project if project is not None else self.project
        rsp = self._request("GET", f"/data/experiments/{quote(session)}", params={"format": "json"})
        if rsp.status_code == 404 and project:
            _check_id("project", project)
            rsp = self._request("GET", f"/data/projects/{quote(project)}/experiments/{quote(session)}",
                                params={"format": "json"})
        if rsp.status_code != 200:
            raise XnatError(f"XNAT session {session} not found (HTTP {rsp.status_code}).", rsp.status_code)
        try:
            fields = rsp.json()["items"][0]["data_fields"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise XnatError(f"XNAT session {session}: unexpected answer.", rsp.status_code) from exc
        return XnatSession(id=str(fields.get("ID", session)), label=str(fields.get("label", "")),
                           project=str(fields.get("project", project or "")),
                           subject=str(fields.get("subject_ID", "")),
                           study_instance_uid=str(fields.get("UID", "")))

    def find_session_by_study_uid(self, study_instance_uid: str, project: str | None = None) -> XnatSession | None:
        """The image session of ``project`` whose UID is the StudyInstanceUID, or None.

        Raises
        ------
        XnatError
            When the listing fails.
        """
        project = project if project is not None else self.project
        _check_id("project", project)
        data = self._json(f"/data/projects/{quote(project)}/experiments",
                          {"columns": "ID,label,subject_ID,UID,xsiType"})
        for row in data.get("ResultSet", {}).get("Result", []):
            if row.get("UID") == study_instance_uid:
                return XnatSession(id=row["ID"], label=row.get("label", ""), project=project,
                                   subject=row.get("subject_ID", ""), study_instance_uid=study_instance_uid)
        return None

    def scans(self, session: str) -> list[dict[str, Any]]:
        """The scans of a session (``GET /data/experiments/{E}/scans``): ID, type, series UID where reported.

        Raises
        ------
        XnatError
            When the session does not exist or the request fails.
        """
        _check_id("session", session)
        data = self._json(f"/data/experiments/{quote(session)}/scans", {"columns": "ID,type,UID,series_description"})
        return list(data.get("ResultSet", {}).get("Result", []))

    # --- pull ---------------------------------------------------------------------------------

    def download_scan(self, session: str, scan: str, dest: Path, *,
                      progress: Callable[[int], None] | None = None) -> Path:
        """Stream a scan's DICOM resource as a zip to ``dest`` (never in memory).

        ``GET /data/experiments/{E}/scans/{S}/resources/DICOM/files?format=zip``.

        Raises
        ------
        XnatError
            When the scan or its DICOM resource does not exist, or the transfer fails.
        """
        _check_id("session", session)
        _check_id("scan", scan)
        if not self._logged_in:
            self.login()
        path = f"/data/experiments/{quote(session)}/scans/{quote(scan)}/resources/DICOM/files"
        for attempt in (1, 2):
            try:
                with self._http.stream("GET", self.url + path, params={"format": "zip"}) as rsp:
                    if rsp.status_code == 401 and attempt == 1:
                        rsp.read()
                        self.login()
                        continue
                    if rsp.status_code != 200:
                        rsp.read()
                        raise XnatError(f"XNAT scan {session}/{scan}: HTTP {rsp.status_code}.", rsp.status_code)
                    done = 0
                    with open(dest, "wb") as fh:
                        for chunk in rsp.iter_bytes():
                            fh.write(chunk)
                            done += len(chunk)
                            if progress:
                                progress(done)
                    return dest
            except httpx.HTTPError as exc:
                raise XnatError(f"XNAT scan download {session}/{scan} failed: {exc}") from exc
        raise XnatError(f"XNAT scan {session}/{scan}: not authorised.", 401)

    def pull_scan(self, store: Store, session: str, scan: str, *, max_zip_bytes: int = DEFAULT_MAX_ZIP_BYTES,
                  max_zip_members: int = DEFAULT_MAX_ZIP_MEMBERS, calling_ae_title: str | None = None,
                  progress: Callable[[int], None] | None = None) -> XnatPullResult:
        """Download a scan and store its DICOM files durably.

        The zip is streamed to a file next to the store, extracted with the zip-bomb and path
        checks of :func:`dicom_io.sources.extract_zip`, and each DICOM file is put into the store
        (non-DICOM members such as XNAT's catalog files are skipped).

        Returns
        -------
        XnatPullResult
            Never raises for the server's failures; see ``error``.
        """
        t0 = time.perf_counter()
        result = XnatPullResult(session, scan)
        origin = self.name if calling_ae_title is None else calling_ae_title
        work = Path(tempfile.mkdtemp(prefix="xnat-", dir=spool_dir(store)))
        try:
            archive = self.download_scan(session, scan, work / "scan.zip", progress=progress)
            files = extract_zip(archive, work / "files", max_zip_bytes=max_zip_bytes,
                                max_zip_members=max_zip_members)
            archive.unlink()
            studies: dict[str, None] = {}
            series: dict[str, None] = {}
            for f in files:
                if not is_dicom_file(f):
                    result.skipped_files += 1
                    continue
                try:
                    put = store.put_file(f, kind=KIND_RECEIVED, calling_ae_title=origin)
                    info = InstanceInfo.from_file(put.path)
                except (InstanceValidationError, StoreFullError, OSError) as exc:
                    result.failed[f.name] = str(exc)
                    continue
                studies[info.study_instance_uid] = None
                series[info.series_instance_uid] = None
                if put.duplicate:
                    result.duplicates += 1
                else:
                    result.stored += 1
                    result.bytes += put.size
            result.study_instance_uids = list(studies)
            result.series_instance_uids = list(series)
        except XnatError as exc:
            result.error = str(exc)
        except Exception as exc:  # unsafe or broken archive
            from dicom_io.errors import UnsafeArchiveError

            if not isinstance(exc, UnsafeArchiveError):
                raise
            result.error = str(exc)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        result.seconds = time.perf_counter() - t0
        logger.info("Pulled XNAT scan %s/%s: %d stored, %d already held, %d failed%s in %.2f s", session, scan,
                    result.stored, result.duplicates, len(result.failed),
                    f" ({result.error})" if result.error else "", result.seconds)
        return result

    # --- push ---------------------------------------------------------------------------------

    def roi_collections_available(self, project: str) -> bool:
        """Whether the server offers the ROI collection API (the XNAT-OHIF viewer plugin).

        Probed once with ``GET /xapi/roi/projects/{p}/permissions/RoiCollection``: 404 means absent.
        """
        if self._roi_available is None:
            try:
                rsp = self._request("GET", f"/xapi/roi/projects/{quote(project)}/permissions/RoiCollection")
                self._roi_available = rsp.status_code != 404
            except XnatError:
                return False
        return bool(self._roi_available)

    def store_seg(self, path: str | os.PathLike[str], session: XnatSession, label: str | None = None) -> StoreResult:
        """Upload a DICOM SEG into ``session``: ROI collection, or the DICOM-zip import service.

        ROI route: ``PUT /xapi/roi/projects/{p}/sessions/{E}/collections/{label}?type=SEG&overwrite=false``
        with the SEG as the body (creates an ``icr:roiCollectionData`` assessor). Import route:
        ``POST /data/services/import?import-handler=DICOM-zip&inbody=true&dest=D``,
        ``D`` = ``/archive/projects/{p}/subjects/{s}/experiments/{E}``,
        with a zip holding the SEG (it becomes a scan of the session).

        Returns
        -------
        StoreResult
            ``status`` 0 when stored (also when the collection already exists: a retry), 0x0124
            when refused for permissions, 0xC000 for other refusals, None when XNAT could not be
            reached or answered 5xx (retry later).
        """
        src = os.fspath(path)
        try:
            info = InstanceInfo.from_file(path)
        except InstanceValidationError as exc:
            return StoreResult(src, "", "", None, f"not sent: {exc}")

        def res(status: int | None, error: str = "") -> StoreResult:
            return StoreResult(src, info.sop_instance_uid, info.sop_class_uid, status, error)

        project = session.project or self.project
        try:
            _check_id("project", project)
            _check_id("session", session.id)
            use_roi = self.upload == "roi" or (self.upload == "auto" and self.roi_collections_available(project))
            if use_roi:
                label = label or "ainode_" + info.sop_instance_uid.replace(".", "_")[-40:]
                _check_id("label", label)
                rsp = self._request(
                    "PUT",
                    f"/xapi/roi/projects/{quote(project)}/sessions/{quote(session.id)}/collections/{quote(label)}",
                    params={"type": "SEG", "overwrite": "false"}, content=Path(path).read_bytes(),
                    headers={"Content-Type": "application/octet-stream"})
                if rsp.status_code == 404 and self.upload == "auto":
                    self._roi_available = False
                    return self.store_seg(path, session, label)
                if rsp.status_code == 409:
                    return res(_SUCCESS, "ROI collection already present")
                return res(*_outcome(rsp, "ROI collection"))
            subject = session.subject or self.get_session(session.id).subject
            _check_id("subject", subject)
            body = _zip_one(Path(path))
            dest = f"/archive/projects/{project}/subjects/{subject}/experiments/{session.id}"
            rsp = self._request("POST", "/data/services/import",
                                params={"import-handler": "DICOM-zip", "inbody": "true", "dest": dest,
                                        "overwrite": "append"},
                                content=body, headers={"Content-Type": "application/zip"})
            return res(*_outcome(rsp, "import service"))
        except ValueError as exc:
            return res(_CANNOT_UNDERSTAND, str(exc))
        except XnatError as exc:
            if exc.status in (401, 403):
                return res(_NOT_AUTHORISED, str(exc))
            if exc.status is not None and exc.status < 500:
                return res(_CANNOT_UNDERSTAND, str(exc))
            return res(None, str(exc))

    def store_instances(self, paths: Sequence[str | os.PathLike[str]],
                        session_for: Callable[[InstanceInfo], XnatSession | None] | None = None) -> list[StoreResult]:
        """Upload result files, each into the session of its study.

        Parameters
        ----------
        paths
            DICOM SEG files.
        session_for
            Maps an instance to its XNAT session (e.g. from where its source was pulled); by
            default the session of ``project`` whose UID is the instance's StudyInstanceUID.

        Returns
        -------
        list of StoreResult
            One per path; see :meth:`store_seg`.
        """
        out = []
        for p in paths:
            try:
                info = InstanceInfo.from_file(p)
            except InstanceValidationError as exc:
                out.append(StoreResult(os.fspath(p), "", "", None, f"not sent: {exc}"))
                continue
            try:
                session = session_for(info) if session_for else None
                if session is None:
                    session = self.find_session_by_study_uid(info.study_instance_uid)
            except XnatError as exc:
                status = None if exc.status is None or exc.status >= 500 else (
                    _NOT_AUTHORISED if exc.status in (401, 403) else _CANNOT_UNDERSTAND)
                out.append(StoreResult(os.fspath(p), info.sop_instance_uid, info.sop_class_uid, status, str(exc)))
                continue
            if session is None:
                out.append(StoreResult(os.fspath(p), info.sop_instance_uid, info.sop_class_uid, _CANNOT_UNDERSTAND,
                                       f"no XNAT session of project {self.project} has study "
                                       f"{info.study_instance_uid}"))
                continue
            out.append(self.store_seg(p, session))
        return out


def _outcome(rsp: httpx.Response, what: str) -> tuple[int | None, str]:
    code = rsp.status_code
    if code in (200, 201):
        return _SUCCESS, ""
    # XNAT's error text is not copied: it may name subjects or sessions (identifiers) and ends up in logs.
    message = f"XNAT {what}: HTTP {code} {rsp.reason_phrase}".strip()
    if code in (401, 403):
        return _NOT_AUTHORISED, message
    if code in (408, 429) or code >= 500:
        return None, message
    return _CANNOT_UNDERSTAND, message


def _parse_csrf(text: str) -> str:
    """The token in XNAT's ``GET /data/JSESSION?CSRF=true`` answer (``…XNAT_CSRF=<token>`` or ``…=<token>``)."""
    text = text.strip()
    if "XNAT_CSRF=" in text:
        return text.split("XNAT_CSRF=", 1)[1].split(";")[0].strip()
    return text.rsplit("=", 1)[1].strip() if "=" in text else ""


def _zip_one(path: Path) -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(path, arcname=path.name if path.suffix else path.name + ".dcm")
    return buf.getvalue()


__all__ = ["XnatClient", "XnatError", "XnatPullResult", "XnatSession"]
