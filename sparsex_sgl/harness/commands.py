"""The ``sparsex-sgl bench`` subcommands: ``workload``, ``run``, ``report`` and ``sweep``.

    sparsex-sgl bench workload rag --n 40 --reuse 0.8 --out work/rag.jsonl
    sparsex-sgl bench run --workload work/rag.jsonl --rate 0.5 --out results/rag
    sparsex-sgl bench report results/rag --sweep results/sweep.json --out results/report
    sparsex-sgl bench sweep --n 200 --out results/sweep.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparsex_sgl.harness import report, run, workloads


def _workload(args: argparse.Namespace) -> None:
    from sparsex_sgl.assets import hotpotqa_path, sharegpt_path
    from sparsex_sgl.eval.hotpotqa import load_examples

    if args.kind == "rag":
        distinct = args.n - round(args.reuse * (args.n - 1))
        built = workloads.rag(load_examples(hotpotqa_path(), distinct, args.offset), args.n, args.reuse, args.seed)
    elif args.kind == "agents":
        built = workloads.agents(load_examples(hotpotqa_path(), args.n, args.offset), args.agents, args.seed)
    else:
        conversations = workloads.sharegpt_conversations(sharegpt_path(), args.n, args.rounds, args.max_chars)
        built = workloads.chat(conversations, args.rounds, args.seed)
    built.write(args.out)
    print(f"wrote {args.out}: {len(built.requests)} requests, {built.params}")


def _sweep(args: argparse.Namespace) -> None:
    """The offline quality sweep: `eval fidelity` on the sweep grid, then the F1 plot next to the JSON."""
    from sparsex_sgl.eval import fidelity

    defaults = argparse.ArgumentParser()
    fidelity.add_arguments(defaults)
    for key, value in vars(defaults.parse_args([])).items():  # every method, the shipped signal, HotpotQA
        if not hasattr(args, key):
            setattr(args, key, value)
    fidelity.run(args)
    sweep = json.loads(args.out.read_text())
    print(f"wrote {report.plot_sweep(sweep, args.out.with_suffix('.png'))}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="bench_command", required=True)

    make = commands.add_parser("workload", help="generate a workload JSONL from real data")
    make.add_argument("kind", choices=workloads.WORKLOADS)
    make.add_argument("--n", type=int, default=40, help="rag: requests; agents: tasks; chat: conversations")
    make.add_argument("--reuse", type=float, default=0.8, help="rag: share of requests revisiting earlier documents")
    make.add_argument("--agents", type=int, default=4, help="agents: agents per task")
    make.add_argument("--rounds", type=int, default=4, help="chat: rounds per conversation")
    make.add_argument("--max-chars", type=int, default=1200, help="chat: longest turn, in characters")
    make.add_argument("--offset", type=int, default=0, help="rag, agents: first HotpotQA question")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--out", type=Path, required=True)
    make.set_defaults(run=_workload)

    run.add_arguments(commands.add_parser("run", help="run workloads against stock / SparseX / full-prefill servers"))
    report.add_arguments(commands.add_parser("report", help="tables and plots from results"))

    from sparsex_sgl.eval import fidelity

    sweep = commands.add_parser("sweep", help="offline quality sweep with the reference executor (F1 vs recompute)")
    sweep.add_argument("--model", default="qwen2.5-0.5b")
    sweep.add_argument("--n", type=int, default=200)
    sweep.add_argument("--offset", type=int, default=0)
    sweep.add_argument("--ratio", type=fidelity.parse_floats, default=[0.05, 0.1, 0.15, 0.3])
    sweep.add_argument("--full-layers", type=fidelity.parse_ints, default=[1, 2, 4])
    sweep.add_argument("--seed", type=int, default=0)
    sweep.add_argument("--out", type=Path, required=True)
    sweep.add_argument("--resume", action="store_true", help="continue the sweep at --out (same grid, any --n)")
    sweep.set_defaults(run=_sweep)
