"""Logging: stable JSON fields, and text that suits journald (no second timestamp).

Every case runs in a real child process whose stderr is a real pipe or, for journald, a
real AF_UNIX stream socket whose device:inode the child finds in JOURNAL_STREAM.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from daemon_proc import REPO

TIMEOUT = 20.0
ISO_UTC_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TEXT_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")
LOG_SOME = """
import logging, sys
from kubeprism.base.logs import setup_logging
setup_logging(sys.argv[1], sys.argv[2])
log = logging.getLogger("kubeprism.test")
log.debug("debug %s", "hidden")
log.info("endpoint %s is %s", "10.0.0.1:6443", "healthy")
log.warning("ünïcode %d", 42)
try:
    raise ValueError("boom")
except ValueError:
    log.exception("failed")
"""


def run_child(
    level: str, fmt: str, stderr: int, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run LOG_SOME with stderr on the given fd."""
    return subprocess.run(
        [sys.executable, "-c", LOG_SOME, level, fmt],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, **(env or {})},
        cwd=REPO,
        check=True,
    )


def lines_from_pipe(level: str, fmt: str, env: dict[str, str] | None = None) -> list[str]:
    """The child's stderr lines, through a pipe."""
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd) as reader:
        try:
            run_child(level, fmt, write_fd, env)
        finally:
            os.close(write_fd)
        return reader.read().splitlines()


def test_json_has_stable_field_names() -> None:
    lines = lines_from_pipe("info", "json", {"JOURNAL_STREAM": ""})
    entries = [json.loads(line) for line in lines]
    assert [list(e) for e in entries[:2]] == [["time", "level", "logger", "msg"]] * 2
    assert list(entries[2]) == ["time", "level", "logger", "msg", "error"]
    assert [e["level"] for e in entries] == ["info", "warning", "error"]
    assert {e["logger"] for e in entries} == {"kubeprism.test"}
    assert entries[0]["msg"] == "endpoint 10.0.0.1:6443 is healthy"
    assert entries[1]["msg"] == "ünïcode 42"
    assert "ValueError: boom" in entries[2]["error"]
    assert all(ISO_UTC_MS.match(e["time"]) for e in entries)


def test_json_from_the_cli(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "kubeprism", "--log-format", "json", "check-config", "-c", missing],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 2
    (entry,) = [json.loads(line) for line in result.stderr.splitlines()]
    assert entry["level"] == "error"
    assert entry["logger"] == "kubeprism"
    assert str(missing) in entry["msg"]


def test_text_has_a_timestamp_outside_journald() -> None:
    lines = lines_from_pipe("debug", "text", {"JOURNAL_STREAM": ""})
    assert TEXT_TIMESTAMP.match(lines[0])
    assert lines[0].endswith(" DEBUG kubeprism.test: debug hidden")
    assert lines[1].endswith(" INFO kubeprism.test: endpoint 10.0.0.1:6443 is healthy")


def test_text_under_journald_has_priority_and_no_timestamp() -> None:
    journal, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with journal, child_end:
        st = os.fstat(child_end.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        run_child("info", "text", child_end.fileno(), env)
        child_end.close()
        text = journal.makefile(encoding="utf-8").read()
    lines = text.splitlines()
    assert lines[0] == "<6>INFO kubeprism.test: endpoint 10.0.0.1:6443 is healthy"
    assert lines[1] == "<4>WARNING kubeprism.test: ünïcode 42"
    assert lines[2] == "<3>ERROR kubeprism.test: failed"
    assert "ValueError: boom" in text


def test_inherited_journal_stream_with_redirected_stderr_keeps_timestamps() -> None:
    # A child of a systemd service inherits JOURNAL_STREAM even when its stderr goes elsewhere.
    journal, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with journal, other:
        st = os.fstat(other.fileno())
        lines = lines_from_pipe("info", "text", {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert TEXT_TIMESTAMP.match(lines[0])
    assert not lines[0].startswith("<")


MALFORMED_REQUESTS = """
import logging, sys
from aiohttp.http_exceptions import BadHttpMessage
from kubeprism.base.logs import setup_logging
from kubeprism.ops.admin import drop_malformed_requests
setup_logging("info", "text")
drop_malformed_requests()  # what admin_runner() does before the admin server starts
server = logging.getLogger("aiohttp.server")
server.error("Error handling request", exc_info=BadHttpMessage("Invalid method encountered"))
server.error("Error handling request", exc_info=RuntimeError("a bug in our handler"))
"""


def test_malformed_admin_requests_are_not_logged_but_handler_errors_are() -> None:
    """Found by tests/faults (scenario 9b): every unparsable request to the admin port was
    an ERROR with a traceback, so anyone on the node could flood the log."""
    result = subprocess.run(
        [sys.executable, "-c", MALFORMED_REQUESTS],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=REPO,
        check=True,
    )
    assert "Invalid method" not in result.stderr
    assert "BadHttpMessage" not in result.stderr
    assert "RuntimeError: a bug in our handler" in result.stderr
