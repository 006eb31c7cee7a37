"""Stock SGLang 0.5.23 with ``--tp 2`` on the CPU (issue 34's ground): without the plugin's CPU shim it dies at
start-up (a PyNccl communicator on a CPU device); with it (gloo groups without PyNccl) a two-rank server
starts and computes the same model as a one-rank server: prompt logprobs within 1e-4 (float32, another
summation order across the two head shards) and the same greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from sparsex_sgl.testing import launch, wait_ready

pytestmark = pytest.mark.slow


def test_a_two_rank_cpu_server_computes_what_a_one_rank_server_computes(tmp_path: Path) -> None:
    model = tiny_model("qwen2")  # 4 query and 2 KV heads: one KV head per rank
    model.generation_config.pad_token_id = 0
    model.save_pretrained(tmp_path / "model")
    flags = ["--skip-tokenizer-init"]
    one = launch(tmp_path / "model", flags, tmp_path / "tp1.log", 4096)
    two = launch(tmp_path / "model", [*flags, "--tp", "2"], tmp_path / "tp2.log", 4096,
                 env={"SGLANG_CPU_OMP_THREADS_BIND": "0|1"})
    try:
        wait_ready(one)
        wait_ready(two)
        gen = torch.Generator().manual_seed(7)
        for _ in range(3):
            ids = torch.randint(1, 256, (60,), generator=gen).tolist()
            body = {"input_ids": ids, "return_logprob": True, "logprob_start_len": 0,
                    "sampling_params": {"temperature": 0, "max_new_tokens": 6}}
            replies = []
            for server in (one, two):
                status, reply = server.post("/generate", body)
                assert status == 200, reply
                replies.append(reply)
            logprobs = [torch.tensor([p[0] for p in r["meta_info"]["input_token_logprobs"][1:]]) for r in replies]
            assert torch.allclose(logprobs[0], logprobs[1], atol=1e-4, rtol=0)
            assert replies[0]["output_ids"] == replies[1]["output_ids"]
    finally:
        one.stop()
        two.stop()
