"""A short run of ``benchmarks/load``: concurrent storescu associations and REST sessions; zero errors, all
accounted for.

Never a timing assertion: the figures are printed by the benchmark (docs/benchmarks.md, "Load").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import peers

pytestmark = [pytest.mark.peers, pytest.mark.slow]

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "load"


def test_load_smoke_run_has_no_errors_and_complete_accounting(tmp_path: Path) -> None:
    assert peers.have("storescu"), "dcmtk storescu is needed: scripts/install.sh --test installs it"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--seconds", "10", "--associations", "2", "--sessions", "3", "--phantoms", "1",
         "--instances", "5", "--baseline-seconds", "0", "--no-preencode", "--json", "--workdir", str(tmp_path / "w")],
        capture_output=True, text=True, timeout=900,
    )
    assert done.stdout.strip(), done.stderr[-3000:]
    report = json.loads(done.stdout)
    load, acc = report["load"], report["accounting"]
    assert load["errors"] == 0, load["error_samples"]
    assert acc["complete"], acc
    assert report["node_alive"]
    # Both kinds of work actually ran and were accounted for.
    assert acc["instances_acknowledged"] >= 5 and load["latency"]["association"]["n"] >= 1
    assert load["latency"]["prompt"]["n"] >= 3 and acc["sessions"] >= 3 and acc["results_committed"] >= 3
    assert done.returncode == 0, done.stderr[-3000:]
