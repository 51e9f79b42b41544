"""CI smoke for bench/: a --quick run covers every scenario and writes a complete JSON.

No timing is asserted anywhere: only that each scenario produced numbers for each target.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kubeprism

REPO = Path(__file__).resolve().parent.parent
# The proxies compared in the smoke; nginx's numbers add nothing a smoke needs.
SMOKE_TARGETS = ["direct", "kubeprism-splice", "kubeprism-copy", "kubeprism-python", "haproxy"]
# Tools the scenarios drive (nginx is also the HTTP upstream).
TOOLS = ["haproxy", "nginx", "iperf3", "sockperf", "wrk"]
# Hard bound on the whole smoke (it takes about 40 s on 2 cores).
SMOKE_TIMEOUT = 240
# What each scenario must report, for every target or only for the proxies.
EXPECTED = {
    "bulk": ({"bulk_gbps", "machine_cpu_s_per_gib"}, {"cpu_s_per_gib"}),
    "pingpong": ({"pingpong_p50_us", "pingpong_p99_us"}, set()),
    "keepalive": ({"keepalive_rps"}, set()),
    "churn": ({"churn_cps"}, set()),
    "idle": (set(), {"idle_rss_kib_per_conn", "idle_fds_per_conn", "idle_pipes_per_conn"}),
    "startup": (set(), {"start_ready_s"}),
}

missing = [t for t in TOOLS if shutil.which(t) is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing), reason=f"benchmark tools not installed: {missing}"),
]


def _bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--out", str(tmp_path)]
    return subprocess.run(
        [*argv, *args],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT,
        check=False,
        cwd=tmp_path,
    )


def test_quick_bench_reports_every_scenario(tmp_path: Path) -> None:
    done = _bench(tmp_path, "--only", ",".join(SMOKE_TARGETS), "--tag", "smoke")
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = tmp_path.glob("*-smoke.json")
    doc = json.loads(result.read_text())
    assert doc["config"]["targets"] == SMOKE_TARGETS
    failed = [r for r in doc["runs"] if "error" in r]
    assert not failed, failed
    assert set(doc["scenarios"]) == set(EXPECTED)
    for scenario, (everyone, proxies_only) in EXPECTED.items():
        metrics = doc["scenarios"][scenario]
        for key in everyone | proxies_only:
            for target in SMOKE_TARGETS:
                if key in everyone or target != "direct":
                    value = metrics[key][target]["median"]
                    assert isinstance(value, float | int), (scenario, key, target, value)
    assert (tmp_path / result.name.replace(".json", ".md")).exists()
    # Which engine the kubeprism columns ran on is part of the record.
    assert f"; engine {kubeprism.ENGINE})" in doc["versions"]["kubeprism"]


def test_compare_measures_another_revision_in_the_same_run(tmp_path: Path) -> None:
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    only = "kubeprism-splice,haproxy"
    done = _bench(tmp_path, "--only", only, "--scenarios", "keepalive", "--compare", "HEAD")
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = tmp_path.glob("*.json")
    doc = json.loads(result.read_text())
    old = f"kubeprism-splice@{head}"
    assert doc["config"]["targets"] == ["kubeprism-splice", old, "haproxy"]
    assert not [r for r in doc["runs"] if "error" in r]
    rps = doc["scenarios"]["keepalive"]["keepalive_rps"]
    assert rps[old]["median"] > 0 and rps["kubeprism-splice"]["median"] > 0
    assert any(n.startswith(f"HTTP keep-alive: kubeprism-splice / {old} = ") for n in doc["notes"])


def test_compare_names_a_revision_that_does_not_exist(tmp_path: Path) -> None:
    done = _bench(tmp_path, "--only", "kubeprism-splice", "--compare", "no-such-rev")
    assert done.returncode != 0
    assert "--compare: 'no-such-rev' is not a commit here" in done.stderr
