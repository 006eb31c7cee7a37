"""The ``sparsex-sgl`` command."""

from __future__ import annotations

import argparse

from sparsex_sgl import prewarm_cli
from sparsex_sgl.eval import fidelity
from sparsex_sgl.harness import commands as bench


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sparsex-sgl", description="SparseX segment-level KV reuse for SGLang")
    commands = parser.add_subparsers(dest="command", required=True)
    evaluate = commands.add_parser("eval", help="evaluations").add_subparsers(dest="evaluation", required=True)
    fidelity.add_arguments(evaluate.add_parser("fidelity", help="fidelity of reuse methods to full prefill"))
    bench.add_arguments(commands.add_parser("bench", help="workloads, load runs against SGLang servers, reports"))
    prewarm_cli.add_arguments(commands.add_parser("prewarm", help="compute a corpus's segments ahead of traffic"))
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
