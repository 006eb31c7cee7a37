"""The quality tables of a fidelity report (one model on one task), and the statistics behind them.

``python -m sparsex_sgl.eval.quality_table REPORT.json [...]`` prints, per report, every method's F1, EM,
KL mean / median, greedy agreement with full prefill, recompute and FLOPs fractions, then every SparseX
setting minus CacheBlend-style (same ratio and ``L_full``), minus full prefill and, for an adaptive
budget, minus the same signal at a fixed ratio, question by question, with 95% paired bootstrap
intervals, and which of the quality targets the report meets. ``--summary`` prints the README's form:
one row per method with its intervals against CacheBlend-style and full prefill in the row.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from sparsex_sgl.core.config import SelectionConfig

Interval = tuple[float, float, float]
"""A paired difference: mean, and the low and high ends of its 95% interval."""


def paired_difference(a: Sequence[float], b: Sequence[float], resamples: int = 2000, seed: int = 0) -> Interval:
    """Mean of ``a - b`` over paired questions and its 95% percentile-bootstrap interval
    (``scipy.stats.bootstrap`` over the per-question differences).

    Paired, because methods differ far less from each other on one question than questions differ
    from each other: the unpaired spread would hide every difference that matters here."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need two equally long, non-empty series, got {len(a)} and {len(b)}")
    diffs = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if np.ptp(diffs) == 0:  # every resample has the same mean; scipy warns on such data
        return float(diffs[0]), float(diffs[0]), float(diffs[0])
    result = stats.bootstrap((diffs,), np.mean, n_resamples=resamples, confidence_level=0.95, method="percentile",
                             rng=np.random.default_rng(seed))
    interval = result.confidence_interval
    return float(diffs.mean()), float(interval.low), float(interval.high)


def interval_text(figures: Interval, scale: float) -> str:
    """A ``paired_difference`` result as ``mean [low, high]``, each times ``scale`` (100: F1 points)."""
    mean, low, high = (scale * x for x in figures)
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


def model_of(meta: dict[str, Any]) -> str:
    """The model a report ran, read from its recorded command."""
    return meta.get("command", "").split("--model ")[-1].split(" ")[0] or "?"


def _header(meta: dict[str, Any]) -> str:
    model = model_of(meta)
    return (f"{model}, {meta.get('task', 'hotpotqa')} ({meta.get('split', 'other')} questions "
            f"{meta['offset']}..{meta['offset'] + meta['n'] - 1}, {meta['n']} questions, "
            f"{meta['mean_prompt_tokens']:.0f} prompt tokens on average{CACHED_TEXT[meta.get('cached', 'alone')]})")


CACHED_TEXT = {"alone": "", "other-order": ", paragraphs cached in another order",
               "sink": ", paragraphs cached alone behind the chat template's opening"}
"""How a report's header names where the paragraphs' KV came from (``fidelity.CACHE_SOURCES``)."""


def _figures(m: dict[str, Any]) -> str:
    return (f"{m['f1']:.3f} | {m['em']:.3f} | {m['kl_mean']:.3f} / {m['kl_median']:.3f} | {m['greedy_exact']:.2f} "
            f"| {m['recompute_frac']:.3f} | {m['flops_frac']:.3f}")


def methods_table(report: dict[str, Any]) -> str:
    lines = ["| method | F1 | EM | KL mean / median | greedy = full | recompute frac | FLOPs frac |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {_figures(m)} |" for name, m in report["methods"].items()]
    return "\n".join(lines)


def references(methods: dict[str, dict[str, Any]], name: str) -> list[str]:
    """What a SparseX setting is compared with: full prefill, CacheBlend-style at its ratio, ``L_full`` and
    chunk start, and, for an adaptive budget (``coverage`` > 0), the same signal at each fixed ratio and its
    ``L_full`` (the budget must match fixed-ratio quality at a lower mean recompute fraction)."""
    m = methods[name]
    adaptive = bool(m.get("coverage"))
    return [other for other, om in methods.items() if om["method"] == "full" or (
        om["method"] == "cacheblend" and om["ratio"] == m["ratio"] and om["full_layers"] == m["full_layers"]
        and om.get("chunk_start") == m.get("chunk_start")) or (
        adaptive and om["method"] == "sparsex" and not om.get("coverage") and om["signal"] == m["signal"]
        and om["full_layers"] == m["full_layers"])]


def comparisons(report: dict[str, Any]) -> list[tuple[str, str, Interval, Interval]]:
    """Each SparseX setting minus each of its ``references``, question by question: (setting, reference,
    ΔF1, ΔKL)."""
    methods, per = report["methods"], report["per_question"]
    return [(name, other, paired_difference(per[name]["f1"], per[other]["f1"]),
             paired_difference(per[name]["kl"], per[other]["kl"]))
            for name, m in methods.items() if m["method"] == "sparsex" for other in references(methods, name)]


def paired_table(pairs: list[tuple[str, str, Interval, Interval]]) -> str:
    lines = ["| SparseX setting | vs | ΔF1 (points) | ΔKL (lower: closer to full) |", "|---|---|---|---|"]
    lines += [f"| {name} | {other} | {interval_text(f1, 100)} | {interval_text(kl, 1)} |"
              for name, other, f1, kl in pairs]
    return "\n".join(lines)


_REFERENCE_LABELS = {"cacheblend": "CacheBlend-style", "full": "full"}
"""The references a summary row carries, in column order, with their column labels."""


def summary_table(report: dict[str, Any], pairs: list[tuple[str, str, Interval, Interval]]) -> str:
    """The README's form: each method's figures, and for SparseX its ΔF1 / ΔKL against CacheBlend-style
    (same ratio and ``L_full``) and full prefill in the same row; a reference the report did not run (a
    ratio run has no CacheBlend-style) gets no columns, so the README prints this table as it is."""
    methods = report["methods"]
    by_kind = {(name, methods[other]["method"]): (f1, kl) for name, other, f1, kl in pairs}
    present = {kind for _, kind in by_kind}
    kinds = [kind for kind in _REFERENCE_LABELS if kind in present]
    header = "| method | F1 | EM | KL mean / median | greedy = full | recompute frac | FLOPs frac |" + "".join(
        f" ΔF1 vs {_REFERENCE_LABELS[kind]} | ΔKL vs {_REFERENCE_LABELS[kind]} |" for kind in kinds)
    lines = [header, "|---" * (7 + 2 * len(kinds)) + "|"]
    for name, m in methods.items():
        cells = []
        for kind in kinds:
            f1, kl = by_kind.get((name, kind), (None, None))
            cells += ["" if f1 is None else interval_text(f1, 100), "" if kl is None else interval_text(kl, 1)]
        lines.append(f"| {name} | {_figures(m)} |" + "".join(f" {cell} |" for cell in cells))
    return "\n".join(lines)


def targets(report: dict[str, Any], pairs: list[tuple[str, str, Interval, Interval]]) -> list[str]:
    """The issue's quality targets, read off the paired intervals: SparseX significantly above
    CacheBlend-style on F1 somewhere and significantly below it nowhere; the closest SparseX setting to
    full prefill; each adaptive budget's mean recompute fraction against its fixed-ratio twin."""
    methods = report["methods"]
    vs_cb = [(name, f1) for name, other, f1, _ in pairs if methods[other]["method"] == "cacheblend"]
    above = [f"{name} ({interval_text(f1, 100)})" for name, f1 in vs_cb if _direction(f1) == "significantly higher"]
    below = [f"{name} ({interval_text(f1, 100)})" for name, f1 in vs_cb if _direction(f1) == "significantly lower"]
    lines = [f"- F1 significantly above CacheBlend-style: {', '.join(above) or 'none'}",
             f"- F1 significantly below CacheBlend-style: {', '.join(below) or 'none'}"] if vs_cb else []
    vs_full = [(f1, name) for name, other, f1, _ in pairs if methods[other]["method"] == "full"]
    if vs_full:
        f1, name = max(vs_full)
        lines.append(f"- closest to full prefill on F1: {name}, {interval_text(f1, 100)} points")
    for name, other, f1, kl in pairs:
        m, om = methods[name], methods[other]
        if m.get("coverage") and om["method"] == "sparsex" and om["ratio"] == m["ratio"]:
            lines.append(f"- {name}: mean recompute fraction {m['recompute_frac']:.3f} vs {om['recompute_frac']:.3f} "
                         f"for {other}; ΔF1 {interval_text(f1, 100)} ({_direction(f1)}), "
                         f"ΔKL {interval_text(kl, 1)} ({_direction(kl)})")
    return lines


def _direction(figures: Interval) -> str:
    """Whether a paired interval excludes 0, and on which side."""
    return "significantly higher" if figures[1] > 0 else "significantly lower" if figures[2] < 0 else "n.s."


def shipped_chunk_start(method: str) -> int:
    """The chunk-start knob a method runs with unless swept: SparseX the shipped ``min_tokens_per_segment``,
    the baselines none (``methods.method_config``)."""
    return SelectionConfig().min_tokens_per_segment if method == "sparsex" else 0


def chunk_start_of(m: dict[str, Any]) -> int:
    """A report entry's chunk-start knob: as swept (``--chunk-start``), else its method's own."""
    k = m.get("chunk_start")
    return k if k is not None else shipped_chunk_start(m["method"])


def setting_key(m: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two report entries the same setting, whatever each report named it (a name carries only
    the settings its own sweep varied)."""
    return (m["method"], m["ratio"], m["full_layers"], m.get("signal"), m.get("mass_prior"), m.get("coverage") or 0.0,
            chunk_start_of(m))


def against_table(report: dict[str, Any], base: dict[str, Any]) -> str:
    """Each method of ``report`` minus the same setting in ``base`` (``setting_key``), question by question:
    two runs of the same questions that differ in one setting (e.g. where the paragraphs were cached).
    Refuses reports of other questions (their full prefill must agree question by question)."""
    same = ("task", "offset", "n", "seed")
    if any(report["meta"].get(k) != base["meta"].get(k) for k in same) or (
            report["per_question"]["full"]["f1"] != base["per_question"]["full"]["f1"]):
        raise SystemExit("--against needs two reports of the same questions (task, offset, n, seed, full prefill)")
    label = CACHED_TEXT.get(base["meta"].get("cached", "alone"), "").removeprefix(", ") or "paragraphs cached alone"
    counterparts = {setting_key(m): name for name, m in base["methods"].items()}
    rows = [f"| method | ΔF1 vs {label} (points) | ΔKL vs {label} |", "|---|---|---|"]
    for name, m in report["methods"].items():
        other = counterparts.get(setting_key(m))
        if m["method"] == "full" or other is None:
            continue
        mine, theirs = report["per_question"][name], base["per_question"][other]
        shown = name if other == name else f"{name} vs {other}"
        rows.append(f"| {shown} | {interval_text(paired_difference(mine['f1'], theirs['f1']), 100)} | "
                    f"{interval_text(paired_difference(mine['kl'], theirs['kl']), 1)} |")
    return "\n".join(rows)


def render(report: dict[str, Any], summary: bool = False) -> str:
    pairs = comparisons(report)
    tables = [summary_table(report, pairs)] if summary else [methods_table(report), paired_table(pairs)]
    return "\n\n".join([f"**{_header(report['meta'])}**", *tables, "\n".join(targets(report, pairs))])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sparsex_sgl.eval.quality_table")
    parser.add_argument("reports", type=Path, nargs="+")
    parser.add_argument("--summary", action="store_true",
                        help="one row per method, intervals against CacheBlend-style and full in the row (README)")
    parser.add_argument("--against", type=Path, default=None,
                        help="a report of the same questions: every method minus its counterpart there")
    args = parser.parse_args(argv)
    reports = [json.loads(path.read_text()) for path in args.reports]
    out = [render(report, args.summary) for report in reports]
    if args.against is not None:
        base = json.loads(args.against.read_text())
        out += [against_table(report, base) for report in reports]
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
