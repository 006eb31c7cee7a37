"""Answer quality of a run: EM / F1 against gold answers, and agreement with a full-prefill run.

The answer a user reads is the generated text up to its first line break (the prompts ask for a short
answer). EM and F1 use the standard SQuAD normalisation, maxed over the gold answers. Agreement with
full prefill (a stock server with ``--disable-radix-cache``, greedy) is exact equality of the whole
generated text, plus the token F1 between the two answers as a softer measure.
"""

from __future__ import annotations

from collections.abc import Mapping

from sparsex_sgl.eval.hotpotqa import exact_match, f1_score, first_line, gold_scores

__all__ = ["agreement", "gold_scores"]


def agreement(texts: Mapping[str, str], reference: Mapping[str, str]) -> dict[str, float | int]:
    """How often ``texts`` equal the reference run's texts, over the requests both completed."""
    common = [rid for rid in texts if rid in reference]
    if not common:
        return {"compared": 0}
    equal = sum(texts[rid] == reference[rid] for rid in common)
    answer_f1 = sum(_answer_f1(first_line(texts[rid]), first_line(reference[rid])) for rid in common)
    return {"compared": len(common), "equal_to_full": equal / len(common), "answer_f1_vs_full": answer_f1 / len(common)}


def _answer_f1(answer: str, reference: str) -> float:
    """Token F1 between two answers; two answers that normalise alike (both empty included) score 1."""
    return 1.0 if exact_match(answer, reference) else f1_score(answer, reference)
