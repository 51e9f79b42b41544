"""Medians, ratios to haproxy, issue-5 goals, and the four outputs: stdout, JSON, markdown, PNG."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scenarios import METRICS, Metric


@dataclass(frozen=True)
class Goal:
    """An issue-5 target for kubeprism: on the ratio to haproxy, or on the absolute value."""

    key: str
    op: str  # ">=", "<=" or "<"
    bound: float
    on_ratio: bool

    def met(self, value: float | None, ratio: float | None) -> bool | None:
        """True/False, or None when there is nothing to compare."""
        x = ratio if self.on_ratio else value
        if x is None:
            return None
        if self.op == ">=":
            return x >= self.bound
        return x <= self.bound if self.op == "<=" else x < self.bound

    def describe(self) -> str:
        """Human form, e.g. '>= 1.4x haproxy'."""
        return f"{self.op} {self.bound:g}{'x haproxy' if self.on_ratio else ''}"


GOALS = {
    g.key: g
    for g in (
        Goal("bulk_gbps", ">=", 1.4, True),
        Goal("keepalive_rps", ">=", 1.0, True),
        Goal("pingpong_p50_us", "<=", 1.05, True),
        Goal("pingpong_p99_us", "<=", 1.05, True),
        Goal("churn_cps", ">=", 0.8, True),
        Goal("idle_rss_kib_per_conn", "<=", 3.0, False),
        Goal("idle_pipes_per_conn", "<=", 0.05, False),
        Goal("start_ready_s", "<", 0.5, False),
    )
}


def median(samples: list[float]) -> float | None:
    """Median of the samples, None if there are none."""
    return statistics.median(samples) if samples else None


def summarize(
    samples: dict[str, dict[str, list[float]]], targets: list[str], baseline: str
) -> dict[str, dict[str, dict[str, Any]]]:
    """metric -> target -> {median, ratio, samples} (ratio to the baseline's median)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key, per_target in samples.items():
        base = median(per_target.get(baseline, []))
        row: dict[str, dict[str, Any]] = {}
        for t in targets:
            vals = per_target.get(t, [])
            m = median(vals)
            ratio = m / base if m is not None and base else None
            row[t] = {"median": m, "ratio": ratio, "samples": vals}
        out[key] = row
    return out


def revision_notes(summary: dict[str, dict[str, dict[str, Any]]], new: str, old: str) -> list[str]:
    """Per metric: the working tree's median over another revision's, with both sample ranges.

    The ranges are the noise to judge the ratio by: a ratio inside them is no change.
    """
    notes = []
    for metric in all_metrics():
        row = summary.get(metric.key, {})
        a, b = row.get(new), row.get(old)
        if not a or not b or not a["median"] or not b["median"]:
            continue
        notes.append(
            f"{metric.label}: {new} / {old} = {a['median'] / b['median']:.2f}"
            f" (samples {_span(a['samples'])} vs {_span(b['samples'])} {metric.unit})"
        )
    return notes


def _span(samples: list[float]) -> str:
    return f"{_fmt(min(samples))}-{_fmt(max(samples))}" if samples else "-"


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 0.1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry or entry["median"] is None:
        return "-"
    ratio = entry["ratio"]
    return _fmt(entry["median"]) + ("" if ratio is None else f" ({ratio:.2f}x)")


def _goal_cell(metric: Metric, row: dict[str, dict[str, Any]], who: str) -> str:
    goal = GOALS.get(metric.key)
    entry = row.get(who)
    if goal is None or entry is None:
        return ""
    met = goal.met(entry["median"], entry["ratio"])
    mark = {True: "met", False: "MISSED", None: "?"}[met]
    return f"{goal.describe()}: {mark}"


def table_rows(
    summary: dict[str, dict[str, dict[str, Any]]], targets: list[str], goal_for: str
) -> list[list[str]]:
    """Header plus one row per metric: value (ratio to haproxy) per target, then the goal."""
    rows = [["metric", *targets, f"goal ({goal_for})"]]
    for metric in all_metrics():
        row = summary.get(metric.key)
        if row is None:
            continue
        cells = [_cell(row.get(t)) for t in targets]
        rows.append([f"{metric.label} [{metric.unit}]", *cells, _goal_cell(metric, row, goal_for)])
    return rows


def all_metrics() -> list[Metric]:
    """The reported metrics, plus the derived pipes-per-idle-connection figure."""
    extra = Metric("idle_pipes_per_conn", "pipes per idle connection", "pipes", False, "idle")
    return [*METRICS, extra]


def text_table(rows: list[list[str]]) -> str:
    """Aligned plain-text table."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> str:
    """GitHub markdown table."""
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def header_lines(meta: dict[str, Any]) -> list[str]:
    """Machine, versions, date and run shape, one fact per line."""
    m, v, c = meta["machine"], meta["versions"], meta["config"]
    return [
        f"date: {meta['date']}",
        f"machine: {m['cpus']} x {m['cpu_model']}, {m['mem_gib']:.0f} GiB, Linux {m['kernel']}",
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"run: {c['reps']} repetition(s), medians; {c['seconds']} s per load scenario, "
        f"{c['idle_conns']} idle connections; targets interleaved (order rotated per repetition)",
        f"CPU pinning: {c['pinning']}",
        "cells: median (ratio to haproxy in the same run)",
    ]


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """The whole result document."""
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")


def write_markdown(
    path: Path, meta: dict[str, Any], rows: list[list[str]], notes: list[str]
) -> None:
    """Header facts, the table and any notes."""
    parts = ["# kubeprism benchmark", "", *(f"- {line}" for line in header_lines(meta)), ""]
    parts += [markdown_table(rows), ""]
    if notes:
        parts += ["Notes:", "", *(f"- {n}" for n in notes), ""]
    path.write_text("\n".join(parts))


def write_chart(
    path: Path, summary: dict[str, dict[str, dict[str, Any]]], targets: list[str], title: str
) -> str | None:
    """One bar panel per metric (median, labelled with the ratio to haproxy); None if no PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install '.[bench]'): no chart"
    skip = {"idle_pipe_fds", "idle_pipes_per_conn"}  # zero almost everywhere: in the table only
    metrics = [m for m in all_metrics() if m.key in summary and m.key not in skip]
    cols = 3
    nrows = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(cols * 5.2, nrows * 3.4), squeeze=False)
    colors = ["#8c8c8c", "#1f77b4", "#6baed6", "#d62728", "#2ca02c", "#9467bd"]
    for ax, metric in zip(axes.flat, metrics, strict=False):
        row = summary[metric.key]
        vals = [row[t]["median"] or 0.0 for t in targets]
        bars = ax.bar(range(len(targets)), vals, color=colors[: len(targets)])
        for bar, t in zip(bars, targets, strict=True):
            ratio = row[t]["ratio"]
            if row[t]["median"] is not None:
                label = _fmt(row[t]["median"]) + ("" if ratio is None else f"\n{ratio:.2f}x")
                ax.annotate(
                    label,
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        better = "higher" if metric.higher_is_better else "lower"
        ax.set_title(f"{metric.label} [{metric.unit}], {better} is better", fontsize=9)
        ax.set_xticks(range(len(targets)), targets, rotation=20, fontsize=7)
        ax.margins(y=0.25)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return None
