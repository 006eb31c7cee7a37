"""The quality-against-FLOPs front: the sweep equals the definition (no point costs at most as much and is at
least as good, better in one), checked by brute force over random points; and on the committed held-out
reports each method's shipped form is one point per ratio, so the figure draws what the defaults are; and
``quality_table --against`` pairs the same setting across reports that named it differently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsex_sgl.eval import quality_flops, quality_table
from sparsex_sgl.eval.quality_flops import Point

ROOT = Path(__file__).resolve().parent.parent


def dominated(p: Point, q: Point) -> bool:
    return q.flops <= p.flops and q.f1 >= p.f1 and (q.flops < p.flops or q.f1 > p.f1)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.1, 0.2, 0.3, 0.5]), st.sampled_from([0.3, 0.4, 0.5, 0.6])),
                min_size=1, max_size=12))
def test_front_is_the_set_of_undominated_points(pairs: list[tuple[float, float]]) -> None:
    points = [Point("c", f"s{i}", "m", flops, f1, 0.0, 0.0) for i, (flops, f1) in enumerate(pairs)]
    expected = {p for p in points if not any(dominated(p, q) for q in points)}
    assert quality_flops.pareto(points, lambda p: p.f1) == expected


def test_committed_reports_give_one_shipped_point_per_method_and_ratio() -> None:
    reports = sorted((ROOT / "bench" / "results").glob("quality-heldout-qwen15-*.json"))
    assert len(reports) >= 3, "the 1.5B held-out reports were not found"
    for path in reports:
        report = json.loads(path.read_text())
        points = quality_flops.case_points(path.stem, [report])
        keys = [(report["methods"][p.setting]["method"], report["methods"][p.setting]["ratio"]) for p in points]
        assert len(keys) == len(set(keys)), f"{path.name}: two settings of one method and ratio: {keys}"
        assert ("full", None) in keys and any(method == "sparsex" for method, _ in keys)


def test_command_prints_each_case_and_draws_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    served = ROOT / "bench" / "results" / "quality-heldout-qwen15-hotpotqa-served.json"
    figure = tmp_path / "front.svg"
    quality_flops.main([f"served={served}", "--plot", str(figure)])
    out = capsys.readouterr().out
    assert out.startswith("**served**") and "| full | 1.000 |" in out
    assert "sparsex (served)" in figure.read_text()


def test_against_pairs_the_same_setting_whatever_each_report_named_it() -> None:
    """A chunk-start sweep names SparseX ``sparsex[k=1]``; a run without the knob ran the same setting as
    ``sparsex[r=0.15,L=2]``: the two pair (here a report against a renamed copy of itself: zero difference),
    and a chunk start the other run never had pairs with nothing."""
    base = json.loads((ROOT / "bench" / "results" / "quality-heldout-qwen15-hotpotqa.json").read_text())
    swept = {"meta": base["meta"], "methods": {}, "per_question": {}}
    for name, k in (("full", None), ("sparsex[r=0.15,L=2]", 1), ("sparsex[r=0.15,L=2]", 4)):
        new = name if k is None else f"sparsex[k={k}]"
        swept["methods"][new] = {**base["methods"][name], "chunk_start": k}
        swept["per_question"][new] = base["per_question"][name]
    rows = quality_table.against_table(swept, base).splitlines()[2:]
    assert rows == ["| sparsex[k=1] vs sparsex[r=0.15,L=2] | +0.00 [+0.00, +0.00] | +0.00 [+0.00, +0.00] |"]
