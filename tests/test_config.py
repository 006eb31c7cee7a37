"""Settings validation, presets in configs/, the selection policies' registry, method expansion, and the
FLOPs model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest

from sparsex_sgl.core.config import SELECTION_CHOICES, SelectionConfig, ServerConfig
from sparsex_sgl.core.selection import POLICIES, Selection
from sparsex_sgl.eval.fidelity import method_runs, with_chunk_starts
from sparsex_sgl.eval.methods import method_config
from sparsex_sgl.reference.executor import ReuseSetting
from sparsex_sgl.reference.flops import ModelDims, modeled_prefill_flops

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_presets_load(path: Path) -> None:
    assert isinstance(ServerConfig.from_yaml(path), ServerConfig)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_presets_agree_with_the_methods_they_name(path: Path) -> None:
    """A preset is the method of its name at the defaults every report uses (ratio 0.15, ``L_full`` 2)."""
    assert ReuseSetting(ServerConfig.from_yaml(path).selection) == method_config(path.stem, 0.15, 2)


def test_presets_exist() -> None:
    assert {p.stem for p in CONFIGS} >= {"sparsex", "cacheblend", "epic"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"recompute_ratio": 1.5}, "recompute_ratio"),
        ({"selection": "random"}, "Input should be 'sparse_q', 'query_mass', 'kv_deviation', 'first_k' or 'none'"),
        ({"kernels": "cuda"}, "Input should be 'auto', 'torch' or 'triton'"),
        ({"coverage": 0.5, "selection": "first_k", "full_layers": 0}, "coverage needs a scored selection"),
        ({"full_layers": -1}, "full_layers"),
        ({"mass_prior": -0.5}, "mass_prior"),
        ({"full_layers": 0, "selection": "sparse_q"}, "full_layers >= 1"),
        ({"auto_segment_tokens": 3}, "auto_segment_tokens"),
    ],
)
def test_invalid_configs_are_rejected(kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=message):
        ServerConfig.from_mapping(kwargs)


def test_unknown_yaml_keys_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("sparsex:\n  ratio: 0.2\n")
    with pytest.raises(ValueError, match="unknown SparseX settings"):
        ServerConfig.from_yaml(path)


def test_every_selection_choice_is_one_registered_policy() -> None:
    assert set(POLICIES) == set(get_args(Selection)) == set(SELECTION_CHOICES)
    for name, policy in POLICIES.items():
        assert policy.name == name and (policy.score.__doc__ or "").strip(), f"{name} has no docstring saying why"
    assert {n for n, p in POLICIES.items() if p.reads_full_layer} == {"sparse_q", "query_mass", "kv_deviation"}


def test_a_server_config_round_trips_through_its_flat_mapping() -> None:
    config = ServerConfig.from_mapping({"recompute_ratio": 0.3, "mass_layers": "all", "kernels": "torch",
                                        "markers": True})
    assert config.selection == SelectionConfig(recompute_ratio=0.3, mass_layers="all")
    assert ServerConfig.from_mapping(config.flat()) == config


def test_method_runs_name_settings_only_when_swept() -> None:
    names = [r.name for r in method_runs(["full", "naive", "epic", "sparsex"], [0.15], [2])]
    assert names == ["full", "naive", "epic", "sparsex"]
    swept = [r.name for r in method_runs(["epic", "sparsex"], [0.05, 0.3], [1, 4])]
    assert swept == ["epic[r=0.05]", "epic[r=0.3]", "sparsex[r=0.05,L=1]", "sparsex[r=0.05,L=4]",
                     "sparsex[r=0.3,L=1]", "sparsex[r=0.3,L=4]"]


def test_flops_model_counts_linear_and_causal_attention_terms() -> None:
    dims = ModelDims(num_layers=2, hidden=8, n_heads=2, n_kv_heads=1, head_dim=4, intermediate=16, vocab=10)
    per_token = 2 * (8 * (8 + 8) + 8 * 8 + 3 * 8 * 16)  # q+kv projections, o projection, gated MLP
    assert dims.linear_flops_per_token() == per_token
    full = modeled_prefill_flops(dims, [range(4), range(4)])
    assert full == 2 * (4 * per_token + 4 * 2 * 4 * (1 + 2 + 3 + 4)) + 2 * 8 * 10
    sparse = modeled_prefill_flops(dims, [range(4), [3]])
    assert sparse == full - 3 * per_token - 4 * 2 * 4 * (1 + 2 + 3)


def test_sweep_pivot_has_one_row_per_method_and_ratio() -> None:
    from sparsex_sgl.eval.sweep_table import pivot

    runs = method_runs(["full", "naive", "epic", "sparsex"], [0.05, 0.3], [1, 4])
    report = {"methods": {r.name: {"method": r.method, "ratio": r.ratio, "full_layers": r.full_layers,
                                   "kl_mean": i / 10, "top1_agree": 1.0, "greedy_exact": 1.0, "flops_frac": 0.5}
                          for i, r in enumerate(runs)}}
    lines = pivot(report).splitlines()
    assert len(lines) == 2 + 1 + 1 + 2 + 2  # header, rule, full, naive, epic x2, sparsex x2
    assert lines[3].startswith("| naive | - | 0.100") and lines[3].count("0.100") == 2  # spans both L columns
    sparsex_low = next(line for line in lines if line.startswith("| sparsex | 0.05"))
    assert "0.400" in sparsex_low and "0.500 / 1.000" not in sparsex_low.split("|")[3]


def test_paired_difference_interval_brackets_the_mean() -> None:
    from sparsex_sgl.eval.quality_table import paired_difference

    base = [0.0, 1.0, 0.5, 0.25]
    assert paired_difference([x + 0.1 for x in base], base) == pytest.approx((0.1, 0.1, 0.1))  # constant gap
    mean, low, high = paired_difference([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], [0.0] * 6)
    assert mean == pytest.approx(4 / 6) and 0.0 <= low < mean < high <= 1.0
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1.0], [1.0, 2.0])


def test_quality_targets_read_the_paired_intervals() -> None:
    """Two SparseX settings over 40 questions: one 0.1 F1 above CacheBlend-style on every other question,
    one 0.1 below on every question; an adaptive budget identical to its fixed twin at a lower fraction."""
    from sparsex_sgl.eval.quality_table import comparisons, summary_table, targets

    runs = method_runs(["full", "cacheblend", "sparsex"], [0.15], [2, 4], signals=["mass_all"], coverages=[0.0, 0.5])
    n = 40
    base = [0.2 + 0.6 * (q % 3 == 0) for q in range(n)]  # spread across questions, as real F1 is
    f1 = {r.name: base for r in runs}
    f1["full"] = [x + 0.2 for x in base]
    f1["sparsex:mass_all[r=0.15,L=2]"] = [x + 0.1 * (q % 2) for q, x in enumerate(base)]
    f1["sparsex:mass_all[r=0.15,L=4]"] = f1["sparsex:mass_all[r=0.15,L=4,cov=0.5]"] = [x - 0.1 for x in base]
    figures = {"f1": 0.0, "em": 0.0, "kl_mean": 0.1, "kl_median": 0.1, "greedy_exact": 0.0, "flops_frac": 0.3}
    report = {"meta": {"offset": 0, "n": n, "mean_prompt_tokens": 1000.0},
              "methods": {r.name: {"method": r.method, "ratio": r.ratio, "full_layers": r.full_layers,
                                   "signal": r.signal, "coverage": r.coverage, **figures,
                                   "recompute_frac": 0.1 if r.coverage else 0.16} for r in runs},
              "per_question": {r.name: {"f1": f1[r.name], "kl": [0.1] * n} for r in runs}}
    pairs = comparisons(report)
    lines = targets(report, pairs)
    assert lines[0].startswith("- F1 significantly above CacheBlend-style: sparsex:mass_all[r=0.15,L=2] (+5.00 [")
    assert lines[1].count("sparsex:mass_all[r=0.15,L=4") == 2  # the fixed setting and its adaptive twin
    assert lines[2].startswith("- closest to full prefill on F1: sparsex:mass_all[r=0.15,L=2], -15.00 [")
    assert any(line.startswith("- sparsex:mass_all[r=0.15,L=4,cov=0.5]: mean recompute fraction 0.100 vs 0.160")
               and "ΔF1 +0.00 [+0.00, +0.00] (n.s.)" in line for line in lines)
    row = next(line for line in summary_table(report, pairs).splitlines() if line.startswith("| sparsex:mass_all[r=0.15,L=4] "))
    assert row.endswith("| -10.00 [-10.00, -10.00] | +0.00 [+0.00, +0.00] | -30.00 [-30.00, -30.00] | +0.00 [+0.00, +0.00] |")


def test_quality_table_compares_an_adaptive_budget_with_its_signal_at_fixed_ratios() -> None:
    from sparsex_sgl.eval.quality_table import references

    runs = method_runs(["full", "cacheblend", "sparsex"], [0.15, 0.3], [2, 4], signals=["sparse_q", "mass_all"],
                       coverages=[0.0, 0.5])
    methods = {r.name: {"method": r.method, "ratio": r.ratio, "full_layers": r.full_layers, "signal": r.signal,
                        "coverage": r.coverage} for r in runs}
    assert references(methods, "sparsex:mass_all[r=0.3,L=4]") == ["full", "cacheblend[r=0.3,L=4]"]
    assert references(methods, "sparsex:mass_all[r=0.3,L=4,cov=0.5]") == [
        "full", "cacheblend[r=0.3,L=4]", "sparsex:mass_all[r=0.15,L=4]", "sparsex:mass_all[r=0.3,L=4]"]


def test_mass_priors_expand_sparsex_only() -> None:
    runs = method_runs(["cacheblend", "sparsex"], [0.15], [2], mass_priors=[0.0, 4.0])
    assert [r.name for r in runs] == ["cacheblend", "sparsex[prior=0.0]", "sparsex[prior=4.0]"]
    assert [r.config.selection.mass_prior for r in runs if r.method == "sparsex"] == [0.0, 4.0]  # type: ignore[union-attr]
    assert method_runs(["sparsex"], [0.15], [2])[0].config == ReuseSetting(SelectionConfig(full_layers=2,
                                                                                           recompute_ratio=0.15))


def test_signals_and_coverage_expand_sparsex_only() -> None:
    runs = method_runs(["cacheblend", "sparsex"], [0.15], [2], signals=["sparse_q", "mass_all", "lookahead"],
                       coverages=[0.0, 0.5])
    assert [r.name for r in runs] == ["cacheblend", "sparsex", "sparsex[cov=0.5]", "sparsex:mass_all",
                                      "sparsex:mass_all[cov=0.5]", "sparsex:lookahead", "sparsex:lookahead[cov=0.5]"]
    by_name = {r.name: r.config for r in runs}
    assert by_name["sparsex:mass_all[cov=0.5]"] == ReuseSetting(SelectionConfig(
        full_layers=2, recompute_ratio=0.15, coverage=0.5, selection="query_mass", mass_layers="all"))
    assert by_name["sparsex:lookahead"] == ReuseSetting(SelectionConfig(full_layers=2, recompute_ratio=0.15,
                                                                        selection="query_mass"), lookahead=True)
    limited = method_runs(["sparsex"], [0.15], [2], signals=["sparse_q", "mass_all"], coverages=[0.0, 0.5],
                          coverage_signals=["mass_all"])
    assert [r.name for r in limited] == ["sparsex", "sparsex:mass_all", "sparsex:mass_all[cov=0.5]"]
    assert limited[0].config == ReuseSetting(SelectionConfig(full_layers=2, recompute_ratio=0.15))  # fixed ratio
    with pytest.raises(ValueError, match="unknown SparseX signal"):
        method_config("sparsex", 0.15, 2, "attention")


def test_development_and_held_out_questions_never_mix() -> None:
    from sparsex_sgl.eval.fidelity import SPLITS, split_of

    for task, splits in SPLITS.items():
        (a, b), (c, d) = splits["heldout"], splits["dev"]
        assert b <= c or d <= a, task  # disjoint
        assert split_of(task, a, b - a) == "heldout" and split_of(task, c, 10) == "dev"
        with pytest.raises(SystemExit, match="straddle"):
            split_of(task, c - 5, 10)
    assert split_of("hotpotqa", 300, 50) == "other"


def test_squad_prompts_hold_the_gold_paragraph_among_nine_of_its_article() -> None:
    import json

    from sparsex_sgl.assets import hotpotqa_path
    from sparsex_sgl.eval.fidelity import load_task
    from sparsex_sgl.eval.hotpotqa import normalize_answer

    articles = json.loads((hotpotqa_path().parent / "squad.json").read_text())["data"]
    by_id = {qa["id"]: (article["title"], paragraph["context"]) for article in articles
             for paragraph in article["paragraphs"] for qa in paragraph["qas"]}
    examples = load_task("squad", 30, 1000)
    assert load_task("squad", 30, 1000) == examples  # the same questions and paragraphs every time
    assert len({e.qid for e in examples}) == 30 and len({by_id[e.qid][0] for e in examples}) > 5  # many articles
    for example in examples:
        title, gold = by_id[example.qid]
        assert gold.strip() in example.paragraphs[0] and len(set(example.paragraphs)) == 10
        assert all(p.startswith(f"Document: {title.replace('_', ' ')}\n") for p in example.paragraphs)
        assert any(normalize_answer(a) in normalize_answer(gold) for a in example.answers)  # answerable here
        assert not any(gold.strip() in p for p in example.paragraphs[1:])


def test_checkpoints_are_replaced_whole(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sparsex_sgl.eval.fidelity import write_atomic

    out = tmp_path / "sweep.json"
    write_atomic(out, {"meta": {"n": 1}})
    write_atomic(out, {"meta": {"n": 2}})
    assert json.loads(out.read_text()) == {"meta": {"n": 2}} and [p.name for p in tmp_path.iterdir()] == ["sweep.json"]


def test_chunk_starts_expand_the_scored_methods_and_pair_sparsex_with_cacheblend_at_the_same_k() -> None:
    from sparsex_sgl.eval.quality_table import references

    runs = with_chunk_starts(method_runs(["full", "naive", "epic", "cacheblend", "sparsex"], [0.15], [2]), [0, 4])
    assert [r.name for r in runs] == ["full", "naive", "epic", "cacheblend[k=0]", "cacheblend[k=4]", "sparsex[k=0]",
                                      "sparsex[k=4]"]
    by_name = {r.name: r for r in runs}
    assert by_name["sparsex[k=4]"].config == ReuseSetting(SelectionConfig(full_layers=2, recompute_ratio=0.15,
                                                                          min_tokens_per_segment=4))
    assert by_name["cacheblend[k=4]"].config == ReuseSetting(SelectionConfig(
        full_layers=2, recompute_ratio=0.15, selection="kv_deviation", min_tokens_per_segment=4))
    assert by_name["epic"].config == method_runs(["epic"], [0.15], [2])[0].config  # EPIC is the chunk start itself
    methods = {r.name: {"method": r.method, "ratio": r.ratio, "full_layers": r.full_layers,
                        "chunk_start": r.chunk_start, "signal": r.signal, "coverage": r.coverage} for r in runs}
    assert references(methods, "sparsex[k=4]") == ["full", "cacheblend[k=4]"]
