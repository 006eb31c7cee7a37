"""``sparsex-sgl eval fidelity``: how close each reuse method stays to exact full prefill.

Per question (HotpotQA, or SQuAD v2 with the gold paragraph among nine of its article: ``eval.squad``):
the 10 paragraphs in a shuffled order are segments, and the instruction is an exact prefix. How the
paragraphs' KV was cached is ``CACHE_SOURCES``: each alone from position 0 (the default), or from an exact
prefill of the same prompt in another order. Full prefill of the prompt is the reference; every method
prefills the same prompt from the cache. Metrics per method:

- ``kl_mean``: KL(full || method) of the next-token distribution at the answer start;
- ``top1_agree``: share of 16 teacher-forced answer steps (full prefill's greedy tokens as history)
  where the method's top-1 equals full prefill's greedy token;
- ``greedy_exact``: share of questions whose 16 greedy tokens equal full prefill's;
- ``f1`` / ``em``: token F1 and exact match of the greedy answer (up to its first line break or end of
  turn) against the best gold answer, with the standard SQuAD normalisation;
- ``recompute_frac``: share of prompt tokens computed in the sparse layers;
- ``flops_frac``: modeled prefill FLOPs as a fraction of full prefill's (a look-ahead pass included).

Protocol: signals and their parameters are chosen on development questions (``SPLITS``), then reported
on the held-out ones; a run that mixes the two is refused, and the report says which split it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sparsex_sgl.assets import hotpotqa_path, resolve_model
from sparsex_sgl.core.prewarm import chat_frame
from sparsex_sgl.eval import hotpotqa, squad
from sparsex_sgl.eval.hotpotqa import QAExample, SegmentedPrompt, build_prompt, first_line, gold_scores
from sparsex_sgl.eval.methods import MASS_PRIOR, METHODS, SPARSEX_SIGNALS, method_config
from sparsex_sgl.reference.cache import ReferenceSegmentCache
from sparsex_sgl.reference.executor import PrefillResult, ReferenceExecutor, ReuseSetting

ANSWER_TOKENS = 16
METRICS = ("kl_mean", "top1_agree", "greedy_exact", "f1", "em", "recompute_frac", "flops_frac")
"""Per-method figures, each a mean over questions."""
PER_QUESTION = ("kl", "f1", "em", "greedy_exact", "recompute_frac")
"""Per-method figures also kept question by question (``report["per_question"]``), for medians and paired
comparisons between methods: KL is heavy-tailed and F1 differences are small against their spread."""
TASKS = ("hotpotqa", "squad")
SPLITS: dict[str, dict[str, tuple[int, int]]] = {
    "hotpotqa": {"heldout": (0, 200), "dev": (500, 3000)},
    "squad": {"heldout": (0, 200), "dev": (1000, 3000)},
}
"""Question index ranges ``[start, end)`` per task: signals and parameters are chosen on ``dev`` only, and
``heldout`` is what the README reports."""
CACHE_SOURCES = ("alone", "sink", "other-order")
"""Where the reused paragraphs' KV comes from. ``alone``: each paragraph prefilled by itself from position 0
(the CacheBlend paper's protocol, and the harshest: a paragraph's KV has seen no other text, and its first
token was an attention sink). ``sink``: each paragraph prefilled alone behind the chat template's opening
and cached without it, as the server's pre-warm path caches a corpus (``core.prewarm``). ``other-order``: the same prompt with the paragraphs in another shuffle,
prefilled exactly and stored as the server stores a served request, so each paragraph's KV has seen the
instruction and the paragraphs before it there; the traffic the project is built for (RAG chunks that come
back in another order)."""


def split_of(task: str, offset: int, n: int) -> str:
    """The split questions ``offset .. offset + n`` lie in ("other" outside both); raises if they straddle."""
    for name, (start, end) in SPLITS[task].items():
        inside = max(0, min(end, offset + n) - max(start, offset))
        if inside == n:
            return name
        if inside:
            raise SystemExit(f"questions {offset}..{offset + n - 1} of {task} straddle its {name} split "
                             f"{start}..{end - 1}: development and held-out questions are never mixed")
    return "other"


def load_task(task: str, n: int, offset: int) -> list[QAExample]:
    if task == "hotpotqa":
        return hotpotqa.load_examples(hotpotqa_path(), n, offset)
    if task == "squad":
        return squad.load_examples(squad.squad_path(hotpotqa_path().parent), n, offset)
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


@dataclass(frozen=True)
class MethodRun:
    """One method at one setting; ``name`` is the key in the report."""

    name: str
    method: str
    config: ReuseSetting | None
    ratio: float | None
    full_layers: int | None
    mass_prior: float | None = None
    signal: str | None = None
    coverage: float | None = None
    chunk_start: int | None = None


def method_runs(methods: list[str], ratios: list[float], full_layers: list[int],
                mass_priors: list[float] | None = None, signals: list[str] | None = None,
                coverages: list[float] | None = None, coverage_signals: list[str] | None = None) -> list[MethodRun]:
    """Expand methods over the settings they depend on; names carry a setting only when several are swept.

    ``mass_priors`` (``SelectionConfig.mass_prior``; default: the shipped value), ``signals`` (keys of
    ``methods.SPARSEX_SIGNALS``; default: the shipped ``sparse_q``) and ``coverages`` (adaptive budget; 0:
    the fixed ratio) expand SparseX only, the priors only its signals that weigh deviation by mass
    (``sparse_q``, ``lookahead_q``); ``coverage_signals`` (default: every signal) limits the adaptive
    budgets to those signals, the others run at the fixed ratio. A SparseX signal other than ``sparse_q``
    is named ``sparsex:<signal>``."""
    priors, signals, coverages = mass_priors or [MASS_PRIOR], signals or ["sparse_q"], coverages or [0.0]
    many = len(ratios) > 1 or len(full_layers) > 1
    runs: list[MethodRun] = []
    for method in methods:
        uses_ratio = method in ("cacheblend", "epic", "sparsex")
        uses_layers = method in ("cacheblend", "sparsex")
        sparsex = method == "sparsex"
        for ratio in ratios if uses_ratio else [None]:
            for layers in full_layers if uses_layers else [None]:
                for signal in signals if sparsex else [None]:
                    uses_prior = signal is not None and SPARSEX_SIGNALS[signal].get("selection", "sparse_q") == "sparse_q"
                    for prior in priors if uses_prior else [None]:
                        adaptive = sparsex and (coverage_signals is None or signal in coverage_signals)
                        for coverage in coverages if adaptive else [0.0] if sparsex else [None]:
                            cfg = method_config(method, ratio or 0.0, layers or 0, signal or "sparse_q",
                                                coverage or 0.0)
                            if cfg is not None and prior is not None:
                                cfg = dataclasses.replace(cfg, selection=dataclasses.replace(cfg.selection,
                                                                                              mass_prior=prior))
                            setting = []
                            if many and uses_ratio:
                                setting += [f"r={ratio}"] + ([f"L={layers}"] if uses_layers else [])
                            if len(priors) > 1 and prior is not None:
                                setting.append(f"prior={prior}")
                            if coverage:
                                setting.append(f"cov={coverage}")
                            label = method if signal in (None, "sparse_q") else f"{method}:{signal}"
                            suffix = f"[{','.join(setting)}]" if setting else ""
                            runs.append(MethodRun(label + suffix, method, cfg, ratio, layers, prior, signal,
                                                  coverage))
    return runs


def with_chunk_starts(runs: list[MethodRun], chunk_starts: list[int]) -> list[MethodRun]:
    """Each scored run (CacheBlend-style, SparseX) once per chunk start ``k``, named ``<name>[k=K]``: the first
    ``k`` tokens of every moved segment forced into its recompute set, within its budget (EPIC's fix for
    chunk starts, as a knob of the scored policies: ``SelectionConfig.min_tokens_per_segment``). Without
    the option each method keeps its own (CacheBlend-style 0, SparseX 1, the server's default)."""
    out = []
    for run in runs:
        if run.method not in ("cacheblend", "sparsex") or run.config is None:
            out.append(run)
            continue
        for k in chunk_starts:
            selection = dataclasses.replace(run.config.selection, min_tokens_per_segment=k)
            out.append(dataclasses.replace(run, name=f"{run.name}[k={k}]", chunk_start=k,
                                           config=dataclasses.replace(run.config, selection=selection)))
    return out


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(reference || other) of the softmax distributions, in nats."""
    log_p = torch.log_softmax(reference_logits.double(), dim=-1)
    log_q = torch.log_softmax(logits.double(), dim=-1)
    return float((log_p.exp() * (log_p - log_q)).sum())


def answer_text(tokenizer: Any, tokens: list[int]) -> str:
    """The answer a reader sees: greedy tokens up to the end of turn, decoded, up to the first line break."""
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    for index, token in enumerate(tokens):
        if token in stops:
            tokens = tokens[:index]
            break
    return first_line(str(tokenizer.decode(tokens, skip_special_tokens=True)))


def load_executor(model: str) -> tuple[ReferenceExecutor, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return ReferenceExecutor(hf_model), tokenizer


def evaluate(
    executor: ReferenceExecutor,
    tokenizer: Any,
    n: int,
    offset: int,
    runs: list[MethodRun],
    seed: int = 0,
    progress: bool = True,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
    resume: dict[str, Any] | None = None,
    task: str = "hotpotqa",
    cached: str = "alone",
) -> dict[str, Any]:
    """Run every method on ``n`` questions of ``task`` from ``offset``; returns the report dict.

    ``checkpoint`` gets the report over the questions done so far after each question (``meta.n`` says
    how many), so a long sweep that is stopped keeps its figures. ``resume`` is such a report of the
    same sweep: its questions are not run again, and the new ones are averaged in with them. ``cached``:
    where the paragraphs' KV comes from (``CACHE_SOURCES``); another order is the shuffle of ``seed + 1``."""
    if cached not in CACHE_SOURCES:
        raise ValueError(f"unknown cache source {cached!r}; choose one of {CACHE_SOURCES}")
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    per_question: dict[str, dict[str, list[float]]] = {run.name: {key: [] for key in PER_QUESTION} for run in runs}
    skip, prompt_tokens, earlier_seconds = 0, 0, 0.0
    if resume is not None:
        skip = int(resume["meta"]["n"])
        for name, metrics in resume["methods"].items():
            for key in METRICS:
                totals[name][key] = metrics[key] * skip
        per_question = {name: {key: list(values) for key, values in figures.items()}
                        for name, figures in resume["per_question"].items()}
        if n > skip and any(set(figures) != set(PER_QUESTION) for figures in per_question.values()):
            raise SystemExit(f"--resume: the report keeps {sorted(next(iter(per_question.values())))} per question, "
                             f"this version {list(PER_QUESTION)}; it can be read, not extended")
        prompt_tokens = round(resume["meta"]["mean_prompt_tokens"] * skip)
        earlier_seconds = float(resume["meta"]["seconds"])
    examples = load_task(task, n - skip, offset + skip) if n > skip else []
    started = time.perf_counter() - earlier_seconds
    context = _Context(runs, offset, seed, task, executor, cached)
    sink = tokenizer(chat_frame(tokenizer)[0], add_special_tokens=False)["input_ids"]
    report = _report(totals, per_question, context, skip, prompt_tokens, started) if skip else {}
    for done, example in enumerate(tqdm(examples, desc="fidelity", unit="q", disable=not progress), start=skip + 1):
        prompt = build_prompt(tokenizer, example, seed)
        prompt_tokens += len(prompt.input_ids)
        full = executor.prefill_full(prompt.input_ids, extra_capacity=ANSWER_TOKENS)
        full_greedy = executor.greedy_decode(full, ANSWER_TOKENS)
        full_flops = full.stats.flops
        cache = ReferenceSegmentCache(executor, num_slots=2 * len(prompt.input_ids) + 2)
        fill_cache(cache, prompt, build_prompt(tokenizer, example, seed + 1) if cached == "other-order" else None,
                   sink if cached == "sink" else ())
        # Every method's prefill from one lookup, then one batched decode of all of them (same figures as
        # one method at a time; the full layers and the decode weight reads are shared).
        approximate = [index for index, run in enumerate(runs) if run.config is not None]
        configs = [run.config for run in runs if run.config is not None]
        reuse_results = cache.prefill_many(prompt.input_ids, prompt.spans, configs, extra_capacity=ANSWER_TOKENS)
        results: list[PrefillResult] = [full] * len(runs)
        greedy_all = [full_greedy] * len(runs)
        for index, result, tokens in zip(approximate, reuse_results,
                                         executor.greedy_decode_many(reuse_results, ANSWER_TOKENS), strict=True):
            results[index], greedy_all[index] = result, tokens
        forced_all = executor.teacher_forced_argmax_many(results, full_greedy)
        for run, result, forced, greedy in zip(runs, results, forced_all, greedy_all, strict=True):
            em, f1 = gold_scores(answer_text(tokenizer, greedy), example.answers)
            figures = {
                "kl": kl_divergence(full.logits, result.logits),
                "top1_agree": sum(a == b for a, b in zip(forced, full_greedy)) / ANSWER_TOKENS,
                "greedy_exact": float(greedy == full_greedy),
                "f1": f1,
                "em": em,
                "recompute_frac": result.stats.recompute_frac,
                "flops_frac": result.stats.flops / full_flops,
            }
            for key, value in figures.items():
                totals[run.name]["kl_mean" if key == "kl" else key] += value
            for key in PER_QUESTION:
                per_question[run.name][key].append(figures[key])
        report = _report(totals, per_question, context, done, prompt_tokens, started)
        if checkpoint is not None:
            checkpoint(report)
    return report


def fill_cache(cache: ReferenceSegmentCache, prompt: SegmentedPrompt, earlier: SegmentedPrompt | None,
               sink: Sequence[int] = ()) -> None:
    """Cache ``prompt``'s instruction and paragraphs: each paragraph alone (behind ``sink``, if given) when
    ``earlier`` is None, else ``earlier`` (the same paragraphs in another order) prefilled exactly and stored
    whole."""
    executor = cache.executor
    if earlier is not None:
        cache.store(earlier.input_ids, earlier.spans, executor.prefill_full(earlier.input_ids))
        return
    head = prompt.input_ids[: prompt.head_len]
    cache.store(head, [], executor.prefill_full(head))
    for index in range(len(prompt.spans)):
        cache.fill_segment(prompt.segment_ids(index), sink)


@dataclass(frozen=True)
class _Context:
    """What every checkpoint of one sweep reports besides its figures."""

    runs: list[MethodRun]
    offset: int
    seed: int
    task: str
    executor: ReferenceExecutor
    cached: str


def _report(totals: dict[str, dict[str, float]], per_question: dict[str, dict[str, list[float]]],
            context: _Context, n: int, prompt_tokens: int, started: float) -> dict[str, Any]:
    report: dict[str, Any] = {"methods": {}, "per_question": per_question}
    for run in context.runs:
        metrics: dict[str, Any] = {key: totals[run.name][key] / n for key in METRICS}
        metrics["kl_median"] = statistics.median(per_question[run.name]["kl"])
        metrics.update(method=run.method, ratio=run.ratio, full_layers=run.full_layers, mass_prior=run.mass_prior,
                       signal=run.signal, coverage=run.coverage, chunk_start=run.chunk_start)
        report["methods"][run.name] = metrics
    executor = context.executor
    report["meta"] = {
        "n": n,
        "task": context.task,
        "split": split_of(context.task, context.offset, n),
        "offset": context.offset,
        "seed": context.seed,
        "cached": context.cached,
        "mean_prompt_tokens": prompt_tokens / n,
        "answer_tokens": ANSWER_TOKENS,
        "architecture": executor.spec.architecture,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return report


def format_table(report: dict[str, Any]) -> str:
    header = ("| method | KL(full‖m) mean | KL median | top-1 agree | greedy exact | F1 | EM | recompute frac "
              "| FLOPs frac |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for name, m in report["methods"].items():
        lines.append(
            f"| {name} | {m['kl_mean']:.4f} | {m['kl_median']:.4f} | {m['top1_agree']:.3f} | {m['greedy_exact']:.2f} | {m['f1']:.3f} "
            f"| {m['em']:.3f} | {m['recompute_frac']:.3f} | {m['flops_frac']:.3f} |"
        )
    return "\n".join(lines)


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2",
                        help="'smollm2', 'qwen2.5-0.5b', 'qwen2.5-1.5b' or a path to an HF model folder")
    parser.add_argument("--data", default="hotpotqa", choices=TASKS,
                        help="hotpotqa, or squad (gold paragraph among nine of its article)")
    parser.add_argument("--n", type=int, default=10, help="number of questions")
    parser.add_argument("--offset", type=int, default=0, help="index of the first question")
    parser.add_argument("--ratio", type=parse_floats, default=[0.15], help="recompute ratio(s), comma-separated")
    parser.add_argument("--full-layers", type=parse_ints, default=[2], help="L_full value(s), comma-separated")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--mass-prior", type=parse_floats, default=[MASS_PRIOR],
                        help="SparseX's mass_prior value(s), comma-separated (core.selection.sparse_q_signal)")
    parser.add_argument("--signals", default="sparse_q",
                        help=f"SparseX signal(s), comma-separated, from {','.join(SPARSEX_SIGNALS)}")
    parser.add_argument("--coverage", type=parse_floats, default=[0.0],
                        help="SparseX adaptive budget(s): share of the signal to cover, at most --ratio (0: fixed)")
    parser.add_argument("--coverage-signals", default=None,
                        help="signals that get the --coverage budgets (default: all); the others run at --ratio")
    parser.add_argument("--chunk-start", type=parse_ints, default=None,
                        help="chunk-start value(s) k, comma-separated: CacheBlend-style and SparseX once per k, the "
                             "first k tokens of every moved segment forced into the recompute set (default: each "
                             "method's own, 0 and 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the paragraph shuffles")
    parser.add_argument("--cached", default="alone", choices=CACHE_SOURCES,
                        help="where the paragraphs' KV comes from: each alone from position 0, each alone behind "
                             "the chat template's opening (as the server pre-warms a corpus), or an exact prefill of "
                             "the same prompt in another order (as served traffic caches it)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--resume", action="store_true",
                        help="continue the report at --out (same settings, any --n): its questions are kept")
    parser.set_defaults(run=run)


def _resumable(out: Path | None, grid: str) -> dict[str, Any] | None:
    """The report at ``out`` if it is this sweep's (same settings); None if there is none yet."""
    if out is None:
        raise SystemExit("--resume needs --out")
    if not out.exists():
        return None
    report: dict[str, Any] = json.loads(out.read_text())
    if report.get("meta", {}).get("grid") != grid:
        raise SystemExit(f"--resume: {out} was made with other settings ({report.get('meta', {}).get('grid')!r}); "
                         f"this run has {grid!r}")
    return report


def sweep_grid(args: argparse.Namespace) -> str:
    """Every setting that decides a question's figures, as the report's ``meta.grid``: ``--resume`` continues
    a report only under the same grid, so a changed default (``MASS_PRIOR``) cannot mix two settings in one
    report. Settings added after reports were written appear only when they differ from their default, so
    the older reports keep resuming."""
    grid = (
        f"--model {args.model} --data {args.data} --offset {args.offset} --ratio {','.join(map(str, args.ratio))} "
        f"--full-layers {','.join(map(str, args.full_layers))} --methods {args.methods} "
        f"--mass-prior {','.join(map(str, args.mass_prior))} --seed {args.seed}"
    )
    if args.signals != "sparse_q" or args.coverage != [0.0]:
        grid += f" --signals {args.signals} --coverage {','.join(map(str, args.coverage))}"
    if args.coverage_signals:
        grid += f" --coverage-signals {args.coverage_signals}"
    if args.cached != "alone":
        grid += f" --cached {args.cached}"
    if args.chunk_start is not None:
        grid += f" --chunk-start {','.join(map(str, args.chunk_start))}"
    return grid


def run(args: argparse.Namespace) -> None:
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    executor, tokenizer = load_executor(args.model)
    signals = args.signals.split(",")
    unknown = set(signals) - set(SPARSEX_SIGNALS)
    if unknown:
        raise SystemExit(f"unknown signals {sorted(unknown)}; choose from {tuple(SPARSEX_SIGNALS)}")
    split_of(args.data, args.offset, args.n)
    coverage_signals = args.coverage_signals.split(",") if args.coverage_signals else None
    if coverage_signals is not None and not set(coverage_signals) <= set(signals):
        raise SystemExit(f"--coverage-signals {sorted(set(coverage_signals) - set(signals))} are not in --signals")
    runs = method_runs(methods, args.ratio, args.full_layers, args.mass_prior, signals, args.coverage,
                       coverage_signals)
    if args.chunk_start is not None:
        runs = with_chunk_starts(runs, args.chunk_start)
    grid = sweep_grid(args)
    command = f"sparsex-sgl eval fidelity --n {args.n} {grid}"
    resume = _resumable(args.out, grid) if args.resume else None

    def checkpoint(partial: dict[str, Any]) -> None:
        if args.out:
            partial["meta"].update(command=command, grid=grid)
            write_atomic(args.out, partial)

    report = evaluate(executor, tokenizer, args.n, args.offset, runs, seed=args.seed, checkpoint=checkpoint,
                      resume=resume, task=args.data, cached=args.cached)
    report["meta"].update(command=command, grid=grid)
    print(format_table(report))
    meta = report["meta"]
    print(f"{meta['n']} questions, {meta['mean_prompt_tokens']:.0f} prompt tokens on average, {meta['seconds']} s")
    if args.out:
        write_atomic(args.out, report)
        print(f"wrote {args.out}")


def write_atomic(path: Path, report: dict[str, Any]) -> None:
    """Write the JSON beside ``path`` and rename it over: a sweep killed mid-write leaves the last whole
    checkpoint, never a truncated one that ``--resume`` cannot read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(report, indent=2))
    os.replace(staging, path)
