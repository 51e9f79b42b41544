"""The things measured side by side: no proxy, kubeprism (splice, copy), haproxy, nginx stream.

Each target starts on a fresh loopback port in front of one upstream port, with a config
written into the run's temporary directory, and reports how long it took to become ready.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import procs

# How long a proxy may take to become ready before the measurement is given up.
READY_DEADLINE = 15.0
# Listen backlog for every proxy, kubeprism's own default (listeners.LISTEN_BACKLOG).
BACKLOG = 4096
# Connection limit for every proxy: above the idle scenario's 5,000, and low enough that
# haproxy (2 fds per connection plus maxconn/4 splice pipes) fits a hard RLIMIT_NOFILE of 20,000.
MAX_CONN = 7000
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


@dataclass(frozen=True)
class Running:
    """A started target: where clients connect, which process to watch, how fast it came up."""

    port: int
    pid: int | None  # None for "direct": there is no proxy process
    ready_s: float | None
    accepts_s: float | None


@dataclass(frozen=True)
class Target:
    """One column of the results."""

    name: str
    kind: str  # direct | kubeprism | haproxy | nginx
    forwarding: str = ""
    # kubeprism only: a directory holding the kubeprism package of another revision
    # (at_revision), imported instead of the installed one; None: the installed one.
    source: Path | None = None
    # kubeprism only: KUBEPRISM_ENGINE for it ("" leaves the choice to the package: the
    # compiled engine where it was built, kubeprism/native.py).
    engine: str = ""

    @contextlib.contextmanager
    def launch(self, upstream: int, workdir: Path) -> Iterator[Running]:
        """Start the target in front of 127.0.0.1:upstream; stop it on exit."""
        if self.kind == "direct":
            yield Running(upstream, None, None, None)
            return
        port = procs.free_port()
        argv, ready = self._command(port, upstream, workdir)
        log = workdir / f"{self.name}.log"
        with procs.child(argv, log, "proxy", self.environment()) as proc:
            accepts = _poll(proc, lambda: procs.port_accepts(port), f"{self.name} port")
            ready_s = accepts
            if ready is not None:
                ready_s = _poll(proc, ready, f"{self.name} /readyz")
            yield Running(port, proc.pid, ready_s, accepts)

    def environment(self) -> dict[str, str]:
        """This process's environment, plus what makes kubeprism import this target's
        package (PYTHONPATH) and run its engine (KUBEPRISM_ENGINE)."""
        env = dict(os.environ)
        if self.source is not None:
            env["PYTHONPATH"] = str(self.source)
        if self.engine:
            env["KUBEPRISM_ENGINE"] = self.engine
        return env

    def _command(self, port: int, upstream: int, workdir: Path) -> tuple[list[str], object]:
        if self.kind == "kubeprism":
            admin = procs.free_port()
            cfg = workdir / f"{self.name}.yaml"
            cfg.write_text(kubeprism_config(port, upstream, admin, self.forwarding))
            argv = [sys.executable, "-m", "kubeprism", "--log-level", "warning", "run"]
            return [*argv, "--config", str(cfg)], lambda: procs.http_status(admin, "/readyz") == 200
        if self.kind == "haproxy":
            cfg = workdir / "haproxy.cfg"
            cfg.write_text(haproxy_config(port, upstream))
            return ["haproxy", "-db", "-q", "-f", str(cfg)], None
        if self.kind == "nginx":
            prefix = workdir / "nginx-stream"
            prefix.mkdir(exist_ok=True)
            (prefix / "nginx.conf").write_text(nginx_stream_config(port, upstream))
            argv = ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
            return [*argv, "-g", "daemon off;"], None
        raise ValueError(self.kind)


def _poll(proc: procs.Proc, predicate: object, what: str) -> float:
    def ok() -> bool:
        proc.check_alive()
        return bool(predicate())  # type: ignore[operator]

    procs.wait_until(ok, READY_DEADLINE, what)
    return time.monotonic() - proc.started


ALL = (
    Target("direct", "direct"),
    Target("kubeprism-splice", "kubeprism", "splice"),
    Target("kubeprism-copy", "kubeprism", "copy"),
    # The same code as plain Python: what an install without a C compiler runs.
    Target("kubeprism-python", "kubeprism", "splice", engine="python"),
    Target("haproxy", "haproxy"),
    Target("nginx", "nginx"),
)
BASELINE = "haproxy"


def at_revision(rev: str, into: Path) -> Target:
    """kubeprism-splice as of git revision ``rev``, extracted under ``into``.

    Measured in the same run as the working tree, so a regression is told from a slower or
    busier machine (ratios to haproxy alone move by 10-20 % between runs on a 2-core VM).
    Only the package is taken from ``rev``; the installed dependencies are shared.
    """
    repo = Path(__file__).resolve().parent.parent
    try:
        short = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "--verify", f"{rev}^{{commit}}"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"--compare: {rev!r} is not a commit here: {exc.stderr.strip()}") from exc
    tree = into / f"kubeprism-{short}"
    tree.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", short, "kubeprism"],
        capture_output=True,
        check=True,
        timeout=60,
    )
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True, timeout=60)
    # Never compiled (a plain git archive): plain Python, whatever KUBEPRISM_ENGINE says.
    return Target(f"kubeprism-splice@{short}", "kubeprism", "splice", source=tree, engine="python")


def available(targets: tuple[Target, ...]) -> tuple[list[Target], list[str]]:
    """Targets whose binaries exist here, and a note for each one that is missing."""
    have, notes = [], []
    for t in targets:
        if t.kind == "haproxy" and not _which("haproxy"):
            notes.append("haproxy not installed: skipped")
        elif t.kind == "nginx" and not (_which("nginx") and os.path.exists(NGINX_STREAM_MODULE)):
            notes.append("nginx or libnginx-mod-stream not installed: skipped")
        else:
            have.append(t)
    return have, notes


def _which(name: str) -> bool:
    return shutil.which(name) is not None


def kubeprism_config(port: int, upstream: int, admin: int, forwarding: str) -> str:
    """kubeprism in front of one plain-TCP upstream."""
    return f"""\
listen: ["127.0.0.1:{port}"]
upstreams: ["127.0.0.1:{upstream}"]
healthCheck: {{type: tcp, interval: 1s, timeout: 800ms}}
forwarding: {forwarding}
maxConnections: {MAX_CONN}
drainTimeout: 500ms
admin: {{listen: "127.0.0.1:{admin}"}}
"""


def haproxy_config(port: int, upstream: int) -> str:
    """haproxy 2.6 the way kubespray-like setups run it: mode tcp, splice-auto, one thread."""
    return f"""\
global
    nbthread 1
    maxconn {MAX_CONN}
defaults
    mode tcp
    option splice-auto
    timeout connect 1s
    timeout client 10m
    timeout server 10m
    maxconn {MAX_CONN}
frontend fe
    bind 127.0.0.1:{port}
    backlog {BACKLOG}
    default_backend be
backend be
    server up 127.0.0.1:{upstream} check inter 1s
"""


def nginx_stream_config(port: int, upstream: int) -> str:
    """nginx stream proxy with one worker (kubespray's localhost balancer)."""
    return f"""\
load_module {NGINX_STREAM_MODULE};
worker_processes 1;
worker_rlimit_nofile {MAX_CONN * 2 + 100};
pid nginx.pid;
error_log error.log warn;
events {{ worker_connections {MAX_CONN * 2}; }}
stream {{
    server {{
        listen 127.0.0.1:{port} backlog={BACKLOG};
        proxy_pass 127.0.0.1:{upstream};
        proxy_connect_timeout 1s;
        proxy_timeout 10m;
    }}
}}
"""
