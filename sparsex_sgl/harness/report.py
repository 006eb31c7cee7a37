"""Tables and plots from the harness's ``results.json`` and the offline quality sweep's JSON.

``sparsex-sgl bench report RESULTS_DIR... [--sweep SWEEP.json] --out DIR`` writes ``report.md`` (every
run's table, plus the sweep's) and the plots: TTFT CDF per system (one per workload and load),
throughput against offered load (over every ``--rate`` run in the folders given), and F1 against recompute fraction per
method (from the sweep).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from sparsex_sgl.eval import quality_table
from sparsex_sgl.eval.figures import pyplot


def _f(value: Any, spec: str = ".2f", scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def _file_part(name: str) -> str:
    """A workload name as part of a file name: ``rag:rag-n30-r80`` -> ``rag-rag-n30-r80``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def _prefix_hit(summary: dict[str, Any]) -> str:
    """Mean prefix-hit tokens, with the blended part where there is one (older results lack the key)."""
    blended = summary.get("sparsex_blended_prefix_mean") or 0
    hit = f"{summary['prefix_hit_tokens_mean']:.0f}"
    return f"{hit} ({blended:.0f} blended)" if blended >= 0.5 else hit


def _load_label(run: dict[str, Any]) -> str:
    return f"{run['rate']}/s Poisson" if run.get("rate") else f"concurrency {run.get('concurrency')}"


def markdown(report: dict[str, Any]) -> str:
    """One table per (workload, load): a row per system, then the SparseX / stock ratios."""
    lines = [f"Command: `{report['command']}`", "",
             (f"Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs, "
              f"device {report['machine']['device']}; model `{Path(report['model']).name}`"), ""]
    for run in report["runs"]:
        if "server_error" in run:
            message = run["server_error"].strip().splitlines() or ["(no message)"]
            lines += [f"**{run['system']}: the server did not start** ({message[0].rstrip(':;')}): `{message[-1]}`", ""]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in report["runs"]:
        if "summary" in run:
            groups[(run["workload"], _load_label(run))].append(run)
    for (workload, load), runs in groups.items():
        params = report["workloads"][workload]["params"]
        lines += [f"### {workload}, {load}", "", f"Workload: `{json.dumps(params)}`", "",
                  ("| system | done / errors | TTFT p50 / p90 / p99 (s) | TTFT p50 novel / reuse (s) | ITL p50 (ms) "
                   "| req/s | out tok/s | prompt tok | prefix hit | reused | recomputed | EM / F1 | equal to full |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for run in runs:
            s = run["summary"]
            interrupted = " (interrupted)" if run.get("interrupted") else ""
            lines.append(
                f"| {run['system']}{interrupted} | {s['completed']} / {s['errors']} "
                f"| {_f(s['ttft_p50'])} / {_f(s['ttft_p90'])} / {_f(s['ttft_p99'])} "
                f"| {_f(s['ttft_p50_novel'])} / {_f(s['ttft_p50_reuse'])} | {_f(s['itl_p50'], '.0f', 1000)} "
                f"| {_f(s['req_per_s'], '.3f')} | {_f(s['output_tok_per_s'], '.1f')} | {s['prompt_tokens_mean']:.0f} "
                f"| {_prefix_hit(s)} | {s['sparsex_reused_mean']:.0f} | {s['sparsex_recomputed_mean']:.0f} "
                f"| {_f(s.get('em'))} / {_f(s.get('f1'))} | {_f(s.get('equal_to_full'))} |")
        by_system = {run["system"]: run["summary"] for run in runs}
        if "stock" in by_system and "sparsex" in by_system:
            stock, ours = by_system["stock"], by_system["sparsex"]
            lines += ["", "SparseX vs stock: " + ", ".join(
                f"{name} {_ratio(stock.get(a), ours.get(a)) if inverse else _ratio(ours.get(a), stock.get(a))}"
                for name, a, inverse in (("TTFT p50", "ttft_p50", True), ("TTFT p50 on novel requests", "ttft_p50_novel", True),
                                         ("TTFT p50 on reuse requests", "ttft_p50_reuse", True),
                                         ("throughput", "req_per_s", False)))
                      + " (ratios > 1 favour SparseX)"]
        for run in runs:
            for error in run["summary"]["error_samples"]:
                lines.append(f"- {run['system']} error: `{error}`")
        lines.append("")
    return "\n".join(lines)


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if not numerator or not denominator:
        return "-"
    return f"{numerator / denominator:.2f}x"


def _finish(fig: Any, ax: Any, path: Path, legend_size: float | None = None) -> Path:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    return path


def plot_ttft_cdf(report: dict[str, Any], out: Path, source: str) -> list[Path]:
    """One CDF per workload and load of one results folder; ``source`` (the folder's name) keeps the files
    of several folders with the same workload and load apart."""
    plt = pyplot()

    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in report["runs"]:
        if run.get("requests"):
            groups[(run["workload"], _load_label(run))].append(run)
    written = []
    for (workload, load), runs in groups.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for run in runs:
            ttfts = sorted(q["ttft"] for q in run["requests"] if q["ok"])
            ax.step(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], where="post", label=run["system"])
        ax.set(xlabel="time to first token (s)", ylabel="share of requests", title=f"TTFT CDF: {workload}, {load}")
        written.append(_finish(fig, ax, out / f"ttft-cdf-{_file_part(source)}-{_file_part(workload)}-{load.split()[0].replace('/', 'per')}.png"))
    return written


def plot_throughput(report: dict[str, Any], out: Path) -> list[Path]:
    plt = pyplot()

    curves: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for run in report["runs"]:
        if run.get("rate") and "summary" in run and run["summary"]["req_per_s"] is not None:
            curves[run["workload"]][run["system"]].append((run["rate"], run["summary"]["req_per_s"]))
    written = []
    for workload, systems in curves.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for system, points in systems.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=system)
        ax.set(xlabel="offered load (requests/s)", ylabel="throughput (requests/s)", title=f"Throughput: {workload}")
        written.append(_finish(fig, ax, out / f"throughput-{_file_part(workload)}.png"))
    return written


def plot_sweep(sweep: dict[str, Any], path: Path) -> Path:
    """F1 against recompute fraction, one line per method and L_full (colour: method; line style: L_full);
    full prefill and naive as references."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    lines: dict[tuple[str, int | None], list[tuple[float, float]]] = defaultdict(list)
    for m in sweep["methods"].values():
        if m["method"] == "full":
            ax.axhline(m["f1"], color="black", linestyle="--", label="full prefill")
        elif m["method"] == "naive":
            ax.axhline(m["f1"], color="grey", linestyle=":", label="naive reuse")
        else:
            lines[(m["method"], m["full_layers"])].append((m["recompute_frac"], m["f1"]))
    colours = {"cacheblend": "tab:blue", "epic": "tab:green", "sparsex": "tab:red"}
    depths = sorted({layers for _, layers in lines if layers is not None})
    styles: dict[int | None, str] = dict(zip(depths, ["-", "--", "-.", ":"] * len(depths)))
    for (method, layers), points in sorted(lines.items(), key=lambda item: (item[0][0], item[0][1] or 0)):
        points.sort()
        label = method + (f", L_full {layers}" if layers is not None else "")
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label,
                color=colours.get(method), linestyle=styles.get(layers, "-"))
    ax.set(xlabel="recompute fraction (share of prompt tokens)", ylabel="F1 (HotpotQA)",
           title=f"F1 vs recompute fraction ({sweep['meta']['n']} questions)")
    return _finish(fig, ax, path, legend_size=7)


def run_summary(results: dict[str, Any], folder: Path) -> str:
    """A few lines a newcomer reads after a run: SparseX against stock SGLang and full prefill, per workload
    and load (TTFT p50 speed-up, tokens reused, agreement with full prefill, answer F1), and where the full
    table is."""
    lines = ["", "Summary"]
    by_setting: dict[tuple[str, Any, Any], dict[str, dict[str, Any]]] = defaultdict(dict)
    for run in results["runs"]:
        if "summary" not in run:  # its server did not start; results.md says why
            lines.append(f"- {run.get('system')}: no requests ran ({run.get('server_error', 'see results.md')[:200]})")
            continue
        by_setting[(run["workload"], run["rate"], run["concurrency"])][run["system"]] = run["summary"]
    for (workload, rate, concurrency), systems in by_setting.items():
        load = f"rate {rate}/s" if rate else f"concurrency {concurrency}"
        sparsex, stock, full = systems.get("sparsex"), systems.get("stock"), systems.get("full")
        if sparsex is None:
            continue
        lines.append(f"- {Path(workload).name}, {load}: {sparsex['completed']} of {sparsex['requests']} requests; "
                     f"SparseX reused {sparsex['sparsex_reused_mean']:.0f} of {sparsex['prompt_tokens_mean']:.0f} "
                     f"prompt tokens per request and recomputed {sparsex['sparsex_recomputed_mean']:.0f} of them")
        for name, other in (("stock SGLang", stock), ("full prefill", full)):
            if other is not None and sparsex.get("ttft_p50") and other.get("ttft_p50"):
                lines.append(f"  - TTFT p50 {sparsex['ttft_p50']:.2f} s against {name}'s {other['ttft_p50']:.2f} s "
                             f"({other['ttft_p50'] / sparsex['ttft_p50']:.2f}x)")
        if "equal_to_full" in sparsex:
            lines.append(f"  - greedy answer equal to full prefill's: {sparsex['equal_to_full']:.0%} of "
                         f"{sparsex['compared']} requests")
        if "f1" in sparsex:
            lines.append(f"  - answer F1 against the gold answers: SparseX {sparsex['f1']:.2f}"
                         + "".join(f", {name} {other['f1']:.2f}" for name, other in (("stock", stock), ("full", full))
                                   if other is not None and "f1" in other))
    lines.append(f"Full table: {folder / 'results.md'}; every request: {folder / 'results.json'}")
    return "\n".join(lines)


def save_bench(out: Path, report: dict[str, Any], table: str) -> None:
    """A bench script's results in ``out`` (created): ``report.json`` (every figure) and ``table.md``, which
    is also printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "table.md").write_text(table + "\n")
    print(table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", type=Path, nargs="*", help="folders holding results.json")
    parser.add_argument("--sweep", type=Path, default=None, help="JSON of `sparsex-sgl bench sweep`")
    parser.add_argument("--out", type=Path, required=True)
    parser.set_defaults(run=main)


def main(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    sections, plots = [], []
    all_runs: list[dict[str, Any]] = []
    for folder in args.results:
        report = json.loads((folder / "results.json").read_text())
        sections += [f"## {folder}", "", markdown(report)]
        plots += plot_ttft_cdf(report, args.out, folder.name)
        all_runs += report["runs"]
    plots += plot_throughput({"runs": all_runs}, args.out)  # one curve per system over every folder's loads
    if args.sweep:
        sweep = json.loads(args.sweep.read_text())
        sections += ["## Quality sweep", "", quality_table.render(sweep)]
        plots.append(plot_sweep(sweep, args.out / "f1-vs-recompute.png"))
    sections += ["", *[f"![{p.stem}]({p.name})" for p in plots]]
    (args.out / "report.md").write_text("\n".join(sections) + "\n")
    print("\n".join(sections))
    print(f"wrote {args.out / 'report.md'} and {len(plots)} plots")
