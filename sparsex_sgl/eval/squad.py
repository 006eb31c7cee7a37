"""SQuAD v2 as a task where the question decides which reused segment matters.

HotpotQA's questions need two gold paragraphs among eight distractors from other topics. Here each
answerable SQuAD v2 dev question gets its one gold paragraph among nine other paragraphs **of the same
Wikipedia article**: every segment is on the question's topic, so only reading for the question (not
salience to the prompt as a whole) finds the one that answers it. The ten paragraphs are reused
segments in a new seeded order per question (``hotpotqa.build_prompt``); answers are scored against every
gold answer (EM / F1, SQuAD normalisation). Unanswerable questions are left out: a reuse method cannot
be scored against a gold answer that is not there.

Questions come in a fixed seeded shuffle of all answerable ones (the file groups them by article), so an
offset range spans many articles; ``eval.fidelity.SPLITS`` keeps development and held-out ranges apart.
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path

from sparsex_sgl.eval.hotpotqa import QAExample

PARAGRAPHS_PER_PROMPT = 10
ORDER_SEED = "squad-v2-answerable"


def squad_path(data_dir: Path) -> Path:
    return data_dir / "squad.json"


@lru_cache(maxsize=1)
def _questions(path: str) -> tuple[tuple[str, str, tuple[str, ...], str, tuple[str, ...]], ...]:
    """(qid, question, answers, gold paragraph, the article's other paragraphs) of every answerable
    question, in the fixed shuffled order."""
    articles = json.loads(Path(path).read_text())["data"]
    rows = []
    for article in articles:
        title = article["title"].replace("_", " ")
        texts = [f"Document: {title}\n{p['context'].strip()}\n\n" for p in article["paragraphs"]]
        for index, paragraph in enumerate(article["paragraphs"]):
            others = tuple(texts[:index] + texts[index + 1 :])
            for qa in paragraph["qas"]:
                if qa["is_impossible"] or not qa["answers"]:
                    continue
                answers = tuple(dict.fromkeys(a["text"] for a in qa["answers"]))
                rows.append((qa["id"], qa["question"], answers, texts[index], others))
    random.Random(ORDER_SEED).shuffle(rows)
    return tuple(rows)


def load_examples(path: Path, n: int, offset: int = 0) -> list[QAExample]:
    """Questions ``offset .. offset + n`` of the shuffled answerable ones, each with its gold paragraph first
    and nine others of its article (seeded per question; ``build_prompt`` shuffles the order)."""
    rows = _questions(str(path))
    if offset < 0 or n < 1 or offset + n > len(rows):
        raise ValueError(f"--offset {offset} and --n {n} must select within the {len(rows)} answerable questions")
    examples = []
    for qid, question, answers, gold, others in rows[offset : offset + n]:
        if len(others) < PARAGRAPHS_PER_PROMPT - 1:
            raise ValueError(f"question {qid}: its article has {len(others) + 1} paragraphs, fewer than "
                             f"{PARAGRAPHS_PER_PROMPT}")
        distractors = random.Random(f"{ORDER_SEED}:{qid}").sample(others, PARAGRAPHS_PER_PROMPT - 1)
        examples.append(QAExample(qid, question, answers, (gold, *distractors)))
    return examples
