"""Start and stop real SGLang servers on 127.0.0.1 (CPU flags by default), for the tests and the benchmarks.

SGLang's ``popen_launch_server`` / ``kill_process_tree`` (its test utilities) do not fit here: a server's
output goes to its own log file (the tests print its tail on failure), servers start side by side and are
waited for together, and a stop is a SIGTERM to the server's process group first, so SGLang shuts down its
scheduler and frees the port before anything is killed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from sparsex_sgl.core.protocol import SPANS_KEY, flatten_spans

CPU_FLAGS = (
    "--device", "cpu", "--attention-backend", "torch_native", "--sampling-backend", "pytorch",
    "--disable-cuda-graph", "--skip-server-warmup", "--dtype", "float32", "--mem-fraction-static", "0.3",
    "--sleep-on-idle",  # an idle scheduler otherwise spins a core, which skews a server running beside it
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def post(self, path: str, payload: dict[str, Any], timeout: float = 600) -> tuple[int, Any]:
        response = httpx.post(self.url + path, json=payload, timeout=timeout)
        return response.status_code, _decode(response.content)

    def generate(self, input_ids: Sequence[int], spans: Sequence[tuple[int, int]] | None, max_new_tokens: int,
                 **custom: Any) -> dict[str, Any]:
        """A greedy ``/generate`` of ``input_ids`` with its segment ``spans`` (None: no segment data, as a stock
        client sends) and any other ``custom_params``; asserts a 200 and returns the reply."""
        params: dict[str, Any] = {"temperature": 0, "max_new_tokens": max_new_tokens}
        if spans is not None:
            params["custom_params"] = {SPANS_KEY: flatten_spans(spans), **custom}
        status, reply = self.post("/generate", {"input_ids": list(input_ids), "sampling_params": params})
        assert status == 200, reply
        return dict(reply)

    def hang_up_after(self, payload: dict[str, Any], events: int) -> None:
        """Send a streaming ``/generate`` and close the connection after ``events`` server-sent events (0: at
        once), as a client that gives up does: the server must abort the request and free what it held."""
        with httpx.Client(timeout=600) as client, client.stream(
                "POST", self.url + "/generate", json={**payload, "stream": True}) as response:
            seen = 0
            lines = response.iter_lines()
            while seen < events:
                line = next(lines, None)
                if line is None:
                    break
                seen += line.startswith("data:")
        # leaving both blocks closes the connection mid-stream

    def get(self, path: str) -> Any:
        response = httpx.get(self.url + path, timeout=60)
        response.raise_for_status()
        return response.json()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def idle_stats(server: Server, timeout: float = 30.0) -> dict[str, Any]:
    """The first scheduler's ``/sparsex/stats`` once it holds no request (its counts are added when a request
    is released, which can follow the HTTP reply by a scheduler step), or as they are after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        stats: dict[str, Any] = server.get("/sparsex/stats")["schedulers"][0]
        if stats["tracked_requests"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def flush_cache(url: str, timeout: float = 60.0) -> bool:
    """``POST /flush_cache`` until it succeeds. SGLang refuses (400) while any request is running or
    waiting, and a request's scheduler-side cleanup can lag its HTTP reply, so one refusal right after
    a reply is normal. False if still refused after ``timeout`` s or unreachable."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = httpx.post(url + "/flush_cache", timeout=60).status_code
        except httpx.HTTPError:
            return False
        if status == 200:
            return True
        if status != 400:
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def _decode(body: bytes) -> Any:
    """JSON replies as objects; SGLang answers some admin routes (``/flush_cache``) in plain text."""
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")


def launch(model: Path, extra: Sequence[str], log: Path, max_total_tokens: int = 8192,
           base_flags: Sequence[str] = CPU_FLAGS, env: Mapping[str, str] | None = None,
           cwd: Path | None = None) -> Server:
    """Start ``python -m sglang.launch_server`` in its own process group; ``wait_ready`` to block.

    ``base_flags`` default to the CPU set; pass ``()`` on a GPU machine to keep SGLang's own defaults.
    ``env`` adds variables to the server's environment (e.g. ``TRITON_INTERPRET``); ``cwd`` is where it starts
    (``python -m`` puts that folder first on the server's import path)."""
    port = free_port()
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), *base_flags,
           "--max-total-tokens", str(max_total_tokens), "--host", "127.0.0.1", "--port", str(port), *extra]
    out = log.open("wb")
    process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                               env=None if env is None else {**os.environ, **env}, cwd=cwd)
    return Server(f"http://127.0.0.1:{port}", process, log)


def wait_ready(server: Server, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}; log tail:\n{tail(server.log)}")
        try:
            if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    server.stop()
    raise TimeoutError(f"server not ready after {timeout} s; log tail:\n{tail(server.log)}")


def tail(log: Path, n: int = 40) -> str:
    lines = log.read_bytes().decode("utf-8", "replace").splitlines()
    return "\n".join(line for line in lines[-n:] if "server_args=" not in line)


def save_hybrid(kind: str, folder: Path) -> Path:
    """``reference.hybrid.tiny_model(kind)`` as an HF folder SGLang serves, its weights drawn with std 0.1 (the
    default 0.02 gives near-uniform logits, whose greedy ties no comparison could trust). SGLang 0.5.23 reads a
    few fields transformers 5 does not write: Qwen3.5's ``full_attention_interval`` (it ignores ``layer_types``),
    NemotronH's block names of transformers 4, ``mamba_n_groups`` and ``mamba_expand``; and it fixes the Mamba2
    step-size floor at 0 where HF clamps at ``time_step_min`` (0.001), so the folder says 0 for both."""
    import torch

    from sparsex_sgl.reference.hybrid import tiny_model

    model = tiny_model(kind)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.1)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if kind == "qwen3_5":
        config["full_attention_interval"] = config["layer_types"].index("full_attention") + 1
    else:
        names = {"linear_attention": "mamba", "full_attention": "attention", "mlp": "mlp", "moe": "moe"}
        config["layers_block_type"] = [names[t] for t in config["layers_block_type"]]
        config["mtp_layers_block_type"] = [names[t] for t in config.get("mtp_layers_block_type", [])]
        config.update(mamba_n_groups=config["n_groups"], mamba_expand=config["expand"], time_step_min=0.0)
    path.write_text(json.dumps(config, indent=2))
    return folder
