"""Where a proxy's time goes per connection: CPU and syscalls, kubeprism next to haproxy.

Usage (from the repository root):
  ./bench/run percon [--seconds 3] [--only kubeprism-splice,haproxy] [--compare REV] [--quick]

For each target and each load, in front of bench/'s nginx upstream and pinned like
bench/run.py (load and upstream on CPU 0, the proxy alone on CPU 1):
  churn      wrk with `Connection: close`: one new client and upstream connection per request
  keepalive  wrk over 32 kept-alive connections: figures per request
one proxy process is started, warmed up, then measured twice for --seconds each:
  1. CPU: the proxy's time on CPU (schedstat of every thread, ns) over the requests wrk
     completed; the user/system split comes from /proc/PID/stat (10 ms ticks);
  2. syscalls: `strace -f -c` attached for a second window; calls per request by name.
strace slows a proxy 10-30x, so the second window completes fewer requests: its
counts per request are the figure, never its rate. Each kubeprism figure is also given as
a ratio to haproxy's. Results: a markdown table on stdout, bench/results/percon-<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import backends
import procs
import run
import targets
from scenarios import TOOL_SLACK, parse_wrk, wrk_argv

# Long enough to average over thousands of connections, short enough to share a 2-core VM.
DEFAULT_SECONDS = 3.0
QUICK_SECONDS = 1.0
# First-use costs (imports, pools, page faults) are not per connection.
WARMUP_SECONDS = 1.0
# wrk gives up on a request after this long (a strace-slowed proxy still answers within it).
WRK_TIMEOUT = "5s"
# strace attaches to every thread within this, or the syscall window is given up.
ATTACH_DEADLINE = 10.0
TARGETS = ("kubeprism-splice", "kubeprism-python", "haproxy", "nginx")
# load -> (Connection: close?, what one wrk request is)
LOADS = {"churn": (True, "connection"), "keepalive": (False, "keep-alive request")}
# After the straced load, the proxy counts as done when it is busy less than QUIET_SHARE of
# a SETTLE_SLICE (health checks alone stay far below); given up after SETTLE_DEADLINE.
SETTLE_SLICE, QUIET_SHARE, SETTLE_DEADLINE = 0.2, 0.05, 15.0
# Successful calls of these count the connections a proxy accepted.
ACCEPTS = ("accept", "accept4")
# Syscall rows shown: those made at least this often per request by some target, busiest first.
MIN_SHOWN_PER_REQUEST = 0.05
MAX_SHOWN_SYSCALLS = 16


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=None, help="each measured window (default 3)")
    p.add_argument("--quick", action="store_true", help="1 s windows, no warm-up (a smoke run)")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(TARGETS)}")
    p.add_argument("--loads", default="", help=f"subset of {','.join(LOADS)}")
    p.add_argument("--compare", default="", metavar="REV", help="add kubeprism-splice@REV")
    p.add_argument("--pin", default=run.DEFAULT_PIN, metavar="CLIENT:PROXY:SERVER|none")
    p.add_argument("--no-strace", action="store_true", help="CPU only, no syscall window")
    p.add_argument("--out", type=Path, default=run.RESULTS, help="directory for md/json")
    p.add_argument("--tag", default="", help="suffix for the result file names")
    return p.parse_args(argv)


def cpu_window(port: int, pid: int, close: bool, secs: float) -> dict[str, Any]:
    """One unobserved wrk window: requests, and the proxy's CPU per request (µs)."""
    argv = wrk_argv(port, secs, close, "--timeout", WRK_TIMEOUT)
    others = procs.foreign_ticks()
    t0, (u0, s0), on0 = time.monotonic(), procs.cpu_split(pid), procs.run_seconds(pid)
    done = parse_wrk(procs.run_tool(argv, secs + TOOL_SLACK))
    on1, (u1, s1) = procs.run_seconds(pid), procs.cpu_split(pid)
    elapsed = time.monotonic() - t0
    n = _completed(done.requests)
    return {
        "requests": n,
        "rps": done.rps,
        "wrk_errors": done.errors,
        "proxy_core_busy": (on1 - on0) / elapsed,
        "cpu_us": (on1 - on0) / n * 1e6,
        "user_us": (u1 - u0) / n * 1e6,
        "sys_us": (s1 - s0) / n * 1e6,
        "background_cores": procs.foreign_cpu(others, procs.foreign_ticks()) / elapsed,
    }


def strace_window(port: int, pid: int, close: bool, secs: float, workdir: Path) -> dict[str, Any]:
    """A wrk window with `strace -f -c` on every process of the proxy: syscalls per request."""
    summary, log = workdir / f"strace-{pid}.txt", workdir / f"strace-{pid}.log"
    summary.unlink(missing_ok=True)
    argv = ["strace", "-f", "-c", "-qq", "-o", str(summary)]
    for p in procs.tree(pid):
        argv += ["-p", str(p)]
    with procs.child(argv, log, "client") as tracer:

        def attached() -> bool:
            tracer.check_alive()
            return procs.traced(pid)

        procs.wait_until(attached, ATTACH_DEADLINE, "strace to attach")
        wrk = wrk_argv(port, secs, close, "--timeout", WRK_TIMEOUT)
        out = procs.run_tool(wrk, secs + TOOL_SLACK)
        # The slowed proxy is still closing what wrk left behind: count that work too.
        procs.wait_until(lambda: quiet(pid), SETTLE_DEADLINE, "the straced proxy to go quiet")
    # Leaving the block sent SIGTERM: strace detaches and writes its summary (or was killed).
    calls = parse_strace(summary.read_text() if summary.exists() else "")
    if not calls:
        raise procs.BenchError(f"no strace summary; log: {log.read_text()[-500:]}")
    done = parse_wrk(out)
    # Churn: per connection the proxy accepted. Slowed by strace, it completes a few hundred
    # connections a second, and wrk's 32 still open at the end would add ~10 % to each count.
    accepted = sum(c - e for name, (c, e) in calls.items() if name in ACCEPTS)
    n = accepted if close and accepted else _completed(done.requests)
    return {
        "divisor": n,
        "divisor_is": "accepted connections" if n == accepted else "requests wrk completed",
        "wrk_requests": done.requests,
        "wrk_errors": done.errors,
        "total": sum(c for c, _ in calls.values()) / n,
        "per_request": {name: c / n for name, (c, _) in calls.items()},
        "errors_per_request": {name: e / n for name, (_, e) in calls.items() if e},
    }


def quiet(pid: int) -> bool:
    """True when the proxy spends (almost) no CPU over the next SETTLE_SLICE seconds."""
    before = procs.run_seconds(pid)
    time.sleep(SETTLE_SLICE)
    return procs.run_seconds(pid) - before < QUIET_SHARE * SETTLE_SLICE


def _completed(requests: int) -> int:
    if requests <= 0:
        raise procs.BenchError("wrk completed no request")
    return requests


def parse_strace(text: str) -> dict[str, tuple[int, int]]:
    """`strace -c` table -> syscall: (calls, errors); the total line is left out."""
    out: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) not in (5, 6) or parts[-1] == "total" or not parts[3].isdigit():
            continue
        out[parts[-1]] = (int(parts[3]), int(parts[4]) if len(parts) == 6 else 0)
    return out


def measure(
    target: targets.Target, load: str, secs: float, warmup: float, workdir: Path, trace: bool
) -> dict[str, Any]:
    """One fresh proxy under one load: CPU window, then syscall window; failures recorded."""
    close = LOADS[load][0]
    rec: dict[str, Any] = {}
    try:
        with backends.http(workdir) as up, target.launch(up, workdir) as running:
            assert running.pid is not None
            if warmup:
                procs.run_tool(wrk_argv(running.port, warmup, close), warmup + TOOL_SLACK)
            port, pid = running.port, running.pid
            _stage(rec, "cpu", lambda: cpu_window(port, pid, close, secs))
            if trace:
                _stage(rec, "strace", lambda: strace_window(port, pid, close, secs, workdir))
    except (procs.BenchError, OSError) as exc:
        rec["error"] = str(exc)
    cpu, sys_calls = rec.get("cpu", {}).get("cpu_us"), rec.get("strace", {}).get("total")
    shown = [f"{cpu:.1f} us CPU" if cpu else "", f"{sys_calls:.1f} syscalls" if sys_calls else ""]
    shown += [v for k, v in rec.items() if k.endswith("error")]
    print(f"  {load:9} {target.name:24} " + "  ".join(filter(None, shown)), file=sys.stderr)
    return rec


def _stage(rec: dict[str, Any], name: str, measure: Callable[[], dict[str, Any]]) -> None:
    """rec[name] = measure(), or the error as rec[name + '_error']."""
    try:
        rec[name] = measure()
    except (procs.BenchError, OSError) as exc:
        rec[f"{name}_error"] = str(exc)


# Figures of the load itself, not of the proxy's cost: no ratio to haproxy.
NO_RATIO = ("requests", "divisor", "rps", "proxy_core_busy")


def table(load: str, results: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    """Markdown rows for one load: targets as columns, kubeprism cells with a ratio to haproxy."""
    what = LOADS[load][1]
    cols = [n for n in names if load in results[n]]
    rows: list[tuple[str, str, str]] = [
        (f"{what}s measured (CPU window)", "cpu", "requests"),
        ("rate during the CPU window [/s]", "cpu", "rps"),
        ("proxy's core busy [share]", "cpu", "proxy_core_busy"),
        (f"CPU per {what} [µs]", "cpu", "cpu_us"),
        ("  user [µs]", "cpu", "user_us"),
        ("  system [µs]", "cpu", "sys_us"),
        (f"{what}s {'accepted' if load == 'churn' else 'completed'} (strace)", "strace", "divisor"),
        (f"syscalls per {what}", "strace", "total"),
    ]
    rows += [(f"  {s}", "per_request", s) for s in busiest(load, results, cols)]
    out = [f"### {load}: per {what}", "", "| | " + " | ".join(cols) + " |"]
    out.append("|---" * (len(cols) + 1) + "|")
    base = results.get(targets.BASELINE, {}).get(load, {})
    for label, stage, key in rows:
        cells = []
        for who in cols:
            rec = results[who][load]
            v = _value(rec, stage, key)
            text = _fmt(v, key) if v is not None else _missing(rec, stage)
            b = _value(base, stage, key)
            if v and b and who.startswith("kubeprism") and key not in NO_RATIO:
                text += f" ({v / b:.2f}x)"
            failed = rec.get("strace", {}).get("errors_per_request", {}).get(key, 0.0)
            if stage == "per_request" and failed >= 0.01:
                text += f", {failed:.3g} failed"
            cells.append(text)
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def busiest(load: str, results: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    """Syscalls made at least MIN_SHOWN_PER_REQUEST times per request by some target."""
    most: dict[str, float] = {}
    for n in names:
        for s, v in results[n][load].get("strace", {}).get("per_request", {}).items():
            most[s] = max(most.get(s, 0.0), v)
    shown = [s for s, v in most.items() if v >= MIN_SHOWN_PER_REQUEST]
    return sorted(shown, key=lambda s: -most[s])[:MAX_SHOWN_SYSCALLS]


def _value(rec: dict[str, Any], stage: str, key: str) -> float | None:
    if stage == "per_request":
        if "strace" not in rec:
            return None
        return float(rec["strace"]["per_request"].get(key, 0.0))
    value = rec.get(stage, {}).get(key)
    return None if value is None else float(value)


def _fmt(v: float, key: str) -> str:
    return f"{v:,.0f}" if v >= 1000 or key in ("requests", "divisor") else f"{v:.3g}"


def _missing(rec: dict[str, Any], stage: str) -> str:
    stage = "strace" if stage == "per_request" else stage
    return "failed" if f"{stage}_error" in rec or "error" in rec else "-"


def notes_for(results: dict[str, dict[str, Any]]) -> list[str]:
    """Failures, wrk errors and a busy neighbour, one line each."""
    notes = []
    for who, loads in results.items():
        for load, rec in loads.items():
            for key, value in rec.items():
                if key.endswith("error"):
                    notes.append(f"{who} {load}: {key.replace('_', ' ')}: {str(value).strip()}")
            for stage in ("cpu", "strace"):
                errors = rec.get(stage, {}).get("wrk_errors")
                if errors:
                    notes.append(f"{who} {load}: wrk counted {errors} errors in the {stage} window")
            bg = rec.get("cpu", {}).get("background_cores", 0.0)
            if bg > 0.1:
                notes.append(f"{who} {load}: other processes used {bg:.2f} cores meanwhile")
    return notes


def main(argv: list[str] | None = None) -> int:
    """Measure every chosen target under every chosen load; print and write the tables."""
    args = parse_args(argv)
    secs = args.seconds or (QUICK_SECONDS if args.quick else DEFAULT_SECONDS)
    warmup = 0.0 if args.quick else min(WARMUP_SECONDS, secs)
    loads = run.pick(args.loads, list(LOADS), "loads")
    wanted = run.pick(args.only, list(TARGETS), "targets")
    chosen, notes = targets.available(tuple(t for t in targets.ALL if t.name in wanted))
    trace = not args.no_strace and shutil.which("strace") is not None
    if not trace:
        notes.append("no syscall window (--no-strace, or strace is not installed)")
    run.apply_pinning(args.pin, notes)
    procs.raise_nofile()
    now = dt.datetime.now(dt.UTC)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="kubeprism-percon-") as tmp:
        if args.compare:
            old = targets.at_revision(args.compare, Path(tmp) / "revisions")
            chosen.insert(1 if chosen and chosen[0].name == "kubeprism-splice" else 0, old)
        if not chosen:
            raise SystemExit("no target available")
        for load in loads:
            for t in chosen:
                rec = measure(t, load, secs, warmup, Path(tmp), trace)
                results.setdefault(t.name, {})[load] = rec
    meta = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": run.machine(),
        "versions": {**run.versions(), "strace": run.first_line(["strace", "-V"])},
        "config": {"seconds": secs, "warmup": warmup, "loads": loads},
        "targets": [t.name for t in chosen],
        "pinning": dict(procs.AFFINITY) or "none",
    }
    write(
        args.out,
        now.strftime("%Y-%m-%d-%H%M") + (f"-{args.tag}" if args.tag else ""),
        meta,
        results,
        notes + notes_for(results),
    )
    return 0


def write(
    out: Path, stem: str, meta: dict[str, Any], results: dict[str, Any], notes: list[str]
) -> None:
    """The tables on stdout and in percon-<stem>.md, everything in percon-<stem>.json."""
    lines = header(meta)
    for load in meta["config"]["loads"]:
        lines += ["", *table(load, results, meta["targets"])]
    lines += ["", *[f"- {n}" for n in notes]] if notes else []
    print("\n".join(lines))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"percon-{stem}.md").write_text("\n".join(lines) + "\n")
    doc = {**meta, "results": results, "notes": notes}
    (out / f"percon-{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {out}/percon-{stem}.{{md,json}}", file=sys.stderr)


def header(meta: dict[str, Any]) -> list[str]:
    """Title and the circumstances of the run."""
    v = meta["versions"]
    return [
        "# Per-connection CPU and syscalls",
        "",
        f"- date: {meta['date']}; {meta['machine']['cpus']} cores, {meta['machine']['kernel']}",
        f"- kubeprism {v['kubeprism']}, haproxy {v['haproxy']}, nginx {v['nginx']}, {v['strace']}",
        f"- {meta['config']['seconds']:g} s per window after a {meta['config']['warmup']:g} s "
        f"warm-up; CPU pinning {meta['pinning']}",
        "- cells: value per connection or request (kubeprism: ratio to haproxy); CPU from the "
        "unobserved window, syscalls from the straced one; 'failed': calls per connection or "
        "request that returned an error (a non-blocking connect's EINPROGRESS counts)",
    ]


if __name__ == "__main__":
    sys.exit(main())
