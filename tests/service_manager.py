"""A stand-in service manager: the part of systemd a restart that keeps connections needs.

It listens on its own notify socket for sd_notify datagrams (READY=1, FDSTORE=1 with
descriptors, FDSTOREREMOVE=1), keeps a file descriptor store, and starts each next
process with the stored descriptors in LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES (through
socket_activation.py's exec wrapper, so LISTEN_PID is the daemon's own pid), as systemd
does on `systemctl restart`. `flush()` is what `systemctl stop` does to the store.
"""

from __future__ import annotations

import array
import asyncio
import os
import select
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from daemon_proc import DaemonProcess
from netns import NetNS

HERE = Path(__file__).resolve().parent
ACTIVATION = str(HERE / "socket_activation.py")
# One datagram carries at most SCM_MAX_FD (253) descriptors.
_MAX_FDS = 253
_RECV_TIMEOUT = 0.05
# 2 descriptors a connection, room for undelivered bytes and the listeners (200 connections).
STORE_CAPACITY = 4 * 200 + 16


class ServiceManager:
    """Notify socket + descriptor store, drained by a background thread."""

    def __init__(self, workdir: Path, capacity: int) -> None:
        self.capacity = capacity
        self.path = str(workdir / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.store: list[tuple[int, str]] = []
        self.messages: list[str] = []
        self.dropped = 0  # descriptors over capacity, closed as systemd does
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="service manager", daemon=True)
        self._thread.start()

    def env(self) -> dict[str, str]:
        """What the manager puts in the service's environment."""
        return {"NOTIFY_SOCKET": self.path, "FDSTORE": str(self.capacity)}

    def launch(self) -> tuple[list[str], tuple[int, ...]]:
        """(wrapper argv, fds to pass) that start a process with the store's descriptors."""
        self.drain()
        with self._lock:
            if not self.store:
                return [], ()
            specs = [f"{fd}={name}" for fd, name in self.store]
            fds = tuple(fd for fd, _ in self.store)
        # -S: the wrapper needs only the standard library. systemd execs the service itself;
        # the wrapper's interpreter start-up is the stand-in's cost, kept out of the pause.
        return [sys.executable, "-S", ACTIVATION, "exec", *specs, "--"], fds

    def seed(self, fd: int, name: str) -> None:
        """Put a copy of ``fd`` in the store, as a previous process would have."""
        with self._lock:
            self.store.append((os.dup(fd), name))

    def stored_names(self) -> list[str]:
        """Names in the store right now."""
        self.drain()
        with self._lock:
            return [name for _, name in self.store]

    def drain(self) -> None:
        """Handle every datagram already queued (call after the service exited)."""
        while self._receive():
            pass

    def flush(self) -> int:
        """Close every stored descriptor (`systemctl stop`); return how many."""
        self.drain()
        with self._lock:
            stored, self.store = self.store, []
        for fd, _ in stored:
            os.close(fd)
        return len(stored)

    def close(self) -> None:
        """Stop the thread, close the socket and whatever is still stored."""
        self._stopping.set()
        self._thread.join()
        self.flush()
        self.sock.close()

    # ---------------------------------------------------------------- receiving

    def _run(self) -> None:
        # Wait for a datagram without the lock, then take it: a recvmsg blocking under the
        # lock kept drain() waiting (up to ~0.15 s under load, the thread re-taking the lock
        # first), and that wait counted in every measured restart pause.
        while not self._stopping.is_set():
            if select.select([self.sock], [], [], _RECV_TIMEOUT)[0]:
                self._receive()

    def _receive(self) -> bool:
        """Receive and handle one queued datagram (under the lock: drain() sees it done)."""
        with self._lock:
            try:
                data, ancdata, _flags, _ = self.sock.recvmsg(
                    4096, socket.CMSG_SPACE(_MAX_FDS * 4), socket.MSG_DONTWAIT
                )
            except BlockingIOError:
                return False
            fds = _fds_of(ancdata)
            self._handle(data.decode(errors="replace"), fds)
            return True

    def _handle(self, message: str, fds: list[int]) -> None:
        self.messages.append(message)
        fields = dict(line.partition("=")[::2] for line in message.splitlines())
        name = fields.get("FDNAME", "stored")
        if fields.get("FDSTORE") == "1":
            for fd in fds:
                if len(self.store) < self.capacity:
                    self.store.append((fd, name))
                else:
                    self.dropped += 1
                    os.close(fd)
            return
        for fd in fds:  # descriptors on any other message are not kept (as systemd does)
            os.close(fd)
        if fields.get("FDSTOREREMOVE") == "1":
            for fd, _ in [e for e in self.store if e[1] == name]:
                os.close(fd)
            self.store = [e for e in self.store if e[1] != name]


class Service:
    """kubeprism under the stand-in manager: start, restart (SIGTERM + start), stop."""

    def __init__(
        self,
        cfg: dict[str, Any],
        workdir: Path,
        capacity: int = STORE_CAPACITY,
        netns: NetNS | None = None,
    ) -> None:
        self.cfg, self.workdir, self.netns = cfg, workdir, netns
        self.manager = ServiceManager(workdir, capacity)
        self.daemon: DaemonProcess | None = None
        self.generations: list[DaemonProcess] = []

    def start(self) -> DaemonProcess:
        """Start the next process with whatever the store holds; wait until it serves."""
        wrap, fds = self.manager.launch()
        daemon = DaemonProcess(
            self.cfg,
            self.workdir,
            netns=self.netns,
            env=self.manager.env(),
            wrap=wrap,
            pass_fds=fds,
        )
        self.generations.append(daemon)
        self.daemon = daemon.start()
        return daemon

    def terminate(self) -> int:
        """SIGTERM (what systemctl restart and stop send) and wait for the exit."""
        assert self.daemon is not None
        self.daemon.signal(signal.SIGTERM)
        code = self.daemon.wait_exit(10)
        self.manager.drain()
        return code

    def restart(self) -> float:
        """systemctl restart; return the seconds from SIGTERM until the new one serves."""
        started = time.monotonic()
        assert self.terminate() == 0
        self.start()
        return time.monotonic() - started

    async def astart(self) -> DaemonProcess:
        """start() off the event loop (in-process upstreams keep answering)."""
        return await asyncio.to_thread(self.start)

    async def aterminate(self) -> int:
        """terminate() off the event loop."""
        return await asyncio.to_thread(self.terminate)

    async def arestart(self) -> float:
        """restart() off the event loop."""
        return await asyncio.to_thread(self.restart)

    def close(self) -> None:
        """Stop whatever still runs and close the store."""
        for daemon in self.generations:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop()
        self.manager.close()


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(array.array("i", payload[:usable]))
    return fds
