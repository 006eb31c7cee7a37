"""Every quality sweep documented with ``--resume`` continues its committed report as written, and
docs/results.md holds every held-out report's table as it stands.

docs/results.md gives, beside each table, the command that made its report in bench/results/. A sweep
resumes only a report made under the same settings (``fidelity.sweep_grid``), so a changed default (the
selection's ``mass_prior``) or an edited command silently turns "resume this report" into "refuse to run".
This reads the commands from the document, parses them with the CLI's own parser and compares their grid
with the one recorded in the report they name; no model is loaded. The document's held-out tables
("Answer quality on held-out questions", which the README's results table links to) are copied from
``quality_table --summary``; a report resumed to more questions and a table not refreshed would publish
figures no report holds, and a report whose table is missing from the document would go unpublished.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest

from sparsex_sgl.eval import fidelity, quality_flops, quality_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DOC = ROOT / "docs" / "results.md"


def documented_sweeps() -> list[list[str]]:
    """The arguments after ``eval fidelity`` of every documented ``--resume`` sweep, shell variables of the
    same block (``G="..."``) expanded."""
    sweeps = []
    for block in re.findall(r"```bash\n(.*?)```", RESULTS_DOC.read_text(), flags=re.DOTALL):
        variables: dict[str, str] = {}
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            assignment = re.fullmatch(r"(\w+)=(.*)", line.strip())
            if assignment:
                variables[assignment[1]] = " ".join(shlex.split(assignment[2]))
                continue
            for name, value in variables.items():
                line = line.replace(f"${name}", value)
            words = shlex.split(line, comments=True)
            if words[:3] == [".venv/bin/sparsex-sgl", "eval", "fidelity"] and "--resume" in words:
                sweeps.append(words[3:])
    return sweeps


def test_every_documented_sweep_resumes_its_committed_report() -> None:
    parser = argparse.ArgumentParser()
    fidelity.add_arguments(parser)
    sweeps = documented_sweeps()
    assert len(sweeps) >= 10, "the commands were not found: has the document's layout changed?"
    for words in sweeps:
        args = parser.parse_args(words)
        report = json.loads((ROOT / args.out).read_text())
        assert report["meta"]["grid"] == fidelity.sweep_grid(args), f"{args.out} does not resume with: {words}"


def test_results_doc_holds_every_held_out_report_as_committed() -> None:
    reports = sorted((ROOT / "bench" / "results").glob("quality-heldout-*.json"))
    assert reports, "no held-out report found"
    doc = RESULTS_DOC.read_text()
    complete = 0
    for path in reports:
        report = json.loads(path.read_text())
        asked = int(re.search(r"--n (\d+)", report["meta"]["command"])[1])
        if report["meta"]["n"] < asked:  # a run still going: its figures are not read, nor published
            continue
        complete += 1
        table = quality_table.summary_table(report, quality_table.comparisons(report))
        assert table in doc, f"docs/results.md does not hold {path.name} as `quality_table --summary` renders it"
    assert complete >= 5, "the complete held-out reports were not found"


def test_results_doc_holds_the_quality_against_flops_tables_as_their_command_prints_them(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The front's tables are what the command printed beside them prints on the committed reports."""
    monkeypatch.chdir(ROOT)
    commands = [shlex.split(line) for block in re.findall(r"```bash\n(.*?)```", RESULTS_DOC.read_text(), flags=re.DOTALL)
                for line in re.sub(r"\\\n\s*", " ", block).splitlines()
                if line.startswith(".venv/bin/python -m sparsex_sgl.eval.quality_flops ")]
    assert commands, "the quality-against-FLOPs command was not found in docs/results.md"
    for words in commands:
        args = words[3:]
        if "--plot" in args:  # the figure is not compared
            del args[args.index("--plot"):args.index("--plot") + 2]
        quality_flops.main(args)
        assert capsys.readouterr().out.strip() in RESULTS_DOC.read_text(), f"stale tables for: {' '.join(words)}"
