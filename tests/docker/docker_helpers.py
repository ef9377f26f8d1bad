"""Helpers for tests/docker: read the container config files, and run them natively (no Docker engine here).

Only the values that must differ between the containers and this host are changed, and always the same way:

* Orthanc (docker/orthanc/orthanc.json): Orthanc's own ``${NAME:-default}`` substitution from the
  environment, through :data:`ORTHANC_HOST_VARIABLES` (ports, storage and plugin paths, the node's
  address, remote access off for a loopback-only run). The defaults in the file are the container's values.
* The node (docker/ainode.toml): ``AINODE_*`` environment variables (ports, bind addresses, data_dir,
  free-space floor) and, because ``[destinations.*]`` tables are TOML-only settings, a copy of the file in
  which exactly the lines of :data:`NODE_PEER_LINES` are replaced (Orthanc's host and ports).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import tomllib
import urllib.error
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import peers  # noqa: E402

ROOT = peers.ROOT
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
NODE_TOML = DOCKER / "ainode.toml"
ORTHANC_JSON = DOCKER / "orthanc" / "orthanc.json"
HEALTHCHECK = DOCKER / "healthcheck.py"
#: The console script of this install: the entry point the image runs (ENTRYPOINT ["ainode"]).
AINODE = Path(sys.executable).with_name("ainode")

#: Every variable orthanc.json reads, and what the native run sets it to (``{...}`` filled per run).
ORTHANC_HOST_VARIABLES = {
    "ORTHANC_STORAGE": "{storage}",
    "ORTHANC_PLUGINS_DIR": "/usr/share/orthanc/plugins",   # Debian's orthanc-dicomweb
    "ORTHANC_HTTP_PORT": "{http_port}",
    "ORTHANC_DICOM_PORT": "{dicom_port}",
    "ORTHANC_REMOTE_ACCESS": "false",                       # loopback only on this host
    "ORTHANC_AINODE_HOST": "127.0.0.1",
    "ORTHANC_AINODE_PORT": "{node_port}",
}

#: The only lines of docker/ainode.toml rewritten for the native run: (line in the file, replacement).
NODE_PEER_LINES = (
    ('host = "orthanc"', 'host = "127.0.0.1"'),
    ("port = 4242", "port = {orthanc_dicom_port}"),
    ('url = "http://orthanc:8042/dicom-web"', 'url = "http://127.0.0.1:{orthanc_http_port}/dicom-web"'),
)

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def orthanc_variables(text: str) -> dict[str, str | None]:
    """``{name: default}`` of every ``${NAME}`` / ``${NAME:-default}`` in an Orthanc config text (not in comments)."""
    return {m.group(1): m.group(2) for m in _VARIABLE.finditer(strip_json_comments(text))}


def orthanc_substitute(text: str, environ: dict[str, str]) -> str:
    """Orthanc's substitution: ``${NAME}`` → the variable (else empty), ``${NAME:-d}`` → it, else ``d``."""
    def repl(m: re.Match[str]) -> str:
        value = environ.get(m.group(1))
        if value:
            return value
        return m.group(2) if m.group(2) is not None else ""
    return _VARIABLE.sub(repl, text)


def strip_json_comments(text: str) -> str:
    """Drop ``//`` and ``/* */`` comments outside strings (Orthanc's config dialect → strict JSON)."""
    out, i, n, in_str = [], 0, len(text), False
    while i < n:
        c = text[i]
        if in_str:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
            out.append(c)
        elif text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
            continue
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
            continue
        else:
            out.append(c)
        i += 1
    return "".join(out)


def orthanc_config(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """docker/orthanc/orthanc.json as Orthanc reads it (``environ`` empty: the container's values)."""
    return json.loads(strip_json_comments(orthanc_substitute(ORTHANC_JSON.read_text(), environ or {})))


def compose() -> dict[str, Any]:
    """docker/compose.yaml, parsed."""
    import yaml

    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def node_config() -> dict[str, Any]:
    with open(NODE_TOML, "rb") as fh:
        return tomllib.load(fh)


def native_node_toml(out: Path, orthanc_dicom_port: int, orthanc_http_port: int) -> Path:
    """Copy docker/ainode.toml with only :data:`NODE_PEER_LINES` replaced (each must occur exactly once)."""
    text = NODE_TOML.read_text()
    for old, new in NODE_PEER_LINES:
        pattern = re.compile(rf"^{re.escape(old)}(?=\s*(#.*)?$)", re.MULTILINE)
        if len(pattern.findall(text)) != 1:
            raise AssertionError(f"docker/ainode.toml must hold the line {old!r} exactly once")
        text = pattern.sub(new.format(orthanc_dicom_port=orthanc_dicom_port, orthanc_http_port=orthanc_http_port),
                           text)
    out.write_text(text)
    return out


def start_orthanc(workdir: Path, node_port: int) -> peers.Proc:
    """Debian's Orthanc with docker/orthanc/orthanc.json itself (not a copy), host values by environment."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    http_port, dicom_port = peers.free_port(), peers.free_port()
    values = {"storage": str(workdir / "db"), "http_port": http_port, "dicom_port": dicom_port, "node_port": node_port}
    env = {k: v.format(**values) for k, v in ORTHANC_HOST_VARIABLES.items()}
    env["TCP_NODELAY"] = "1"
    log = workdir / "orthanc.stdout"
    p = peers.start([peers.ORTHANC, f"--logdir={workdir / 'logs'}", str(ORTHANC_JSON)], log, env=env)
    proc = peers.Proc(p, log, port=dicom_port, http_port=http_port, workdir=workdir)
    deadline = time.monotonic() + 30
    while True:
        try:
            peers.orthanc_get(proc, "/system")
            break
        except (OSError, urllib.error.URLError) as exc:
            if p.poll() is not None or time.monotonic() > deadline:
                proc.stop()
                raise RuntimeError("Orthanc did not start:\n" + proc.log_text()[-2000:]
                                   + orthanc_log(proc)[-2000:]) from exc
            time.sleep(0.05)
    peers.wait_tcp(dicom_port, proc=p)
    return proc


def orthanc_log(proc: peers.Proc) -> str:
    assert proc.workdir is not None
    path = proc.workdir / "logs" / "Orthanc.log"
    return path.read_text(errors="replace") if path.exists() else ""


def node_env(data_dir: Path, dimse_port: int, http_port: int) -> dict[str, str]:
    """The AINODE_* overrides of the native run (loopback, free ports, a temporary data_dir)."""
    return {"AINODE_DATA_DIR": str(data_dir), "AINODE_DIMSE_HOST": "127.0.0.1", "AINODE_DIMSE_PORT": str(dimse_port),
            "AINODE_HTTP_HOST": "127.0.0.1", "AINODE_HTTP_PORT": str(http_port), "AINODE_STORE_MIN_FREE_GB": "0",
            "PYTHONUNBUFFERED": "1"}


def start_node(data_dir: Path, config: Path, dimse_port: int, http_port: int) -> peers.Proc:
    """``ainode serve --config FILE``: the image's ENTRYPOINT + CMD, with the native overrides."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "serve.log"
    env = node_env(data_dir, dimse_port, http_port)
    p = peers.start([str(AINODE), "serve", "--config", str(config)], log, env=env, cwd=data_dir)
    try:
        peers.wait_tcp(dimse_port, timeout=60, proc=p)
        peers.wait_tcp(http_port, timeout=60, proc=p)
    except Exception as exc:
        peers.Proc(p, log).stop()
        raise RuntimeError("ainode serve did not start:\n" + log.read_text(errors="replace")[-3000:]) from exc
    return peers.Proc(p, log, port=dimse_port, http_port=http_port, workdir=data_dir)


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without AINODE_* variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AINODE_")}
    env.update(extra)
    return env
