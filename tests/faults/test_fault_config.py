"""Scenario 9, config part: hostile config files through `kubeprism check-config`.

The only acceptable outcomes are exit 0 with the effective config, or exit 2 with one
clean `invalid config` line: never a traceback, never a hang. Besides values of every
type in every known key (tests/test_config.py covers those in-process), the files use
what only YAML text can carry: alias bombs, deep nesting, huge number literals,
impossible dates, odd tags, control characters. The examples run the CLI entry point
in-process (bounded by an alarm); a fixed set also runs as a real subprocess.
"""

from __future__ import annotations

import contextlib
import io
import logging
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from daemon_proc import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faults.fault_report import record
from kubeprism.__main__ import main

EXAMPLES = 250
# One example may take this long in-process; an alias bomb used to take minutes.
EXAMPLE_SECONDS = 10

KEYS = {
    "": [
        *("upstreams", "listen", "allowNonLoopback", "healthCheck", "dialTimeout"),
        *("forwarding", "tcpKeepalive", "tcpUserTimeout", "idleTimeout", "drainTimeout"),
        *("maxConnections", "closeConnectionsOnUnhealthy", "admin", "discovery", "logLevel"),
    ],
    "healthCheck": [
        *("type", "path", "interval", "timeout", "caFile", "serverName"),
        *("clientCertFile", "clientKeyFile", "healthyThreshold", "unhealthyThreshold"),
        *("keepAlive", "fastInterval", "unhealthyInterval", "livenessTimeout", "stallTimeout"),
    ],
    "tcpKeepalive": ["idle", "interval", "count"],
    "admin": ["listen"],
    "discovery": [
        "dnsRefresh",
        "kubernetes",
        "cacheFile",
        "filters",
        "removalGrace",
        "maxEndpoints",
    ],
    "kubernetes": ["enabled", "kubeconfig", "tokenFile", "caFile", "serverName", "debounce"],
}
SCALAR_TEXT = [
    "1s", "500ms", "0s", "-1s", "1e3s", "1h1h1h", "10.0.0.1:6443", "[::1]:7445", "[fe80::1%eth0]:1",
    "0.0.0.0:7445", "127.0.0.1:0", "localhost:6443", "kubernetes", "/readyz", "readyz", "https",
    "tcp", "splice", "copy", "", "!10.0.0.0/8", "10.0.0.0/33", "/dev/null", "/etc/hostname",
    "~", "null", "yes", "0x1F", "0o17", ".inf", "-.nan", "2001-02-30", "0000-01-01",
]  # fmt: skip
# YAML text that only a file can carry (the value goes after "key: ").
RAW_VALUES = [
    "&x [*x]",
    "!!binary AAAA",
    "!!str 1s",
    "!!int '12'",
    "!!float .nan",
    "!!timestamp 2001-12-14",
    "!!set {a, b}",
    "!!omap [a: 1]",
    "2001-02-30",
    "0000-01-01",
    "'\\t'",
    '"\\ud800"',
    '"\\x00"',
    "{? [a, b] : c}",
    "*undefined",
    "!custom tag",
    "|\n  block\n  text",
    ">-\n folded",
]


def _scalars() -> st.SearchStrategy[object]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(),
        st.text(max_size=20),
        st.sampled_from(SCALAR_TEXT),
    )


def _values(section: str) -> st.SearchStrategy[object]:
    keys = st.sampled_from(KEYS.get(section, KEYS[""])) | st.text(max_size=8)
    return st.recursive(
        _scalars(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
        max_leaves=12,
    )


@st.composite
def documents(draw: st.DrawFn) -> str:
    """A YAML text: mostly-plausible structure, then maybe something only text can carry."""
    # Half the files start from a valid config, so some survive and exit 0.
    doc: dict[str, object] = {"upstreams": ["10.0.0.1:6443"]} if draw(st.booleans()) else {}
    for key in draw(st.lists(st.sampled_from(KEYS[""]), max_size=3 if doc else 6, unique=True)):
        if key in KEYS and draw(st.booleans()):
            sub = KEYS[key] if key != "discovery" else [*KEYS[key], "kubernetes"]
            doc[key] = {k: draw(_values(k)) for k in draw(st.lists(st.sampled_from(sub)))}
        else:
            doc[key] = draw(_values(key))
    text = yaml.safe_dump(doc, allow_unicode=draw(st.booleans()))
    extra = draw(
        st.sampled_from(["none"] * 3 + ["raw", "bomb", "deep", "bigint", "garbage", "truncate"])
    )
    key = draw(st.sampled_from([*KEYS[""], "x"]))
    if extra == "raw":
        text += f"{key}: {draw(st.sampled_from(RAW_VALUES))}\n"
    elif extra == "bomb":
        levels, width = draw(st.integers(1, 12)), draw(st.integers(2, 12))
        text += _bomb(key, levels, width)
    elif extra == "deep":
        depth = draw(st.integers(1, 30_000))
        opener, closer = draw(st.sampled_from([("[", "]"), ("{a: ", "}")]))
        text += f"{key}: {opener * depth}1{closer * depth}\n"
    elif extra == "bigint":
        text += f"{key}: {'9' * draw(st.integers(1, 6000))}\n"
    elif extra == "garbage":
        text += draw(st.text(max_size=200))
    elif extra == "truncate" and text:
        text = text[: draw(st.integers(0, len(text) - 1))]
    return text


def _bomb(key: str, levels: int, width: int) -> str:
    lines = [f"b0: &b0 [{', '.join(['x'] * width)}]"]
    lines += [f"b{i}: &b{i} [{', '.join([f'*b{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\n{key}: *b{levels - 1}\n"


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise TimeoutError in the main thread after `seconds` (a hang is a failure too)."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"check-config took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def captured_cli() -> Iterator[io.StringIO]:
    """Run the CLI in-process: its stdout and log lines go into one buffer; logging and
    the streams are put back afterwards (main() reconfigures the root logger)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield buffer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def check_config_in_process(text: str) -> tuple[int, str]:
    """`kubeprism check-config` on `text`: (exit code, everything it printed)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kubeprism.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        with captured_cli() as out, time_limit(EXAMPLE_SECONDS):
            rc = main(["check-config", "--config", str(path)])
    return rc, out.getvalue()


OUTCOMES: dict[int, int] = {}


@given(documents())
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
def test_9c_hypothesis_configs_exit_0_or_2_cleanly(text: str) -> None:
    rc, out = check_config_in_process(text)
    OUTCOMES[rc] = OUTCOMES.get(rc, 0) + 1
    assert rc in (0, 2), out
    assert "Traceback" not in out, out
    if rc == 2:  # one message (a YAML error adds the offending line and a caret)
        assert out.startswith("ERROR kubeprism: invalid config", out.index(" ERROR") + 1), out


NASTY = {
    "alias bomb (9 levels x 9)": _bomb("upstreams", 9, 9),
    "nesting 20,000 deep": "upstreams: " + "[" * 20000 + "]" * 20000 + "\n",
    "5,000-digit priority": "upstreams: [{address: a, priority: " + "9" * 5000 + "}]\n",
    "impossible date": "upstreams: [10.0.0.1:6443]\ndialTimeout: 2001-02-30\n",
    "self-containing list": "a: &a [*a]\nupstreams: *a\n",
    "NUL byte": "upstreams: [10.0.0.1:6443]\n\x00\n",
}


def test_9c_nasty_configs_through_the_real_cli(tmp_path: Path) -> None:
    """The worst of the inputs above through a real `python -m kubeprism check-config`."""
    results = {}
    for name, text in NASTY.items():
        path = tmp_path / "nasty.yaml"
        path.write_text(text)
        proc = subprocess.run(
            [sys.executable, "-m", "kubeprism", "check-config", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            check=False,
        )
        first = (proc.stderr.strip().splitlines() or [""])[0]
        results[name] = (
            proc.returncode,
            first.split(" kubeprism: ", 1)[-1].replace(str(path), "F"),
        )
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
    record(
        "9c hostile config files",
        f"{sum(OUTCOMES.values())} hypothesis files in-process (exit codes "
        f"{dict(sorted(OUTCOMES.items()))}) and {len(NASTY)} nasty files via the CLI: exit 0 "
        "or 2, 0 tracebacks, 0 hangs",
        "only clean ConfigErrors (exit 2), never a traceback",
        True,
        hypothesis_exit_codes=dict(sorted(OUTCOMES.items())),
        cli_results={name: f"exit {rc}: {msg}" for name, (rc, msg) in results.items()},
    )


@pytest.fixture(autouse=True, scope="module")
def _keep_alarm_clean() -> Iterator[None]:
    yield
    signal.alarm(0)
