"""Behaviour pinned across the redesign of the sparse extend (plan / select / run, selection policies as
plug-ins, one seam to SGLang): on fixed requests, the rows chosen, the reused / recomputed counts and the
greedy outputs equal the values recorded *before* the redesign, by the code of commit 36352d4.

Two layers of the same promise:

- the reference executor on tiny random Llama and Qwen3 models, every recompute method and SparseX signal
  (naive, CacheBlend-, EPIC-style, ``sparse_q`` and its query-mass variants, the look-ahead pass, the
  adaptive budget), paragraphs cached alone and cached in another order;
- real ``--enable-sparsex`` SGLang servers with SmolLM2 on reordered HotpotQA prompts at two ratios, under the
  default policy, EPIC-style's and the query-mass policy over every full layer with an adaptive budget.

The recorded values are not derived from the code under test: a change in any step (the budget, a scorer,
tie breaking, the row layout, re-rotation, the sparse layers) changes a CRC or a token and fails here. To
re-record after an *intended* change of behaviour, run this file with ``SPARSEX_RECORD_PINS=1`` (and, for the
servers, ``SPARSEX_PINS_SERVER_PYTHONPATH`` naming a checkout of the code before the change) and paste what it
prints, saying in the commit why the behaviour changed.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_model

RECORD = os.environ.get("SPARSEX_RECORD_PINS") == "1"
ANSWER_TOKENS = 6


def crc(rows: Any) -> int:
    return zlib.crc32(np.asarray(rows, dtype=np.int32).tobytes())


def segmented_prompt(seed: int, order: list[int]) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """A 6-token head, four segments of 12-24 tokens in ``order``, a 9-token question; and the segments."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.randint(0, 256, (6,), generator=gen).tolist()
    segs = [torch.randint(0, 256, (int(n),), generator=gen).tolist() for n in (12, 24, 17, 20)]
    question = torch.randint(0, 256, (9,), generator=gen).tolist()
    ids, spans = list(head), []
    for index in order:
        spans.append([len(ids), len(ids) + len(segs[index])])
        ids += segs[index]
    return ids + question, spans, segs


def reference_configs() -> dict[str, Any]:
    from sparsex_sgl.eval.methods import method_config

    configs = {"naive": method_config("naive", 0.0, 0)}
    for ratio in (0.15, 0.4):
        configs[f"cacheblend[r={ratio}]"] = method_config("cacheblend", ratio, 2)
        configs[f"epic[r={ratio}]"] = method_config("epic", ratio, 0)
        for signal in ("sparse_q", "mass", "mass_all", "mass_max", "answer_mass", "lookahead", "lookahead_q"):
            configs[f"sparsex:{signal}[r={ratio}]"] = method_config("sparsex", ratio, 2, signal)
    configs["sparsex:sparse_q[r=0.4,L=1]"] = method_config("sparsex", 0.4, 1)
    configs["sparsex:mass_all[r=0.4,cov=0.5]"] = method_config("sparsex", 0.4, 2, "mass_all", 0.5)
    configs["sparsex:sparse_q[r=0.4,cov=0.3]"] = method_config("sparsex", 0.4, 2, "sparse_q", 0.3)
    return configs


REFERENCE_PINS: dict[str, dict[str, tuple[int, int, tuple[int, ...]]]] = {
    'llama/alone': {
        'naive': (0, 3704595743, (126, 110, 70, 101, 126, 39)),
        'cacheblend[r=0.15]': (11, 1256498494, (126, 110, 5, 15, 188, 229)),
        'epic[r=0.15]': (11, 3401530838, (126, 249, 171, 144, 73, 170)),
        'sparsex:sparse_q[r=0.15]': (11, 2415393675, (126, 110, 70, 101, 162, 170)),
        'sparsex:mass[r=0.15]': (11, 3176102905, (126, 110, 70, 101, 126, 255)),
        'sparsex:mass_all[r=0.15]': (11, 1710228945, (126, 110, 15, 212, 126, 255)),
        'sparsex:mass_max[r=0.15]': (11, 3664032943, (126, 110, 70, 101, 126, 255)),
        'sparsex:answer_mass[r=0.15]': (11, 3176102905, (126, 110, 70, 101, 126, 255)),
        'sparsex:lookahead[r=0.15]': (11, 3429908403, (126, 110, 70, 101, 75, 113)),
        'sparsex:lookahead_q[r=0.15]': (11, 2579825815, (126, 110, 70, 101, 126, 255)),
        'cacheblend[r=0.4]': (29, 3364395126, (126, 110, 70, 101, 162, 188)),
        'epic[r=0.4]': (29, 2339439687, (126, 110, 70, 101, 126, 203)),
        'sparsex:sparse_q[r=0.4]': (29, 2954429179, (126, 110, 188, 229, 236, 188)),
        'sparsex:mass[r=0.4]': (29, 3564315701, (126, 110, 70, 101, 126, 255)),
        'sparsex:mass_all[r=0.4]': (29, 3362748620, (126, 110, 70, 101, 162, 31)),
        'sparsex:mass_max[r=0.4]': (29, 86195998, (126, 110, 15, 212, 126, 255)),
        'sparsex:answer_mass[r=0.4]': (29, 3564315701, (126, 110, 70, 101, 126, 255)),
        'sparsex:lookahead[r=0.4]': (29, 3416731781, (126, 110, 189, 15, 188, 229)),
        'sparsex:lookahead_q[r=0.4]': (29, 1399201155, (126, 110, 188, 229, 236, 188)),
        'sparsex:sparse_q[r=0.4,L=1]': (29, 864915988, (126, 110, 70, 101, 126, 98)),
        'sparsex:mass_all[r=0.4,cov=0.5]': (29, 3362748620, (126, 110, 70, 101, 162, 31)),
        'sparsex:sparse_q[r=0.4,cov=0.3]': (19, 4234184965, (126, 110, 70, 101, 162, 170)),
    },
    'llama/other-order': {
        'naive': (0, 3989860475, (126, 45, 163, 61, 53, 193)),
        'cacheblend[r=0.15]': (11, 2097168763, (126, 110, 188, 229, 236, 188)),
        'epic[r=0.15]': (11, 3730217603, (126, 45, 163, 61, 8, 94)),
        'sparsex:sparse_q[r=0.15]': (11, 1517154711, (126, 110, 188, 229, 236, 188)),
        'sparsex:mass[r=0.15]': (11, 2846284972, (126, 249, 171, 144, 22, 161)),
        'sparsex:mass_all[r=0.15]': (11, 1897505412, (126, 249, 171, 46, 119, 240)),
        'sparsex:mass_max[r=0.15]': (11, 3465352186, (126, 249, 171, 46, 119, 240)),
        'sparsex:answer_mass[r=0.15]': (11, 2846284972, (126, 249, 171, 144, 22, 161)),
        'sparsex:lookahead[r=0.15]': (11, 451978918, (126, 249, 171, 144, 22, 161)),
        'sparsex:lookahead_q[r=0.15]': (11, 3993722918, (126, 249, 171, 144, 22, 161)),
        'cacheblend[r=0.4]': (29, 2673767919, (126, 110, 188, 229, 236, 188)),
        'epic[r=0.4]': (29, 1110403433, (126, 110, 188, 4, 24, 14)),
        'sparsex:sparse_q[r=0.4]': (29, 1344291651, (126, 110, 188, 229, 236, 188)),
        'sparsex:mass[r=0.4]': (29, 489507099, (126, 110, 188, 229, 108, 7)),
        'sparsex:mass_all[r=0.4]': (29, 19994082, (126, 110, 188, 229, 236, 188)),
        'sparsex:mass_max[r=0.4]': (29, 3430765104, (126, 251, 251, 251, 251, 251)),
        'sparsex:answer_mass[r=0.4]': (29, 489507099, (126, 110, 188, 229, 108, 7)),
        'sparsex:lookahead[r=0.4]': (29, 525345958, (126, 110, 188, 15, 9, 209)),
        'sparsex:lookahead_q[r=0.4]': (29, 749395623, (126, 110, 188, 229, 236, 188)),
        'sparsex:sparse_q[r=0.4,L=1]': (29, 4208197434, (126, 110, 188, 229, 236, 188)),
        'sparsex:mass_all[r=0.4,cov=0.5]': (29, 19994082, (126, 110, 188, 229, 236, 188)),
        'sparsex:sparse_q[r=0.4,cov=0.3]': (20, 1517708093, (126, 110, 188, 229, 236, 188)),
    },
    'qwen3/alone': {
        'naive': (0, 3704595743, (126, 110, 250, 58, 51, 24)),
        'cacheblend[r=0.15]': (11, 1182225902, (88, 58, 146, 212, 228, 149)),
        'epic[r=0.15]': (11, 3401530838, (126, 110, 250, 58, 51, 229)),
        'sparsex:sparse_q[r=0.15]': (11, 3975468959, (88, 58, 146, 212, 228, 149)),
        'sparsex:mass[r=0.15]': (11, 1861608944, (88, 58, 51, 232, 58, 51)),
        'sparsex:mass_all[r=0.15]': (11, 1050164271, (88, 58, 51, 232, 58, 51)),
        'sparsex:mass_max[r=0.15]': (11, 4182881113, (88, 58, 51, 232, 58, 51)),
        'sparsex:answer_mass[r=0.15]': (11, 1861608944, (88, 58, 51, 232, 58, 51)),
        'sparsex:lookahead[r=0.15]': (11, 581614636, (88, 58, 51, 232, 58, 51)),
        'sparsex:lookahead_q[r=0.15]': (11, 2449398799, (88, 58, 146, 212, 228, 149)),
        'cacheblend[r=0.4]': (29, 2706289890, (88, 58, 51, 232, 58, 51)),
        'epic[r=0.4]': (29, 2339439687, (126, 110, 250, 58, 51, 229)),
        'sparsex:sparse_q[r=0.4]': (29, 2063653266, (88, 58, 51, 232, 58, 51)),
        'sparsex:mass[r=0.4]': (29, 1508966776, (88, 58, 51, 232, 58, 51)),
        'sparsex:mass_all[r=0.4]': (29, 3626070411, (88, 58, 51, 232, 58, 51)),
        'sparsex:mass_max[r=0.4]': (29, 3881226227, (88, 58, 51, 232, 58, 51)),
        'sparsex:answer_mass[r=0.4]': (29, 1508966776, (88, 58, 51, 232, 58, 51)),
        'sparsex:lookahead[r=0.4]': (29, 339684327, (88, 58, 51, 232, 58, 51)),
        'sparsex:lookahead_q[r=0.4]': (29, 1176926437, (88, 58, 51, 232, 58, 51)),
        'sparsex:sparse_q[r=0.4,L=1]': (29, 864915988, (126, 110, 250, 77, 229, 192)),
        'sparsex:mass_all[r=0.4,cov=0.5]': (29, 3626070411, (88, 58, 51, 232, 58, 51)),
        'sparsex:sparse_q[r=0.4,cov=0.3]': (19, 1607275507, (88, 58, 51, 232, 58, 51)),
    },
    'qwen3/other-order': {
        'naive': (0, 3989860475, (4, 102, 126, 222, 58, 51)),
        'cacheblend[r=0.15]': (11, 1831497053, (88, 58, 15, 188, 15, 188)),
        'epic[r=0.15]': (11, 3730217603, (4, 102, 126, 249, 169, 5)),
        'sparsex:sparse_q[r=0.15]': (11, 2572522299, (88, 58, 15, 188, 15, 188)),
        'sparsex:mass[r=0.15]': (11, 2048672421, (88, 58, 15, 188, 15, 188)),
        'sparsex:mass_all[r=0.15]': (11, 712088442, (88, 58, 15, 188, 15, 188)),
        'sparsex:mass_max[r=0.15]': (11, 3988263948, (4, 104, 9, 171, 204, 227)),
        'sparsex:answer_mass[r=0.15]': (11, 2048672421, (88, 58, 15, 188, 15, 188)),
        'sparsex:lookahead[r=0.15]': (11, 598528846, (126, 110, 250, 58, 51, 229)),
        'sparsex:lookahead_q[r=0.15]': (11, 2065540353, (126, 110, 250, 58, 51, 229)),
        'cacheblend[r=0.4]': (29, 3817543960, (88, 58, 51, 60, 109, 9)),
        'epic[r=0.4]': (29, 1110403433, (4, 102, 126, 249, 247, 131)),
        'sparsex:sparse_q[r=0.4]': (29, 3142704552, (88, 58, 51, 60, 109, 9)),
        'sparsex:mass[r=0.4]': (29, 2427415638, (88, 58, 51, 232, 161, 126)),
        'sparsex:mass_all[r=0.4]': (29, 293543077, (88, 58, 51, 60, 199, 15)),
        'sparsex:mass_max[r=0.4]': (29, 772317917, (88, 58, 51, 232, 161, 126)),
        'sparsex:answer_mass[r=0.4]': (29, 2427415638, (88, 58, 51, 232, 161, 126)),
        'sparsex:lookahead[r=0.4]': (29, 2982090697, (126, 110, 250, 58, 51, 229)),
        'sparsex:lookahead_q[r=0.4]': (29, 885229026, (88, 58, 51, 232, 161, 3)),
        'sparsex:sparse_q[r=0.4,L=1]': (29, 4208197434, (88, 58, 51, 60, 109, 174)),
        'sparsex:mass_all[r=0.4,cov=0.5]': (29, 293543077, (88, 58, 51, 60, 199, 15)),
        'sparsex:sparse_q[r=0.4,cov=0.3]': (19, 1722399568, (88, 58, 15, 188, 15, 188)),
    },
}
"""Per model and cache source, per method: (recomputed reused tokens, CRC-32 of the rows the last layer
computed, greedy tokens), recorded at commit 36352d4."""


@pytest.mark.parametrize("cached", ["alone", "other-order"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_reference_executor_rows_counts_and_outputs_are_the_pinned_ones(family: str, cached: str) -> None:
    from sparsex_sgl.reference import ReferenceExecutor
    from sparsex_sgl.reference.cache import ReferenceSegmentCache

    executor = ReferenceExecutor(tiny_model(family))
    ids, spans, segs = segmented_prompt(5, [2, 0, 3, 1])
    cache = ReferenceSegmentCache(executor, num_slots=1024)
    if cached == "alone":
        for seg in segs:
            assert cache.fill_segment(seg)
    else:
        earlier, earlier_spans, _ = segmented_prompt(5, [0, 1, 2, 3])
        assert cache.store(earlier, earlier_spans, executor.prefill_full(earlier))
    configs = reference_configs()
    results = cache.prefill_many(ids, spans, list(configs.values()), extra_capacity=ANSWER_TOKENS)
    greedy = executor.greedy_decode_many(results, ANSWER_TOKENS)
    got = {name: (result.stats.n_selected, crc(result.rows), tuple(tokens))
           for name, result, tokens in zip(configs, results, greedy, strict=True)}
    assert all(result.stats.n_reused == 73 for result in results)  # the four segments, every token
    key = f"{family}/{cached}"
    if RECORD:
        print(f"    {key!r}: {{")
        for name, value in got.items():
            print(f"        {name!r}: {value!r},")
        print("    },")
        return
    assert got == REFERENCE_PINS[key]


SERVER_PINS: dict[str, list[tuple[int, int, int, int, tuple[int, ...]]]] = {
    "sparse_q": [
        (41, 1355, 203, 2676586832, (504, 6510, 282, 260, 12986, 23399, 476, 20429)),
        (41, 1355, 678, 1791536030, (504, 6510, 282, 260, 12986, 23399, 476, 20429)),
        (221, 1286, 193, 3922473366, (504, 2582, 10916, 7706, 1528, 334, 30, 61)),
        (41, 1466, 733, 472295587, (504, 937, 2882, 282, 2582, 10916, 7706, 1528)),
        (41, 1935, 290, 653455102, (504, 3140, 2496, 338, 1065, 344, 254, 4573)),
        (41, 1935, 968, 2603986266, (504, 3140, 2496, 338, 476, 67, 2668, 41121)),
    ],
    "first_k": [
        (41, 1355, 203, 2648663212, (504, 6510, 282, 260, 12986, 23399, 476, 20429)),
        (41, 1355, 678, 3024600764, (504, 6510, 282, 260, 12986, 23399, 476, 20429)),
        (221, 1286, 193, 4018260245, (504, 2582, 10916, 7706, 1528, 1541, 33243, 553)),
        (41, 1466, 733, 2024823083, (504, 937, 2882, 282, 2582, 10916, 7706, 1528)),
        (41, 1935, 290, 1258919511, (504, 3140, 2496, 338, 38607, 20139, 4573, 3720)),
        (41, 1935, 968, 1173440413, (504, 3140, 2496, 338, 476, 67, 2668, 41121)),
    ],
    "query_mass_all_coverage": [
        (41, 1355, 192, 2989419999, (504, 6510, 282, 260, 12986, 23399, 476, 20429)),
        (41, 1355, 212, 4066488525, (504, 6510, 282, 260, 12986, 23399, 476, 20429)),
        (221, 1286, 178, 683396943, (504, 2582, 10916, 7706, 1528, 334, 30, 61)),
        (41, 1466, 198, 1371946675, (504, 937, 2882, 282, 2582, 10916, 7706, 1528)),
        (41, 1935, 273, 894253258, (504, 3140, 2496, 338, 38607, 20139, 28, 253)),
        (41, 1935, 267, 41526370, (504, 3140, 2496, 338, 38607, 20139, 28, 253)),
    ],
}
"""Per server setting, per reordered request (3 HotpotQA questions x ratios 0.15 and 0.5): (prefix, reused,
recomputed, rows_crc32, greedy output ids), recorded by the code of commit 36352d4."""

SERVER_SETTINGS: dict[str, dict[str, Any]] = {
    "sparse_q": {},  # the shipped default
    "first_k": {"selection": "first_k", "full_layers": 0, "min_tokens_per_segment": 0},
    "query_mass_all_coverage": {"selection": "query_mass", "mass_layers": "all", "coverage": 0.5},
}
"""The settings a pinned server runs with, as a preset (a flat mapping: both the code before the redesign
and after it read one): the default, EPIC-style's policy (no full layers), and the query-mass policy summed
over every full layer (the model hook records two layers' queries) with the adaptive budget."""


@pytest.fixture(scope="module", params=list(SERVER_SETTINGS))
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """A server per pinned setting. ``SPARSEX_PINS_SERVER_PYTHONPATH`` (recording only) puts another checkout
    of the package first on the server's path, so the pins can be recorded by the code before a change."""
    import yaml

    from sparsex_sgl.assets import resolve_model
    from sparsex_sgl.testing import launch, wait_ready

    name = request.param
    logs = tmp_path_factory.mktemp(f"pins-{name}")
    flags = ["--enable-sparsex"]
    if SERVER_SETTINGS[name]:
        (logs / "preset.yaml").write_text(yaml.safe_dump(SERVER_SETTINGS[name]))
        flags += ["--sparsex-config", str(logs / "preset.yaml")]
    other = os.environ.get("SPARSEX_PINS_SERVER_PYTHONPATH")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [other, os.environ.get("PYTHONPATH")]))} if other else None
    server = launch(resolve_model("smollm2"), flags, logs / "server.log", 8192, env=env, cwd=logs if other else None)
    try:
        wait_ready(server)
        yield name, server
    finally:
        server.stop()


@pytest.mark.slow
def test_served_rows_counts_and_outputs_are_the_pinned_ones(server: tuple[str, Any]) -> None:
    from transformers import AutoTokenizer

    from sparsex_sgl.assets import hotpotqa_path, resolve_model
    from sparsex_sgl.client import reuse_counts
    from sparsex_sgl.core.protocol import flatten_spans
    from sparsex_sgl.eval.hotpotqa import build_prompt, load_examples
    from sparsex_sgl.testing import flush_cache

    name, server = server
    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    got = []
    for example in load_examples(hotpotqa_path(), 3, offset=4):
        assert flush_cache(server.url)
        for seed, ratio in ((0, None), (1, 0.15), (2, 0.5)):
            prompt = build_prompt(tok, example, seed)
            custom: dict[str, Any] = {"sparsex_spans": flatten_spans(prompt.spans)}
            if ratio is not None:
                custom["sparsex_recompute_ratio"] = ratio
            status, reply = server.post("/generate", {"input_ids": list(prompt.input_ids), "sampling_params": {
                "temperature": 0, "max_new_tokens": 8, "custom_params": custom}})
            assert status == 200, reply
            if ratio is None:
                continue
            counts = reuse_counts(reply["meta_info"])
            assert counts["fallback"] == ""
            got.append((int(counts["prefix"]), int(counts["reused"]), int(counts["recomputed"]),
                        int(counts["rows_crc32"]), tuple(reply["output_ids"])))
    assert all(reused > 0 for _, reused, _, _, _ in got)
    if RECORD:
        print(f"    {name!r}: [")
        for row in got:
            print(f"        {row!r},")
        print("    ],")
        return
    assert got == SERVER_PINS[name]
