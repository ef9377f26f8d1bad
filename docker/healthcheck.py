"""Container health check of ainode: GET /health on the node's own HTTP port; exit 0 when it answers ok.

Used by docker/Dockerfile (HEALTHCHECK) and docker/compose.yaml, and run natively by
tests/docker/test_stack_native.py. The port comes from the same settings the node reads (the TOML file given
with --config or $AINODE_CONFIG, then AINODE_* environment variables), so it follows any override.

Exit status: 0 healthy, 1 not healthy (no answer, an error status, or a body other than status ok),
2 when the settings cannot be read or the HTTP server is disabled.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import urllib.error
import urllib.request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", metavar="FILE", help="TOML settings file (default: $AINODE_CONFIG)")
    parser.add_argument("--timeout", type=float, default=4.0, metavar="SECONDS")
    args = parser.parse_args(argv)
    try:
        from config.settings import ConfigError, Settings
    except ImportError as exc:  # pragma: no cover - only when run outside the node's environment
        print(f"unhealthy: the ainode package cannot be imported ({exc})", file=sys.stderr)
        return 2
    try:
        settings = Settings.load(args.config)
    except ConfigError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 2
    http = settings.http
    if not http.port:
        print("unhealthy: the HTTP server is disabled (http.port = 0)", file=sys.stderr)
        return 2
    host = "127.0.0.1" if http.host in ("", "0.0.0.0", "::") else http.host
    host = f"[{host}]" if ":" in host else host
    tls = bool(getattr(http, "tls_cert", ""))
    url = f"{'https' if tls else 'http'}://{host}:{http.port}/health"
    context = None
    if tls:
        # The node's own port: liveness only, so its certificate is not checked here.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=args.timeout, context=context) as rsp:
            body = json.loads(rsp.read() or b"{}")
    except (OSError, urllib.error.URLError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if not isinstance(body, dict) or body.get("status") != "ok":
        print(f"unhealthy: {url} answered {body!r}", file=sys.stderr)
        return 1
    print(f"healthy: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
