"""Pivot a fidelity report swept over ratios and L_full into one markdown table.

Rows: method at a recompute ratio; columns: L_full. Methods without full layers (naive, EPIC) fill
every column with their one value, so each row reads at a glance against the same budget.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def pivot(report: dict[str, Any]) -> str:
    methods = report["methods"].values()
    layers = sorted({m["full_layers"] for m in methods if m["full_layers"] is not None})
    rows: dict[tuple[str, float | None], dict[int | None, dict[str, Any]]] = {}
    for m in methods:
        rows.setdefault((m["method"], m["ratio"]), {})[m["full_layers"]] = m
    header = "| method | ratio | " + " | ".join(f"L_full={L}: KL / top-1 / exact / FLOPs" for L in layers) + " |"
    lines = [header, "|---|---|" + "---|" * len(layers)]
    for (method, ratio), by_layers in rows.items():
        cells = []
        for L in layers:
            m = by_layers[L] if L in by_layers else by_layers[None]  # None: a method without full layers
            cells.append(
                f"{m['kl_mean']:.3f} / {m['top1_agree']:.3f} / {m['greedy_exact']:.2f} / {m['flops_frac']:.2f}"
            )
        lines.append(f"| {method} | {'-' if ratio is None else ratio} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sparsex_sgl.eval.sweep_table")
    parser.add_argument("report", type=Path)
    args = parser.parse_args(argv)
    print(pivot(json.loads(args.report.read_text())))


if __name__ == "__main__":
    main()
