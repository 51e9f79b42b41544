"""What the unit's priority settings change for kubeprism on a CPU-saturated node.

deploy/systemd/kubeprism.service gives kubeprism the standing of a node-critical component
with Nice=-10, CPUWeight=1000 and OOMScoreAdjust=-999. This measures each one on the machine
it runs on (root; `ip netns`, iptables, systemd-nspawn and debootstrap, as the tests use):

    # Nice: fault scenario 14 (tests/faults/test_fault_overload.py: PROCS processes spinning
    # at nice 0 in the daemon's cgroup and autogroup for SECONDS, stand-ins at nice -15, six
    # streams and a fresh request every 200 ms) with the daemon at each nice value, REPS runs
    .venv/bin/python bench/priority.py overload --nice 0,-10 --procs 200,1000 --reps 2

    # one such run by hand: loaded as a pytest plugin (-p priority), this module starts the
    # daemon at $KUBEPRISM_DAEMON_NICE; the test file itself is unchanged
    KUBEPRISM_DAEMON_NICE=-10 KUBEPRISM_FAULTS_SUMMARY=/tmp/x.md PYTHONPATH=bench \\
        .venv/bin/pytest tests/faults/test_fault_overload.py::test_14_node_overloaded \\
        -p priority -p no:cacheprovider -q

    # CPUWeight=, Nice= and OOMScoreAdjust= as drop-ins under a real systemd 252
    # (tests/nspawn.py), BUSY processes spinning in competing units for SECONDS
    .venv/bin/python bench/priority.py systemd --busy 50 --busy-weight none --reps 2
    .venv/bin/python bench/priority.py systemd --modes writable-cpu --busy-units 10 --no-oom
    .venv/bin/python bench/priority.py systemd --modes writable-cpu --busy-units 10 \\
        --busy-slice kubepods.slice --no-oom

`systemd` boots a container per mode. "as-tests" is the container exactly as tests/nspawn.py
boots it. "writable-cpu" gives the container's systemd cpu and cpuacct hierarchies of its
own, which it can write (a cgroup made for the container in each host hierarchy, bound in,
mounted over nspawn's read-only ones before systemd starts): systemd as PID 1 of a
cgroup-v1 node. Inside each: three TLS stand-in API servers (tests/systemd_cluster.py, in
remote.slice with CPUWeight=10000 and Nice=-15: they stand for remote machines), and
kubeprism.service from deploy/systemd with its shipped hardening (DynamicUser=,
PrivateUsers=) and a config listing them. For each variant (a drop-in in
kubeprism.service.d): restart kubeprism; start BUSY processes spinning in --busy-units units
busy-*.service (nice 0; CPUWeight=100 unless --busy-weight; in system.slice unless
--busy-slice; kubepods.slice has CPUWeight=200, as a kubelet weights it on 2 CPUs); then run
a probe (this file's `probe` command, in remote.slice, CPUWeight=10000, Nice=-15) that every
--interval makes a fresh TLS request through kubeprism (127.0.0.1:7445, GET /version) and a
GET of its admin /healthz, for SECONDS. Over that window, from the host:
/proc/PID/schedstat of kubeprism's main thread (the event loop): run-queue wait per second
and per time it ran, CPU fraction; and where the settings landed (nice of every thread,
oom_score_adj, cpu cgroup and its cpu.shares, autogroup). --oom (default) then checks
OOMScoreAdjust= with systemd's debug log on. Each run first waits (--quiet-wait) until the
machine's CPU is idle.

Every load is bounded: the hogs end by themselves SECONDS + a margin after they start, every
unit has RuntimeMaxSec=, every request a 5 s timeout, and the containers are powered off
(their cgroups removed) however the run ends. All traffic stays on loopback inside the
namespaces and containers made here. Results: --out (JSON per run) and a markdown table on
stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest
    from nspawn import SystemdContainer

REPO = Path(__file__).resolve().parent.parent
NICE_ENV = "KUBEPRISM_DAEMON_NICE"
JSON_ENV = "KUBEPRISM_PRIORITY_JSON"
OVERLOAD_TEST = "tests/faults/test_fault_overload.py::test_14_node_overloaded"
STALL = "kubeprism_stall_seconds_total"

# ---------------------------------------------------------------------------------------------
# A shared machine: measure only while nothing else uses the CPU


def _busy_fraction(seconds: float = 2.0) -> float:
    """Fraction of all CPUs' time that was not idle (idle + iowait) over `seconds`."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_quiet(limit: float, threshold: float = 0.25) -> dict[str, float]:
    """Wait (at most `limit` seconds) until the machine is quiet: less than `threshold` of
    the CPU in use over 2 s. Returns how long it waited and the last figure."""
    started = time.monotonic()
    while True:
        used = _busy_fraction()
        waited = time.monotonic() - started
        if used < threshold or waited >= limit:
            return {"waited_s": round(waited, 1), "cpu_in_use_before": round(used, 3)}
        time.sleep(10)


# ---------------------------------------------------------------------------------------------
# Nice: scenario 14 with the daemon at another nice value (this module as a pytest plugin)


def _daemon_nice() -> int | None:
    value = os.environ.get(NICE_ENV)
    return None if value in (None, "") else int(value)


def _thread_nices(pid: int) -> list[int]:
    """The nice value of every thread of a process (field 19 of /proc/PID/task/TID/stat)."""
    nices = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            nices.append(int(stat.rsplit(")", 1)[1].split()[16]))
    return sorted(set(nices))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With $KUBEPRISM_DAEMON_NICE set: scenario 14's daemon starts at that nice value (set
    before exec, so every thread has it, as systemd's Nice= does), and the scenario's check
    that the daemon runs at the hogs' nice value accepts it instead."""
    nice = _daemon_nice()
    network: Any = sys.modules.get("faults.test_fault_network")
    overload: Any = sys.modules.get("faults.test_fault_overload")
    if nice is None or network is None or overload is None:
        return
    start_daemon = network.start_daemon

    def start_daemon_at_nice(*args: Any, **kwargs: Any) -> Any:
        def set_nice() -> None:
            os.setpriority(os.PRIO_PROCESS, 0, nice)

        return start_daemon(*args, preexec_fn=set_nice, **kwargs)

    def check_competition(cluster: Any, run: Any, busy: Any) -> dict[str, Any]:
        # tests/faults/test_fault_overload.py's _check_competition, daemon at `nice`.
        daemon = overload._pid(run.daemon)
        assert overload.cpu_group(busy.pid) == overload.cpu_group(daemon)
        assert busy.spinning == overload.BUSY, busy
        nices: dict[str, Any] = {"daemon": overload.nice_of(daemon), "busy": overload.BUSY_NICE}
        nices |= {name: overload.nice_of(cluster.standins[name].pid) for name in cluster.names}
        for name, load in (("requests client", run.load), ("streams client", run.streams)):
            nices[name] = overload.nice_of(load.proc.pid)
        nices["daemon threads"] = _thread_nices(daemon)
        assert nices["daemon threads"] == [nice], nices
        return nices

    network.start_daemon = start_daemon_at_nice
    overload._check_competition = check_competition


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Scenario 14's exact figures to $KUBEPRISM_PRIORITY_JSON (when set)."""
    target = os.environ.get(JSON_ENV)
    report = sys.modules.get("faults.fault_report")
    if not target or report is None:
        return
    found = [r for r in report.RESULTS if r.scenario.startswith("14 ")]
    doc = {
        "daemon_nice": _daemon_nice() or 0,
        "exitstatus": int(exitstatus),
        "met": found[0].met if found else None,
        "measured": found[0].measured if found else None,
        "details": found[0].details if found else None,
    }
    Path(target).write_text(json.dumps(doc, indent=1, default=str))


def _overload_row(doc: dict[str, Any]) -> dict[str, Any]:
    """The figures of one scenario-14 run that the table shows."""
    d = doc.get("details") or {}
    seconds = float(d.get("overload_seconds") or 0) or math.nan
    counters = d.get("daemon_counters") or {}
    checks = d.get("health_checks") or {}
    stall = counters.get(STALL)
    return {
        "p50_ms": 1000 * float(d.get("median_seconds", math.nan)),
        "p99_ms": 1000 * float(d.get("p99_seconds", math.nan)),
        "max_ms": 1000 * float(d.get("max_seconds", math.nan)),
        "failed": f"{d.get('failed')}/{d.get('fresh_requests')}",
        "stall_per_s": math.nan if stall is None else stall / seconds,
        "cpu": float(d.get("daemon_cpu_fraction", math.nan)),
        "checks": checks.get("checks"),
        "over_250ms": checks.get("over 0.25 s"),
        "over_500ms": checks.get("over 0.5 s"),
        "inconclusive": d.get("inconclusive_checks"),
        "admin_errors": d.get("admin_errors"),
        "met": doc.get("met"),
    }


def run_overload(args: argparse.Namespace) -> int:
    """Scenario 14 for every (procs, nice) pair, `reps` times, interleaved; one pytest each."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for rep in range(args.reps):
        for procs in args.procs:
            for nice in args.nice:
                name = f"overload-n{procs}-nice{nice}-r{rep + 1}"
                env = {
                    **os.environ,
                    NICE_ENV: str(nice),
                    JSON_ENV: str(out / f"{name}.json"),
                    "KUBEPRISM_FAULTS_SUMMARY": str(out / f"{name}.md"),
                    "KUBEPRISM_FAULTS_OVERLOAD": str(args.seconds),
                    "KUBEPRISM_FAULTS_OVERLOAD_PROCS": str(procs),
                    "PYTHONPATH": os.pathsep.join(
                        p for p in (str(REPO / "bench"), os.environ.get("PYTHONPATH")) if p
                    ),
                }
                argv = [sys.executable, "-m", "pytest", OVERLOAD_TEST, "-p", "priority"]
                argv += ["-p", "no:cacheprovider", "-q"]
                quiet = wait_quiet(args.quiet_wait)
                print(f"# {name} {quiet}: {' '.join(argv)}", file=sys.stderr, flush=True)
                timeout = 300 + 3 * args.seconds
                with (out / f"{name}.log").open("w") as log:
                    subprocess.run(
                        argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                        timeout=timeout, check=False,
                    )  # fmt: skip
                result = out / f"{name}.json"
                doc = json.loads(result.read_text()) if result.exists() else {}
                rows.append(
                    _overload_row(doc) | {"nice": nice, "procs": procs, "run": rep + 1} | quiet
                )
    (out / "overload.json").write_text(json.dumps(rows, indent=1))
    print(overload_table(rows))
    return 0


def overload_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per run."""
    head = (
        "| busy procs | daemon nice | run | fresh p50 ms | p99 ms | max ms | failed | "
        "run-queue wait s/s | daemon CPU | checks | > 0.25 s | > 0.5 s | inconclusive | "
        "admin errors |"
    )
    lines = [head, _rule(head)]
    for r in sorted(rows, key=lambda r: (r["procs"], -r["nice"], r["run"])):
        lines.append(
            f"| {r['procs']} | {r['nice']} | {r['run']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} "
            f"| {r['max_ms']:.0f} | {r['failed']} | {r['stall_per_s']:.3f} | {r['cpu']:.1%} "
            f"| {r['checks']} | {r['over_250ms']} | {r['over_500ms']} | {r['inconclusive']} "
            f"| {r['admin_errors']} |"
        )
    return "\n".join(lines)


def _rule(head: str) -> str:
    return "|" + " --- |" * (head.count("|") - 1)


# ---------------------------------------------------------------------------------------------
# The probe (runs inside the container, with the container's python3: standard library only)


def _percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (nan for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _fresh_request(ctx: ssl.SSLContext, port: int) -> None:
    """One fresh TLS connection through kubeprism and GET /version; raises on anything but 200."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.settimeout(5)
        with ctx.wrap_socket(raw, server_hostname="kubernetes") as tls:
            tls.sendall(b"GET /version HTTP/1.1\r\nHost: kubernetes\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
    if not answer.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(answer[:40].decode(errors="replace"))


def _healthz(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"/healthz {response.status}")
    finally:
        conn.close()


def run_probe(args: argparse.Namespace) -> int:
    """Every `interval` for `seconds`: a fresh request through kubeprism, then /healthz."""
    ctx = ssl.create_default_context(cafile=args.ca)
    timings: dict[str, list[float]] = {"proxy": [], "healthz": []}
    failures: dict[str, list[str]] = {"proxy": [], "healthz": []}
    probes: dict[str, Callable[[], None]] = {
        "proxy": lambda: _fresh_request(ctx, args.port),
        "healthz": lambda: _healthz(args.admin_port),
    }
    start = time.monotonic()
    for i in range(int(args.seconds / args.interval)):
        due = start + i * args.interval
        time.sleep(max(0.0, due - time.monotonic()))
        for name, probe in probes.items():
            t0 = time.monotonic()
            try:
                probe()
            except Exception as exc:
                failures[name].append(f"{type(exc).__name__}: {exc}"[:120])
            timings[name].append(time.monotonic() - t0)
    doc = {"seconds": time.monotonic() - start, "timings": timings, "failures": failures}
    Path(args.out).write_text(json.dumps(doc))
    return 0


# ---------------------------------------------------------------------------------------------
# CPUWeight=, Nice=, OOMScoreAdjust= under systemd 252 in a container

# The drop-ins compared (kubeprism.service.d/priority.conf). Each sets all three settings, so
# that the figures do not depend on what the shipped unit sets: "CPUWeight=" (empty) is unset,
# Nice=0 and OOMScoreAdjust=0 are what PID 1 passes on when they are unset.
VARIANTS = {
    "none": "Nice=0\nCPUWeight=\nOOMScoreAdjust=0",
    "Nice=-10": "Nice=-10\nCPUWeight=\nOOMScoreAdjust=0",
    "CPUWeight=1000": "Nice=0\nCPUWeight=1000\nOOMScoreAdjust=0",
    "all three": "Nice=-10\nCPUWeight=1000\nOOMScoreAdjust=-999",
}
SERVERS = ("127.0.0.11", "127.0.0.12", "127.0.0.13")
# The stand-ins and the probe: above everything (they stand for remote machines and for a
# client whose own starvation is not what is measured), in a slice of their own so that their
# CPUWeight= does not give every unit of system.slice a cpu cgroup of its own.
PRIVILEGED = ("--slice=remote.slice", "-p", "CPUWeight=10000", "-p", "Nice=-15")
# kubeprism's defaults except the CA of the test PKI (the stand-ins' certificates).
CONFIG = """\
listen: ["127.0.0.1:7445", "[::1]:7445"]
upstreams: [{servers}]
healthCheck: {{caFile: {pki}/ca.pem}}
"""
SCRATCH = "/srv/scratch"
DROP_IN = "/etc/systemd/system/kubeprism.service.d/priority.conf"
READY_TIMEOUT = 60.0


def _writable_cpu_container(venv: Path, binds: dict[Path, str]) -> SystemdContainer:
    """A kubeprism_container() whose systemd owns cpu and cpuacct hierarchies it can write."""
    import nspawn  # tests/ is on sys.path (run_systemd)

    class WritableCpuContainer(nspawn.SystemdContainer):
        """nspawn mounts every cgroup-v1 controller hierarchy read-only, so the systemd inside
        cannot give a unit a cpu cgroup of its own. Here the container gets a cgroup of its
        own in the host's cpu and cpuacct hierarchies (systemd 252 handles cpu and cpuacct
        together: with cpuacct read-only it puts a unit with CPUWeight= in its slice's cpu
        cgroup), bound in at /srv/cg-*, and PID 1 is a shell that mounts those over nspawn's
        read-only ones and then execs systemd (SystemdContainer's two boot hooks)."""

        CONTROLLERS = ("cpu", "cpuacct")

        def _own(self) -> list[Path]:
            return [
                nspawn.CGROUP_ROOT / c / f"kubeprism-bench-{self.name}" for c in self.CONTROLLERS
            ]

        def _init_command(self) -> list[str]:
            for controller, cgroup in zip(self.CONTROLLERS, self._own(), strict=True):
                cgroup.mkdir(exist_ok=True)
                self.binds[cgroup] = f"/srv/cg-{controller}"
            remount = "".join(
                f"umount /sys/fs/cgroup/{c} && mount --bind /srv/cg-{c} /sys/fs/cgroup/{c} && "
                for c in self.CONTROLLERS
            )
            return ["/bin/sh", "-c", f"{remount}exec /usr/lib/systemd/systemd"]

        def _extra_cgroups(self) -> list[Path]:
            return self._own()

    return WritableCpuContainer(
        binds={venv: nspawn.VENV, **binds}, read_only_binds={REPO: nspawn.REPO_INSIDE}
    )


def _host_pid(box: SystemdContainer, pid: int) -> int:
    """The host's pid of process `pid` of the container."""
    pidns = os.readlink(f"/proc/{box.pid}/ns/pid")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{entry}/ns/pid") != pidns:
                continue
            for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                if line.startswith("NSpid:") and int(line.split()[-1]) == pid:
                    return int(entry)
    raise LookupError(f"no host pid for {pid} in {box.name}")


def _schedstat(pid: int) -> tuple[float, float, int]:
    """(CPU seconds, run-queue wait seconds, times run) of a process's main thread."""
    cpu, wait, runs = Path(f"/proc/{pid}/schedstat").read_text().split()
    return int(cpu) / 1e9, int(wait) / 1e9, int(runs)


def _facts(box: SystemdContainer, pid: int) -> dict[str, Any]:
    """Where kubeprism.service's settings landed (just after its start): as systemd reports
    them, and the process."""
    props = ("CPUWeight", "Nice", "OOMScoreAdjust", "ControlGroup", "User")
    shown = box.run("systemctl", "show", *(f"-p{p}" for p in props), "kubeprism.service").stdout
    cgroup = _cpu_cgroup(Path(f"/proc/{pid}/cgroup").read_text())
    autogroup = Path(f"/proc/{pid}/autogroup")
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {
        "systemctl show": dict(line.split("=", 1) for line in shown.splitlines() if "=" in line),
        "thread nices": _thread_nices(pid),
        "oom_score_adj": int(Path(f"/proc/{pid}/oom_score_adj").read_text()),
        "uid_map": Path(f"/proc/{pid}/uid_map").read_text().split(),
        "uid": next(line.split()[1] for line in status if line.startswith("Uid:")),
        "cpu cgroup (host view)": cgroup,
        "cpu.shares": _shares(cgroup),
        "autogroup": (autogroup.read_text().strip() if autogroup.exists() else "") or "none",
    }


def _cgroup_setup(box: SystemdContainer) -> dict[str, Any]:
    """What the container's systemd has for the cpu controller, and PID 1's capabilities."""
    mounts = box.sh("grep ' /sys/fs/cgroup' /proc/self/mounts || true")
    mine = box.sh("grep -E ':cpu:' /proc/$(systemctl show -P MainPID kubeprism)/cgroup").strip()
    own = box.sh(
        "cat /sys/fs/cgroup/cpu/system.slice/kubeprism.service/cpu.shares 2>&1 || true"
    ).strip()
    return {
        "mounts": [" ".join(m.split()[1:4]) for m in mounts.splitlines()],
        "unified cgroup.controllers": box.sh(
            "cat /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null || echo n/a"
        ).strip(),
        "kubeprism's cpu cgroup (container view)": mine,
        "system.slice/kubeprism.service/cpu.shares": own,
        "PID 1 CapBnd": box.sh("grep CapBnd /proc/1/status").split()[-1],
    }


def _oom_check(box: SystemdContainer, scratch: Path) -> dict[str, Any]:
    """OOMScoreAdjust=-999 with systemd's debug log on: what lands, and what systemd says;
    the same on transient units with and without PrivateUsers=, and a positive value."""
    (scratch / "priority.conf").write_text(f"[Service]\n{VARIANTS['none']}\nOOMScoreAdjust=-999\n")
    box.run("install", "-D", "-m", "0644", f"{SCRATCH}/priority.conf", DROP_IN)
    box.run("systemctl", "daemon-reload")
    box.run("systemd-analyze", "log-level", "debug")
    checks: dict[str, Any] = {}
    try:
        box.run("systemctl", "restart", "kubeprism.service", timeout=120)
        _wait_ready(box)
        pid = box.run("systemctl", "show", "-P", "MainPID", "kubeprism").stdout.strip()
        checks["kubeprism.service (OOMScoreAdjust=-999)"] = _oom_of(box, pid)
        userns = "PrivateUsers=yes DynamicUser=yes"
        units = {
            "oom-plain": "OOMScoreAdjust=-999",
            "oom-userns": f"OOMScoreAdjust=-999 {userns}",
            "oom-positive-userns": f"OOMScoreAdjust=500 {userns}",
        }
        for unit, props in units.items():
            options = [arg for prop in props.split() for arg in ("-p", prop)]
            box.run("systemd-run", "--quiet", f"--unit={unit}", *options, "-p", "RuntimeMaxSec=30",
                    "/bin/sleep", "20")  # fmt: skip
            pid = box.run("systemctl", "show", "-P", "MainPID", unit).stdout.strip()
            checks[f"{unit} ({props})"] = _oom_of(box, pid)
            box.run("systemctl", "stop", unit, check=False)
    finally:
        box.run("systemd-analyze", "log-level", "info")
        box.run("rm", "-f", DROP_IN)
        box.run("systemctl", "daemon-reload")
    journal = box.run("journalctl", "-b", "-o", "cat", "--no-pager", check=False).stdout
    checks["systemd says"] = sorted(
        {line for line in journal.splitlines() if "OOM setting" in line or "oom_score" in line}
    )
    return checks


def _oom_of(box: SystemdContainer, pid: str) -> str:
    return box.sh(f"cat /proc/{pid}/oom_score_adj").strip()


def _wait_ready(box: SystemdContainer) -> None:
    """Until kubeprism answers and has every stand-in healthy; the units' state if never."""
    from util import wait_for

    def ready() -> bool:
        answer = box.run("curl", "-sf", "http://127.0.0.1:7446/upstreams", check=False).stdout
        if not answer:
            return False
        states = [ep["state"] for ep in json.loads(answer)["endpoints"]]
        return len(states) == len(SERVERS) and set(states) == {"healthy"}

    try:
        wait_for(ready, READY_TIMEOUT, 0.2, "kubeprism up with every stand-in healthy")
    except AssertionError as exc:
        status = box.run("systemctl", "status", "--no-pager", "-n", "20", "kubeprism",
                         "apiservers", check=False)  # fmt: skip
        answer = box.run("curl", "-s", "http://127.0.0.1:7446/upstreams", check=False).stdout
        raise AssertionError(f"{exc}\n{answer}\n{status.stdout}") from None


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": 1000 * _percentile(values, 0.5),
        "p99_ms": 1000 * _percentile(values, 0.99),
        "max_ms": 1000 * max(values, default=math.nan),
        "mean_ms": 1000 * statistics.fmean(values) if values else math.nan,
    }


def _measure(
    box: SystemdContainer, args: argparse.Namespace, scratch: Path, name: str, drop_in: str
) -> dict[str, Any]:
    """One variant: drop-in, restart, hogs, probe; figures over the probe's window."""
    (scratch / "priority.conf").write_text(f"[Service]\n{drop_in}\n")
    box.run("install", "-D", "-m", "0644", f"{SCRATCH}/priority.conf", DROP_IN)
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "restart", "kubeprism.service", timeout=120)
    _wait_ready(box)
    pid = _host_pid(box, int(box.run("systemctl", "show", "-P", "MainPID", "kubeprism").stdout))
    facts = _facts(box, pid)
    hogs = [f"busy-{name}-{k}" for k in range(args.busy_units)]
    slice_args = ["--slice", args.busy_slice] if args.busy_slice else []
    if args.busy_weight != "none":
        slice_args += ["-p", f"CPUWeight={args.busy_weight}"]
    try:
        for k, unit in enumerate(hogs):
            count = args.busy // args.busy_units + (k < args.busy % args.busy_units)
            box.run(
                "systemd-run", "--quiet", f"--unit={unit}", *slice_args,
                "-p", f"RuntimeMaxSec={args.seconds + 60:g}", "/usr/bin/python3",
                "/srv/kubeprism/tests/faults/fault_busy.py", "--count", str(count),
                "--seconds", str(args.seconds + 15),
            )  # fmt: skip
        time.sleep(args.ramp)
        spawners = [
            _host_pid(box, int(box.run("systemctl", "show", "-P", "MainPID", u).stdout))
            for u in hogs
        ]
        spinning = sum(
            len(Path(f"/proc/{p}/task/{p}/children").read_text().split()) for p in spawners
        )
        before, t0 = _schedstat(pid), time.monotonic()
        box.run(
            "systemd-run", "--quiet", "--wait", f"--unit=probe-{name}", *PRIVILEGED,
            "-p", f"RuntimeMaxSec={args.seconds + 60:g}", "/usr/bin/python3",
            "/srv/kubeprism/bench/priority.py", "probe", "--seconds", str(args.seconds),
            "--interval", str(args.interval), "--ca", f"{SCRATCH}/pki/ca.pem",
            "--out", f"{SCRATCH}/probe-{name}.json",
            timeout=args.seconds + 90,
        )  # fmt: skip
        after, t1 = _schedstat(pid), time.monotonic()
        busy_cgroup = Path(f"/proc/{spawners[0]}/cgroup").read_text()
        own_cgroup = _cpu_cgroup(Path(f"/proc/{pid}/cgroup").read_text())
        own_shares = _shares(own_cgroup)
    finally:
        box.run("systemctl", "stop", *hogs, check=False, timeout=60)
    probe = json.loads((scratch / f"probe-{name}.json").read_text())
    window = t1 - t0
    runs = after[2] - before[2]
    return {
        "drop-in": drop_in,
        "window_s": window,
        "busy units": args.busy_units,
        "busy spinning": spinning,
        "busy cpu cgroup": _cpu_cgroup(busy_cgroup),
        "kubeprism cpu cgroup": own_cgroup,
        "kubeprism cpu.shares": own_shares,
        "runq_wait_per_s": (after[1] - before[1]) / window,
        "cpu_fraction": (after[0] - before[0]) / window,
        "wait_per_run_ms": 1000 * (after[1] - before[1]) / runs if runs else math.nan,
        "runs": runs,
        "proxy": _stats(probe["timings"]["proxy"]),
        "proxy_failed": _failed(probe, "proxy"),
        "healthz": _stats(probe["timings"]["healthz"]),
        "healthz_failed": _failed(probe, "healthz"),
        "failures": probe["failures"],
        "facts": facts,
    }


def _cpu_cgroup(proc_cgroup: str) -> str:
    """The cpu hierarchy's line of a /proc/PID/cgroup text."""
    return next(line.split(":", 2)[2] for line in proc_cgroup.splitlines() if ":cpu:" in line)


def _shares(cgroup: str) -> str:
    """cpu.shares of a cgroup of the host's cpu hierarchy."""
    if cgroup == "/":
        return "n/a: the host's root"
    path = Path("/sys/fs/cgroup/cpu", cgroup.lstrip("/"), "cpu.shares")  # the host's
    return path.read_text().strip() if path.exists() else "none"


def _failed(probe: dict[str, Any], name: str) -> str:
    return f"{len(probe['failures'][name])}/{len(probe['timings'][name])}"


@contextlib.contextmanager
def _node(mode: str, venv: Path, scratch: Path) -> Iterator[SystemdContainer]:
    """A booted container (`mode`), stand-ins running, kubeprism's units and config in."""
    import nspawn
    from certs import TestPKI

    box = (
        nspawn.kubeprism_container(venv, {scratch: SCRATCH})
        if mode == "as-tests"
        else _writable_cpu_container(venv, {scratch: SCRATCH})
    )
    with box:
        box.setup_kubeprism()
        (scratch / "pki-src").mkdir(exist_ok=True)
        pki = TestPKI.create(scratch / "pki-src")
        (scratch / "pki").mkdir(exist_ok=True)
        for file in ("ca.pem", "server.pem", "server-key.pem"):
            (scratch / "pki" / file).write_bytes((pki.paths.directory / file).read_bytes())
        servers = ", ".join(f'"{s}:6443"' for s in SERVERS)
        (scratch / "kubeprism.yaml").write_text(
            CONFIG.format(servers=servers, pki=f"{SCRATCH}/pki")
        )
        box.run(
            "install", "-D", "-m", "0644", f"{SCRATCH}/kubeprism.yaml",
            "/etc/kubeprism/kubeprism.yaml",
        )  # fmt: skip
        box.run(
            "systemd-run", "--quiet", "--unit=apiservers", *PRIVILEGED,
            f"{nspawn.VENV}/bin/python", f"{nspawn.REPO_INSIDE}/tests/systemd_cluster.py",
            "--pki", f"{SCRATCH}/pki", "--servers", ",".join(SERVERS), "--publish", "3",
        )  # fmt: skip
        if mode != "as-tests":
            # A slice for the hogs, weighted like the kubepods cgroup a kubelet on a 2-CPU
            # node makes (cpu.shares 2048), for --busy-slice kubepods.slice.
            (scratch / "kubepods.slice").write_text("[Slice]\nCPUWeight=200\n")
            box.run("install", "-m", "0644", f"{SCRATCH}/kubepods.slice", "/etc/systemd/system/")
        box.run("systemctl", "daemon-reload")
        box.run("systemctl", "start", "kubeprism.socket", "kubeprism.service", timeout=120)
        _wait_ready(box)
        yield box


def _systemd_modes(args: argparse.Namespace, work: Path, out: Path) -> dict[str, Any]:
    """Each container mode in turn: boot, every variant `reps` times (interleaved)."""
    import image
    import nspawn

    wheels = nspawn.build_wheelhouse(work / "wheels", image.build_image_wheel(work / "image"))
    (work / "venv").mkdir()
    venv = nspawn.install_venv(work / "venv", wheels)
    results: dict[str, Any] = {}
    for mode in args.modes:
        scratch = work / f"scratch-{mode}"
        scratch.mkdir()
        with _node(mode, venv, scratch) as box:
            runs = []
            for rep in range(args.reps):
                for variant in args.variants:
                    name = f"{variant.split('=')[0].replace(' ', '')}-r{rep + 1}"
                    quiet = wait_quiet(args.quiet_wait)
                    print(f"# {mode} {name} {quiet}", file=sys.stderr, flush=True)
                    runs.append(_measure(box, args, scratch, name, VARIANTS[variant]))
                    runs[-1] |= {"variant": variant, **quiet}
            setup = _cgroup_setup(box)
            oom = _oom_check(box, scratch) if args.oom else {}
        results[mode] = {"cgroup setup": setup, "oom": oom, "runs": runs}
        (out / "systemd.json").write_text(json.dumps(results, indent=1))
    return results


def run_systemd(args: argparse.Namespace) -> int:
    """Both container modes, every variant `reps` times (interleaved); JSON and a table."""
    sys.path.insert(0, str(REPO / "tests"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # SIGTERM ends the run like an exception: the containers are powered off on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="kubeprism-priority-"))
    try:
        results = _systemd_modes(args, work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(systemd_table(results))
    return 0


def systemd_table(results: dict[str, Any]) -> str:
    """Markdown: one line per run, then where the settings landed per variant."""
    head = (
        "| container | variant | kubeprism cpu cgroup (cpu.shares) | busy cpu cgroup "
        "| run-queue wait s/s | "
        "wait per run ms | CPU | proxy p50 / p99 / max ms | failed | "
        "/healthz p50 / p99 / max ms | failed |"
    )
    lines = [head, _rule(head)]
    for mode, result in results.items():
        for r in result["runs"]:
            f, p, h = r["facts"], r["proxy"], r["healthz"]
            lines.append(
                f"| {mode} | {r['variant']} | {r.get('kubeprism cpu cgroup', '?')} "
                f"({r.get('kubeprism cpu.shares', f['cpu.shares'])}) | {r['busy cpu cgroup']} "
                f"| {r['runq_wait_per_s']:.3f} | {r['wait_per_run_ms']:.2f} "
                f"| {r['cpu_fraction']:.1%} "
                f"| {p['p50_ms']:.0f} / {p['p99_ms']:.0f} / {p['max_ms']:.0f} "
                f"| {r['proxy_failed']} "
                f"| {h['p50_ms']:.0f} / {h['p99_ms']:.0f} / {h['max_ms']:.0f} "
                f"| {r['healthz_failed']} |"
            )
    lines += ["", "| container | variant | thread nices | oom_score_adj | uid (map) | autogroup |"]
    lines.append(_rule(lines[-1]))
    for mode, result in results.items():
        seen = set()
        for r in result["runs"]:
            if r["variant"] in seen:
                continue
            seen.add(r["variant"])
            f = r["facts"]
            lines.append(
                f"| {mode} | {r['variant']} | {f['thread nices']} | {f['oom_score_adj']} "
                f"| {f['uid']} ({' '.join(f['uid_map'])}) | {f['autogroup']} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _run_options(parser: argparse.ArgumentParser) -> None:
    """What both measuring commands take: repetitions, output, the wait for a quiet CPU."""
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--out", default="/tmp/kubeprism-priority")
    parser.add_argument(
        "--quiet-wait", type=float, default=600.0, help="wait this long at most for an idle CPU"
    )


def main(argv: list[str] | None = None) -> int:
    """Command line: overload | systemd | probe."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    over = sub.add_parser("overload", help="scenario 14 at several daemon nice values")
    over.add_argument("--nice", type=_ints, default=[0, -10], help="daemon nice values")
    over.add_argument("--procs", type=_ints, default=[200], help="busy process counts")
    over.add_argument("--seconds", type=float, default=20.0, help="length of the overload")
    _run_options(over)
    sysd = sub.add_parser("systemd", help="drop-ins under systemd 252 in a container")
    sysd.add_argument(
        "--modes",
        type=lambda s: s.split(","),
        default=["as-tests", "writable-cpu"],
        help="as-tests, writable-cpu",
    )
    sysd.add_argument(
        "--variants", type=lambda s: s.split(","), default=list(VARIANTS), help=", ".join(VARIANTS)
    )
    sysd.add_argument("--busy", type=int, default=50, help="spinning processes, all units together")
    sysd.add_argument("--busy-units", type=int, default=1, help="busy-*.service units sharing them")
    sysd.add_argument(
        "--busy-weight", default="100", help="CPUWeight= of the busy units (none: not set)"
    )
    sysd.add_argument(
        "--oom",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="then check OOMScoreAdjust= (systemd's debug log on)",
    )
    sysd.add_argument("--busy-slice", default="", help="e.g. kubepods.slice (CPUWeight=200)")
    sysd.add_argument("--seconds", type=float, default=20.0, help="measured window")
    sysd.add_argument("--ramp", type=float, default=2.0, help="hogs spin this long first")
    sysd.add_argument("--interval", type=float, default=0.2, help="between probe requests")
    _run_options(sysd)
    probe = sub.add_parser("probe", help="(inside the container) the request stream")
    probe.add_argument("--seconds", type=float, required=True)
    probe.add_argument("--interval", type=float, default=0.2)
    probe.add_argument("--ca", required=True)
    probe.add_argument("--port", type=int, default=7445)
    probe.add_argument("--admin-port", type=int, default=7446)
    probe.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    commands = {"overload": run_overload, "systemd": run_systemd, "probe": run_probe}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
