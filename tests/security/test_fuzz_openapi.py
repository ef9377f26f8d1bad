"""Property-based fuzzing of the REST API from its OpenAPI document (schemathesis), in-process over ASGI.

A bounded, deterministic run: ``EXAMPLES`` schema-valid and ``EXAMPLES`` schema-invalid requests per
operation (hypothesis derandomized, no example database), with a phantom series in the store so some
requests reach the handlers' deeper paths. Checks: no 5xx, declared status codes, content types,
headers and response schemas; every call answers within ``MAX_SECONDS`` (no hangs).

Not checked: schemathesis' ``positive_data_acceptance`` — a request can be schema-valid and still
semantically wrong (a prompt outside the volume, an unknown series), which the API answers 4xx by design.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import schemathesis
from api_helpers import make_phantom_series
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis import checks as st_checks
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
                    nonlocal calls
                    t0 = time.monotonic()
                    response = case.call()
                    calls += 1
                    took = time.monotonic() - t0
                    if took > MAX_SECONDS:
                        slow.append(f"{op.method.upper()} {op.path}: {took:.1f} s")
                    try:
                        case.validate_response(response, checks=CHECKS)
                    except Exception as exc:  # noqa: BLE001 - collected, reported together below
                        failures.append(f"{op.method.upper()} {op.path} [{mode.value}] -> {response.status_code}: "
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
