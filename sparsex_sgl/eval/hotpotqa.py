"""HotpotQA (distractor dev set) as segment-structured prompts.

Each question's 10 Wikipedia paragraphs become 10 reusable segments in a seeded random order, between
an instruction (a gap piece shared by every prompt) and the question (a new piece). Pieces are
tokenized one by one and concatenated, so segment boundaries are token-exact and a paragraph has the
same token ids wherever it appears, which is what reuse requires.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from sparsex_sgl.core.prewarm import chat_frame

INSTRUCTION = "Answer the question using the documents below. Reply with a short answer only.\n\n"


@dataclass(frozen=True)
class SegmentedPrompt:
    """Token ids of a prompt and the spans ``[start, end)`` of its reusable segments."""

    input_ids: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]
    head_len: int

    def segment_ids(self, index: int) -> tuple[int, ...]:
        start, end = self.spans[index]
        return self.input_ids[start:end]


@dataclass(frozen=True)
class QAExample:
    """A question over reusable paragraphs (HotpotQA, ``squad``); ``answers``: every gold answer."""

    qid: str
    question: str
    answers: tuple[str, ...]
    paragraphs: tuple[str, ...]

    @property
    def answer(self) -> str:
        return self.answers[0]


@lru_cache(maxsize=2)
def _load(path: str) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text())


def load_examples(path: Path, n: int, offset: int = 0) -> list[QAExample]:
    rows = _load(str(path))
    if offset < 0 or n < 1 or offset + n > len(rows):
        raise ValueError(f"--offset {offset} and --n {n} must select within the {len(rows)} questions")
    return [
        QAExample(
            row["_id"],
            row["question"],
            (row["answer"],),
            tuple(f"Document: {title}\n{''.join(sents).strip()}\n\n" for title, sents in row["context"]),
        )
        for row in rows[offset : offset + n]
    ]


def build_prompt(tokenizer: Any, example: QAExample, seed: int) -> SegmentedPrompt:
    """Instruction, the paragraphs in a shuffled order (seeded per question), then the question."""
    head, tail = chat_frame(tokenizer)
    order = list(example.paragraphs)
    random.Random(f"{seed}:{example.qid}").shuffle(order)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = encode(head + INSTRUCTION)
    head_len = len(ids)
    spans = []
    for paragraph in order:
        piece = encode(paragraph)
        spans.append((len(ids), len(ids) + len(piece)))
        ids += piece
    ids += encode(f"Question: {example.question}{tail}")
    return SegmentedPrompt(tuple(ids), tuple(spans), head_len)


def first_line(text: str) -> str:
    """The answer a reader sees in a generated text: its first line (the prompts ask for a short answer)."""
    return text.strip().split("\n", 1)[0].strip()


def normalize_answer(text: str) -> str:
    """SQuAD answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1_score(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def gold_scores(text: str, answers: Sequence[str]) -> tuple[float, float]:
    """(EM, F1) of a generated text against the best of ``answers``, read up to its first line break."""
    answer = first_line(text)
    return max(exact_match(answer, g) for g in answers), max(f1_score(answer, g) for g in answers)
