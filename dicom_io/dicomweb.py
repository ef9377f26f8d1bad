"""DICOMweb client (PS3.18): QIDO-RS search, streamed WADO-RS retrieval into the store, STOW-RS store."""

from __future__ import annotations

import errno
import http.client
import logging
import os
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from dicom_io.multipart import (
    MultipartError,
    MultipartParser,
    SpooledPart,
    encode_files,
    new_boundary,
    parse_content_type,
)
from dicom_io.scu import StoreResult
from dicom_io.store import (
    KIND_RECEIVED,
    InstanceInfo,
    InstanceValidationError,
    PutResult,
    StagedInstance,
    Store,
    StoreFullError,
    check_encoding,
    read_file_meta,
)

if TYPE_CHECKING:
    from config.settings import DestinationSettings

logger = logging.getLogger(__name__)

#: WADO-RS Accept header asking for the instances in their stored transfer syntax (PS3.18 8.7.3.5.2).
ACCEPT_DICOM_ANY_TS = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ACCEPT_JSON = "application/dicom+json, application/json"

# DIMSE-style status codes used for STOW-RS outcomes (PS3.18 10.5.3 uses the PS3.4 codes as FailureReason).
_SUCCESS = 0x0000
_NOT_AUTHORISED = 0x0124
_PROCESSING_FAILURE = 0x0110
_CANNOT_UNDERSTAND = 0xC000

# Tags of the Store Instances Response Module (PS3.18 10.5.3.1).
_TAG_RETRIEVE_URL = "00081190"
_TAG_FAILED = "00081198"
_TAG_REFERENCED = "00081199"
_TAG_OTHER_FAILURES = "0008119A"
_TAG_FAILURE_REASON = "00081197"
_TAG_WARNING_REASON = "00081196"
_TAG_SOP_CLASS = "00081150"
_TAG_SOP_INSTANCE = "00081155"

#: Largest body of one STOW-RS request; more instances are split over several requests.
STOW_MAX_BYTES = 256 * 1024 * 1024
#: Parts larger than this are spilled to disk while they arrive.
SPOOL_BYTES = 8 * 1024 * 1024


class DicomwebError(RuntimeError):
    """A QIDO-RS or WADO-RS request failed (peer unreachable, refused, or answered nonsense).

    ``status`` is the HTTP status, or None when no response was received.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class PullResult:
    """Outcome of :meth:`DicomwebClient.pull_series`.

    ``expected`` is the archive's instance count (QIDO), or None when it could not be asked;
    ``stored`` counts newly stored instances, ``duplicates`` those already held, ``failed`` maps a
    SOP Instance UID (or a part number) to the reason it was not stored. ``error`` is set when the
    transfer itself failed; ``skipped`` when the series was already complete.
    """

    study_instance_uid: str
    series_instance_uid: str
    expected: int | None = None
    stored: int = 0
    duplicates: int = 0
    bytes: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    error: str = ""
    skipped: bool = False
    seconds: float = 0.0

    @property
    def held(self) -> int:
        return self.stored + self.duplicates

    @property
    def complete(self) -> bool:
        """True when nothing failed and the store holds as many instances as the archive announced."""
        return not self.error and not self.failed and (self.expected is None or self.held >= self.expected)


_default_tls: ssl.SSLContext | None = None
_default_tls_lock = threading.Lock()


def default_tls_context() -> ssl.SSLContext:
    """httpx's default verifying TLS context (certifi's CAs, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``), built once.

    Building it reads the whole CA bundle: 15-25 ms on this machine, which every new client paid (a pull,
    a STOW-RS delivery), https or not. Clients share this one; a context is safe to share between threads.
    """
    global _default_tls
    with _default_tls_lock:
        if _default_tls is None:
            _default_tls = httpx.create_ssl_context()
        return _default_tls


def _ssl_context(verify: bool, ca: str = "", cert: str = "", key: str = "") -> ssl.SSLContext | bool:
    if not verify:
        return False
    if not (ca or cert):
        return True
    ctx = ssl.create_default_context(cafile=ca or None)
    if cert:
        ctx.load_cert_chain(cert, key or None)
    return ctx


class _BearerAuth(httpx.Auth):
    def __init__(self, token: str) -> None:
        self._token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request

    def __repr__(self) -> str:
        return "_BearerAuth('**********')"


def make_auth(kind: str, username: str = "", password: str = "", token: str = "") -> httpx.Auth | None:
    """An httpx auth for ``none``, ``basic`` or ``bearer``.

    Raises
    ------
    ValueError
        When ``kind`` is not one of those, or its credentials are missing.
    """
    kind = (kind or "none").lower()
    if kind == "none":
        return None
    if kind == "basic":
        if not username:
            raise ValueError("auth 'basic' needs a username.")
        return httpx.BasicAuth(username, password)
    if kind == "bearer":
        if not token:
            raise ValueError("auth 'bearer' needs a token.")
        return _BearerAuth(token)
    raise ValueError(f'auth "{kind}" is not supported; use "none", "basic" or "bearer".')


#: Bytes per socket read while streaming (httpcore's default is 64 KB; 1 MB reads roughly halve the
#: Python overhead of a multi-hundred-MB WADO-RS answer).
READ_BYTES = 1024 * 1024


def _large_reads() -> None:
    """Raise httpcore's per-read size (a class attribute of its HTTP/1.1 connection; pinned httpcore 1.0)."""
    try:
        from httpcore._sync import http11

        if int(getattr(http11.HTTP11Connection, "READ_NUM_BYTES", READ_BYTES)) < READ_BYTES:
            http11.HTTP11Connection.READ_NUM_BYTES = READ_BYTES
    except (ImportError, AttributeError, TypeError):  # another httpcore: keep its default
        pass


def _join(base: str, prefix: str) -> str:
    base = base.rstrip("/")
    prefix = prefix.strip("/")
    return f"{base}/{prefix}" if prefix else base


class DicomwebClient:
    """A DICOMweb archive (Orthanc's DICOMweb plugin, dcm4chee-arc, cloud archives).

    Methods are named after the PS3.18 transactions, as in ``dicomweb-client``. Peer outcomes of
    :meth:`store_instances` and :meth:`pull_series` are returned values; the search and metadata
    calls raise :class:`DicomwebError`.

    Parameters
    ----------
    url
        Base URL, e.g. ``http://127.0.0.1:8042/dicom-web``.
    qido_prefix, wado_prefix, stow_prefix
        Paths appended to ``url`` for each service (empty = ``url`` itself).
    auth
        An :class:`httpx.Auth` (see :func:`make_auth`) or None.
    verify
        True, False, or an :class:`ssl.SSLContext`.
    timeout
        Seconds for connecting and for each read.
    concurrency
        Parallel requests/storage workers used by :meth:`pull_series`.
    name
        The archive's configured name (recorded as the origin of pulled instances).
    headers
        Extra HTTP headers sent with every request.
    spool_bytes
        Retrieved instances larger than this are written to a spool file while they arrive.
    """

    def __init__(
        self,
        url: str,
        *,
        qido_prefix: str = "",
        wado_prefix: str = "",
        stow_prefix: str = "",
        auth: httpx.Auth | None = None,
        verify: ssl.SSLContext | bool = True,
        timeout: float = 30.0,
        concurrency: int = 4,
        name: str = "",
        headers: Mapping[str, str] | None = None,
        spool_bytes: int = SPOOL_BYTES,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f'DICOMweb url "{url}" must start with http:// or https://.')
        self.url = url.rstrip("/")
        self.qido_url = _join(url, qido_prefix)
        self.wado_url = _join(url, wado_prefix)
        self.stow_url = _join(url, stow_prefix)
        self.name = name
        self.spool_bytes = spool_bytes
        self.concurrency = max(1, int(concurrency))
        limits = httpx.Limits(max_connections=self.concurrency + 2, max_keepalive_connections=self.concurrency + 2)
        _large_reads()
        if verify is True:
            verify = default_tls_context()
        self._auth = auth
        self._verify = verify
        self._timeout = timeout
        self._http = httpx.Client(auth=auth, verify=verify, timeout=httpx.Timeout(timeout),
                                  limits=limits, headers=dict(headers or {}), follow_redirects=False)

    @classmethod
    def from_settings(cls, name: str, dest: DestinationSettings) -> DicomwebClient:
        """The client for a ``kind = "dicomweb"`` destination.

        Raises
        ------
        ValueError
            When the destination is not a DICOMweb one or its URL/auth settings are unusable.
        """
        if dest.kind != "dicomweb":
            raise ValueError(f'Destination "{name}" has kind "{dest.kind}", not "dicomweb".')
        auth = make_auth(dest.auth, dest.username, dest.password.get_secret_value(), dest.token.get_secret_value())
        verify = _ssl_context(dest.verify_tls, dest.tls_ca, dest.tls_cert, dest.tls_key)
        return cls(dest.url, qido_prefix=dest.qido_prefix, wado_prefix=dest.wado_prefix,
                   stow_prefix=dest.stow_prefix, auth=auth, verify=verify, timeout=dest.timeout,
                   concurrency=dest.concurrency, name=name)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DicomwebClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DicomwebClient({self.url!r})"

    # --- QIDO-RS (PS3.18 10.6) ----------------------------------------------------------------

    def _search(self, path: str, search_filters: Mapping[str, str | Sequence[str]] | None, fields: Sequence[str],
                limit: int | None, offset: int | None) -> list[dict[str, Any]]:
        params: list[tuple[str, str | int | float | bool | None]] = []
        for key, value in (search_filters or {}).items():
            params.append((key, value if isinstance(value, str) else ",".join(value)))
        # Repeat includefield rather than comma-joining: Orthanc's plugin 1.7 ignores the joined form.
        params += [("includefield", f) for f in fields]
        if limit is not None:
            params.append(("limit", str(limit)))
        if offset:
            params.append(("offset", str(offset)))
        url = self.qido_url + path
        try:
            rsp = self._http.get(url, params=params, headers={"Accept": ACCEPT_JSON})
        except httpx.HTTPError as exc:
            raise DicomwebError(f"QIDO-RS {path} to {self.qido_url} failed: {exc}") from exc
        if rsp.status_code == 204:
            return []
        if rsp.status_code != 200:
            raise DicomwebError(f"QIDO-RS {path} to {self.qido_url} answered HTTP {rsp.status_code}.",
                                rsp.status_code)
        try:
            data = rsp.json() if rsp.content else []
        except ValueError as exc:
            raise DicomwebError(f"QIDO-RS {path}: the answer is not JSON.", rsp.status_code) from exc
        if not isinstance(data, list):
            raise DicomwebError(f"QIDO-RS {path}: the answer is not a JSON array.", rsp.status_code)
        return data

    def search_for_studies(self, search_filters: Mapping[str, str | Sequence[str]] | None = None,
                           fields: Sequence[str] = (), limit: int | None = None,
                           offset: int | None = None) -> list[dict[str, Any]]:
        """QIDO-RS ``GET {qido}/studies`` (PS3.18 10.6.1); DICOM JSON objects.

        Raises
        ------
        DicomwebError
            When the request fails or the answer is not a JSON array.
        """
        return self._search("/studies", search_filters, fields, limit, offset)

    def search_for_series(self, study_instance_uid: str | None = None,
                          search_filters: Mapping[str, str | Sequence[str]] | None = None,
                          fields: Sequence[str] = (), limit: int | None = None,
                          offset: int | None = None) -> list[dict[str, Any]]:
        """QIDO-RS ``GET {qido}[/studies/{study}]/series``.

        Raises
        ------
        DicomwebError
            When the request fails or the answer is not a JSON array.
        """
        path = f"/studies/{study_instance_uid}/series" if study_instance_uid else "/series"
        return self._search(path, search_filters, fields, limit, offset)

    def search_for_instances(self, study_instance_uid: str | None = None, series_instance_uid: str | None = None,
                             search_filters: Mapping[str, str | Sequence[str]] | None = None,
                             fields: Sequence[str] = (), limit: int | None = None,
                             offset: int | None = None) -> list[dict[str, Any]]:
        """QIDO-RS ``GET {qido}[/studies/{study}[/series/{series}]]/instances``.

        Raises
        ------
        DicomwebError
            When the request fails or the answer is not a JSON array.
        """
        if series_instance_uid and not study_instance_uid:
            raise ValueError("search_for_instances: series_instance_uid needs study_instance_uid.")
        path = "/instances"
        if study_instance_uid:
            path = f"/studies/{study_instance_uid}" + (f"/series/{series_instance_uid}" if series_instance_uid
                                                        else "") + path
        return self._search(path, search_filters, fields, limit, offset)

    def series_instance_uids(self, study_instance_uid: str, series_instance_uid: str,
                             page: int = 1000) -> list[str]:
        """SOP Instance UIDs of a series in the archive (paged QIDO-RS instance search).

        Raises
        ------
        DicomwebError
            When the search fails.
        """
        uids: list[str] = []
        offset = 0
        while True:
            batch = self.search_for_instances(study_instance_uid, series_instance_uid, fields=("00080018",),
                                              limit=page, offset=offset)
            uids += [u for u in (_first(item, "00080018") for item in batch) if u]
            if len(batch) < page:
                return list(dict.fromkeys(uids))
            offset += len(batch)

    # --- WADO-RS (PS3.18 10.4) ----------------------------------------------------------------

    def retrieve_series_metadata(self, study_instance_uid: str, series_instance_uid: str) -> list[dict[str, Any]]:
        """WADO-RS ``GET {wado}/studies/{study}/series/{series}/metadata``.

        Raises
        ------
        DicomwebError
            When the request fails or the answer is not a JSON array.
        """
        url = f"{self.wado_url}/studies/{study_instance_uid}/series/{series_instance_uid}/metadata"
        try:
            rsp = self._http.get(url, headers={"Accept": ACCEPT_JSON})
        except httpx.HTTPError as exc:
            raise DicomwebError(f"WADO-RS metadata from {self.wado_url} failed: {exc}") from exc
        if rsp.status_code != 200:
            raise DicomwebError(f"WADO-RS metadata answered HTTP {rsp.status_code}.", rsp.status_code)
        data = rsp.json()
        if not isinstance(data, list):
            raise DicomwebError("WADO-RS metadata: the answer is not a JSON array.", rsp.status_code)
        return data

    def iter_retrieve(self, path: str, on_part: Callable[[SpooledPart], None], *,
                      spool_dir: Path | None = None, direct: bool = False) -> int:
        """Stream a WADO-RS ``multipart/related; type="application/dicom"`` answer part by part.

        Parameters
        ----------
        path
            Path below the WADO-RS root, e.g. ``/studies/{study}/series/{series}``.
        on_part
            Called with each complete part as it arrives (it owns the part).
        spool_dir
            Folder where large parts spill.
        direct
            Read the body with the standard library's HTTP client straight into the parser's buffers
            (:meth:`_stream_direct`), on a connection of its own; used for whole series. The request is
            the same: same headers, authentication and TLS settings. Falls back to httpx when a proxy
            applies to the URL or the authentication is not a plain header.

        Returns
        -------
        int
            Number of parts received.

        Raises
        ------
        DicomwebError
            When the request fails, the answer is not multipart, or the body is truncated.
        """
        url = self.wado_url + path
        try:
            if direct and self._direct_ok(url):
                return self._stream_direct(url, path, on_part, spool_dir)
            with self._http.stream("GET", url, headers={"Accept": ACCEPT_DICOM_ANY_TS}) as rsp:
                if rsp.status_code != 200:
                    rsp.read()
                    raise DicomwebError(f"WADO-RS {path} answered HTTP {rsp.status_code}.", rsp.status_code)
                return self._split(path, rsp.headers.get("content-type", ""), rsp.iter_bytes(), rsp.status_code,
                                   on_part, spool_dir)
        except httpx.HTTPError as exc:
            raise DicomwebError(f"WADO-RS {path} from {self.wado_url} failed: {exc}") from exc
        except MultipartError as exc:
            raise DicomwebError(f"WADO-RS {path}: {exc}") from exc

    def _split(self, path: str, content_type: str, chunks: Iterable[bytes | bytearray], status: int,
               on_part: Callable[[SpooledPart], None], spool_dir: Path | None) -> int:
        """Split a WADO-RS body (``chunks``) into parts for ``on_part``; the number of parts."""
        media, params = parse_content_type(content_type)
        if media == "application/dicom":
            part = SpooledPart({"content-type": media}, spool_dir, self.spool_bytes)
            for chunk in chunks:
                part.write(chunk if isinstance(chunk, bytes) else bytes(chunk))
            part.finish()
            on_part(part)
            return 1
        if media != "multipart/related" or not params.get("boundary"):
            raise DicomwebError(f"WADO-RS {path}: answer is '{media}', not multipart/related.", status)
        parser = MultipartParser(params["boundary"], on_part, spool_dir=spool_dir, max_memory=self.spool_bytes)
        try:
            for chunk in chunks:
                parser.feed(chunk)
            parser.close()
        except BaseException:
            parser.abort()
            raise
        return parser.parts

    def _direct_ok(self, url: str) -> bool:
        """True when :meth:`_stream_direct` sends exactly what httpx would: no proxy for ``url`` (httpx
        honours the proxy environment variables) and no authentication or a one-step header one."""
        if self._auth is not None and not isinstance(self._auth, (httpx.BasicAuth, _BearerAuth)):
            return False
        parts = urllib.parse.urlsplit(url)
        proxies = urllib.request.getproxies_environment()
        # proxy_bypass_environment: the stdlib's NO_PROXY matcher (what getproxies_environment pairs with),
        # undocumented and so absent from typeshed
        bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
        if (parts.scheme in proxies or "all" in proxies) and not bypass(parts.hostname or "", proxies):
            return False
        return True

    def _stream_direct(self, url: str, path: str, on_part: Callable[[SpooledPart], None],
                       spool_dir: Path | None) -> int:
        """GET ``url`` with ``http.client`` and read its body into fresh 1 MB buffers that the multipart
        parser hands on without copying.

        httpx (h11) copies each read into its receive buffer and out again; on two cores that is ~35 ms
        of CPU per 158 MB series (measured by hand: 0.054 against 0.017 CPU-seconds for the same body),
        and CPU is what a pull is short of. Headers (the client's own, Accept, authentication) come from
        httpx's request builder, so both paths send the same request; compression is refused
        (``Accept-Encoding: identity``), as WADO-RS bodies are not worth compressing.
        """
        request = self._http.build_request("GET", url, headers={"Accept": ACCEPT_DICOM_ANY_TS,
                                                                "Accept-Encoding": "identity"})
        if self._auth is not None:
            request = next(self._auth.sync_auth_flow(request))  # basic / bearer: one step, a header
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(host, parts.port or 443, timeout=self._timeout,
                                               context=self._direct_tls())
        else:
            conn = http.client.HTTPConnection(host, parts.port or 80, timeout=self._timeout)

        def failed(exc: BaseException) -> DicomwebError:
            return DicomwebError(f"WADO-RS {path} from {self.wado_url} failed: {exc or type(exc).__name__}")

        try:
            # Network errors become DicomwebError here; errors of the parts' consumer pass unchanged.
            try:
                conn.putrequest("GET", urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")),
                                skip_host=True, skip_accept_encoding=True)
                for name, value in request.headers.multi_items():
                    conn.putheader(name, value)
                conn.endheaders()
                if conn.sock is not None:
                    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                rsp = conn.getresponse()
                if rsp.status != 200:
                    rsp.read()
            except (OSError, http.client.HTTPException) as exc:
                raise failed(exc) from exc
            if rsp.status != 200:
                raise DicomwebError(f"WADO-RS {path} answered HTTP {rsp.status}.", rsp.status)
            encoding = (rsp.getheader("content-encoding") or "identity").strip().lower()
            if encoding != "identity":
                raise DicomwebError(f"WADO-RS {path}: answered with Content-Encoding '{encoding}' although "
                                    "'identity' was asked for.", rsp.status)

            def chunks() -> Iterator[bytearray]:
                while True:
                    buf = bytearray(READ_BYTES)  # fresh each time: the parts keep slices of it
                    try:
                        n = rsp.readinto(buf)
                    except (OSError, http.client.HTTPException) as exc:  # e.g. IncompleteRead: cut short
                        raise failed(exc) from exc
                    if not n:
                        return
                    if n < len(buf):
                        del buf[n:]
                    yield buf

            return self._split(path, rsp.getheader("content-type") or "", chunks(), rsp.status, on_part, spool_dir)
        finally:
            conn.close()

    def _direct_tls(self) -> ssl.SSLContext:
        if isinstance(self._verify, ssl.SSLContext):
            return self._verify
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verify = False, as the httpx client
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def retrieve_series(self, study_instance_uid: str, series_instance_uid: str,
                        on_part: Callable[[SpooledPart], None], *, spool_dir: Path | None = None) -> int:
        """WADO-RS Retrieve Series, streamed: ``on_part`` gets each instance as it arrives.

        Raises
        ------
        DicomwebError
            See :meth:`iter_retrieve`.
        """
        return self.iter_retrieve(f"/studies/{study_instance_uid}/series/{series_instance_uid}", on_part,
                                  spool_dir=spool_dir, direct=True)

    def retrieve_instance(self, study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str,
                          on_part: Callable[[SpooledPart], None], *, spool_dir: Path | None = None) -> int:
        """WADO-RS Retrieve Instance, streamed.

        Raises
        ------
        DicomwebError
            See :meth:`iter_retrieve`.
        """
        return self.iter_retrieve(
            f"/studies/{study_instance_uid}/series/{series_instance_uid}/instances/{sop_instance_uid}",
            on_part, spool_dir=spool_dir)

    # --- pull into the store ------------------------------------------------------------------

    def pull_series(
        self,
        store: Store,
        study_instance_uid: str,
        series_instance_uid: str,
        *,
        progress: Callable[[int, int | None], None] | None = None,
        calling_ae_title: str | None = None,
    ) -> PullResult:
        """Fetch a series into the durable store; idempotent and resumable.

        When the store holds part of the series, the archive's instance list (QIDO-RS) decides: a
        series held completely is not fetched again; a partially held one is completed instance by
        instance (in parallel). Otherwise the whole series is streamed with one WADO-RS request,
        each instance checked and written as a temp file as soon as its part has arrived, while a
        series-level QIDO-RS search gets the instance count the result is checked against; at the end
        the batch is made durable, renamed and indexed at once (nothing is reported stored before).

        Parameters
        ----------
        store
            The node's store.
        study_instance_uid, series_instance_uid
            The series to fetch.
        progress
            Called as ``progress(instances_held, expected_or_None)`` after each instance.
        calling_ae_title
            Origin recorded in the index (default: this archive's name).

        Returns
        -------
        PullResult
            Never raises for the archive's failures; see ``error`` and ``failed``.
        """
        t0 = time.perf_counter()
        result = PullResult(study_instance_uid, series_instance_uid)
        for uid in (study_instance_uid, series_instance_uid):
            if not _valid_uid(uid):
                raise ValueError(f'UID "{uid}" is not a valid UID.')
        origin = self.name if calling_ae_title is None else calling_ae_title
        held = {r.sop_instance_uid for r in store.instances(series_instance_uid)}
        if not held:
            # Nothing held: only the archive's instance count is needed (to check the result), and
            # the cheap series-level search runs while the series streams in.
            listing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qido")
            count = listing.submit(self._series_count, study_instance_uid, series_instance_uid)
            listing.shutdown(wait=False)
            expected: list[str] = []
        else:
            # Something held: the instance list decides what (if anything) to fetch.
            try:
                expected = self.series_instance_uids(study_instance_uid, series_instance_uid)
                result.expected = len(expected)
            except DicomwebError as exc:
                logger.warning("QIDO-RS instance list of series %s unavailable (%s)", series_instance_uid, exc)
                expected = []
        missing = [u for u in expected if u not in held]
        if expected and not missing:
            result.duplicates = len(expected)
            result.skipped = True
            result.seconds = time.perf_counter() - t0
            logger.info("Series %s already complete in the store (%d instances); not fetched",
                        series_instance_uid, len(expected))
            if progress:
                progress(result.held, result.expected)
            return result
        sink = _StoreSink(store, study_instance_uid, series_instance_uid, origin, result, progress, held)
        try:
            store.check_space()
            spool = spool_dir(store)
            if held and missing:
                result.duplicates = len(held & set(expected))
                logger.info("Series %s: %d of %d instances held; fetching the %d missing", series_instance_uid,
                            len(held & set(expected)), len(expected), len(missing))
                self._pull_instances(study_instance_uid, series_instance_uid, missing, sink, spool)
            else:
                self.retrieve_series(study_instance_uid, series_instance_uid, sink.submit, spool_dir=spool)
        except DicomwebError as exc:
            result.error = str(exc)
        except StoreFullError as exc:
            sink.full = sink.full or exc
        except OSError as exc:  # e.g. the spool cannot be written
            result.error = f"The node cannot write the series: {exc}"
        finally:
            # The whole batch becomes durable (and visible) at once; nothing is reported before.
            sink.commit()
        if sink.full is not None:
            result.error = (f"The node's store is full ({sink.full.strerror or sink.full}); nothing of this "
                            "transfer was kept. Free space (or lower store.min_free_gb) and pull again.")
        if not held:
            result.expected = count.result()
            if progress:
                progress(result.held, result.expected)
        if expected and not result.error:
            now_held = {r.sop_instance_uid for r in store.instances(series_instance_uid)}
            for uid in expected:
                if uid not in now_held and uid not in result.failed:
                    result.failed[uid] = "announced by QIDO-RS but not returned by WADO-RS"
        result.seconds = time.perf_counter() - t0
        logger.info("Pulled series %s from %s: %d stored, %d already held, %d failed%s in %.2f s",
                    series_instance_uid, self.name or self.url, result.stored, result.duplicates,
                    len(result.failed), f" ({result.error})" if result.error else "", result.seconds)
        return result

    def _series_count(self, study_instance_uid: str, series_instance_uid: str) -> int | None:
        """NumberOfSeriesRelatedInstances (0020,1209) from a series-level QIDO-RS search, or None."""
        try:
            found = self.search_for_series(study_instance_uid, {"SeriesInstanceUID": series_instance_uid},
                                           fields=("00201209",))
        except DicomwebError as exc:
            logger.warning("QIDO-RS search for series %s failed (%s); its instance count is unknown",
                           series_instance_uid, exc)
            return None
        value = first_value(found[0], "00201209") if found else None
        try:
            return int(value) if value is not None else None
        except (TypeError, ValueError):
            return None

    def _pull_instances(self, study: str, series: str, sop_uids: Sequence[str], sink: _StoreSink,
                        spool: Path) -> None:
        def one(sop: str) -> None:
            if sink.full is not None:
                return
            try:
                self.retrieve_instance(study, series, sop, sink.submit, spool_dir=spool)
            except StoreFullError:  # the sink stops the transfer; the pull reports it
                pass
            except DicomwebError as exc:
                sink.fail(sop, str(exc))

        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="wado") as pool:
            list(pool.map(one, sop_uids))

    # --- STOW-RS (PS3.18 10.5) ----------------------------------------------------------------

    def store_instances(self, paths: Sequence[str | os.PathLike[str]],
                        study_instance_uid: str | None = None) -> list[StoreResult]:
        """STOW-RS the DICOM files ``paths`` (``multipart/related; type="application/dicom"``).

        The body is streamed from disk with a Content-Length (no chunked encoding, which some
        archives mishandle). Each instance's outcome is read from the Store Instances Response:
        listed in ReferencedSOPSequence (0008,1199) → success (or its WarningReason), in
        FailedSOPSequence (0008,1198) → its FailureReason (0008,1197). Without a usable response
        body the HTTP status decides: connection errors, 408/429/5xx → ``status=None`` (retry
        later); 401/403 → 0x0124 (not authorised); other 4xx → 0xC000. An instance the archive
        neither confirms nor refuses gets ``status=None``: a 200 alone is never trusted.

        Parameters
        ----------
        paths
            Part 10 files.
        study_instance_uid
            POST to ``/studies/{study}`` instead of ``/studies`` (the archive then refuses other studies).

        Returns
        -------
        list of StoreResult
            One per path, in order; never raises for the archive's answers.
        """
        items: list[tuple[str, InstanceInfo | None, str]] = []
        for p in paths:
            try:
                items.append((os.fspath(p), InstanceInfo.from_file(p), ""))
            except InstanceValidationError as exc:
                items.append((os.fspath(p), None, f"not sent: {exc}"))
        results: dict[int, StoreResult] = {}
        for idx, (src, info, err) in enumerate(items):
            if info is None:
                results[idx] = StoreResult(src, "", "", None, err)
        batch: list[int] = []
        size = 0
        sendable = [i for i in range(len(items)) if i not in results]
        for idx in sendable:
            n = os.path.getsize(items[idx][0])
            if batch and size + n > STOW_MAX_BYTES:
                results.update(self._stow_batch([(i, items[i]) for i in batch], study_instance_uid))
                batch, size = [], 0
            batch.append(idx)
            size += n
        if batch:
            results.update(self._stow_batch([(i, items[i]) for i in batch], study_instance_uid))
        return [results[i] for i in range(len(items))]

    def _stow_batch(self, batch: list[tuple[int, tuple[str, InstanceInfo | None, str]]],
                    study_instance_uid: str | None) -> dict[int, StoreResult]:
        boundary = new_boundary()
        files = [Path(src) for _, (src, _i, _e) in batch]
        length, body = encode_files(files, boundary)
        url = self.stow_url + (f"/studies/{study_instance_uid}" if study_instance_uid else "/studies")
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary="{boundary}"',
            "Content-Length": str(length),
            "Accept": "application/dicom+json",
        }

        def all_(status: int | None, error: str) -> dict[int, StoreResult]:
            return {i: StoreResult(src, info.sop_instance_uid, info.sop_class_uid, status, error)
                    for i, (src, info, _e) in batch if info is not None}

        try:
            rsp = self._http.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            logger.warning("STOW-RS to %s failed: %s", self.stow_url, exc)
            return all_(None, f"STOW-RS failed: {type(exc).__name__}: {exc}")
        code = rsp.status_code
        doc: dict[str, Any] = {}
        try:
            parsed = rsp.json() if rsp.content else {}
            if isinstance(parsed, list) and parsed:
                parsed = parsed[0]
            if isinstance(parsed, dict):
                doc = parsed
        except ValueError:
            doc = {}
        referenced = {_first(item, _TAG_SOP_INSTANCE): item for item in _seq(doc, _TAG_REFERENCED)}
        failed = {_first(item, _TAG_SOP_INSTANCE): item for item in _seq(doc, _TAG_FAILED)}
        # The archive's Warning header and body text are not copied into results or logs: dcm4chee
        # names patient IDs there (A778/A779), and results end up in the outbox and the logs.
        if not referenced and not failed:
            if code in (408, 429) or code >= 500:
                return all_(None, f"HTTP {code} {rsp.reason_phrase}".strip())
            if code in (401, 403):
                return all_(_NOT_AUTHORISED, f"HTTP {code}: not authorised")
            if code >= 400:
                return all_(_CANNOT_UNDERSTAND, f"HTTP {code} {rsp.reason_phrase}".strip())
        out: dict[int, StoreResult] = {}
        for i, (src, info, _e) in batch:
            assert info is not None
            uid = info.sop_instance_uid
            if uid in referenced:
                reason = _first(referenced[uid], _TAG_WARNING_REASON)
                status = int(reason) if isinstance(reason, int) else _SUCCESS
                out[i] = StoreResult(src, uid, info.sop_class_uid, status)
            elif uid in failed:
                reason = _first(failed[uid], _TAG_FAILURE_REASON)
                status = int(reason) if isinstance(reason, int) else _CANNOT_UNDERSTAND
                out[i] = StoreResult(src, uid, info.sop_class_uid, status,
                                     f"refused by the archive (HTTP {code}, FailureReason 0x{status:04X})")
            else:
                out[i] = StoreResult(src, uid, info.sop_class_uid, None,
                                     f"HTTP {code}, but the archive did not confirm this instance")
        ok = sum(1 for r in out.values() if r.status == _SUCCESS)
        logger.info("STOW-RS to %s: HTTP %d, %d of %d instance(s) confirmed", self.stow_url, code, ok, len(out))
        return out


class _StoreSink:
    """Receives WADO-RS parts. Each is checked and written as a temp file (:meth:`Store.stage`, its write-back
    started at once so the disk works while the stream goes on) on the thread that received it; :meth:`commit`
    then makes the whole batch durable and visible at once (:meth:`Store.commit_staged`: one flush of the batch,
    renames, directory fsyncs, one index transaction). Nothing is reported stored before.

    No writer thread: on two cores handing each part to one (a queue, the GIL going back and forth) cost more
    than the write itself; with one, the benchmark's pull took ~0.20 s instead of ~0.17 s (docs/benchmarks.md,
    "Pull").

    ``held`` are the SOP Instance UIDs the store held of the series when the pull started: those are not
    written again (the commit checks the index once more for instances stored meanwhile).
    """

    def __init__(self, store: Store, study: str, series: str, origin: str, result: PullResult,
                 progress: Callable[[int, int | None], None] | None, held: set[str]) -> None:
        self.store = store
        self.study = study
        self.series = series
        self.origin = origin
        self.result = result
        self.progress = progress
        self.held = held
        self.full: StoreFullError | None = None
        self._lock = threading.Lock()
        self._n = 0
        self._staged: list[StagedInstance] = []

    def submit(self, part: SpooledPart) -> None:
        """Take a complete part (called from the reading thread, or several fetching threads).

        Raises
        ------
        StoreFullError
            When the store is full (or below its reserve): the transfer stops.
        """
        try:
            if self.full is not None:
                raise StoreFullError(errno.ENOSPC, f"The node's store is full: {self.full.strerror or self.full}")
            with self._lock:
                self._n += 1
                n = self._n
            self._stage(n, part)
        finally:
            part.discard()

    def _stage(self, n: int, part: SpooledPart) -> None:
        try:
            info, payload = prepare_part(part, expect_series=self.series)
            if info.sop_instance_uid in self.held:
                with self._lock:
                    self.result.duplicates += 1
                return
            data: Any = payload if payload is not None else part.path.read_bytes()  # type: ignore[union-attr]
            # write-back starts now; the flush comes at the commit
            staged = self.store.stage(data, info, calling_ae_title=self.origin, kind=KIND_RECEIVED,
                                      check_duplicate=False)
        except InstanceValidationError as exc:
            self.fail(f"part {n}", str(exc))
            return
        except StoreFullError as exc:
            with self._lock:
                self.full = self.full or exc
            self.fail(f"part {n}", f"store full: {exc.strerror or exc}")
            raise
        except OSError as exc:  # e.g. a part spilled to disk that cannot be read back, or a write error
            self.fail(f"part {n}", f"cannot write: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - one bad part never stops the pull
            logger.exception("Storing retrieved part %d failed", n)
            self.fail(f"part {n}", f"cannot store: {exc}")
            return
        assert isinstance(staged, StagedInstance)  # (check_duplicate=False: never a PutResult)
        with self._lock:
            self._staged.append(staged)
            held, expected = self.result.held + len(self._staged), self.result.expected
        if self.progress:
            self.progress(held, expected)

    def fail(self, key: str, reason: str) -> None:
        with self._lock:
            self.result.failed[key] = reason

    def commit(self) -> None:
        """Make everything staged durable and indexed (or, after a failure, remove it)."""
        with self._lock:
            staged, self._staged = self._staged, []
        if self.full is not None:
            self.store.discard_staged(staged)
            for st in staged:
                self.result.failed.setdefault(st.info.sop_instance_uid, "not stored: the store is full")
            return
        try:
            puts = self.store.commit_staged(staged)
        except OSError as exc:  # the staged files are removed: nothing was reported stored
            self.result.error = f"The series could not be made durable: {exc}"
            for st in staged:
                self.result.failed[st.info.sop_instance_uid] = f"cannot make durable: {exc}"
            return
        for put in puts:
            if put.duplicate:
                self.result.duplicates += 1
            else:
                self.result.stored += 1
                self.result.bytes += put.size


def store_part(store: Store, part: SpooledPart, *, calling_ae_title: str = "", kind: str = KIND_RECEIVED,
               expect_series: str | None = None, expect_study: str | None = None) -> PutResult:
    """Store one received ``application/dicom`` part (a Part 10 file) durably.

    Parameters
    ----------
    store
        The node's store.
    part
        A complete part; it is not discarded here.
    calling_ae_title
        Origin recorded in the index.
    kind
        ``received`` or ``result``.
    expect_series, expect_study
        Refuse an instance of another series / study.

    Parts held in memory are checked like C-STORE data sets (:func:`dicom_io.store.check_encoding`:
    a damaged instance is refused, not stored); parts spilled to disk are read with pydicom.

    Raises
    ------
    InstanceValidationError
        When the part is not a Part 10 DICOM file, lacks valid UIDs, or belongs elsewhere
        (``kind="decode"``, ``"uid"``, ``"series_mismatch"``, ``"study_mismatch"``).
    StoreFullError, OSError
        From :meth:`Store.put`.
    """
    info, payload = prepare_part(part, expect_series=expect_series, expect_study=expect_study)
    return _put(store, part, info, payload, calling_ae_title, kind)


def prepare_part(part: SpooledPart, *, expect_series: str | None = None,
                 expect_study: str | None = None) -> tuple[InstanceInfo, Sequence[bytes | memoryview] | None]:
    """Read a part's index attributes; returns (info, in-memory chunks or None when spilled to ``part.path``).

    Raises
    ------
    InstanceValidationError
        See :func:`store_part`.
    """
    ctype, _params = parse_content_type(part.content_type or "application/dicom")
    if ctype not in ("application/dicom", "application/octet-stream", ""):
        raise InstanceValidationError(f"Part has Content-Type '{ctype}', not application/dicom.", kind="decode")
    payload: Sequence[bytes | memoryview] | None
    if part.in_memory:
        chunks = part.chunks()
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        ts, offset = read_file_meta(data)
        # One walk over the element headers: the structure check (a damaged instance is refused, as
        # by C-STORE) and the index values, without decoding anything.
        info = InstanceInfo.from_raw(check_encoding(memoryview(data)[offset:], ts), ts)
        payload = [data]
    else:
        assert part.path is not None
        with open(part.path, "rb") as fh:
            fh.seek(128)
            if fh.read(4) != b"DICM":
                raise InstanceValidationError("Part is not a DICOM Part 10 file (no 'DICM' prefix).", kind="decode")
        info = InstanceInfo.from_file(part.path)
        payload = None
    if expect_series is not None and info.series_instance_uid != expect_series:
        raise InstanceValidationError(
            f"Instance {info.sop_instance_uid} belongs to series {info.series_instance_uid}, not {expect_series}.",
            kind="series_mismatch")
    if expect_study is not None and info.study_instance_uid != expect_study:
        raise InstanceValidationError(
            f"Instance {info.sop_instance_uid} belongs to study {info.study_instance_uid}, not {expect_study}.",
            kind="study_mismatch")
    return info, payload


def _put(store: Store, part: SpooledPart, info: InstanceInfo, payload: Sequence[bytes | memoryview] | None,
         calling_ae_title: str, kind: str) -> PutResult:
    if payload is not None:
        return store.put(payload, info, calling_ae_title=calling_ae_title, kind=kind)
    assert part.path is not None
    put_path = getattr(store, "put_path", None)
    if put_path is not None:
        result: PutResult = put_path(part.path, info, calling_ae_title=calling_ae_title, kind=kind)
        return result
    return store.put(part.path.read_bytes(), info, calling_ae_title=calling_ae_title, kind=kind)


def spool_dir(store: Store, max_age_seconds: float = 3600.0) -> Path:
    """``<store>/spool`` (created), where large parts and XNAT zips are written while they arrive.

    Leftovers older than ``max_age_seconds`` (from a crash mid-transfer; never acknowledged data)
    are removed.
    """
    import shutil

    spool = store.root / "spool"
    spool.mkdir(exist_ok=True)
    cutoff = time.time() - max_age_seconds
    for entry in spool.iterdir():
        try:
            if entry.stat().st_mtime < cutoff:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink()
        except OSError:
            pass
    return spool


def _valid_uid(uid: str) -> bool:
    from dicom_io.store import is_valid_uid

    return is_valid_uid(uid)


def _seq(doc: Mapping[str, Any], tag: str) -> list[dict[str, Any]]:
    elem = doc.get(tag)
    if not isinstance(elem, dict):
        return []
    value = elem.get("Value")
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _first(item: Mapping[str, Any], tag: str) -> Any:
    elem = item.get(tag)
    if not isinstance(elem, dict):
        return None
    value = elem.get("Value")
    if isinstance(value, list) and value:
        return value[0]
    return None


def first_value(item: Mapping[str, Any], tag: str) -> Any:
    """The first value of ``tag`` (8 hex digits) in a DICOM JSON object, or None."""
    return _first(item, tag)


__all__ = [
    "ACCEPT_DICOM_ANY_TS", "DicomwebClient", "DicomwebError", "PullResult", "first_value", "make_auth",
    "prepare_part", "read_file_meta", "spool_dir", "store_part",
]
