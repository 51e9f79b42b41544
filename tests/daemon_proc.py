"""kubeprism as a real subprocess: config file in, admin HTTP out, signals, logs.

Tests talk to the daemon the way a node does: over its listener and its admin
port. Inside a network namespace every socket is made there (tests.netns).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from netns import NetNS
from util import eventually, free_port, stop_process, wait_for

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 10.0


def http_get(host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """Plain HTTP GET on loopback; returns (status, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def base_config(upstreams: list[Any], **overrides: Any) -> dict[str, Any]:
    """A config dict on free loopback ports, with fast checks suited to tests."""
    cfg: dict[str, Any] = {
        "listen": [f"127.0.0.1:{free_port()}"],
        "upstreams": upstreams,
        "healthCheck": {"interval": "500ms", "timeout": "400ms"},
        "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "drainTimeout": "2s",
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


class DaemonProcess:
    """`python -m kubeprism run` on a config dict; stopped (and reaped) on exit."""

    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path,
        netns: NetNS | None = None,
        extra_args: list[str] | None = None,
        preexec_fn: Any = None,
        env: dict[str, str] | None = None,
        wrap: list[str] | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.config = config
        self.workdir = workdir
        self.netns = netns
        self.config_path = workdir / f"kubeprism-{id(self)}.yaml"
        self.log_path = workdir / f"kubeprism-{id(self)}.log"
        self.extra_args = extra_args or []
        self.preexec_fn = preexec_fn
        self.env = env or {}
        self.wrap = wrap or []  # a launcher that execs the daemon (socket activation)
        self.pass_fds = pass_fds
        self.proc: subprocess.Popen[bytes] | None = None

    # ---------------------------------------------------------------- addresses

    @property
    def port(self) -> int:
        """The first listen port."""
        return int(str(self.config["listen"][0]).rsplit(":", 1)[1])

    @property
    def admin_port(self) -> int:
        """The admin port."""
        return int(str(self.config["admin"]["listen"]).rsplit(":", 1)[1])

    # ---------------------------------------------------------------- lifecycle

    def argv(self) -> list[str]:
        """The command line."""
        return [
            sys.executable,
            "-m",
            "kubeprism",
            "--log-level",
            "debug",
            *self.extra_args,
            "run",
            "--config",
            str(self.config_path),
        ]

    def start(self, wait: bool = True) -> DaemonProcess:
        """Write the config, start the process, and (by default) wait for /healthz."""
        self.config_path.write_text(yaml.safe_dump(self.config))
        argv = [*self.wrap, *self.argv()]
        if self.netns is not None:
            argv = self.netns.exec_args(argv)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
                preexec_fn=self.preexec_fn,
                pass_fds=self.pass_fds,
            )
        if wait:
            wait_for(self._alive_and_serving, START_TIMEOUT, 0.02, "daemon answers /healthz")
        return self

    async def astart(self) -> DaemonProcess:
        """start() off the event loop, so in-process stand-ins answer the first probes."""
        return await asyncio.to_thread(self.start)

    async def astop(self, timeout: float = 10.0) -> int:
        """stop() off the event loop."""
        return await asyncio.to_thread(self.stop, timeout)

    def _alive_and_serving(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
        return self.admin("/healthz")[0] == 200

    def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for the process to end; return its exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        """Send a signal."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not stop in time."""
        assert self.proc is not None
        return stop_process(self.proc, timeout)

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        """Everything the daemon logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ---------------------------------------------------------------- admin API

    def admin(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET on the admin port."""
        if self.netns is not None:
            return self.netns.http_get("127.0.0.1", self.admin_port, path, timeout)
        return http_get("127.0.0.1", self.admin_port, path, timeout)

    def upstreams(self) -> dict[str, Any]:
        """/upstreams as a dict keyed by endpoint address."""
        status, body = self.admin("/upstreams")
        assert status == 200, body
        data: dict[str, Any] = json.loads(body)
        return {ep["address"]: ep for ep in data["endpoints"]} | {"_panic": data["panic"]}

    def state_of(self, address: str) -> str:
        """Health state of one endpoint."""
        return str(self.upstreams()[address]["state"])

    def wait_state(self, address: str, state: str, timeout: float = 10.0) -> float:
        """Poll until the endpoint reaches ``state``; return the seconds it took."""
        started = time.monotonic()
        wait_for(
            lambda: self.state_of(address) == state, timeout, 0.02, f"{address} becomes {state}"
        )
        return time.monotonic() - started

    async def aadmin(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """admin() off the event loop (in-process servers must keep answering meanwhile)."""
        return await asyncio.to_thread(self.admin, path, timeout)

    async def aupstreams(self) -> dict[str, Any]:
        """upstreams() off the event loop."""
        return await asyncio.to_thread(self.upstreams)

    async def await_state(self, address: str, state: str, timeout: float = 10.0) -> float:
        """Wait (async) until the endpoint reaches ``state``; return the seconds it took."""
        started = time.monotonic()

        async def reached() -> bool:
            return bool((await self.aupstreams())[address]["state"] == state)

        await eventually(reached, timeout, 0.02, f"{address} becomes {state}")
        return time.monotonic() - started

    async def ametrics(self) -> str:
        """metrics() off the event loop."""
        return await asyncio.to_thread(self.metrics)

    def metrics(self) -> str:
        """The /metrics exposition text."""
        status, body = self.admin("/metrics")
        assert status == 200
        return body.decode()

    def fd_count(self) -> int:
        """Open file descriptors of the daemon process."""
        assert self.proc is not None
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))
