"""Every command in README.md runs as written.

The README's fenced blocks are parsed, not copied: a command edited there is the command run here. The
CPU launch command starts a real server (``MODEL`` replaced by the SmolLM2 folder, nothing else changed);
the curl commands and the Python examples then run against it as written, and ``scripts/demo`` runs
whole. Commands that cannot run here are named with the reason (the GPU launch on a machine without
CUDA, and ``scripts/test``, which runs this test); any other command fails the test until it runs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from sparsex_sgl.assets import resolve_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
NOT_RUN = {"scripts/test": "runs the test suite this test is part of"}
SERVER_URL = "http://127.0.0.1:30000"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.DOTALL)


def commands() -> list[str]:
    """Shell commands of the bash blocks: continuation lines joined, comments dropped."""
    out = []
    for block in blocks("bash"):
        joined = re.sub(r"\\\n\s*", " ", block)
        current = ""
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line) if not line.lstrip().startswith("#") else ""
            if not line.strip():
                continue
            if current and current.count("'") % 2:  # inside a quoted multi-line argument
                current += "\n" + line
            else:
                if current:
                    out.append(current)
                current = line.strip()
        if current:
            out.append(current)
    return out


def classify(command: str) -> str:
    if command in NOT_RUN:
        return "not run"
    if "sglang.launch_server" in command:
        return "cpu server" if "--device cpu" in command else "gpu server"
    if command.startswith("curl "):
        return "curl"
    return "script"


def test_every_readme_command_is_known() -> None:
    kinds = [classify(c) for c in commands()]
    assert kinds.count("cpu server") == 1 and kinds.count("gpu server") == 1 and "curl" in kinds
    assert [c for c in commands() if classify(c) == "script"] == ["scripts/demo"]


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def _wait_ready(process: subprocess.Popen[bytes], log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the README's launch command exited:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(SERVER_URL + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(log.read_text()[-3000:])


def test_readme_server_curl_and_python_examples_run_as_written(tmp_path: Path) -> None:
    kind = "gpu server" if torch.cuda.is_available() else "cpu server"
    (launch,) = [c for c in commands() if classify(c) == kind]
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(["bash", "-c", launch.replace("MODEL", str(resolve_model("smollm2")))],
                                  cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(server, log)
        for command in [c for c in commands() if classify(c) == "curl"]:
            done = subprocess.run(["bash", "-c", command], cwd=ROOT, env=_env(), capture_output=True, text=True,
                                  timeout=300, check=True)
            reply = json.loads(done.stdout)
            assert "text" in reply or "schedulers" in reply, reply
        for code in blocks("python"):
            done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                                  timeout=300, check=False)
            assert done.returncode == 0, done.stderr[-3000:]
            assert done.stdout.strip(), code
        (stats,) = httpx.get(SERVER_URL + "/sparsex/stats", timeout=30).json()["schedulers"]
        assert stats["reused_tokens"] > 0 and stats["fallbacks"] == {}  # the examples really reused segments
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_demo_runs_as_written() -> None:
    done = subprocess.run(["bash", "-c", "scripts/demo"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=1800, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((ROOT / "results" / "demo" / "results.json").read_text())
    assert {run["system"] for run in results["runs"]} == {"full", "stock", "sparsex"}
    summary = done.stdout[done.stdout.rindex("Summary"):]  # it ends with what was shown, for a newcomer
    assert "against stock SGLang's" in summary and "equal to full prefill's" in summary
    assert "Full table: " in summary and "results/demo/results.md" in summary
