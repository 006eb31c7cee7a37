"""Benchmark workloads from the real data (HotpotQA, ShareGPT), their rendering, and the quality metrics."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from sparsex_sgl.assets import hotpotqa_path, resolve_model, sharegpt_path
from sparsex_sgl.eval.hotpotqa import load_examples
from sparsex_sgl.harness import quality, workloads
from sparsex_sgl.harness.driver import arrival_times
from sparsex_sgl.harness.render import render


def _segments(request: workloads.WorkloadRequest) -> list[str]:
    return [p.text for m in request.messages for p in m.pieces if p.segment]


@pytest.mark.parametrize("n, reuse", [(21, 0.8), (10, 0.0), (7, 0.5)])
def test_rag_reuse_share_and_fresh_orders(n: int, reuse: float) -> None:
    repeats = round(reuse * (n - 1))
    built = workloads.rag(load_examples(hotpotqa_path(), n - repeats), n, reuse, seed=3)
    assert len(built.requests) == n and built.requests[0].tags["reuse"] == "novel"
    seen: set[str] = set()
    sent_orders: set[tuple[str, ...]] = set()
    n_seen = n_total = 0
    for request in built.requests:
        segments = _segments(request)
        assert len(segments) == 10 and request.answers
        n_seen += sum(s in seen for s in segments)
        n_total += len(segments)
        # a repeat brings documents seen before, all of them; a new question none of them
        assert all(s in seen for s in segments) == (request.tags["reuse"] == "segments")
        assert tuple(segments) not in sent_orders  # never the same order twice: no whole-prompt prefix hit
        sent_orders.add(tuple(segments))
        seen.update(segments)
    assert n_seen == 10 * repeats  # the reuse knob is the share of segments seen before
    assert n_seen / n_total == pytest.approx(built.params["segment_reuse_share"])


def test_workload_jsonl_round_trip(tmp_path: Path) -> None:
    built = workloads.agents(load_examples(hotpotqa_path(), 2), n_agents=3, seed=0)
    path = tmp_path / "agents.jsonl"
    built.write(path)
    assert workloads.Workload.read(path) == built
    path.write_text(path.read_text().split("\n", 1)[1])  # without its header line
    with pytest.raises(ValueError, match="workload header"):
        workloads.Workload.read(path)


def test_two_workloads_of_one_kind_keep_their_own_requests() -> None:
    """``bench run --workload rag-r80.jsonl rag-r0.jsonl``: both are named "rag"; the report keys runs by
    name, so without distinct names the second workload's requests would be sent twice."""
    from sparsex_sgl.harness.run import distinct_names

    examples = load_examples(hotpotqa_path(), 6)
    reuse, novel = workloads.rag(examples, 6, 0.8, seed=0), workloads.rag(examples, 6, 0.0, seed=0)
    named = distinct_names([reuse, novel], [Path("w/rag-r80.jsonl"), Path("w/rag-r0.jsonl")])
    assert [w.name for w in named] == ["rag:rag-r80", "rag:rag-r0"]
    assert named[0].requests == reuse.requests and named[1].requests == novel.requests
    chat_like = workloads.Workload("chat", {}, ())
    assert distinct_names([reuse, chat_like], [Path("a.jsonl"), Path("b.jsonl")])[0].name == "rag"
    with pytest.raises(SystemExit, match="appear twice"):
        distinct_names([reuse, novel], [Path("a/rag.jsonl"), Path("b/rag.jsonl")])


def test_agents_share_documents_at_different_positions() -> None:
    built = workloads.agents(load_examples(hotpotqa_path(), 3, offset=10), n_agents=4, seed=1)
    assert len(built.requests) == 12
    for task in range(3):
        group = [r for r in built.requests if r.tags["task"] == task]
        sets = [frozenset(_segments(r)) for r in group]
        assert len(set(sets)) == 1 and len(sets[0]) == 11  # 10 documents + the search listing, shared
        orders = [tuple(_segments(r)) for r in group]
        assert len(set(orders)) == 4  # each agent sees them in its own order
        systems = {r.messages[0].pieces[0].text for r in group}
        assert len(systems) == 4  # and after its own system prompt
        assert [r.tags["reuse"] for r in group] == ["novel", "segments", "segments", "segments"]


def test_chat_edits_keep_the_prefix_and_change_the_rest() -> None:
    conversations = workloads.sharegpt_conversations(sharegpt_path(), 6, min_user_turns=3, max_chars=400)
    assert len(conversations) == 6 and all(len(c) >= 6 for c in conversations)
    built = workloads.chat(conversations, rounds=3, seed=2)
    by_conversation: dict[int, list[workloads.WorkloadRequest]] = {}
    for request in built.requests:
        by_conversation.setdefault(request.tags["conversation"], []).append(request)
    for rounds in by_conversation.values():
        rounds.sort(key=lambda q: q.tags["round"])
        assert rounds[0].tags["reuse"] == "novel" and len(rounds[0].messages) == 1
        for previous, current in itertools.pairwise(rounds):
            old, new = _segments(previous), _segments(current)
            if current.tags.get("edit_round") == current.tags["round"]:
                turn = 2 * (current.tags["edited_turn"] - 1)
                assert new[:turn] == old[:turn]  # the prefix before the edit is unchanged
                assert new[turn] != old[turn]  # the edited turn (or the inserted one) differs
                assert set(old[turn + 1:]) <= set(new)  # the later turns come back, shifted: segment reuse
            else:
                assert new[: len(old)] == old  # plain follow-up round: the history is a prefix
            assert current.messages[-1].role == "user"


def test_render_tokenizes_each_segment_alone() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    request = workloads.agents(load_examples(hotpotqa_path(), 1), n_agents=2, seed=0).requests[1]
    ids, spans = render(request, tokenizer)
    segments = _segments(request)
    assert len(spans) == len(segments)
    for (start, end), text in zip(spans, segments):
        assert ids[start:end] == tokenizer(text, add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n" + request.messages[0].pieces[0].text)
    assert text.endswith("<|im_start|>assistant\n")


def test_quality_metrics() -> None:
    assert quality.gold_scores("The Eiffel Tower.\nIt is in Paris.", ["Eiffel Tower"]) == (1.0, 1.0)
    em, f1 = quality.gold_scores("Paris, France", ["paris"])
    assert em == 0.0 and f1 == pytest.approx(2 / 3)
    agree = quality.agreement({"a": "yes", "b": "no idea", "c": ""}, {"a": "yes", "b": "no", "c": ""})
    assert agree == {"compared": 3, "equal_to_full": pytest.approx(2 / 3),
                     "answer_f1_vs_full": pytest.approx((1 + 2 / 3 + 1) / 3)}


def test_poisson_arrivals_have_the_asked_rate() -> None:
    times = arrival_times(4000, rate=2.0, seed=5)
    assert times[0] == 0.0 and times == sorted(times)
    # mean gap 1/rate = 0.5 s; over 3,999 exponential gaps the standard error is 0.5/sqrt(3999) = 0.008
    assert (times[-1] / 3999) == pytest.approx(0.5, abs=0.03)
    assert arrival_times(3, None, 0) == [0.0, 0.0, 0.0]


def test_plain_requests_carry_no_segment_data() -> None:
    """``bench run --plain`` sends the same token ids as a client that marks no segments."""
    from sparsex_sgl.harness.run import _prepare

    marked = _prepare("r", [5, 6, 7], [(0, 2)], 4, plain=False).body()
    plain = _prepare("r", [5, 6, 7], [(0, 2)], 4, plain=True).body()
    assert marked["sampling_params"]["custom_params"] == {"sparsex_spans": [0, 2]}
    assert "custom_params" not in plain["sampling_params"] and plain["input_ids"] == marked["input_ids"]
