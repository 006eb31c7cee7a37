"""Quality against FLOPs: every method's shipped setting from held-out reports, as points of FLOPs fraction
against F1 and KL to full prefill, and which of them are on the Pareto front of their case.

``python -m sparsex_sgl.eval.quality_flops CASE=REPORT[,REPORT...] ... [--plot FILE.svg]`` prints one table
per case (where the paragraphs' KV came from: ``served``, ``sink``, ``alone``). Reports of one case must hold
the same questions (full prefill's answers equal question by question), so that their points compare.

Only each method's shipped form is drawn (``L_full`` 2, SparseX's ``sparse_q`` signal at a fixed ratio and
its chunk-start knob at the shipped ``min_tokens_per_segment``, the baselines without it): the front answers
"which default", and the exploratory settings of the same reports are in their own tables. A point is on the
front when no other point of its case costs at most its FLOPs and is at least as good, better in one of the
two; F1 and KL give two fronts, because F1 on short answers can stay at full prefill's while the next-token
distribution has moved (naive reuse in the served case).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsex_sgl.core.config import SelectionConfig
from sparsex_sgl.eval.figures import pyplot
from sparsex_sgl.eval.quality_table import model_of, setting_key, shipped_chunk_start


@dataclass(frozen=True)
class Point:
    """One method's setting in one case: its mean FLOPs fraction, F1 and KL over the report's questions."""

    case: str
    setting: str
    method: str
    flops: float
    f1: float
    kl: float
    greedy: float


def shipped(m: dict[str, Any]) -> bool:
    """Whether a report's method entry is that method's shipped form (see the module's docstring)."""
    default = SelectionConfig()
    return (m["full_layers"] in (None, default.full_layers) and m.get("signal") in (None, "sparse_q")
            and not m.get("coverage") and m.get("mass_prior") in (None, default.mass_prior)
            and m.get("chunk_start") in (None, shipped_chunk_start(m["method"])))


def case_points(case: str, reports: Sequence[dict[str, Any]]) -> list[Point]:
    """The shipped settings of one case's reports, each once (the first report's name for it). Refuses reports
    of other questions."""
    first = reports[0]["per_question"]["full"]["f1"]
    if any(r["per_question"]["full"]["f1"] != first for r in reports[1:]):
        raise SystemExit(f"case {case}: the reports hold other questions (full prefill's answers differ)")
    points: dict[tuple[Any, ...], Point] = {}
    for report in reports:
        for name, m in report["methods"].items():
            if shipped(m) and setting_key(m) not in points:
                points[setting_key(m)] = Point(case, name, m["method"], m["flops_frac"], m["f1"], m["kl_mean"], m["greedy_exact"])
    return sorted(points.values(), key=lambda p: (p.flops, p.setting))


def pareto(points: Sequence[Point], quality: Callable[[Point], float]) -> set[Point]:
    """The points no other point dominates: none costs at most their FLOPs with at least their quality
    (``quality``: higher is better), better in one. A sweep over equal-cost groups in FLOPs order: a group's
    best points are on the front when they beat every cheaper point (equal in both figures, neither
    dominates the other)."""
    front: set[Point] = set()
    best = float("-inf")
    for cost in sorted({p.flops for p in points}):
        group = [p for p in points if p.flops == cost]
        top = max(quality(p) for p in group)
        if top > best:
            front.update(p for p in group if quality(p) == top)
            best = top
    return front


def table(points: Sequence[Point]) -> str:
    """One case's points in FLOPs order, with their place on the F1 and the KL front."""
    on_f1, on_kl = pareto(points, lambda p: p.f1), pareto(points, lambda p: -p.kl)
    lines = ["| setting | FLOPs frac | F1 | KL mean | greedy = full | on F1 front | on KL front |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {p.setting} | {p.flops:.3f} | {p.f1:.3f} | {p.kl:.3f} | {p.greedy:.2f} | "
              f"{'yes' if p in on_f1 else ''} | {'yes' if p in on_kl else ''} |" for p in points]
    return "\n".join(lines)


def plot(cases: dict[str, list[Point]], title: str, path: Path) -> None:
    """F1 and KL against FLOPs fraction, one line per case and method (its ratios in order), full prefill
    and naive reuse as the ends; written as SVG (text, diffable) or PNG by ``path``'s suffix."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"served": ("-", "o"), "sink": ("--", "s"), "alone": (":", "^")}
    colours = {"sparsex": "tab:blue", "cacheblend": "tab:orange", "epic": "tab:green", "naive": "tab:gray",
               "full": "black"}
    for axis, metric, label in ((axes[0], "f1", "F1"), (axes[1], "kl", "KL to full prefill (mean)")):
        for case, points in cases.items():
            for method in dict.fromkeys(p.method for p in points):
                mine = [p for p in points if p.method == method]
                line, marker = styles.get(case, ("-", "o"))
                axis.plot([p.flops for p in mine], [getattr(p, metric) for p in mine], marker=marker,
                          linestyle=line, color=colours.get(method, "tab:red"),
                          label=f"{method} ({case})")
        axis.set_xlabel("prefill FLOPs, fraction of full prefill")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{title}: quality against FLOPs")
    fig.tight_layout()
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "quality-flops"}):  # text as text, stable ids
        fig.savefig(path, metadata={"Date": None} if path.suffix == ".svg" else None)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sparsex_sgl.eval.quality_flops")
    parser.add_argument("cases", nargs="+", metavar="CASE=REPORT[,REPORT...]")
    parser.add_argument("--plot", type=Path, default=None, help="write the figure here (.svg or .png)")
    args = parser.parse_args(argv)
    cases: dict[str, list[Point]] = {}
    titles: set[str] = set()
    for spec in args.cases:
        case, _, paths = spec.partition("=")
        if not paths:
            parser.error(f"{spec!r}: expected CASE=REPORT[,REPORT...]")
        reports = [json.loads(Path(p).read_text()) for p in paths.split(",")]
        cases[case] = case_points(case, reports)
        titles.update(f"{model_of(r['meta'])}, {r['meta']['task']}" for r in reports)
    print("\n\n".join(f"**{case}**\n\n{table(points)}" for case, points in cases.items()))
    if args.plot is not None:
        plot(cases, " / ".join(sorted(titles)), args.plot)


if __name__ == "__main__":
    main()
