"""kubeprism benchmark: direct, kubeprism (splice, copy), haproxy and nginx side by side.

Usage (from the repository root):  ./bench/run [--reps N] [--quick] [--only a,b] [--scenarios x,y]

Every scenario runs against every target inside each repetition (order rotated per
repetition); the report shows medians and each figure's ratio to haproxy from the same run.
Traffic stays on loopback; every tool run is bounded in time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import procs
import report
import scenarios
import targets

REPO = Path(__file__).resolve().parent.parent
DEFAULT_REPS = 5
# The proxy gets a core of its own, load tools and upstream servers share the other: its own
# capacity is what is compared, and runs repeat (unpinned, which processes happen to share a
# core moves ping-pong latency 2-4x from run to run on a 2-core VM).
DEFAULT_PIN = "0:1:0"
# A measurement that fails (a tool hiccup) is tried this many more times.
RETRIES = 1
RESULTS = REPO / "bench" / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reps", type=int, default=None, help=f"repetitions (default {DEFAULT_REPS})")
    p.add_argument("--quick", action="store_true", help="CI smoke: 1 rep, tiny sizes, seconds")
    p.add_argument("--seconds", type=int, default=None, help="length of each load scenario")
    p.add_argument("--idle-conns", type=int, default=None, help="idle connections to hold")
    names = ",".join(t.name for t in targets.ALL)
    p.add_argument("--only", default="", help=f"comma-separated targets out of {names}")
    p.add_argument("--scenarios", default="", help=f"subset of {','.join(scenarios.SCENARIOS)}")
    p.add_argument(
        "--pin",
        default=DEFAULT_PIN,
        metavar="CLIENT:PROXY:SERVER|none",
        help="CPU lists for load tools, proxy and upstream servers (default "
        f"{DEFAULT_PIN}: the proxy alone on CPU 1); 'none' leaves placement to the scheduler",
    )
    p.add_argument(
        "--compare",
        default="",
        metavar="REV",
        help="also measure kubeprism-splice as of git revision REV in the same run\n"
        "(interleaved with the rest; the report adds each figure's ratio to it)",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for json/md/png")
    p.add_argument("--tag", default="", help="suffix for the result file names")
    p.add_argument("--note", action="append", default=[], help="a note for the report (repeatable)")
    return p.parse_args(argv)


def pick(names: str, known: list[str], what: str) -> list[str]:
    """The comma-separated subset (in the canonical order), or all of them."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return [n for n in known if n in wanted] if wanted else known


def first_line(argv: list[str]) -> str:
    """First output line of a version command, or 'missing'."""
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=10, check=False, cwd=tempfile.gettempdir()
        )
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def kubeprism_source() -> dict[str, str]:
    """Version and origin of the kubeprism (and uvloop) the proxy children import."""
    code = (
        "import json, kubeprism, uvloop; print(json.dumps({'version': kubeprism.__version__,"
        " 'uvloop': uvloop.__version__, 'file': kubeprism.__file__,"
        " 'engine': getattr(kubeprism, 'ENGINE', 'python')}))"
    )
    try:
        info: dict[str, str] = json.loads(first_line([sys.executable, "-c", code]))
    except ValueError:
        return {"version": "not importable", "uvloop": "?", "source": "?"}
    where = str(Path(info.pop("file")).parent)
    commit = first_line(["git", "-C", where, "rev-parse", "--short", "HEAD"])
    if commit.startswith("fatal"):
        info["source"] = where
        return info
    # Not first_line(): a clean tree prints nothing, which first_line() reports as "unknown".
    status = subprocess.run(
        ["git", "-C", where, "status", "--porcelain", "."],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    dirty = status.returncode != 0 or bool(status.stdout.strip())
    info["source"] = f"{where} at {commit}" + (" + uncommitted changes" if dirty else "")
    return info


def machine() -> dict[str, Any]:
    """Cores, CPU model, memory, kernel."""
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": mem_kib / 2**20,
        "kernel": platform.release(),
    }


def versions() -> dict[str, str]:
    """Versions of everything measured or measuring."""
    kp = kubeprism_source()
    return {
        "kubeprism": f"{kp['version']} ({kp['source']}; engine {kp.get('engine', '?')})",
        "python": platform.python_version(),
        "uvloop": kp["uvloop"],
        "haproxy": first_line(["haproxy", "-v"]).removeprefix("HAProxy version ").split(" ")[0],
        "nginx": first_line(["nginx", "-v"]).removeprefix("nginx version: nginx/"),
        "iperf3": first_line(["iperf3", "-v"]).removeprefix("iperf ").split(" ")[0],
        "sockperf": first_line(["sockperf", "--version"]).removeprefix("sockperf, version "),
        "wrk": first_line(["wrk", "-v"]).removeprefix("wrk ").split(" ")[0],
    }


def run_all(
    chosen: list[targets.Target], names: list[str], reps: int, ctx: scenarios.Context
) -> tuple[dict[str, dict[str, list[float]]], list[dict[str, Any]]]:
    """Every repetition, every scenario, every target (rotated); samples per metric/target."""
    samples: dict[str, dict[str, list[float]]] = {}
    runs: list[dict[str, Any]] = []
    for rep in range(reps):
        ctx.startups.clear()
        for scenario in names:
            k = rep % len(chosen)
            for target in chosen[k:] + chosen[:k]:
                runs.append(run_one(rep, scenario, target, ctx, samples))
        for name, starts in ctx.startups.items():
            add(samples, "start_ready_s", name, report.median(starts))
    return samples, runs


def run_one(
    rep: int,
    scenario: str,
    target: targets.Target,
    ctx: scenarios.Context,
    samples: dict[str, dict[str, list[float]]],
) -> dict[str, Any]:
    """One measurement; a failure is recorded, printed and does not stop the run."""
    started = time.monotonic()
    record: dict[str, Any] = {"rep": rep, "scenario": scenario, "target": target.name}
    for attempt in range(RETRIES + 1):
        others = procs.foreign_ticks()
        try:
            values = scenarios.SCENARIOS[scenario](target, ctx)
            break
        except procs.BenchError as exc:
            record.setdefault("failures", []).append(str(exc))
            print(f"  rep {rep} {scenario:9} {target.name:16} FAILED: {exc}", file=sys.stderr)
            if attempt == RETRIES:
                record["error"] = str(exc)
                return record
            started = time.monotonic()
    # Other processes' CPU meanwhile: a busy neighbour explains an outlier.
    elapsed = max(time.monotonic() - started, 1e-3)
    record["background_cores"] = procs.foreign_cpu(others, procs.foreign_ticks()) / elapsed
    if "idle_pipe_fds" in values and values["idle_pipe_fds"] is not None:
        values["idle_pipes_per_conn"] = values["idle_pipe_fds"] / 2 / ctx.sizes.idle_conns
    for key, value in values.items():
        add(samples, key, target.name, value)
    record["values"] = values
    shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items() if v is not None)
    took = time.monotonic() - started
    bg = record["background_cores"]
    print(
        f"  rep {rep} {scenario:9} {target.name:16} {took:5.1f}s bg {bg:4.2f}  {shown}",
        file=sys.stderr,
    )
    return record


def apply_pinning(spec: str, notes: list[str]) -> None:
    """Set procs.AFFINITY from CLIENT:PROXY:SERVER, unless 'none' or the CPUs are missing."""
    if spec == "none":
        return
    roles = spec.split(":")
    if len(roles) != 3:
        raise SystemExit("--pin wants CLIENT:PROXY:SERVER CPU lists, e.g. 0:1:0")
    if cpus_allowed(roles):
        procs.AFFINITY.update(zip(("client", "proxy", "server"), roles, strict=True))
    else:
        notes.append(f"CPUs {spec} are not all available here: not pinned")


def cpus_allowed(cpu_lists: list[str]) -> bool:
    """True if every CPU named in the taskset-style lists (0, 2-3, 0,1) is usable here."""
    wanted: set[int] = set()
    for part in ",".join(cpu_lists).split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or not (hi or lo).isdigit():
            raise SystemExit(f"bad CPU list in --pin: {part!r}")
        wanted.update(range(int(lo), int(hi or lo) + 1))
    return wanted <= os.sched_getaffinity(0)


def add(samples: dict[str, dict[str, list[float]]], key: str, who: str, v: float | None) -> None:
    """Append one sample (None means not applicable and is skipped)."""
    if v is not None:
        samples.setdefault(key, {}).setdefault(who, []).append(v)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the reports; 0 unless the command line was wrong."""
    args = parse_args(argv)
    sizes = scenarios.QUICK if args.quick else scenarios.FULL
    sizes = scenarios.Sizes(args.seconds or sizes.seconds, args.idle_conns or sizes.idle_conns)
    reps = args.reps or (1 if args.quick else DEFAULT_REPS)
    wanted = pick(args.only, [t.name for t in targets.ALL], "targets")
    names = pick(args.scenarios, list(scenarios.SCENARIOS), "scenarios")
    chosen, notes = targets.available(tuple(t for t in targets.ALL if t.name in wanted))
    notes += args.note
    if not chosen:
        raise SystemExit("no target available")
    apply_pinning(args.pin, notes)
    nofile = procs.raise_nofile()
    if nofile < 4 * sizes.idle_conns:
        notes.append(f"RLIMIT_NOFILE is {nofile}: the idle scenario may run out of fds")
    with tempfile.TemporaryDirectory(prefix="kubeprism-bench-") as tmp:
        if args.compare:
            old = targets.at_revision(args.compare, Path(tmp) / "revisions")
            chosen.insert(1 if chosen[0].name == "kubeprism-splice" else 0, old)
        now = dt.datetime.now(dt.UTC)
        meta = {
            "date": now.strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "versions": versions(),
            "config": {
                "reps": reps,
                "quick": args.quick,
                "seconds": sizes.seconds,
                "idle_conns": sizes.idle_conns,
                "targets": [t.name for t in chosen],
                "scenarios": names,
                "baseline": targets.BASELINE,
                "pinning": dict(procs.AFFINITY) or "none",
            },
        }
        print("\n".join(report.header_lines(meta)), file=sys.stderr)
        ctx = scenarios.Context(sizes, Path(tmp))
        samples, runs = run_all(chosen, names, reps, ctx)
    return finish(args, meta, chosen, names, samples, runs, notes, now)


def finish(
    args: argparse.Namespace,
    meta: dict[str, Any],
    chosen: list[targets.Target],
    names: list[str],
    samples: dict[str, dict[str, list[float]]],
    runs: list[dict[str, Any]],
    notes: list[str],
    now: dt.datetime,
) -> int:
    """Summarize and write stdout table, JSON, markdown and PNG."""
    tnames = [t.name for t in chosen]
    summary = report.summarize(samples, tnames, targets.BASELINE)
    if targets.BASELINE not in tnames:
        notes.append("haproxy not measured: no ratios")
    failed = [r for r in runs if "error" in r]
    if failed:
        notes.append(f"{len(failed)} measurement(s) failed; see 'runs' in the JSON")
    background = sorted(r["background_cores"] for r in runs if "background_cores" in r)
    if background:
        notes.append(
            f"other processes on this machine used {report.median(background):.2f} cores "
            f"(median; max {background[-1]:.2f}) while measurements ran"
        )
    goal_for = "kubeprism-splice" if "kubeprism-splice" in tnames else tnames[-1]
    old = next((t for t in tnames if t.startswith("kubeprism-splice@")), None)
    if old is not None and "kubeprism-splice" in tnames:
        notes += report.revision_notes(summary, "kubeprism-splice", old)
    rows = report.table_rows(summary, tnames, goal_for)
    print("\n".join(report.header_lines(meta)))
    print(report.text_table(rows))
    for n in notes:
        print(f"note: {n}")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = now.strftime("%Y-%m-%d-%H%M") + (f"-{args.tag}" if args.tag else "")
    by_scenario: dict[str, dict[str, Any]] = {s: {} for s in [*names, "startup"]}
    for metric in report.all_metrics():
        if metric.key in summary and metric.scenario in by_scenario:
            by_scenario[metric.scenario][metric.key] = summary[metric.key]
    extras = {k: v for k, v in summary.items() if k not in {m.key for m in report.all_metrics()}}
    doc = {**meta, "scenarios": by_scenario, "extra": extras, "notes": notes, "runs": runs}
    report.write_json(args.out / f"{stem}.json", doc)
    report.write_markdown(args.out / f"{stem}.md", meta, rows, notes)
    title = f"kubeprism benchmark {meta['date']} ({meta['machine']['cpus']} cores)"
    chart_note = report.write_chart(args.out / f"{stem}.png", summary, tnames, title)
    if chart_note:
        print(f"note: {chart_note}")
    print(f"wrote {args.out / stem}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
