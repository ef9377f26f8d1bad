"""Bearer tokens with roles for every HTTP route (tokens from ``api.tokens``; off when none are configured).

Roles
-----
``read``
    GET listings, results, status and metrics; QIDO-RS / WADO-RS; MONAI Label / AIAA info.
``segment``
    Segmentations, interactive sessions (native, MONAI Label, OHIF-AI, AIAA), cancelling jobs, and
    STOW-RS (storing instances, e.g. a viewer's SEG, is a write).
``admin``
    Administration (outbox, configuration); ``admin`` also grants ``read`` and ``segment``.

Tokens are configured as ``USER:TOKEN`` (roles ``read`` + ``segment``: what every token could do
before roles existed) or ``USER:ROLE+ROLE:TOKEN`` (e.g. ``ops:admin:…``, ``viewer:read:…``).

Every route's role is declared in :data:`ROUTE_ROLES`; a path no rule matches needs ``admin``
(fail closed), and ``tests/security/test_auth_roles.py`` enumerates the application's routes so a
new route cannot go undeclared.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from config.settings import Secret

logger = logging.getLogger(__name__)

READ = "read"
SEGMENT = "segment"
ADMIN = "admin"
#: The roles a token may carry.
ROLES = (READ, SEGMENT, ADMIN)
#: Pseudo-role of routes answered without a token.
PUBLIC = "public"
#: Roles of a token configured as ``USER:TOKEN``.
DEFAULT_ROLES = frozenset({READ, SEGMENT})

_ROLE_LIST = re.compile(r"^[A-Za-z]+(\+[A-Za-z]+)*$")

_R, _W = ("GET", "HEAD"), ("POST", "PUT", "DELETE", "PATCH")

#: (methods, path template, role): the first rule whose method and template match decides.
#: Templates use Starlette's syntax (``{id}``, ``{rest:path}``); paths are the full request paths.
ROUTE_ROLES: tuple[tuple[tuple[str, ...], str, str], ...] = (
    # Liveness and the API description carry no data.
    (_R, "/health", PUBLIC),
    (_R, "/openapi.json", PUBLIC),
    # The OHIF viewer's static files (HTML, JS, CSS): no patient data; the data it shows comes from
    # /dicomweb and the API, which need tokens.
    (_R, "/ohif", PUBLIC),
    (_R, "/ohif/", PUBLIC),
    (_R, "/ohif/{rest:path}", PUBLIC),
    # The prompt page (node/prompt_page.py): a static bundle; it asks for the token and sends it with
    # every API and DICOMweb request.
    (_R, "/", PUBLIC),
    (_R, "/prompt", PUBLIC),
    (_R, "/prompt/{rest:path}", PUBLIC),
    # The viewer's proxy to the archive (archive mode) returns patient data.
    (_R, "/ohif-archive", READ),
    (_R, "/ohif-archive/{rest:path}", READ),
    # DICOMweb: QIDO-RS / WADO-RS read, STOW-RS writes.
    (_R, "/dicomweb", READ),
    (_R, "/dicomweb/{rest:path}", READ),
    (("POST",), "/dicomweb/{rest:path}", SEGMENT),
    # Node.
    (_R, "/v1/status", READ),
    (_R, "/metrics", READ),
    # Native API.
    (("POST",), "/v1/segmentations", SEGMENT),
    (_R, "/v1/segmentations", READ),
    (_R, "/v1/segmentations/{id}", READ),
    (_R, "/v1/segmentations/{id}/nifti", READ),
    (_R, "/v1/segmentations/{id}/seg", READ),
    (_R, "/v1/jobs/{id}", READ),
    (("DELETE",), "/v1/jobs/{id}", SEGMENT),
    (_R + _W, "/v1/sessions", SEGMENT),
    (_R + _W, "/v1/sessions/{rest:path}", SEGMENT),
    (_R + _W, "/v1/prefetch", SEGMENT),
    (_R + _W, "/v1/prefetch/{rest:path}", SEGMENT),
    # Administration.
    (_R + _W, "/v1/admin", ADMIN),
    (_R + _W, "/v1/admin/{rest:path}", ADMIN),
    (_R + _W, "/v1/outbox", ADMIN),
    (_R + _W, "/v1/outbox/{rest:path}", ADMIN),
    (_R + _W, "/v1/config", ADMIN),
    # AIAA v1.
    (_R, "/v1/models", READ),
    (("POST",), "/v1/segmentation", SEGMENT),
    (("POST",), "/v1/deepgrow", SEGMENT),
    (("POST",), "/v1/dextr3d", SEGMENT),
    (("POST",), "/v1/inference", SEGMENT),
)

#: MONAI Label (and OHIF-AI, which posts to /infer/segmentation); also under ``api.monailabel_root_path``.
MONAILABEL_ROLES: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (_R, "/info", READ),
    (_R, "/info/", READ),
    (_R, "/auth/", READ),
    (_R, "/datastore/", READ),
    (_R, "/datastore/image/info", READ),
    (_R, "/datastore/image/info/", READ),
    (("POST",), "/infer/{model}", SEGMENT),
    (("PUT",), "/session", SEGMENT),
    (("PUT",), "/session/", SEGMENT),
    (_R + ("DELETE",), "/session/{id}", SEGMENT),
)
ROUTE_ROLES = ROUTE_ROLES + MONAILABEL_ROLES


@dataclass(frozen=True)
class Principal:
    """Who made a request: the token's user and roles (``anonymous`` with every role when auth is off)."""

    user: str
    roles: frozenset[str]

    def has(self, role: str) -> bool:
        return role == PUBLIC or ADMIN in self.roles or role in self.roles


ANONYMOUS = Principal("anonymous", frozenset(ROLES))


@dataclass(frozen=True)
class TokenEntry:
    user: str
    roles: frozenset[str]
    token: bytes

    def __repr__(self) -> str:  # never the token
        return f"TokenEntry(user={self.user!r}, roles={sorted(self.roles)!r})"


def parse_tokens(tokens: Sequence[Secret]) -> list[TokenEntry]:
    """``USER:TOKEN`` / ``USER:ROLE+ROLE:TOKEN`` secrets → token entries.

    ``USER:TOKEN`` gets :data:`DEFAULT_ROLES` (``read`` + ``segment``). A middle field made of
    ``+``-joined words is a role list; an unknown word in it is an error (so ``alice:reader:…`` is
    not silently taken as a token containing a colon).

    Raises
    ------
    ValueError
        When an entry is malformed, names an unknown role or repeats a token (the message never
        contains the token).
    """
    out: list[TokenEntry] = []
    for n, secret in enumerate(tokens):
        text = secret.get_secret_value() if isinstance(secret, Secret) else str(secret)
        user, sep, rest = text.partition(":")
        if not sep or not user.strip() or not rest:
            raise ValueError(f"api.tokens[{n}] is not of the form USER:TOKEN or USER:ROLE+ROLE:TOKEN.")
        roles = DEFAULT_ROLES
        head, sep2, tail = rest.partition(":")
        if sep2 and _ROLE_LIST.match(head):
            names = [r.lower() for r in head.split("+")]
            unknown = sorted(set(names) - set(ROLES))
            if unknown:
                raise ValueError(f"api.tokens[{n}] (user '{user.strip()}'): unknown role(s) {unknown}; "
                                 f"roles are {', '.join(ROLES)}.")
            if not tail:
                raise ValueError(f"api.tokens[{n}] (user '{user.strip()}') has roles but no token.")
            roles, rest = frozenset(names), tail
        out.append(TokenEntry(user.strip(), roles, rest.encode()))
    seen: set[bytes] = set()
    for n, entry in enumerate(out):
        if entry.token in seen:
            raise ValueError(f"api.tokens[{n}] (user '{entry.user}') repeats another entry's token.")
        seen.add(entry.token)
    return out


@dataclass(frozen=True)
class _Rule:
    methods: frozenset[str]
    template: str
    role: str
    regex: re.Pattern[str]


def compile_rules(rules: Iterable[tuple[Sequence[str], str, str]]) -> tuple[_Rule, ...]:
    out = []
    for methods, template, role in rules:
        if role not in ROLES and role != PUBLIC:
            raise ValueError(f"Route rule {template}: unknown role '{role}'.")
        regex, _fmt, _conv = compile_path(template)
        out.append(_Rule(frozenset(m.upper() for m in methods), template, role, regex))
    return tuple(out)


_RULES = compile_rules(ROUTE_ROLES)


def route_roles(monailabel_root: str = "", site_viewer_reserved: Iterable[str] | None = None) -> tuple[_Rule, ...]:
    """:data:`ROUTE_ROLES` plus the rules the settings add, compiled.

    Parameters
    ----------
    monailabel_root
        ``api.monailabel_root_path`` (e.g. ``/monai``): the MONAI Label rules again under that prefix.
    site_viewer_reserved
        With ``viewer.ohif_ai_dist``: the first path segments of the node's own routes. GET/HEAD of any
        other path is then public (the OHIF-AI viewer's static files and its SPA routes at the site root:
        no patient data; the data comes from ``/dicomweb`` and the API, which keep their roles).
    """
    rules = list(ROUTE_ROLES)
    if monailabel_root:
        rules += [(methods, monailabel_root + template, role) for methods, template, role in MONAILABEL_ROLES]
    compiled = compile_rules(rules)
    if site_viewer_reserved is not None:
        alternatives = "|".join(re.escape(s) for s in sorted(set(site_viewer_reserved)) if s)
        regex = re.compile(rf"^/(?!(?:{alternatives})(?:/|$))[^?]*$" if alternatives else r"^/[^?]*$")
        compiled += (_Rule(frozenset(_R), "/{rest:path}", PUBLIC, regex),)
    return compiled


def declared_role(method: str, path: str, rules: Sequence[_Rule] = _RULES) -> str | None:
    """The role a request needs per :data:`ROUTE_ROLES`, or None when no rule matches."""
    method = method.upper()
    for rule in rules:
        if method in rule.methods and rule.regex.match(path):
            return rule.role
    return None


def required_role(method: str, path: str, rules: Sequence[_Rule] = _RULES) -> str:
    """The role a request needs; ``admin`` for anything undeclared (fail closed)."""
    return declared_role(method, path, rules) or ADMIN


def _answer(status: int, message: str, challenge: bytes) -> tuple[dict, dict]:
    body = json.dumps({"error": message, "detail": message, "field": "Authorization"}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode()),
                         (b"www-authenticate", challenge)]}
    return start, {"type": "http.response.body", "body": body}


class AuthMiddleware:
    """Require ``Authorization: Bearer <token>`` carrying the role the route needs.

    Sets ``scope["ainode.user"]`` and ``scope["ainode.principal"]``. With no tokens configured every
    request passes as ``anonymous`` with all roles. A missing or unknown token is answered 401, a token
    without the route's role 403 (both with ``WWW-Authenticate: Bearer``, RFC 6750). CORS preflights
    (``OPTIONS``) pass. Applied once, around the whole application, by :func:`node.app.create_app`
    (a request that already carries a principal passes unchanged).
    """

    def __init__(self, app: ASGIApp, tokens: Sequence[Secret] = (),
                 rules: Iterable[tuple[Sequence[str], str, str] | _Rule] | None = None) -> None:
        self.app = app
        self.tokens = parse_tokens(tokens)
        if rules is None:
            self.rules = _RULES
        else:
            given = list(rules)  # compiled rules (route_roles) are taken as they are
            self.rules = tuple(r if isinstance(r, _Rule) else compile_rules([r])[0] for r in given)

    def _principal(self, header: str) -> Principal | None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return None
        given = value.strip().encode("latin-1", "replace")
        found = None
        for entry in self.tokens:  # compare with every token: timing does not tell which one matched
            if hmac.compare_digest(given, entry.token):
                found = Principal(entry.user, entry.roles)
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or "ainode.principal" in scope:
            await self.app(scope, receive, send)
            return
        if not self.tokens:
            scope["ainode.user"], scope["ainode.principal"] = ANONYMOUS.user, ANONYMOUS
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        path = scope["path"]
        if method == "OPTIONS":  # CORS preflight: never authenticated (browsers send no credentials)
            await self.app(scope, receive, send)
            return
        role = required_role(method, path, self.rules)
        header = ""
        for key, value in scope.get("headers", []):
            if key == b"authorization":
                header = value.decode("latin-1")
        principal = self._principal(header) if header else None
        if role == PUBLIC:
            p = principal or Principal("anonymous", frozenset())
            scope["ainode.user"], scope["ainode.principal"] = p.user, p
            await self.app(scope, receive, send)
            return
        if principal is None:
            reason = "no token" if not header else "invalid token"
            logger.warning("Refused %s %s: %s", method, path, reason)
            if not header:
                message = "Authorization: a bearer token is required (Authorization: Bearer <token>)."
                challenge = b'Bearer realm="ainode"'
            else:
                message = "Authorization: the bearer token is not valid."
                challenge = b'Bearer realm="ainode", error="invalid_token"'
            await self._refuse(scope, send, 401, message, challenge)
            return
        if not principal.has(role):
            logger.warning("Refused %s %s: user '%s' lacks role '%s'", method, path, principal.user, role)
            message = (f"Authorization: user '{principal.user}' has role(s) {', '.join(sorted(principal.roles))}; "
                       f"{method} {path} needs role '{role}'.")
            challenge = f'Bearer realm="ainode", error="insufficient_scope", scope="{role}"'.encode()
            await self._refuse(scope, send, 403, message, challenge)
            return
        scope["ainode.user"], scope["ainode.principal"] = principal.user, principal
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, send: Send, status: int, message: str, challenge: bytes) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
            return
        start, body = _answer(status, message, challenge)
        await send(start)
        await send(body)


__all__ = [
    "ADMIN", "ANONYMOUS", "AuthMiddleware", "DEFAULT_ROLES", "MONAILABEL_ROLES", "PUBLIC",
    "Principal", "READ", "ROLES", "ROUTE_ROLES", "SEGMENT", "TokenEntry", "declared_role", "parse_tokens",
    "required_role", "route_roles",
]
