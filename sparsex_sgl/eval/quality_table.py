"""The quality tables of the README's results: one fidelity report (a model on a task) as markdown.

``python -m sparsex_sgl.eval.quality_table REPORT.json [...]`` prints, per report, every method's F1, EM,
KL mean / median, greedy agreement with full prefill, recompute and FLOPs fractions, then every SparseX
setting minus CacheBlend-style (same ratio and ``L_full``), minus full prefill and, for an adaptive
budget, minus the same signal at a fixed ratio, question by question, with 95% paired bootstrap
intervals (``harness.report.paired_difference``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sparsex_sgl.harness.report import interval_text, paired_difference


def _header(meta: dict[str, Any]) -> str:
    model = meta.get("command", "").split("--model ")[-1].split(" ")[0] or "?"
    return (f"{model}, {meta.get('task', 'hotpotqa')} ({meta.get('split', 'other')} questions "
            f"{meta['offset']}..{meta['offset'] + meta['n'] - 1}, {meta['n']} questions, "
            f"{meta['mean_prompt_tokens']:.0f} prompt tokens on average)")


def methods_table(report: dict[str, Any]) -> str:
    lines = ["| method | F1 | EM | KL mean / median | greedy = full | recompute frac | FLOPs frac |",
             "|---|---|---|---|---|---|---|"]
    for name, m in report["methods"].items():
        lines.append(f"| {name} | {m['f1']:.3f} | {m['em']:.3f} | {m['kl_mean']:.3f} / {m['kl_median']:.3f} "
                     f"| {m['greedy_exact']:.2f} | {m['recompute_frac']:.3f} | {m['flops_frac']:.3f} |")
    return "\n".join(lines)


def references(methods: dict[str, dict[str, Any]], name: str) -> list[str]:
    """What a SparseX setting is compared with: full prefill, CacheBlend-style at its ratio and ``L_full``,
    and, for an adaptive budget (``coverage`` > 0), the same signal at each fixed ratio and its ``L_full``
    (the budget must match fixed-ratio quality at a lower mean recompute fraction)."""
    m = methods[name]
    adaptive = bool(m.get("coverage"))
    return [other for other, om in methods.items() if om["method"] == "full" or (
        om["method"] == "cacheblend" and om["ratio"] == m["ratio"] and om["full_layers"] == m["full_layers"]) or (
        adaptive and om["method"] == "sparsex" and not om.get("coverage") and om["signal"] == m["signal"]
        and om["full_layers"] == m["full_layers"])]


def paired_table(report: dict[str, Any]) -> str:
    """Each SparseX setting minus each of its ``references``, question by question."""
    methods, per = report["methods"], report["per_question"]
    lines = ["| SparseX setting | vs | ΔF1 (points) | ΔKL (lower: closer to full) |", "|---|---|---|---|"]
    for name, m in methods.items():
        if m["method"] != "sparsex":
            continue
        for other in references(methods, name):
            f1 = paired_difference(per[name]["f1"], per[other]["f1"])
            kl = paired_difference(per[name]["kl"], per[other]["kl"])
            lines.append(f"| {name} | {other} | {interval_text(f1, 100)} | {interval_text(kl, 1)} |")
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    return "\n\n".join([f"**{_header(report['meta'])}**", methods_table(report), paired_table(report)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sparsex_sgl.eval.quality_table")
    parser.add_argument("reports", type=Path, nargs="+")
    args = parser.parse_args(argv)
    print("\n\n".join(render(json.loads(path.read_text())) for path in args.reports))


if __name__ == "__main__":
    main()
