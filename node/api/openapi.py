"""The OpenAPI 3.1 description of the REST API, served at /openapi.json."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from node import __version__
from node.api.auth import PUBLIC, required_role

_UID = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)*$", "maxLength": 64}
_IJK = {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3}
SCHEMAS: dict[str, Any] = {
    "SeriesRef": {
        "type": "object", "required": ["series_instance_uid"], "additionalProperties": False,
        "properties": {"series_instance_uid": _UID, "study_instance_uid": _UID,
                       "archive": {"type": "string", "description": "configured DICOMweb destination to pull from"}},
    },
    "Point": {
        "type": "object", "description": "ijk = (column, row, 0-based slice) or lps = patient mm",
        "properties": {"ijk": _IJK, "lps": _IJK, "positive": {"type": "boolean", "default": True}},
    },
    "Box": {
        "type": "object", "description": "two corners on one slice, as ijk or lps",
        "properties": {"ijk": {"type": "array", "items": _IJK, "minItems": 2, "maxItems": 2},
                       "lps": {"type": "array", "items": _IJK, "minItems": 2, "maxItems": 2},
                       "positive": {"type": "boolean", "default": True}},
    },
    "Prompts": {
        "type": "object", "additionalProperties": False,
        "properties": {"points": {"type": "array", "items": {"$ref": "#/components/schemas/Point"}},
                       "boxes": {"type": "array", "items": {"$ref": "#/components/schemas/Box"}}},
    },
    "Segment": {
        "type": "object", "additionalProperties": False,
        "properties": {"label": {"type": "string"}, "color": {"type": "string"},
                       "category": {"type": "string", "description": "SCHEME^VALUE^MEANING"},
                       "type": {"type": "string", "description": "SCHEME^VALUE^MEANING"}},
    },
    "SegmentationRequest": {
        "type": "object", "required": ["series", "prompts"], "additionalProperties": False,
        "properties": {
            "series": {"anyOf": [{"$ref": "#/components/schemas/SeriesRef"}, _UID]},
            "prompts": {"$ref": "#/components/schemas/Prompts"},
            "model": {"type": "string", "default": "litemedsam"},
            "mode": {"type": "string", "enum": ["2d", "3d"], "default": "3d"},
            "segment": {"$ref": "#/components/schemas/Segment"},
            "outputs": {"type": "array", "items": {"type": "string", "enum": ["nifti", "seg"]}},
            "destinations": {"type": "array", "items": {"type": "string"}},
            "wait": {"type": "boolean", "default": True},
        },
    },
    "SessionRequest": {
        "type": "object", "required": ["series"],
        "properties": {"series": {"$ref": "#/components/schemas/SeriesRef"}, "model": {"type": "string"},
                       "mode": {"type": "string", "enum": ["2d", "3d"], "default": "2d"},
                       "segment": {"$ref": "#/components/schemas/Segment"},
                       "ttl_seconds": {"type": "number"}},
    },
    "CommitRequest": {
        "type": "object",
        "properties": {"outputs": {"type": "array", "items": {"type": "string", "enum": ["nifti", "seg"]}},
                       "destinations": {"type": "array", "items": {"type": "string"}},
                       "segment": {"$ref": "#/components/schemas/Segment"}},
    },
    "NewSegmentRequest": {
        "type": "object",
        "properties": {"segment": {"$ref": "#/components/schemas/Segment"}},
    },
    "Error": {
        "type": "object",
        "properties": {"error": {"type": "string"}, "detail": {"type": "string"}, "field": {"type": "string"}},
    },
}

#: (method, path) → (summary, request schema or "form", tag)
OPERATIONS: dict[tuple[str, str], tuple[str, str | None, str]] = {
    ("POST", "/v1/segmentations"): ("Segment a series from prompts (NIfTI and/or DICOM SEG)", "SegmentationRequest",
                                    "native"),
    ("GET", "/v1/segmentations/{id}"): ("State, measurements, timings, links and delivery of a result", None,
                                        "native"),
    ("GET", "/v1/segmentations/{id}/nifti"): ("The result mask as NIfTI (.nii.gz)", None, "native"),
    ("GET", "/v1/segmentations/{id}/seg"): ("The result as DICOM SEG", None, "native"),
    ("GET", "/v1/jobs/{id}"): ("State of an inference job", None, "native"),
    ("DELETE", "/v1/jobs/{id}"): ("Cancel an inference job", None, "native"),
    ("POST", "/v1/sessions"): ("Open an interactive session on a series", "SessionRequest", "sessions"),
    ("GET", "/v1/sessions/{id}"): ("Session state", None, "sessions"),
    ("DELETE", "/v1/sessions/{id}"): ("Close a session", None, "sessions"),
    ("POST", "/v1/sessions/{id}/prompts"): ("Add prompts; answers the refined mask (?output=json|bin|nifti|seg)",
                                            "Prompts", "sessions"),
    ("POST", "/v1/sessions/{id}/undo"): ("Undo the last prompts", None, "sessions"),
    ("POST", "/v1/sessions/{id}/reset"): ("Drop all prompts", None, "sessions"),
    ("GET", "/v1/sessions/{id}/mask"): ("The current mask (?output=json|bin|nifti|seg)", None, "sessions"),
    ("GET", "/v1/sessions/{id}/slices"): ("The session's image geometry (per-slice positions, orientation, "
                                          "spacing) and default window", None, "sessions"),
    ("GET", "/v1/sessions/{id}/slices/{k}"): ("One slice's voxels: float32 little-endian (rows, columns) in "
                                              "modality units", None, "sessions"),
    ("POST", "/v1/sessions/{id}/segments"): ("Finish the segment being refined and start the next one",
                                             "NewSegmentRequest", "sessions"),
    ("POST", "/v1/sessions/{id}/commit"): ("Write one SEG/NIfTI of all the session's segments and deliver it",
                                           "CommitRequest", "sessions"),
    ("GET", "/v1/status"): ("Queues, running jobs and sessions", None, "node"),
    ("GET", "/metrics"): ("Prometheus metrics", None, "node"),
    ("GET", "/v1/models"): ("Models (AIAA v1 list format)", None, "aiaa"),
    ("POST", "/v1/segmentation"): ("AIAA segmentation (params + image or session_id)", "form", "aiaa"),
    ("POST", "/v1/deepgrow"): ("AIAA DeepGrow (foreground/background clicks)", "form", "aiaa"),
    ("POST", "/v1/dextr3d"): ("AIAA DEXTR3D (extreme points)", "form", "aiaa"),
    ("POST", "/v1/inference"): ("AIAA generic inference", "form", "aiaa"),
    ("GET", "/info/"): ("MONAI Label app info (models, labels)", None, "monailabel"),
    ("GET", "/info"): ("MONAI Label app info (models, labels)", None, "monailabel"),
    ("POST", "/infer/{model}"): ("MONAI Label inference (?image=&session_id=&output=image|json|all|dicom_seg)",
                                 "form", "monailabel"),
    ("PUT", "/session/"): ("Upload an image into a session (fields files or image)", "form", "monailabel"),
    ("PUT", "/session"): ("Upload an image into a session (fields files or image)", "form", "monailabel"),
    ("GET", "/session/{id}"): ("Session info (?update_ts=true refreshes it)", None, "monailabel"),
    ("DELETE", "/session/{id}"): ("Delete a session", None, "monailabel"),
    ("GET", "/auth/"): ("MONAI Label auth info", None, "monailabel"),
    ("GET", "/datastore/"): ("MONAI Label datastore stats", None, "monailabel"),
    ("GET", "/datastore/image/info"): ("Image info (empty: clients upload into a session)", None, "monailabel"),
    ("GET", "/datastore/image/info/"): ("Image info (empty: clients upload into a session)", None, "monailabel"),
    ("GET", "/openapi.json"): ("This document", None, "node"),
    ("GET", "/v1/config"): ("The effective settings (secrets masked); role admin", None, "admin"),
    ("GET", "/v1/outbox"): ("Outbox counts and entries (?state=pending|delivered|failed&limit=N); role admin",
                            None, "admin"),
}

_MASK_OUTPUT = ("output", "json (default), bin (gzip'd packbits), nifti or seg")
_INFER = [("image", "SeriesInstanceUID (pulled from the DICOMweb archive when not stored)"),
          ("session_id", "a session from PUT /session/"),
          ("output", "image, json, all (default) or dicom_seg"), ("model", "AIAA: the model name")]
#: (method, path) → query parameters (name, description)
QUERY: dict[tuple[str, str], list[tuple[str, str]]] = {
    ("POST", "/v1/sessions/{id}/prompts"): [_MASK_OUTPUT],
    ("POST", "/v1/sessions/{id}/undo"): [_MASK_OUTPUT],
    ("POST", "/v1/sessions/{id}/reset"): [_MASK_OUTPUT],
    ("GET", "/v1/sessions/{id}/mask"): [_MASK_OUTPUT],
    ("POST", "/infer/{model}"): _INFER[:3],
    ("POST", "/v1/segmentation"): _INFER, ("POST", "/v1/deepgrow"): _INFER, ("POST", "/v1/dextr3d"): _INFER,
    ("POST", "/v1/inference"): _INFER,
    ("PUT", "/session/"): [("expiry", "seconds (capped at api.session_ttl_seconds)"),
                           ("uncompress", "accepted; zips are always read")],
    ("PUT", "/session"): [("expiry", "seconds (capped at api.session_ttl_seconds)")],
    ("GET", "/session/{id}"): [("update_ts", "true refreshes the session's last access")],
    ("GET", "/v1/outbox"): [("state", "pending, delivered or failed"), ("limit", "latest N entries (1..10000)")],
    ("GET", "/v1/models"): [("model", "only this name"), ("label", "only models with this label"),
                            ("type", "deepgrow or annotation")],
}

_FORM = {"multipart/form-data": {"schema": {"type": "object", "properties": {
    "params": {"type": "string", "description": "JSON object"},
    "file": {"type": "string", "format": "binary"}, "image": {"type": "string", "format": "binary"},
    "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}


#: Path parameters: ids and UIDs never hold '/', '%', '\\' or spaces (node.api.guard refuses '.'/'..' segments).
_ID = {"type": "string", "pattern": r"^[0-9A-Za-z._-]+$", "maxLength": 128}
_PATH_PARAMS = {"k": {"type": "string", "pattern": r"^[0-9]+$", "maxLength": 9}}


def build_document(routes: Sequence[BaseRoute]) -> dict[str, Any]:
    """OpenAPI 3.1 document of ``routes``."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route):
            continue
        for method in sorted((route.methods or set()) - {"HEAD"}):
            summary, body, tag = OPERATIONS.get((method, route.path), (route.name, None, "node"))
            op: dict[str, Any] = {
                "summary": summary, "tags": [tag], "operationId": f"{method.lower()}_{route.path}",
                "responses": {"2XX": {"description": "OK (201 created; 202 accepted, e.g. wait=false)"},
                              "4XX": {"description": "Refused; the message names the field",
                                      "content": {"application/json": {
                                          "schema": {"$ref": "#/components/schemas/Error"}}}},
                              "502": {"description": "The archive failed while pulling the series"},
                              "503": {"description": "Queue full or model unavailable (Retry-After)"},
                              "504": {"description": "The job outlived api.job_timeout_seconds (it keeps running)"}},
            }
            params = [{"name": name, "in": "path", "required": True, "schema": _PATH_PARAMS.get(name, _ID)}
                      for name in route.param_convertors]
            params += [{"name": name, "in": "query", "required": False, "description": text,
                        "schema": {"type": "string"}} for name, text in QUERY.get((method, route.path), [])]
            if params:
                op["parameters"] = params
            if body == "form":
                op["requestBody"] = {"content": _FORM}
            elif body:
                op["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}}}
            role = required_role(method, route.path)
            op["x-required-role"] = role  # docs/security.md; enforced by node.api.auth
            if role == PUBLIC:
                op["security"] = [{}]
            else:
                op["security"] = [{"bearer": [role]}, {}]  # {}: when api.tokens is empty
                op["responses"]["401"] = {"description": "No or unknown bearer token (WWW-Authenticate)"}
                op["responses"]["403"] = {"description": f"The token lacks the '{role}' role"}
            paths.setdefault(route.path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "ainode prompt API", "version": __version__,
                 "description": "Native REST API plus MONAI Label, OHIF-AI and AIAA compatible endpoints."},
        "components": {"schemas": SCHEMAS, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}, {}],
        "paths": paths,
    }


def openapi_route(routes: Sequence[BaseRoute]) -> Route:
    """``GET /openapi.json`` describing ``routes`` (and itself)."""
    holder: list[dict[str, Any]] = []

    async def openapi(request: Request) -> Response:
        if not holder:
            holder.append(build_document([*routes, route]))
        return JSONResponse(holder[0])

    route = Route("/openapi.json", openapi, methods=["GET"])
    return route


__all__ = ["build_document", "openapi_route"]
