"""Restarts that keep every connection, under a real systemd 252 (systemd-nspawn).

The shipped units as they are (socket unit, FileDescriptorStoreMax=, DynamicUser): 200
connections held through kubeprism survive `systemctl restart kubeprism` three times, and
`systemctl stop` closes them (systemd empties the store when the unit stops).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from nspawn import CONTAINER_ENV, REPO_INSIDE, VENV, SystemdContainer
from util import wait_for

pytestmark = pytest.mark.slow

HELD = 200
UPSTREAM_PORT = 6000
DRAIN_TIMEOUT = 5.0
CONFIG = f"""\
listen: ["127.0.0.1:7445", "[::1]:7445"]
upstreams: ["127.0.0.1:{UPSTREAM_PORT}"]
healthCheck: {{type: tcp, interval: 500ms, timeout: 400ms}}
drainTimeout: {DRAIN_TIMEOUT:g}s
"""
PEER = f"{REPO_INSIDE}/tests/fdstore_peer.py"


class Holder:
    """fdstore_peer.py hold, inside the container: connections held through kubeprism."""

    def __init__(self, box: SystemdContainer, count: int) -> None:
        self.proc = subprocess.Popen(
            box.nsenter_argv(
                f"{VENV}/bin/python", PEER, "hold", "--port", "7445", "--count", str(count)
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=CONTAINER_ENV,
            text=True,
        )
        assert self._line() == f"HELD {count}"

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def ask(self, command: str) -> dict[str, Any]:
        """One command, one JSON answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer: dict[str, Any] = json.loads(self._line())
        return answer

    def close(self) -> None:
        """End the holder (its connections close with it): EOF on its stdin, then let
        nsenter reap it. Killing nsenter instead orphaned the holder outside the container's
        reach, where it stayed a zombie that held the container's poweroff for 10 s."""
        try:
            self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture(scope="module")
def box(systemd_box: SystemdContainer) -> Iterator[SystemdContainer]:
    """The container with an echo upstream and kubeprism started from the shipped units."""
    scratch = next(host for host, inside in systemd_box.binds.items() if inside == "/srv/scratch")
    (scratch / "kubeprism.yaml").write_text(CONFIG)
    systemd_box.sh("install -D -m 0644 /srv/scratch/kubeprism.yaml /etc/kubeprism/kubeprism.yaml")
    systemd_box.run(
        "systemd-run",
        "--unit=fdstore-upstream",
        f"{VENV}/bin/python",
        PEER,
        "upstream",
        "--port",
        str(UPSTREAM_PORT),
    )
    systemd_box.run("systemctl", "start", "kubeprism.socket", "kubeprism.service", timeout=60)
    wait_for(
        lambda: "1/1 endpoints healthy" in _property(systemd_box, "StatusText"),
        20,
        0.2,
        "kubeprism ready with its upstream healthy",
    )
    yield systemd_box


def forwarding_pauses(box: SystemdContainer) -> list[float]:
    """Per restart, seconds from the old process handing its connections to the store to
    the new one taking them over (journal monotonic timestamps)."""
    out = box.run("journalctl", "-u", "kubeprism.service", "-o", "short-monotonic").stdout
    stamped = [
        (float(m.group(1)), m.group(2))
        for m in re.finditer(r"^\[\s*([\d.]+)\] (.*)$", out, re.MULTILINE)
    ]
    handed = [t for t, line in stamped if "handed " in line]
    taken = [t for t, line in stamped if "took over" in line]
    return [
        round(min(t for t in taken if t > h) - h, 3) for h in handed if any(t > h for t in taken)
    ]


def _property(box: SystemdContainer, name: str) -> str:
    return box.run("systemctl", "show", "-P", name, "kubeprism.service").stdout.strip()


def test_200_connections_survive_three_restarts_and_stop_closes_them(
    box: SystemdContainer,
) -> None:
    holder = Holder(box, HELD)
    try:
        seconds = []
        for n in range(1, 4):
            pid = _property(box, "MainPID")
            started = time.monotonic()
            box.run("systemctl", "restart", "kubeprism.service", timeout=60)
            seconds.append(round(time.monotonic() - started, 3))
            assert _property(box, "MainPID") != pid
            assert holder.ask("check") == {"ok": HELD, "lost": 0}, box.journal()[-3000:]
            journal = box.journal()
            assert journal.count(f"took over {HELD} connection(s)") == n, journal[-3000:]
        started = time.monotonic()
        box.run("systemctl", "stop", "kubeprism.service", timeout=60)
        stop = holder.ask(f"closed {DRAIN_TIMEOUT}")
        stop_seconds = time.monotonic() - started
    finally:
        holder.close()
    pauses = forwarding_pauses(box)
    print(f"systemctl restart took {seconds} s; forwarding paused {pauses} s")
    print(f"stop closed {stop} in {stop_seconds:.2f} s")
    assert len(pauses) == 3
    assert stop["closed"] == HELD and stop["open"] == 0
    assert stop_seconds < DRAIN_TIMEOUT
    assert "Traceback" not in box.journal()
