"""A small, faithful fake of XNAT's REST API (ASGI/Starlette) for tests: XNAT itself cannot run here.

What it follows (XNAT 1.8 documentation and the clients that use it: MONAI Label's XNAT datastore,
pyxnat/xnatpy, the XNAT-OHIF viewer's ROI exporter):

* ``POST /data/JSESSION`` with HTTP basic credentials (user/password, or an alias token's
  alias/secret) → 200, body = the session ID, ``Set-Cookie: JSESSIONID=…``; wrong credentials → 401
  with ``WWW-Authenticate: Basic realm="XNAT"``. ``GET /data/JSESSION?CSRF=true`` → the CSRF token
  (``XNAT_CSRF=<token>``). ``DELETE /data/JSESSION`` logs out. Every request authenticated with
  basic credentials opens a new server session (counted in :attr:`FakeXnat.basic_logins`).
* State-changing requests (POST/PUT/DELETE) made with a session cookie must carry ``XNAT_CSRF``
  (query parameter) or get 403.
* ``GET /data/services/tokens/issue`` → alias token JSON.
* ``GET /data/experiments/{E}?format=json`` and ``/data/projects/{P}/experiments/{E-or-label}`` →
  ``{"items": [{"data_fields": {...}, "meta": {...}}]}``; listings → ``{"ResultSet": {"Result": [...]}}``.
* ``GET /data/experiments/{E}/scans/{S}/resources/DICOM/files?format=zip`` → a zip streamed with
  chunked encoding, members under ``{label}/scans/{S}-{type}/resources/DICOM/files/`` plus the
  resource's catalog XML (not DICOM).
* ``/xapi/roi/...`` only when the ROI (XNAT-OHIF viewer) plugin is "installed": permissions probe
  and ``PUT …/collections/{label}?type=SEG&overwrite=false`` (201; 409 when the label exists; 400
  when the body is not a DICOM SEG of that session's study); 404 otherwise.
* ``POST /data/services/import?import-handler=DICOM-zip&inbody=true&dest=/archive/projects/…`` →
  200 with the session URI; 400 for an unparseable member (files before it were kept, as XNAT warns).
"""

from __future__ import annotations

import base64
import io
import secrets
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class FakeScan:
    id: str
    type: str
    uid: str
    files: list[Path] = field(default_factory=list)


@dataclass
class FakeExperiment:
    id: str
    label: str
    project: str
    subject: str
    uid: str
    scans: dict[str, FakeScan] = field(default_factory=dict)


class FakeXnat:
    """State and ASGI app of the fake server."""

    def __init__(self, users: dict[str, str], *, roi_plugin: bool = True) -> None:
        self.users = dict(users)
        self.tokens: dict[str, tuple[str, str, float]] = {}  # alias -> (user, secret, expiry)
        self.sessions: dict[str, tuple[str, str]] = {}  # JSESSIONID -> (user, csrf token)
        self.projects: dict[str, dict[str, str]] = {}  # project -> subject id -> label
        self.experiments: dict[str, FakeExperiment] = {}
        self.roi_plugin = roi_plugin
        self.collections: dict[tuple[str, str], bytes] = {}  # (session, label) -> SEG bytes
        self.imports: list[tuple[str, list[str]]] = []  # (dest, member names)
        self.basic_logins = 0
        self.fail_next: list[int] = []  # HTTP statuses to answer the next requests with (outage injection)
        self.requests: list[tuple[str, str]] = []
        self.app = Starlette(routes=[
            Route("/data/JSESSION", self.jsession, methods=["GET", "POST", "DELETE"]),
            Route("/data/services/tokens/issue", self.issue_token, methods=["GET"]),
            Route("/data/services/import", self.import_service, methods=["POST"]),
            Route("/data/projects/{project}/experiments", self.list_experiments, methods=["GET"]),
            Route("/data/projects/{project}/experiments/{experiment}", self.get_experiment, methods=["GET"]),
            Route("/data/experiments/{experiment}", self.get_experiment, methods=["GET"]),
            Route("/data/experiments/{experiment}/scans", self.list_scans, methods=["GET"]),
            Route("/data/experiments/{experiment}/scans/{scan}/resources/{resource}/files", self.scan_files,
                  methods=["GET"]),
            Route("/xapi/roi/projects/{project}/permissions/RoiCollection", self.roi_permissions, methods=["GET"]),
            Route("/xapi/roi/projects/{project}/sessions/{session}/collections/{label}", self.roi_put,
                  methods=["PUT"]),
        ])

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    # --- data ---------------------------------------------------------------------------------

    def add_session(self, project: str, subject: str, label: str, study_uid: str) -> FakeExperiment:
        subjects = self.projects.setdefault(project, {})
        subject_id = next((sid for sid, lab in subjects.items() if lab == subject), None)
        if subject_id is None:
            subject_id = f"XNAT_S{len(subjects) + 1:05d}"
            subjects[subject_id] = subject
        exp = FakeExperiment(f"XNAT_E{len(self.experiments) + 1:05d}", label, project, subject_id, study_uid)
        self.experiments[exp.id] = exp
        return exp

    def add_scan(self, exp: FakeExperiment, scan_id: str, files: list[Path], scan_type: str = "CT") -> FakeScan:
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        scan = FakeScan(scan_id, scan_type, uid, list(files))
        exp.scans[scan_id] = scan
        return scan

    # --- auth ---------------------------------------------------------------------------------

    def _basic_user(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("basic "):
            return None
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return None
        if self.users.get(user) == password:
            return user
        token = self.tokens.get(user)
        if token and token[1] == password and token[2] > time.time():
            return token[0]
        return None

    def _auth(self, request: Request) -> tuple[str | None, str | None, Response | None]:
        """(user, session id or None when basic auth was used, error response)."""
        self.requests.append((request.method, request.url.path))
        if self.fail_next:
            code = self.fail_next.pop(0)
            return None, None, PlainTextResponse("Service Unavailable", status_code=code)
        sid = request.cookies.get("JSESSIONID")
        if sid and sid in self.sessions:
            user, csrf = self.sessions[sid]
            if request.method in ("POST", "PUT", "DELETE") and request.query_params.get("XNAT_CSRF") != csrf:
                return None, None, PlainTextResponse("Invalid CSRF token", status_code=403)
            return user, sid, None
        basic_user = self._basic_user(request)
        if basic_user is None:
            return None, None, PlainTextResponse(
                "Unauthorized", status_code=401, headers={"WWW-Authenticate": 'Basic realm="XNAT"'})
        self.basic_logins += 1  # XNAT opens a server session for every basic-authenticated request
        return basic_user, None, None

    def _new_session(self, user: str) -> str:
        sid = secrets.token_hex(16).upper()
        self.sessions[sid] = (user, secrets.token_hex(20))
        return sid

    async def jsession(self, request: Request) -> Response:
        if request.method == "POST":
            self.requests.append(("POST", "/data/JSESSION"))
            login = self._basic_user(request)
            if login is None:
                return PlainTextResponse("Unauthorized", status_code=401,
                                         headers={"WWW-Authenticate": 'Basic realm="XNAT"'})
            self.basic_logins += 1
            new_sid = self._new_session(login)
            rsp = PlainTextResponse(new_sid)
            rsp.set_cookie("JSESSIONID", new_sid, path="/", httponly=True)
            return rsp
        user, sid, err = self._auth(request)
        if err:
            return err
        if request.method == "DELETE":
            if sid:
                self.sessions.pop(sid, None)
            return PlainTextResponse("")
        if sid is None:
            sid = self._new_session(user or "")
        if request.query_params.get("CSRF", "").lower() == "true":
            return PlainTextResponse(f"XNAT_CSRF={self.sessions[sid][1]}")
        return PlainTextResponse(sid)

    async def issue_token(self, request: Request) -> Response:
        user, _sid, err = self._auth(request)
        if err:
            return err
        alias, secret = secrets.token_hex(8), secrets.token_hex(24)
        expiry = time.time() + 48 * 3600
        self.tokens[alias] = (user or "", secret, expiry)
        return JSONResponse({"alias": alias, "secret": secret, "xdatUserId": user,
                             "estimatedExpirationTime": int(expiry * 1000)})

    # --- REST: projects, experiments, scans ---------------------------------------------------

    def _experiment_json(self, exp: FakeExperiment) -> dict[str, Any]:
        return {"items": [{
            "meta": {"xsi:type": "xnat:ctSessionData", "isHistory": False},
            "data_fields": {"ID": exp.id, "label": exp.label, "project": exp.project, "subject_ID": exp.subject,
                            "UID": exp.uid, "modality": "CT"},
            "children": [],
        }]}

    async def get_experiment(self, request: Request) -> Response:
        _user, _sid, err = self._auth(request)
        if err:
            return err
        key = request.path_params["experiment"]
        project = request.path_params.get("project")
        exp = self.experiments.get(key)
        if exp is None and project:
            exp = next((e for e in self.experiments.values() if e.project == project and e.label == key), None)
        if exp is None or (project and exp.project != project):
            return PlainTextResponse("Not Found", status_code=404)
        return JSONResponse(self._experiment_json(exp))

    async def list_experiments(self, request: Request) -> Response:
        _user, _sid, err = self._auth(request)
        if err:
            return err
        project = request.path_params["project"]
        if project not in self.projects:
            return PlainTextResponse("Not Found", status_code=404)
        rows = [{"ID": e.id, "label": e.label, "project": e.project, "subject_ID": e.subject, "UID": e.uid,
                 "xsiType": "xnat:ctSessionData", "URI": f"/data/experiments/{e.id}"}
                for e in self.experiments.values() if e.project == project]
        return JSONResponse({"ResultSet": {"Result": rows, "totalRecords": str(len(rows))}})

    async def list_scans(self, request: Request) -> Response:
        _user, _sid, err = self._auth(request)
        if err:
            return err
        exp = self.experiments.get(request.path_params["experiment"])
        if exp is None:
            return PlainTextResponse("Not Found", status_code=404)
        rows = [{"ID": s.id, "type": s.type, "UID": s.uid, "xsiType": "xnat:ctScanData", "quality": "usable",
                 "URI": f"/data/experiments/{exp.id}/scans/{s.id}"} for s in exp.scans.values()]
        return JSONResponse({"ResultSet": {"Result": rows, "totalRecords": str(len(rows))}})

    async def scan_files(self, request: Request) -> Response:
        _user, _sid, err = self._auth(request)
        if err:
            return err
        exp = self.experiments.get(request.path_params["experiment"])
        scan = exp.scans.get(request.path_params["scan"]) if exp else None
        if exp is None or scan is None or request.path_params["resource"] != "DICOM":
            return PlainTextResponse("Not Found", status_code=404)
        if request.query_params.get("format") != "zip":
            rows = [{"Name": p.name, "Size": str(p.stat().st_size), "URI": f"{request.url.path}/{p.name}"}
                    for p in scan.files]
            return JSONResponse({"ResultSet": {"Result": rows}})
        buf = io.BytesIO()
        prefix = f"{exp.label}/scans/{scan.id}-{scan.type}/resources/DICOM/files"
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in scan.files:
                zf.write(p, f"{prefix}/{p.name}")
            zf.writestr(f"{prefix}/scan_{scan.id}_catalog.xml", '<?xml version="1.0"?><cat:DCMCatalog/>')
        data = buf.getvalue()

        def chunks() -> Any:
            for i in range(0, len(data), 65536):
                yield data[i:i + 65536]

        return StreamingResponse(chunks(), media_type="application/zip",
                                 headers={"Content-Disposition": f'attachment; filename="{exp.label}.zip"'})

    # --- ROI collections (XNAT-OHIF viewer plugin) --------------------------------------------

    async def roi_permissions(self, request: Request) -> Response:
        _user, _sid, err = self._auth(request)
        if err:
            return err
        if not self.roi_plugin:
            return JSONResponse({"error": "Not Found"}, status_code=404)
        return JSONResponse({"create": True, "read": True, "edit": True, "delete": True})

    async def roi_put(self, request: Request) -> Response:
        _user, _sid, err = self._auth(request)
        if err:
            return err
        if not self.roi_plugin:
            return JSONResponse({"error": "Not Found"}, status_code=404)
        p = request.path_params
        exp = self.experiments.get(p["session"])
        if exp is None or exp.project != p["project"]:
            return PlainTextResponse(f"Session {p['session']} not found in project {p['project']}", status_code=404)
        if request.query_params.get("type") not in ("SEG", "RTSTRUCT", "AIM", "MEAS", "NIFTI"):
            return PlainTextResponse("Unsupported collection type", status_code=400)
        key = (exp.id, p["label"])
        if key in self.collections and request.query_params.get("overwrite", "false") != "true":
            return PlainTextResponse(f"Collection {p['label']} already exists", status_code=409)
        body = await request.body()
        try:
            ds = pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True)
            ok = ds.Modality == "SEG" and ds.StudyInstanceUID == exp.uid
        except Exception:
            ok = False
        if not ok:
            return PlainTextResponse("Body is not a DICOM SEG of this session's study", status_code=400)
        self.collections[key] = body
        return PlainTextResponse(f"RoiCollection_{len(self.collections)}", status_code=201)

    # --- import service -----------------------------------------------------------------------

    async def import_service(self, request: Request) -> Response:
        _user, _sid, err = self._auth(request)
        if err:
            return err
        q = request.query_params
        if q.get("import-handler") != "DICOM-zip" or q.get("inbody") != "true":
            return PlainTextResponse("Unsupported import handler", status_code=400)
        dest = q.get("dest", "")
        parts = dest.strip("/").split("/")
        if len(parts) != 7 or parts[0] != "archive" or parts[1] != "projects" or parts[3] != "subjects" \
                or parts[5] != "experiments":
            return PlainTextResponse(f"Invalid destination {dest}", status_code=400)
        exp = self.experiments.get(parts[6])
        if exp is None or exp.project != parts[2] or exp.subject != parts[4]:
            return PlainTextResponse(f"Invalid destination {dest}", status_code=400)
        body = await request.body()
        try:
            zf = zipfile.ZipFile(io.BytesIO(body))
        except zipfile.BadZipFile:
            return PlainTextResponse("Unable to read the zip archive", status_code=400)
        names: list[str] = []
        for info in zf.infolist():
            try:
                pydicom.dcmread(io.BytesIO(zf.read(info)), stop_before_pixels=True)
            except Exception:
                self.imports.append((dest, names))
                return PlainTextResponse(f"Unable to parse {info.filename} as DICOM", status_code=400)
            names.append(info.filename)
        self.imports.append((dest, names))
        return PlainTextResponse(f"/data/archive/projects/{exp.project}/subjects/{exp.subject}/experiments/{exp.id}")
