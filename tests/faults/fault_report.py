"""The results of the fault scenarios: one printed line each, and a markdown summary with
the exact figures, written at the end of the session ($KUBEPRISM_FAULTS_SUMMARY or
tests/faults/results/summary.md, which git ignores).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SUMMARY_ENV = "KUBEPRISM_FAULTS_SUMMARY"
DEFAULT_SUMMARY = HERE / "results" / "summary.md"


@dataclass
class Result:
    """One scenario's line in the summary."""

    scenario: str
    measured: str
    target: str
    met: bool
    details: dict[str, Any] = field(default_factory=dict)


RESULTS: list[Result] = []


@dataclass
class CheckCost:
    """Health-check handshakes and requests kubeprism sent, summed over the API servers."""

    handshakes: int = 0
    requests: int = 0
    seconds: float = 0.0  # over how long the daemon ran

    def __str__(self) -> str:
        return f"checks cost {self.handshakes} handshakes, {self.requests} requests"


# The current test's daemon's cost (fault_harness keeps it up to date); None: no daemon.
COST: list[CheckCost | None] = [None]


def record(scenario: str, measured: str, target: str, met: bool, **details: Any) -> None:
    """Print `scenario | measured | target` and keep the exact figures for the summary.

    Recorded before the test asserts, so a missed target still shows its figure. The
    health checks the scenario cost (over its daemon's life) are added to the figure.
    """
    cost = COST[0]
    if cost is not None:
        measured = f"{measured}; {cost}"
        details = {**details, "check_cost": vars(cost)}
    result = Result(scenario, measured, target, met, details)
    RESULTS.append(result)
    print(f"{scenario} | {measured} | {target}{'' if met else ' (MISSED)'}", flush=True)


def summary_path() -> Path:
    """Where the session's summary goes ($KUBEPRISM_FAULTS_SUMMARY or results/summary.md)."""
    return Path(os.environ.get(SUMMARY_ENV) or DEFAULT_SUMMARY)


def _order(result: Result) -> tuple[int, str]:
    """Scenario number first ("10a" after "9d"), unnumbered ones last."""
    match = re.match(r"(\d+)", result.scenario)
    return (int(match.group(1)) if match else 99, result.scenario)


def ordered_results() -> list[Result]:
    """The results so far, by scenario number."""
    return sorted(RESULTS, key=_order)


def write_summary(path: Path) -> None:
    """The results table plus every exact figure, as markdown."""
    results = ordered_results()
    lines = [
        "# kubeprism fault suite: measured figures",
        "",
        f"Run at {time.strftime('%Y-%m-%d %H:%M:%S %Z')} on {os.cpu_count()} CPUs, "
        f"kernel {os.uname().release}, Python {sys.version.split()[0]}.",
        "",
        "| scenario | measured | target | met |",
        "| --- | --- | --- | --- |",
        *(
            f"| {r.scenario} | {r.measured} | {r.target} | {'yes' if r.met else 'NO'} |"
            for r in results
        ),
        "",
        "## Exact figures",
        "",
    ]
    for r in results:
        lines.append(f"### {r.scenario}")
        lines += [f"- {key}: {_fmt(value)}" for key, value in r.details.items()]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return json.dumps(value) if isinstance(value, dict | list) else str(value)
