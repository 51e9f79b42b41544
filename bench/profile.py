"""Profile kubeprism under one benchmark load: py-spy (Python frames) and perf (native, kernel).

Usage (repository root, as root):
  .venv/bin/python bench/profile.py --scenario keepalive [--target kubeprism-splice] [--seconds 15]

Writes into --out (default /tmp/kubeprism-profile): the py-spy collapsed stacks
(<scenario>-<target>.pyspy.txt, for flamegraph.pl or speedscope), a py-spy SVG flame
graph, `perf report` text when perf works, and prints the top frames by self and total time.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import procs
import scenarios
import targets
from run import DEFAULT_PIN
from targets import Running

# py-spy sampling rate: enough samples in 10 s without slowing the proxy much.
PYSPY_RATE = 250
# Frames shown in each of the top lists.
TOP = 25


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scenario", choices=["bulk", "pingpong", "keepalive", "churn"], required=True)
    p.add_argument(
        "--target",
        choices=[t.name for t in targets.ALL if t.kind != "direct"],
        default="kubeprism-splice",
        help="what to profile (py-spy only for kubeprism; perf for all)",
    )
    p.add_argument("--seconds", type=int, default=15, help="load duration (profiles 2 s less)")
    p.add_argument("--out", type=Path, default=Path("/tmp/kubeprism-profile"))
    p.add_argument("--no-perf", action="store_true", help="skip perf even if it is installed")
    return p.parse_args(argv)


class Profilers:
    """Starts py-spy (and perf) on the proxy when the load starts; waits for them after."""

    def __init__(self, out: Path, stem: str, seconds: int, pyspy: bool, perf: bool) -> None:
        self.out, self.stem, self.pyspy, self.perf = out, stem, pyspy, perf
        self.duration = max(1, seconds - 2)
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, run: Running) -> None:
        """Attach to the proxy process (context hook)."""
        assert run.pid is not None
        pid, d, o = str(run.pid), str(self.duration), self.out / self.stem
        common = ["--pid", pid, "--duration", d, "--rate", str(PYSPY_RATE), "--nonblocking"]
        if self.pyspy:
            self._spawn(["py-spy", "record", *common, "--format", "raw"], o, ".pyspy.txt")
            self._spawn(["py-spy", "record", *common, "--format", "flamegraph"], o, ".svg")
        if self.perf:
            argv = ["perf", "record", "-F", "999", "-g", "-p", pid, "-o", f"{o}.perf.data"]
            self.running.append(
                subprocess.Popen(
                    [*argv, "--", "sleep", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )

    def _spawn(self, argv: list[str], stem: Path, suffix: str) -> None:
        self.running.append(
            subprocess.Popen(
                [*argv, "-o", f"{stem}{suffix}"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    def wait(self) -> None:
        """Let every profiler finish (bounded)."""
        for p in self.running:
            try:
                p.wait(self.duration + 30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def frame_name(frame: str) -> str:
    """'func (path/to/file.py:123)' -> 'file.py:func' (lines merged)."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rsplit("/", 1)[-1].rstrip(")")
    return f"{file}:{name}" if file else name


def summarize_stacks(path: Path) -> str:
    """Top frames by self and by total share of samples in a collapsed-stack file."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [frame_name(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
    if not samples:
        return f"{path}: no samples"
    lines = [f"{path.name}: {samples} samples", "  self%  frame"]
    lines += [f"  {100 * n / samples:5.1f}  {f}" for f, n in own.most_common(TOP)]
    lines += ["  total% frame"]
    lines += [f"  {100 * n / samples:5.1f}  {f}" for f, n in total.most_common(TOP)]
    return "\n".join(lines)


def perf_report(data: Path) -> str:
    """Self time by shared object and symbol, from perf.data."""
    argv = ["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "dso,sym"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    rows = [line for line in done.stdout.splitlines() if line.strip() and not line.startswith("#")]
    top = [r for r in rows if "%" in r[:10]][:TOP]
    (data.parent / f"{data.stem}.txt").write_text(done.stdout)
    return "\n".join([f"{data.name} (perf, self time by dso/symbol):", *top])


def main(argv: list[str] | None = None) -> int:
    """Run one scenario against one kubeprism with profilers attached."""
    args = parse_args(argv)
    target = next(t for t in targets.ALL if t.name == args.target)
    pyspy = target.kind == "kubeprism"
    if pyspy and shutil.which("py-spy") is None:
        raise SystemExit("py-spy not found: pip install py-spy")
    args.out.mkdir(parents=True, exist_ok=True)
    procs.raise_nofile()
    procs.AFFINITY.update(zip(("client", "proxy", "server"), DEFAULT_PIN.split(":"), strict=True))
    stem = f"{args.scenario}-{args.target}"
    perf = not args.no_perf and shutil.which("perf") is not None
    prof = Profilers(args.out, stem, args.seconds, pyspy, perf)
    with tempfile.TemporaryDirectory(prefix="kubeprism-profile-") as tmp:
        ctx = scenarios.Context(scenarios.Sizes(args.seconds, 0), Path(tmp), on_load=prof.start)
        values = scenarios.SCENARIOS[args.scenario](target, ctx)
        prof.wait()
    print(f"{stem}: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items() if v is not None))
    if pyspy:
        print(summarize_stacks(args.out / f"{stem}.pyspy.txt"))
        print(f"flame graph: {args.out / stem}.svg")
    if perf and (args.out / f"{stem}.perf.data").exists():
        print(perf_report(args.out / f"{stem}.perf.data"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
