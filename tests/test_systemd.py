"""kubeprism.base.systemd: sd_notify on real AF_UNIX datagram sockets, sd_listen_fds with real fds.

Passed descriptors come from real parents: Debian's systemd-socket-activate, and a small
Python exec wrapper (socket_activation.py) that binds nothing itself but moves fds to 3, 4, ...
and sets LISTEN_* exactly as systemd does.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from socket_activation import GREETING
from util import free_port, wait_for

from kubeprism.base import systemd
from kubeprism.base.net import HostPort

HERE = Path(__file__).resolve().parent
ACTIVATION = str(HERE / "socket_activation.py")
SOCKET_ACTIVATE = "/usr/bin/systemd-socket-activate"
TIMEOUT = 10.0


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No systemd variables from whatever started the test run."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", *systemd._LISTEN_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def notify_socket(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket at a filesystem path, named by NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(TIMEOUT)
        clean_env.setenv("NOTIFY_SOCKET", str(path))
        yield sock


# ------------------------------------------------------------------ sd_notify


def test_notify_without_notify_socket_is_a_no_op(clean_env: pytest.MonkeyPatch) -> None:
    assert systemd.notify("READY=1") is False
    assert systemd.ready("x") is False


def test_messages_arrive_on_a_path_socket(notify_socket: socket.socket) -> None:
    assert systemd.ready("2/3 endpoints healthy")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=2/3 endpoints healthy"
    assert systemd.ready()
    assert notify_socket.recv(4096) == b"READY=1"
    assert systemd.status("1/3 endpoints healthy")
    assert notify_socket.recv(4096) == b"STATUS=1/3 endpoints healthy"
    assert systemd.watchdog()
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert systemd.reloading(123456789)
    assert notify_socket.recv(4096) == b"RELOADING=1\nMONOTONIC_USEC=123456789"
    assert systemd.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_messages_arrive_on_an_abstract_socket(clean_env: pytest.MonkeyPatch) -> None:
    name = f"kubeprism-test-{os.getpid()}-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(TIMEOUT)
        clean_env.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.ready("ok")
        assert sock.recv(4096) == b"READY=1\nSTATUS=ok"


def test_a_child_process_notifies_like_a_service(notify_socket: socket.socket) -> None:
    code = (
        "import sys; from kubeprism.base import systemd; sys.exit(0 if systemd.stopping() else 1)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=TIMEOUT)
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_undeliverable_notify_returns_false(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert systemd.notify("READY=1") is False
    clean_env.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.notify("READY=1") is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("0", None, None),
        ("nonsense", None, None),
        ("30000000", None, 30.0),
        ("2500000", "self", 2.5),
        ("2500000", "other", None),
        ("2500000", "x", None),
    ],
)
def test_watchdog_interval(
    clean_env: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    if usec is not None:
        clean_env.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid, pid)
        clean_env.setenv("WATCHDOG_PID", value)
    assert systemd.watchdog_interval() == expected


# ------------------------------------------------------------------ listen_fds: environment


def test_listen_fds_without_environment_is_empty(clean_env: pytest.MonkeyPatch) -> None:
    assert systemd.listen_fds() == {}


def test_listen_fds_for_another_process_is_ignored_and_unset(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("LISTEN_PID", str(os.getpid() + 1))
    clean_env.setenv("LISTEN_FDS", "2")
    clean_env.setenv("LISTEN_FDNAMES", "a:b")
    assert systemd.listen_fds() == {}
    assert not [k for k in os.environ if k.startswith("LISTEN_")]


def test_listen_fds_can_keep_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LISTEN_PID", str(os.getpid() + 1))
    clean_env.setenv("LISTEN_FDS", "1")
    assert systemd.listen_fds(unset_environment=False) == {}
    assert os.environ["LISTEN_FDS"] == "1"


@pytest.mark.parametrize(
    ("pid", "fds", "names", "message"),
    [
        ("abc", "1", None, "LISTEN_PID"),
        ("self", "two", None, "LISTEN_FDS"),
        ("self", "2", "only-one", r"LISTEN_FDNAMES has 1 name\(s\) for LISTEN_FDS=2"),
    ],
)
def test_malformed_listen_environment_is_an_error(
    clean_env: pytest.MonkeyPatch, pid: str, fds: str, names: str | None, message: str
) -> None:
    clean_env.setenv("LISTEN_PID", str(os.getpid()) if pid == "self" else pid)
    clean_env.setenv("LISTEN_FDS", fds)
    if names is not None:
        clean_env.setenv("LISTEN_FDNAMES", names)
    with pytest.raises(systemd.ListenFdsError, match=message):
        systemd.listen_fds()


# ------------------------------------------------------------------ match_listeners in-process


def _listener(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen()
    return sock


def _address(sock: socket.socket) -> HostPort:
    found = systemd.socket_address(sock)
    assert found is not None
    return found


def test_match_listeners_sorts_matched_missing_and_unmatched() -> None:
    v4, v6, stray = _listener("127.0.0.1"), _listener("::1"), _listener("127.0.0.1")
    idle = socket.socket()
    idle.bind(("127.0.0.1", 0))
    dgram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dgram.bind(("127.0.0.1", 0))
    dup = socket.socket(fileno=os.dup(v4.fileno()))
    socks = [v4, v6, stray, idle, dgram, dup]
    try:
        absent = HostPort("127.0.0.1", free_port())
        wanted = [_address(v4), _address(v6), absent]
        match = systemd.match_listeners(
            {"kubeprism": [v4, v6, stray], "other": [idle, dgram, dup]}, wanted
        )
        assert match.matched == {_address(v4): v4, _address(v6): v6}
        assert match.missing == [absent]
        reasons = {sock.fileno(): reason for sock, reason in match.unmatched}
        assert "matches no configured listen address" in reasons[stray.fileno()]
        assert "'kubeprism'" in reasons[stray.fileno()]
        assert "is not listening" in reasons[idle.fileno()]
        assert "is not a TCP socket" in reasons[dgram.fileno()]
        assert "duplicates another passed socket" in reasons[dup.fileno()]
        assert str(_address(v6)).startswith("[::1]:")
    finally:
        for sock in socks:
            sock.close()


# ------------------------------------------------------------------ real passed descriptors


def _report(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(TIMEOUT)
        raise AssertionError(f"child exited {proc.returncode}: {proc.stderr.read()}")
    report: dict[str, Any] = json.loads(line)
    return report


def _greeting(host: str, port: int) -> str:
    with socket.create_connection((host, port), timeout=TIMEOUT) as conn:
        return conn.makefile().readline()


def _finish(proc: subprocess.Popen[str]) -> None:
    try:
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_python_parent_passes_listening_sockets(tmp_path: Path) -> None:
    v4, v6, stray = _listener("127.0.0.1"), _listener("::1"), _listener("127.0.0.1")
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(tmp_path / "unix.sock"))
    unix.listen()
    passed = [v4, v6, stray, unix]
    absent = f"127.0.0.1:{free_port()}"
    wanted = [str(_address(v4)), str(_address(v6)), absent]
    specs = [f"{s.fileno()}=kubeprism" for s in passed[:3]] + [f"{unix.fileno()}=admin"]
    argv = [sys.executable, ACTIVATION, "exec", *specs, "--"]
    argv += [sys.executable, ACTIVATION, "child", *wanted]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        pass_fds=[s.fileno() for s in passed],
        text=True,
    )
    try:
        for sock in passed:  # the child owns them now, as after systemd's fork
            sock.close()
        report = _report(proc)
        assert report["env_left"] == []
        kubeprism = report["passed"]["kubeprism"]
        assert [e["fd"] for e in kubeprism] == [3, 4, 5]
        assert [e["fd"] for e in report["passed"]["admin"]] == [6]
        assert not any(e["inheritable"] for e in kubeprism)
        assert report["matched"] == sorted(wanted[:2])
        assert report["missing"] == [absent]
        assert len(report["unmatched"]) == 2
        assert any("no configured listen address" in r for r in report["unmatched"])
        assert any("'admin'" in r and "not a TCP socket" in r for r in report["unmatched"])
        v4_port, v6_port = (int(a.rsplit(":", 1)[1]) for a in wanted[:2])
        assert _greeting("127.0.0.1", v4_port) == GREETING.format(address=wanted[0])
        assert _greeting("::1", v6_port) == GREETING.format(address=wanted[1])
    finally:
        _finish(proc)


def test_a_passed_pipe_is_reported_not_adopted() -> None:
    listener = _listener("127.0.0.1")
    read_end, write_end = os.pipe()
    try:
        argv = [sys.executable, ACTIVATION, "exec", f"{listener.fileno()}=kubeprism"]
        argv += [f"{read_end}=fifo", "--", sys.executable, ACTIVATION, "child"]
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            pass_fds=[listener.fileno(), read_end],
            text=True,
        )
        try:
            report = _report(proc)
        finally:
            _finish(proc)
        assert report == {
            "error": "passed descriptor 4 ('fifo') is not a usable socket: "
            "Socket operation on non-socket"
        }
    finally:
        listener.close()
        os.close(read_end)
        os.close(write_end)


def test_systemd_socket_activate_passes_named_sockets() -> None:
    if not os.access(SOCKET_ACTIVATE, os.X_OK):
        pytest.fail(f"{SOCKET_ACTIVATE} missing: apt-get install systemd", pytrace=False)
    v4 = f"127.0.0.1:{free_port()}"
    v6 = f"[::1]:{free_port('::1')}"
    argv = [SOCKET_ACTIVATE, "-l", v4, "-l", v6, "--fdname=kubeprism:kubeprism"]
    argv += [sys.executable, ACTIVATION, "child", v4, v6]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    try:
        v4_port, v6_port = (int(a.rsplit(":", 1)[1]) for a in (v4, v6))
        # systemd-socket-activate execs the service on the first connection attempt; that
        # connection waits in the backlog of the very socket the service then accepts on.
        first = wait_for(
            lambda: socket.create_connection(("127.0.0.1", v4_port), timeout=TIMEOUT),
            TIMEOUT,
            message=f"systemd-socket-activate listens on {v4}",
        )
        with first:
            report = _report(proc)
            assert first.makefile().readline() == GREETING.format(address=v4)
        assert report["pid"] == proc.pid  # exec, not fork: LISTEN_PID held
        assert [e["fd"] for e in report["passed"]["kubeprism"]] == [3, 4]
        assert report["matched"] == sorted([v4, v6])
        assert report["missing"] == report["unmatched"] == report["env_left"] == []
        assert _greeting("::1", v6_port) == GREETING.format(address=v6)
    finally:
        _finish(proc)
