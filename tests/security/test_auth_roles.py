"""Bearer tokens with roles: every route of the application (OpenAPI document + enumerated routes) is checked."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from config.settings import Secret, Settings
from node.api.auth import ADMIN, DEFAULT_ROLES, PUBLIC, READ, SEGMENT, declared_role, parse_tokens
from sec_helpers import TOKEN_ENTRIES, TOKENS, concrete, settings_for, walk_routes

#: Routes answered without a token (docs/security.md): liveness, the API description, the static prompt
#: page and viewer bundles. Anything else returning data must need a role.
DOCUMENTED_PUBLIC = {"/health", "/openapi.json", "/", "/ohif"}
DOCUMENTED_PUBLIC_PREFIXES = ("/prompt/", "/ohif/")

#: A token that lacks the role (wrong role) and one that has exactly it (right role).
WRONG = {READ: TOKENS["segment"], SEGMENT: TOKENS["read"], ADMIN: TOKENS["both"]}
RIGHT = {READ: TOKENS["read"], SEGMENT: TOKENS["segment"], ADMIN: TOKENS["admin"]}


def _request(client: Any, method: str, path: str, token: str | None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    kwargs: dict[str, Any] = {}
    if method in ("POST", "PUT", "PATCH"):
        kwargs["content"] = b"{}"
        headers["Content-Type"] = "application/json"
    return client.request(method, path, headers=headers, **kwargs)


def _operations(app: Any, doc: dict[str, Any]) -> dict[tuple[str, str], str]:
    """(method, template) → where it was found, for the OpenAPI document and the app's route tree."""
    ops: dict[tuple[str, str], str] = {}
    for path, item in doc["paths"].items():
        for method in item:
            ops[(method.upper(), path)] = "openapi"
    for kind, method, template in walk_routes(app.routes):
        assert kind != "unknown", f"a route of an unknown type escapes the walk: {template}"
        if method == "HEAD":
            continue
        ops.setdefault((method, template), kind)
    return ops


def test_token_forms_and_roles() -> None:
    entries = parse_tokens([Secret("alice:tok1"), Secret("ops:admin:tok2"), Secret("v:read:tok:with:colons"),
                            Secret("s:read+segment:tok4"), Secret("c:not-roles:tok5")])
    assert [(e.user, sorted(e.roles), e.token) for e in entries] == [
        ("alice", sorted(DEFAULT_ROLES), b"tok1"), ("ops", ["admin"], b"tok2"),
        ("v", ["read"], b"tok:with:colons"), ("s", ["read", "segment"], b"tok4"),
        ("c", sorted(DEFAULT_ROLES), b"not-roles:tok5")]
    assert "tok1" not in repr(entries)
    with pytest.raises(ValueError, match=r"unknown role\(s\) \['reader'\]") as exc:
        parse_tokens([Secret("bob:reader:sekrit")])
    assert "sekrit" not in str(exc.value)
    with pytest.raises(ValueError, match="not of the form") as exc:
        parse_tokens([Secret("sekrit-only")])
    assert "sekrit" not in str(exc.value)
    with pytest.raises(ValueError, match="repeats another entry's token"):
        parse_tokens([Secret("a:same"), Secret("b:read:same")])
    # The environment form: comma-separated entries.
    s = Settings.load(environ={"AINODE_API_TOKENS": "alice:t1,ops:admin+read:t2"})
    assert [(e.user, sorted(e.roles)) for e in parse_tokens(s.api.tokens)] == [
        ("alice", ["read", "segment"]), ("ops", ["admin", "read"])]


def test_every_route_refuses_anonymous_and_wrong_role(make_app: Any, tmp_path: Path) -> None:
    from config.settings import DestinationSettings, ViewerSettings

    # Archive mode of the viewer adds the /ohif-archive proxy: it must be in the walk too.
    archive = DestinationSettings(kind="dicomweb", url="http://127.0.0.1:9/dicom-web")
    settings = settings_for(tmp_path / "node", tokens=TOKEN_ENTRIES, destinations={"ARCH": archive})
    settings = dataclasses.replace(settings, viewer=ViewerSettings(archive="ARCH"))
    app = make_app(settings)
    c = app.client
    doc = c.get("/openapi.json").json()
    ops = _operations(app.app, doc)
    undeclared = sorted(f"{m} {p}" for m, p in ops if declared_role(m, p) is None)
    assert not undeclared, f"routes without a declared role (node/api/auth.py ROUTE_ROLES): {undeclared}"
    seen_roles: set[str] = set()
    for (method, template), where in sorted(ops.items()):
        role = declared_role(method, template)
        assert role is not None
        seen_roles.add(role)
        path = concrete(template)
        if where == "openapi":
            assert doc["paths"][template][method.lower()]["x-required-role"] == role
        if role == PUBLIC:
            assert template in DOCUMENTED_PUBLIC or template.startswith(DOCUMENTED_PUBLIC_PREFIXES), \
                f"{method} {template} is public but not documented as such"
            r = _request(c, method, path, None)
            assert r.status_code not in (401, 403), (method, path, r.status_code)
            continue
        anonymous = _request(c, method, path, None)
        assert anonymous.status_code == 401, (method, path, anonymous.status_code, anonymous.text[:200])
        assert anonymous.headers["www-authenticate"].startswith("Bearer realm="), (method, path)
        invalid = _request(c, method, path, "not-a-token")
        assert invalid.status_code == 401 and 'error="invalid_token"' in invalid.headers["www-authenticate"]
        wrong = _request(c, method, path, WRONG[role])
        assert wrong.status_code == 403, (method, path, role, wrong.status_code, wrong.text[:200])
        assert f'scope="{role}"' in wrong.headers["www-authenticate"]
        assert f"needs role '{role}'" in wrong.json()["error"]
        right = _request(c, method, path, RIGHT[role])
        assert right.status_code not in (401, 403), (method, path, role, right.status_code, right.text[:200])
        if role != ADMIN:
            assert _request(c, method, path, TOKENS["admin"]).status_code not in (401, 403)  # admin has all roles
    assert {READ, SEGMENT, ADMIN, PUBLIC} <= seen_roles
    # The walk covered the routes outside the OpenAPI document too.
    kinds = set(ops.values())
    assert "openapi" in kinds and "route" in kinds
    assert any(t.startswith("/dicomweb/") for _m, t in ops)
    assert any(t.startswith("/ohif-archive/") for _m, t in ops) and any(t.startswith("/ohif/") for _m, t in ops)
    # Writes to the public static folders are not public (undeclared = admin).
    assert c.post("/prompt/index.html", content=b"x").status_code == 401
    # Unknown paths need admin (fail closed): no anonymous probing of what exists.
    assert c.get("/no/such/route").status_code == 401
    assert c.get("/no/such/route", headers={"Authorization": f"Bearer {TOKENS['both']}"}).status_code == 403
    assert c.get("/no/such/route", headers={"Authorization": f"Bearer {TOKENS['admin']}"}).status_code == 404
    # Tokens never appear in answers.
    r = c.get("/v1/status", headers={"Authorization": "Bearer " + TOKENS["segment"]})
    assert TOKENS["segment"] not in r.text


def test_roles_in_practice(make_app: Any, tmp_path: Path) -> None:
    """A read-only user lists and reads; it cannot segment, open sessions or store by STOW-RS."""
    import peers

    ct = peers.make_ct_series(tmp_path / "ct", n=3)
    app = make_app(settings_for(tmp_path / "node", tokens=TOKEN_ENTRIES), ct.paths)
    c = app.client
    read = {"Authorization": f"Bearer {TOKENS['read']}"}
    seg = {"Authorization": f"Bearer {TOKENS['segment']}"}
    r = c.get("/dicomweb/studies", headers=read)
    assert r.status_code == 200 and ct.study_uid in r.text
    assert c.get(f"/dicomweb/studies/{ct.study_uid}/series/{ct.series_uid}/metadata", headers=seg).status_code == 403
    stow_type = 'multipart/related; type="application/dicom"'
    stow = c.post("/dicomweb/studies", headers={**read, "Content-Type": stow_type}, content=b"")
    assert stow.status_code == 403 and "needs role 'segment'" in stow.json()["error"]
    body = {"series": {"series_instance_uid": ct.series_uid}}
    assert c.post("/v1/sessions", json=body, headers=read).status_code == 403
    opened = c.post("/v1/sessions", json=body, headers=seg)
    assert opened.status_code == 201 and opened.json()["user"] == "segmenter"
    assert c.get("/v1/status", headers=read).status_code == 200
    assert c.get("/v1/status", headers=seg).status_code == 403
    assert c.get("/openapi.json").json()["paths"]["/v1/sessions"]["post"]["security"][0] == {"bearer": ["segment"]}


def test_auth_off_lets_everything_through(make_app: Any, tmp_path: Path) -> None:
    app = make_app(settings_for(tmp_path / "node"))
    assert app.client.get("/v1/status").status_code == 200
    assert app.client.get("/dicomweb/studies").status_code in (200, 204)


def test_malformed_tokens_stop_start_up(tmp_path: Path) -> None:
    from config.settings import ConfigError
    from dicom_io.store import Store
    from node.app import create_app

    store = Store.open(tmp_path / "store", durable=False)
    try:
        with pytest.raises(ConfigError, match=r"api.tokens\[1\] \(user 'bob'\): unknown role") as exc:
            create_app(settings_for(tmp_path, tokens=(Secret("alice:ok-1"), Secret("bob:raed:s3cr3t"))), store)
        assert "s3cr3t" not in str(exc.value)
    finally:
        store.close()


def test_admin_endpoints(make_app: Any, tmp_path: Path) -> None:
    app = make_app(settings_for(tmp_path / "node", tokens=TOKEN_ENTRIES))
    c = app.client
    admin = {"Authorization": f"Bearer {TOKENS['admin']}"}
    both = {"Authorization": f"Bearer {TOKENS['both']}"}
    assert c.get("/v1/config", headers=both).status_code == 403
    r = c.get("/v1/config", headers=admin)
    assert r.status_code == 200
    cfg = r.json()
    assert cfg["api"]["tokens"] == ["**********"] * len(TOKEN_ENTRIES)
    assert all(t not in r.text for t in TOKENS.values())
    assert cfg["dimse"]["ae_title"] == "AINODE"
    r = c.get("/v1/outbox?state=pending", headers=admin)
    assert r.status_code == 200 and r.json() == {"counts": {}, "entries": []}
    r = c.get("/v1/outbox?state=lost", headers=admin)
    assert r.status_code == 422 and r.json()["field"] == "state"
    assert c.get("/v1/outbox?limit=0", headers=admin).status_code == 422
