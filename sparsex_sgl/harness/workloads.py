"""Benchmark workloads from real data, seeded, as replayable JSONL.

A request is a chat: messages whose content is a list of text pieces, each marked as a reusable
segment or not. The text stays model-independent; ``render`` turns it into token ids and segment
spans for one tokenizer, each piece tokenized alone, and every system under test gets those same ids.

- ``rag``: HotpotQA questions, their 10 paragraphs as segments in a fresh order per request. The
  ``reuse`` knob is the share of requests that come back to documents an earlier request brought
  (a repeat question over the same paragraphs, shuffled), hence the share of segments seen before.
- ``chat``: ShareGPT conversations replayed round by round (the history resent each round, every turn a
  segment). At one round per conversation an earlier user turn is edited, or a new exchange is inserted
  before it; from then on the history differs from what was cached after that point, so only segment
  reuse (not prefix reuse) covers the turns after the edit.
- ``agents``: several agents, each with its own system prompt, work on the same task: a HotpotQA question
  with its paragraphs and a search-tool listing. Each agent sees the shared documents in its own order
  and at its own offset (cross-agent reuse).

Every request carries ``tags`` saying what could be reused (``novel``: nothing seen before).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sparsex_sgl.core.protocol import TextPiece
from sparsex_sgl.eval.hotpotqa import INSTRUCTION, QAExample

WORKLOADS = ("rag", "chat", "agents")


@dataclass(frozen=True)
class Message:
    role: str
    pieces: tuple[TextPiece, ...]

    @classmethod
    def of(cls, role: str, *pieces: TextPiece) -> Message:
        return cls(role, tuple(pieces))


@dataclass(frozen=True)
class WorkloadRequest:
    """One request of a workload: ``answers`` are gold answers when the task has them."""

    id: str
    workload: str
    messages: tuple[Message, ...]
    max_new_tokens: int
    answers: tuple[str, ...] = ()
    tags: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "request", **asdict(self)}

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> WorkloadRequest:
        messages = tuple(
            Message(m["role"], tuple(TextPiece(p["text"], bool(p["segment"])) for p in m["pieces"])) for m in row["messages"]
        )
        return cls(row["id"], row["workload"], messages, int(row["max_new_tokens"]), tuple(row.get("answers", ())),
                   dict(row.get("tags", {})))


@dataclass(frozen=True)
class Workload:
    name: str
    params: dict[str, Any]
    requests: tuple[WorkloadRequest, ...]

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as out:
            out.write(json.dumps({"kind": "workload", "name": self.name, "params": self.params}) + "\n")
            for request in self.requests:
                out.write(json.dumps(request.to_json()) + "\n")

    @classmethod
    def read(cls, path: Path) -> Workload:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not rows or rows[0].get("kind") != "workload":
            raise ValueError(f"{path}: the first line must be the workload header ({{'kind': 'workload', ...}})")
        requests = tuple(WorkloadRequest.from_json(row) for row in rows[1:])
        return cls(rows[0]["name"], rows[0]["params"], requests)


# ---------------------------------------------------------------------------------------------- RAG
def _new_order(paragraphs: Sequence[str], rng: random.Random, seen_orders: set[tuple[str, ...]]) -> list[str]:
    """A shuffle not sent before (so a repeat never becomes an exact-prefix hit for either system)."""
    order = list(paragraphs)
    for _ in range(100):
        rng.shuffle(order)
        if tuple(order) not in seen_orders:
            break
    seen_orders.add(tuple(order))
    return order


def rag(examples: Sequence[QAExample], n_requests: int, reuse: float, seed: int,
        max_new_tokens: int = 16) -> Workload:
    """``n_requests`` HotpotQA requests; ``round(reuse * (n_requests - 1))`` of them revisit earlier documents."""
    if not 0.0 <= reuse < 1.0:
        raise ValueError(f"reuse must be in [0, 1), got {reuse}")
    rng = random.Random(seed)
    n_repeats = round(reuse * (n_requests - 1))  # the first request cannot be a repeat
    n_unique = n_requests - n_repeats
    if n_unique > len(examples):
        raise ValueError(f"{n_unique} distinct questions needed, {len(examples)} given")
    kinds = ["repeat"] * n_repeats + ["new"] * (n_unique - 1)
    rng.shuffle(kinds)
    kinds.insert(0, "new")
    asked: list[QAExample] = []
    orders: dict[str, set[tuple[str, ...]]] = {}
    requests = []
    for index, kind in enumerate(kinds):
        example = examples[len(asked)] if kind == "new" else rng.choice(asked)
        if kind == "new":
            asked.append(example)
        order = _new_order(example.paragraphs, rng, orders.setdefault(example.qid, set()))
        content = (TextPiece(INSTRUCTION, False), *(TextPiece(p, True) for p in order),
                   TextPiece(f"Question: {example.question}", False))
        tags = {"reuse": "novel" if kind == "new" else "segments", "qid": example.qid,
                "segments_seen": 0 if kind == "new" else len(order), "segments": len(order)}
        requests.append(WorkloadRequest(f"rag-{index:04d}", "rag", (Message("user", content),), max_new_tokens,
                                        (example.answer,), tags))
    params = {"n_requests": n_requests, "reuse": reuse, "seed": seed, "max_new_tokens": max_new_tokens,
              "distinct_questions": n_unique, "segment_reuse_share": n_repeats / n_requests}
    return Workload("rag", params, tuple(requests))


def corpus_rag(examples: Sequence[QAExample], n_requests: int, per_request: int, zipf: float, seed: int,
               max_new_tokens: int = 4) -> Workload:
    """RAG over a corpus: the paragraphs of ``examples``, each with a Zipf popularity (rank ``r`` drawn with
    weight ``r ** -zipf``, ranks in a seeded random order); each request retrieves ``per_request`` distinct
    paragraphs by popularity, in the order drawn, and asks the question of its first paragraph. Popular
    paragraphs come back often and rare ones seldom, so a pool far smaller than the corpus keeps only part
    of what is reused (``bench/tiers.py``)."""
    rng = random.Random(seed)
    corpus = [(example, paragraph) for example in examples for paragraph in dict.fromkeys(example.paragraphs)]
    rng.shuffle(corpus)  # popularity rank = position
    weights = [(rank + 1) ** -zipf for rank in range(len(corpus))]
    requests = []
    for index in range(n_requests):
        drawn: list[int] = []
        while len(drawn) < per_request:
            pick = rng.choices(range(len(corpus)), weights)[0]
            if pick not in drawn:
                drawn.append(pick)
        example = corpus[drawn[0]][0]
        content = (TextPiece(INSTRUCTION, False), *(TextPiece(corpus[i][1], True) for i in drawn),
                   TextPiece(f"Question: {example.question}", False))
        requests.append(WorkloadRequest(f"corpus-{index:04d}", "corpus_rag", (Message("user", content),),
                                        max_new_tokens, (example.answer,), {"paragraphs": drawn}))
    params = {"n_requests": n_requests, "per_request": per_request, "zipf": zipf, "seed": seed,
              "corpus_paragraphs": len(corpus), "max_new_tokens": max_new_tokens}
    return Workload("corpus_rag", params, tuple(requests))


# --------------------------------------------------------------------------------------------- chat
def sharegpt_conversations(path: Path, limit: int, min_user_turns: int, max_chars: int) -> list[list[str]]:
    """The first ``limit`` ShareGPT conversations that alternate human/gpt with ``min_user_turns``+ user turns.

    The packaged JSON array is truncated, so objects are decoded one by one from the start; every turn
    is cut to ``max_chars`` at a word boundary to bound prompt lengths on the CPU.
    """
    text = path.read_text(encoding="utf-8", errors="replace")
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    found: list[list[str]] = []
    while len(found) < limit:
        while position < len(text) and text[position] in " \r\n\t,":
            position += 1
        try:
            row, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            break  # the truncated tail
        turns = row.get("conversations", [])
        roles = [t.get("from") for t in turns]
        if len(turns) < 2 * min_user_turns or any(r != ("human" if i % 2 == 0 else "gpt") for i, r in enumerate(roles)):
            continue
        values = [_cut(str(t.get("value", "")), max_chars) for t in turns[: 2 * (len(turns) // 2)]]
        if all(values):
            found.append(values)
    return found


def _cut(text: str, max_chars: int) -> str:
    text = text.strip()
    if len(text) <= max_chars:
        return text
    return text[:max_chars].rsplit(" ", 1)[0] + " ..."


def chat(conversations: Sequence[list[str]], rounds: int, seed: int, max_new_tokens: int = 32) -> Workload:
    """Each conversation replayed for up to ``rounds`` rounds, one edit or insertion at a random round >= 2."""
    rng = random.Random(seed)
    requests = []
    for c, turns in enumerate(conversations):
        n_rounds = min(rounds, len(turns) // 2)
        history = [("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns[: 2 * n_rounds])]
        edit_round = rng.randint(2, n_rounds) if n_rounds >= 2 else None
        edit_kind = rng.choice(("edit", "insert"))
        target = 2 * rng.randint(0, edit_round - 2) if edit_round is not None else 0  # an earlier user turn
        for r in range(1, n_rounds + 1):
            shown = list(history[: 2 * r - 1])  # earlier exchanges and this round's user turn
            tags: dict[str, Any] = {"round": r, "conversation": c, "reuse": "novel" if r == 1 else "prefix"}
            if edit_round is not None and r >= edit_round:
                shown = _edited(shown, target, edit_kind, conversations[(c + 1) % len(conversations)])
                tags.update(reuse="segments" if r == edit_round else "prefix+segments", edit=edit_kind,
                            edited_turn=target // 2 + 1, edit_round=edit_round)
            messages = tuple(Message.of(role, TextPiece(text, True)) for role, text in shown)
            requests.append(WorkloadRequest(f"chat-{c:03d}-r{r}", "chat", messages, max_new_tokens, (), tags))
    requests.sort(key=lambda q: (q.tags["round"], q.tags["conversation"]))  # conversations interleave
    params = {"conversations": len(conversations), "rounds": rounds, "seed": seed, "max_new_tokens": max_new_tokens}
    return Workload("chat", params, tuple(requests))


def _edited(shown: list[tuple[str, str]], target: int, kind: str, other: list[str]) -> list[tuple[str, str]]:
    """``shown`` with user turn ``target`` edited (a clarification appended) or an exchange inserted before it."""
    if kind == "edit":
        role, text = shown[target]
        return [*shown[:target], (role, text + "\nPlease keep the answer short and concrete."), *shown[target + 1:]]
    return [*shown[:target], ("user", other[0]), ("assistant", other[1]), *shown[target:]]


# ------------------------------------------------------------------------------------------- agents
AGENT_PROMPTS = (
    ("You are the planner of a research team. Read the task and the material, decide which facts are needed, "
     "and state the answer in a few words."),
    ("You are a fact checker. You verify claims strictly against the documents you are given and never use "
     "outside knowledge. Give the verified answer in a few words."),
    "You are a concise assistant for a busy executive. Answers are short: a name, a number, a date or yes/no.",
    ("You are a careful analyst. Documents may contain distractors that look relevant but are not; ignore them. "
     "When two documents together answer the question, combine them. Reply with the short answer only."),
)


def _search_listing(example: QAExample) -> str:
    """A tool output the agents share: the retrieval tool's listing of the documents it found."""
    titles = [p.split("\n", 1)[0].removeprefix("Document: ") for p in example.paragraphs]
    lines = "\n".join(f"{i}. {title} (score {1.0 - i / 20:.2f})" for i, title in enumerate(titles, start=1))
    return f"Tool output (search):\n{lines}\n\n"


def agents(examples: Sequence[QAExample], n_agents: int, seed: int, max_new_tokens: int = 16) -> Workload:
    """Per task (a HotpotQA question), ``n_agents`` agents in turn; each sees the shared documents and tool
    output in its own order, after its own system prompt and, for odd agents, after the question."""
    if not 1 <= n_agents <= len(AGENT_PROMPTS):
        raise ValueError(f"n_agents must be in 1..{len(AGENT_PROMPTS)}")
    rng = random.Random(seed)
    requests = []
    for t, example in enumerate(examples):
        listing = _search_listing(example)
        for a in range(n_agents):
            docs = [TextPiece(p, True) for p in example.paragraphs]
            rng.shuffle(docs)
            material = [TextPiece(listing, True), *docs]
            question = TextPiece(f"Task: {example.question}\n\n", False)
            content = (question, *material) if a % 2 else (*material, question)
            messages = (Message.of("system", TextPiece(AGENT_PROMPTS[a], False)), Message("user", tuple(content)))
            tags = {"task": t, "agent": a, "reuse": "novel" if a == 0 else "segments", "qid": example.qid}
            requests.append(WorkloadRequest(f"agents-{t:03d}-a{a}", "agents", messages, max_new_tokens,
                                            (example.answer,), tags))
    params = {"tasks": len(examples), "agents": n_agents, "seed": seed, "max_new_tokens": max_new_tokens}
    return Workload("agents", params, tuple(requests))

