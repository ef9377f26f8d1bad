"""Property-based fuzzing of the REST API from its OpenAPI document (schemathesis), in-process over ASGI.

A bounded, deterministic run: ``EXAMPLES`` schema-valid and ``EXAMPLES`` schema-invalid requests per
operation (hypothesis derandomized, no example database), with a phantom series in the store so some
requests reach the handlers' deeper paths. Checks: no 5xx, declared status codes, content types,
headers and response schemas; every call answers within ``MAX_SECONDS`` (no hangs).

Not checked: schemathesis' ``positive_data_acceptance`` — a request can be schema-valid and still
semantically wrong (a prompt outside the volume, an unknown series), which the API answers 4xx by design.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis import checks as st_checks

from api_helpers import make_phantom_series
from sec_helpers import settings_for

EXAMPLES = int(os.environ.get("AINODE_FUZZ_EXAMPLES", "6"))  # a deeper local run: AINODE_FUZZ_EXAMPLES=100
MAX_SECONDS = 30.0
CHECKS = [st_checks.not_a_server_error, st_checks.status_code_conformance, st_checks.content_type_conformance,
          st_checks.response_headers_conformance, st_checks.response_schema_conformance]


class _NoModel:
    """The fuzz run never needs a model: a request that gets that far answers 503 (declared)."""

    def get(self) -> Any:
        from models.base import ModelError

        raise ModelError("no model in the fuzz run")


def test_rest_api_fuzzed_from_openapi(tmp_path: Path) -> None:
    from sec_helpers import build_app

    ph = make_phantom_series(tmp_path / "ph")
    app = build_app(settings_for(tmp_path / "node", max_upload_bytes=1024 * 1024), _NoModel(), ph.paths)
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", app.app)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 30
        failures: list[str] = []
        slow: list[str] = []
        calls = no_negative = 0
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
                @given(case=op.as_strategy(generation_mode=mode))
                def run(case: Any) -> None:
                    # `op` and `mode` come from the enclosing loops on purpose (the B023 noqa below): run() is
                    # called right after its definition, within the same iteration.
                    nonlocal calls
                    t0 = time.monotonic()
                    response = case.call()
                    calls += 1
                    took = time.monotonic() - t0
                    if took > MAX_SECONDS:
                        slow.append(f"{op.method.upper()} {op.path}: {took:.1f} s")  # noqa: B023
                    try:
                        case.validate_response(response, checks=CHECKS)
                    except Exception as exc:  # noqa: BLE001 - collected, reported together below
                        failures.append(f"{op.method.upper()} {op.path} [{mode.value}] -> {response.status_code}: "  # noqa: B023
                                        f"{str(exc)[:400]}")

                try:
                    run()
                except Unsatisfiable:
                    # Nothing to make invalid (no parameters, no body): only schema-valid requests exist.
                    assert mode is GenerationMode.NEGATIVE, op.path
                    no_negative += 1
        assert no_negative < len(operations) // 2
        assert calls >= len(operations) * 4
        assert not slow, slow
        assert not failures, "\n".join(failures[:10])
        # The node is still fine.
        assert app.client.get("/v1/status").status_code == 200
    finally:
        app.close()


def _hostile_json(series: str, study: str) -> list[bytes]:
    """Bodies of the independent attack (issue 18): nesting, huge values, huge prompts, far boxes, NUL labels."""
    from hostile import nested_json

    far = {"ijk": [[-1e300, -1e300, 0], [1e300, 1e300, 0]]}
    return [
        nested_json(), b'{"series": ' + nested_json(2000) + b"}", b"[]", b"\xff\xfe", b'{"a": 1e999999}',
        json.dumps({"series": "1." + "2" * 1_000_000}).encode(),
        json.dumps({"series": series, "prompts": {"points": [{"ijk": [1, 1, 0]}] * 10_000}, "mode": "2d"}).encode(),
        json.dumps({"points": [{"ijk": [1, 1, 0]}] * 10_000}).encode(),
        json.dumps({"series": series, "prompts": {"boxes": [far]}, "mode": "2d"}).encode(),
        json.dumps({"boxes": [far]}).encode(),
        json.dumps({"series": {"series_instance_uid": series, "study_instance_uid": "1.2.3"}}).encode(),
        json.dumps({"series": series, "segment": {"label": "liver\x00"}}).encode(),
        json.dumps({"outputs": ["seg"] * 100_000, "destinations": ["x" * 100_000]}).encode(),
        json.dumps({"series": study, "ttl_seconds": 1e300, "mode": "\u0663d"}).encode(),
    ]


def _hostile_params() -> list[str | bytes]:
    from hostile import nested_json

    return [nested_json().decode(), json.dumps({"foreground": [[1, 1, 0]] * 10_000}),
            json.dumps({"pos_lassos": [[[1, 1, 0], [5, 5, 0]]] * 1000}),
            json.dumps({"pos_scribbles": [[[1, 1, 0]] * 100_000]}),
            json.dumps({"pos_boxes": [[[-1e300, 0, 0], [1e300, 5, 0]]]}),
            json.dumps({"roi": [0, 0, 1e300, 1e300, 0, 0]}), json.dumps({"foreground": "[" * 10_000}),
            json.dumps({"foreground": [[1, 1, "\u0663"]], "label_info": [{"name": "a\x00"}]}), "[]"]


def test_every_route_survives_the_hostile_inputs(make_app: Any, tmp_path: Path) -> None:
    """Each operation of /openapi.json, with hostile path ids, query values, JSON bodies, params and uploads:
    no 5xx, every answer within a bound (the attack found 500s and answers that never came)."""
    from hostile import damaged_nifti_gz, nested_json, zip_of_copies

    ph = make_phantom_series(tmp_path / "ph")
    app = make_app(settings_for(tmp_path / "node"), ph.paths)
    c = app.client
    sid = c.post("/v1/sessions", json={"series": ph.series_instance_uid}).json()["id"]
    doc = c.get("/openapi.json").json()
    ids = [sid, "\u0663", "x" * 5000, "0123456789abcdef0123456789abcdef"]
    queries = ["\u0663", "-1e300", "a\x00b", "x" * 50_000, ph.series_instance_uid]
    bodies = _hostile_json(ph.series_instance_uid, ph.study_instance_uid)
    uploads = [("x.nii.gz", damaged_nifti_gz()), ("s.zip", zip_of_copies(b"\0" * 8_000_000, 200)),
               ("s.zip", zip_of_copies(b"junk", 30_000))]
    failures: list[str] = []
    calls = 0
    t_all = time.monotonic()
    for template, ops in doc["paths"].items():
        for method, op in ops.items():
            if method == "parameters":
                continue
            names = [p["name"] for p in op.get("parameters", []) if p["in"] == "query"]
            content = op.get("requestBody", {}).get("content", {})
            for n, ident in enumerate(ids):
                path = template
                for p in op.get("parameters", []):
                    if p["in"] == "path":
                        path = path.replace("{" + p["name"] + "}", "3" if p["name"] == "k" and n == 0 else ident)
                query = {name: queries[(n + i) % len(queries)] for i, name in enumerate(names)}
                requests: list[dict[str, Any]] = []
                if "application/json" in content:
                    requests += [{"content": b, "headers": {"Content-Type": "application/json"}}
                                 for b in (bodies if n == 0 else bodies[:3])]
                elif "multipart/form-data" in content:
                    requests += [{"files": {"params": (None, p) if isinstance(p, str) else ("params.json", p)}}
                                 for p in ([*_hostile_params(), b"\xff\xfe" * 3, nested_json()] if n == 0 else [])]
                    requests += [{"files": {"files": u, "file": u}} for u in (uploads if n == 0 else [])]
                else:
                    requests.append({})
                for kw in requests:
                    t0 = time.monotonic()
                    r = c.request(method.upper(), path, params=query, **kw)
                    calls += 1
                    took = time.monotonic() - t0
                    if r.status_code >= 500 or took > MAX_SECONDS:
                        failures.append(f"{method.upper()} {path[:80]} {str(kw)[:120]} -> {r.status_code} in "
                                        f"{took:.1f} s: {r.text[:200]}")
                    assert len(r.content) < 200_000 or r.headers.get("content-type", "").startswith(
                        ("application/dicom", "application/gzip", "application/x-ainode", "multipart/")), path
    assert calls > 250
    assert not failures, "\n".join(failures[:10])
    assert time.monotonic() - t_all < 120
    assert c.get("/v1/status").status_code == 200
