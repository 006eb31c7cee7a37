"""Hybrid models served by SGLang on the CPU (issue 36, item 4, first part): the plugin's CPU shim runs the
recurrent layers of Qwen3.5 (Gated DeltaNet) and NemotronH (Mamba2) on pure-torch ops (``sglang.torch_ops``),
and the server's outputs equal HF transformers' own forward of the same weights.

The tiny random models of the reference executor (``reference.hybrid.tiny_model``) are saved as HF folders in
the shape SGLang reads (``save_hybrid``) and served float32 with ``--skip-tokenizer-init``, with SGLang's own
mamba prefix cache (``no_buffer``: a state at each prefill's and request's end). Greedy tokens must equal HF's
and the first output's top-5 logprobs agree within 1e-4 (2.3e-5 measured; HF's own float32 and float64 runs of
the Qwen model differ by 2.7e-5); a conversation's next turn must hit SGLang's cache and still equal HF. Without
the CPU ops the server dies at its first prefill (no Triton driver), so these tests cannot pass by accident.
With ``--enable-sparsex`` the ``sparsex`` cache (``HybridStateCache``) serves the same models, resuming exact
prefixes from the segment graph's recurrent states, under SGLang's strict idle check of the state pool.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparsex_sgl.testing import Server, launch, save_hybrid, tail, wait_ready

pytestmark = pytest.mark.slow
KINDS = ("qwen3_5", "nemotron_h")
FLAGS = ["--skip-tokenizer-init", "--mamba-radix-cache-strategy", "no_buffer", "--disable-overlap-schedule",
         "--max-mamba-cache-size", "32"]
ENV = {"SGLANG_MAMBA_CONV_DTYPE": "float32", "SGLANG_MAMBA_SSM_DTYPE": "float32"}
"""SGLang keeps the conv window in bfloat16 whatever ``--dtype`` says (greedy drifts from float32 HF)."""
NEW, TOP, TOLERANCE = 8, 5, 1e-4


def serve(root: Path, flags: list[str], env: dict[str, str]) -> Iterator[dict[str, tuple[Path, Server]]]:
    """Both tiny hybrids saved under ``root`` and served side by side with ``flags``, stopped at the end."""
    servers = {}
    for kind in KINDS:
        folder = save_hybrid(kind, root / kind)
        servers[kind] = (folder, launch(folder, flags, root / f"{kind}.log", 4096, env=env))
    try:
        for _, server in servers.values():
            wait_ready(server)
        yield servers
    finally:
        for _, server in servers.values():
            server.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, Server]]]:
    yield from serve(tmp_path_factory.mktemp("hybrid"), FLAGS, ENV)


@torch.no_grad()
def hf_greedy(model: torch.nn.Module, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """HF's greedy ``NEW`` tokens (a full forward per step, no cache) and the first step's log-probabilities."""
    sequence, first = list(ids), None
    for _ in range(NEW):
        logprobs = torch.log_softmax(model(torch.tensor([sequence])).logits[0, -1].float(), -1)
        first = logprobs if first is None else first
        sequence.append(int(logprobs.argmax()))
    assert first is not None
    return sequence[len(ids):], first


def generate(server: Server, ids: list[int], namespace: str | None = None) -> dict:
    params: dict = {"temperature": 0, "max_new_tokens": NEW, "ignore_eos": True}
    if namespace is not None:
        params["custom_params"] = {"sparsex_namespace": namespace}
    status, reply = server.post("/generate", {"input_ids": ids, "sampling_params": params, "return_logprob": True,
                                              "top_logprobs_num": TOP})
    assert status == 200, (reply, tail(server.log))
    return dict(reply)


def assert_equals_hf(model: torch.nn.Module, server: Server, ids: list[int], namespace: str | None = None) -> dict:
    reply = generate(server, ids, namespace)
    tokens, first = hf_greedy(model, ids)
    assert reply["output_ids"] == tokens
    top = reply["meta_info"]["output_top_logprobs"][0]
    assert [token for _, token, _ in top] == torch.topk(first, TOP).indices.tolist()
    assert max(abs(logprob - float(first[token])) for logprob, token, _ in top) < TOLERANCE
    return reply


@pytest.mark.parametrize("kind", KINDS)
def test_a_hybrid_served_on_the_cpu_equals_hf(served: dict[str, tuple[Path, Server]], kind: str) -> None:
    folder, server = served[kind]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    for length in (40, 97, 200):  # shorter than, across and past the 64-token chunk of the recurrent kernels
        assert_equals_hf(model, server, torch.randint(0, 256, (length,), generator=gen).tolist())
    # A conversation's next turn resends the last prompt and its reply: SGLang resumes it from its stored state.
    first = torch.randint(0, 256, (150,), generator=gen).tolist()
    reply = assert_equals_hf(model, server, first)
    turn = first + reply["output_ids"] + torch.randint(0, 256, (30,), generator=gen).tolist()
    assert assert_equals_hf(model, server, turn)["meta_info"]["cached_tokens"] >= len(first)


@pytest.fixture(scope="module")
def sparsex(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, Server]]]:
    yield from serve(tmp_path_factory.mktemp("hybrid-sparsex"), [*FLAGS, "--enable-sparsex"],
                     {**ENV, "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"})


@pytest.mark.parametrize("kind", KINDS)
def test_sparsex_resumes_hybrids_from_its_state_checkpoints(sparsex: dict[str, tuple[Path, Server]],
                                                           kind: str) -> None:
    """``--enable-sparsex`` serves a hybrid with exact prefixes resumed from the graph's recurrent states. A
    conversation's second turn hits the first at its end, where no state was kept yet (the first lookup taught
    the placement only misses); that hit teaches it, so the second turn keeps its end state and the third resumes
    there. A prompt sharing less than any state is computed whole. Every reply equals HF's."""
    folder, server = sparsex[kind]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    first = torch.randint(0, 256, (150,), generator=gen).tolist()
    turns, cached = [first], []
    for _ in range(3):
        reply = assert_equals_hf(model, server, turns[-1])
        cached.append(reply["meta_info"]["cached_tokens"])
        turns.append(turns[-1] + reply["output_ids"] + torch.randint(0, 256, (20,), generator=gen).tolist())
    assert cached == [0, 0, len(turns[1]) + NEW - 1]  # the second turn's KV: all but its last reply token
    apart = first[:100] + torch.randint(0, 256, (40,), generator=gen).tolist()
    assert assert_equals_hf(model, server, apart)["meta_info"]["cached_tokens"] == 0  # no state within 96 tokens
    # Segments are not reused on a hybrid: the request is served exact, and counted.
    status, marked = server.post("/generate", {"input_ids": apart, "sampling_params": {
        "temperature": 0, "max_new_tokens": NEW, "ignore_eos": True, "custom_params": {"sparsex_spans": [0, 100]}}})
    assert status == 200 and marked["output_ids"] == hf_greedy(model, apart)[0]
    stats = server.get("/sparsex/stats")["schedulers"][0]
    assert stats["fallbacks"].get("recurrent_layers", 0) >= 1 and stats["recurrent_states"] >= 1, stats


def test_sparsex_cuts_a_prefill_where_its_placement_keeps_a_state(sparsex: dict[str, tuple[Path, Server]]) -> None:
    """Questions over one 200-token document, in a namespace of their own (whose placement has learned nothing):
    the second one's hit (at 192, the document's last 16-token block) teaches the placement a state at 192; its
    own prefill is cut there (a chunk ends at 192, where the state is copied), so the third question resumes
    from it. Every reply equals HF's."""
    folder, server = sparsex["qwen3_5"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(2)
    document = torch.randint(0, 256, (200,), generator=gen).tolist()
    cached = [assert_equals_hf(model, server, document + torch.randint(0, 256, (12,), generator=gen).tolist(),
                               "questions")["meta_info"]["cached_tokens"] for _ in range(3)]
    assert cached == [0, 0, 192]
