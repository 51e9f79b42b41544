"""CI smoke for `./bench/run health-cost`: a short quiet window, every figure present.

No rate is asserted (a few seconds say nothing about a rate; the bench measures it): only
that each stand-in was counted, that kubeprism's own counters agree with the stand-ins',
and that the quiet window needed no new TLS handshake (the health connection was kept).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Start-up, a 3 s warm-up and a 6 s window take about 12 s.
SMOKE_TIMEOUT = 120


def test_health_cost_bench_counts_each_server_and_keeps_its_connections(tmp_path: Path) -> None:
    argv = [sys.executable, str(REPO / "bench" / "health_cost.py"), "--seconds", "6"]
    argv += ["--warmup", "3", "--out", str(tmp_path), "--tag", "smoke"]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=SMOKE_TIMEOUT, check=False, cwd=tmp_path
    )
    # 1 = a rate above the acceptance: possible in so short a window, and no failure here.
    # 2 = nothing measured (a stand-in or kubeprism failed): stderr has kubeprism's log.
    assert done.returncode in (0, 1), done.stderr[-3000:]
    (result,) = tmp_path.glob("health-cost-*-smoke.json")
    doc = json.loads(result.read_text())
    assert [s["server"] for s in doc["servers"]] == ["api-1", "api-2", "api-3"]
    for server in doc["servers"]:
        assert server["handshakes"] == 0, server
        assert server["kubeprism_counted"]["handshakes"] == 0, server
        # A check in flight at either reading may be counted on one side only.
        assert abs(server["requests"] - server["kubeprism_counted"]["requests"]) <= 1, server
    assert "TLS handshakes / hour" in done.stdout
    assert doc["kubeprism_cpu_seconds"] > 0  # the daemon's own cost, idle
    assert "kubeprism's own CPU (interval 5s): " in done.stdout
    assert (tmp_path / result.name.replace(".json", ".md")).exists()


def test_health_cost_bench_that_measures_nothing_exits_2_with_kubeprisms_log(
    tmp_path: Path,
) -> None:
    # A kubeprism that fails at start (put first on the path): exit 2, never 1, which
    # means "a rate missed", and its log in the message (its directory is gone by then).
    fake = tmp_path / "fake" / "kubeprism"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(
        "import sys\nprint('fake kubeprism: bad key healthCheck.x')\nsys.exit(3)\n"
    )
    argv = [sys.executable, str(REPO / "bench" / "health_cost.py"), "--seconds", "1"]
    argv += ["--warmup", "0", "--out", str(tmp_path / "out")]
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(fake.parent)},
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "health-cost: kubeprism exited with 3" in done.stderr
    assert "fake kubeprism: bad key healthCheck.x" in done.stderr
    assert not (tmp_path / "out").exists()  # nothing measured, nothing written
