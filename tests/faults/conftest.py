"""Fixtures of the fault suite: the namespace topology (one per session), a fresh set of
stand-in API servers per test, and the summary of measured figures written at the end.

The suite needs root, `ip` (iproute2) and `iptables`; like the other namespace tests it
fails loudly instead of skipping, because CI runs it as root.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from certs import TestPKI

from faults.fault_harness import Cluster
from faults.fault_report import COST, RESULTS, ordered_results, summary_path, write_summary
from faults.fault_topology import Topology


@pytest.fixture(autouse=True)
def _no_cost_from_the_last_test() -> None:
    """Each scenario's line states only the checks its own daemon cost."""
    COST[0] = None


@pytest.fixture(scope="session")
def topology(_netns_ready: None) -> Iterator[Topology]:
    """node + cp1..cp3 on a bridge in a switch namespace; deleted at the end of the session."""
    with Topology() as topo:
        yield topo


@pytest.fixture
def cluster(topology: Topology, pki: TestPKI) -> Iterator[Cluster]:
    """A fault-free network and three fresh, healthy stand-ins (cp1, cp2, cp3)."""
    topology.reset()
    cluster = Cluster(topology, pki)
    try:
        cluster.start(*cluster.names)
        yield cluster
    finally:
        cluster.stop_all()
        topology.reset()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Write the summary of whatever scenarios ran."""
    if RESULTS:
        write_summary(summary_path())


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Show the one-line results of the scenarios at the end of the run."""
    if not RESULTS:
        return
    terminalreporter.section("kubeprism fault scenarios: scenario | measured | target")
    for r in ordered_results():
        missed = "" if r.met else " (MISSED)"
        terminalreporter.write_line(f"{r.scenario} | {r.measured} | {r.target}{missed}")
    terminalreporter.write_line(f"exact figures: {summary_path()}")
