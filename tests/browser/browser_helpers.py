"""Run a browser scenario in Debian's headless chromium through playwright-core (installed by
``scripts/install.sh --test`` into tests/browser/node_modules; no browser is ever downloaded).

A scenario is a Node.js module exporting ``async (page, params, tools) => result`` (see runner.js):
``run_browser("my_scenario.js", {"base": url}, tmp_path)`` returns a :class:`BrowserRun` whose
``result`` is the scenario's return value (JSON), ``requests`` every response the page saw and
``console`` the page's console, page errors and failed requests. A scenario that throws raises
``AssertionError`` carrying that console, so a failing test shows what the browser said.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "runner.js"
NODE_MODULES = HERE / "node_modules"
#: The real chromium binary: the /usr/bin/chromium shell wrapper adds flags and prints noise.
CHROMIUM = Path("/usr/lib/chromium/chromium")
#: Flags: headless in a container, software WebGL, and nothing that reaches out to the network
#: (background networking, component updates, sync, QUIC, first-run tasks). Requests to hosts other
#: than loopback are also aborted by the runner.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--metrics-recording-only",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
)


@dataclass
class BrowserRun:
    """What a scenario returned and what the page did."""

    result: Any
    console: list[str] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)

    def failed_requests(self) -> list[dict[str, Any]]:
        """Responses with status >= 400."""
        return [r for r in self.requests if int(r.get("status", 0)) >= 400]

    def console_text(self, last: int = 200) -> str:
        return "\n".join(self.console[-last:])


def check_browser() -> None:
    """Fail (not skip) with a clear message when chromium or playwright-core is missing."""
    problems = []
    if not CHROMIUM.exists():
        problems.append(f"{CHROMIUM} is missing (Debian package chromium)")
    if shutil.which("node") is None:
        problems.append("node is missing (Debian package nodejs)")
    if not (NODE_MODULES / "playwright-core").is_dir():
        problems.append(f"{NODE_MODULES}/playwright-core is missing")
    if problems:
        raise AssertionError("Browser tests need `bash scripts/install.sh --test`: " + "; ".join(problems))


def run_browser(scenario: str | Path, params: dict[str, Any], workdir: Path, *, timeout: float = 300.0,
                viewport: tuple[int, int] = (1400, 900), extra_args: tuple[str, ...] = ()) -> BrowserRun:
    """Run ``scenario`` (a path, or a file name in tests/browser) in a fresh chromium profile.

    Parameters
    ----------
    scenario
        The Node.js module (``module.exports = async (page, params, tools) => result``).
    params
        JSON-serialisable parameters passed to the scenario (URLs, UIDs, an output directory...).
    workdir
        A directory for the profile, spec and result files (the test's tmp_path).
    timeout
        Seconds before node and chromium are killed (their process group) and the run fails.

    Returns
    -------
    BrowserRun

    Raises
    ------
    AssertionError
        When the scenario threw or the run timed out; the message holds the browser's console.
    """
    check_browser()
    path = Path(scenario)
    if not path.is_absolute():
        path = HERE / path
    workdir.mkdir(parents=True, exist_ok=True)
    n = len(list(workdir.glob("browser-run-*.spec.json")))
    stem = workdir / f"browser-run-{n}"
    profile = workdir / f"browser-run-{n}-profile"  # fresh user-data dir per run
    profile.mkdir()
    spec = {
        "executablePath": str(CHROMIUM),
        "args": [*CHROMIUM_ARGS, *extra_args],
        "userDataDir": str(profile),
        "viewport": {"width": viewport[0], "height": viewport[1]},
        "params": params,
        "allowHosts": ["127.0.0.1", "localhost", "[::1]"],
    }
    spec_path = Path(f"{stem}.spec.json")
    result_path = Path(f"{stem}.result.json")
    log_path = Path(f"{stem}.node.log")
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1", "NODE_PATH": str(NODE_MODULES),
           "HOME": str(profile)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["node", str(RUNNER), str(path), str(spec_path), str(result_path)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=HERE, env=env, start_new_session=True)
        try:
            proc.wait(timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.poll() is None:
                # SIGTERM first: playwright closes its browser on it; then whatever is left, by PID.
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    _signal_group(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            _kill_profile_processes(profile)
    node_log = log_path.read_text(errors="replace")[-4000:]
    if not result_path.exists():
        raise AssertionError(f"browser run {'timed out' if timed_out else 'failed'} "
                             f"(exit {proc.returncode}); node output:\n{node_log}")
    data = json.loads(result_path.read_text())
    run = BrowserRun(data.get("result"), data.get("console", []), data.get("requests", []), data.get("blocked", []))
    if data.get("error") or timed_out:
        raise AssertionError(f"browser scenario {path.name} failed: {data.get('error') or 'timed out'}\n"
                             f"--- browser console (last 200) ---\n{run.console_text()}\n--- node ---\n{node_log}")
    return run


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _kill_profile_processes(profile: Path) -> None:
    """SIGKILL processes still running with this run's (unique) profile directory on their command line:
    chromium runs in a process group of its own, so a killed runner can leave it behind."""
    marker = str(profile).encode()  # chromium's --user-data-dir, crashpad's --database below it
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline and entry.name != str(os.getpid()):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


__all__ = ["BrowserRun", "CHROMIUM", "CHROMIUM_ARGS", "check_browser", "run_browser"]
