"""Every command in README.md runs as written.

The README's fenced blocks are parsed, not copied: a command edited there is the command run here. The
CPU launch command starts a real server (``MODEL`` replaced by the SmolLM2 folder, nothing else changed);
the curl commands and the Python examples then run against it as written, and ``scripts/demo`` runs
whole. Commands that cannot run here are named with the reason (the GPU launch on a machine without
CUDA, and ``scripts/test``, which runs this test); any other command fails the test until it runs.

The README stays a short manual: at most ``README_MAX_BYTES``, its relative links name files that exist, and
its links into docs/results.md (where the tables and their reading live) name anchors that a heading there
produces, by GitHub's rules. Those checks only read files and are not marked slow; the tests above them
(the command census, the server and the demo) are, one by one.
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

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS_DOC = ROOT / "docs" / "results.md"
README_MAX_BYTES = 15_000
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


@pytest.mark.slow
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


@pytest.mark.slow
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
            assert "text" in reply or "schedulers" in reply or reply.get("failed") == 0, reply
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


@pytest.mark.slow
def test_demo_runs_as_written() -> None:
    done = subprocess.run(["bash", "-c", "scripts/demo"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=1800, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((ROOT / "results" / "demo" / "results.json").read_text())
    assert {run["system"] for run in results["runs"]} == {"full", "stock", "sparsex"}
    summary = done.stdout[done.stdout.rindex("Summary"):]  # it ends with what was shown, for a newcomer
    assert "against stock SGLang's" in summary and "equal to full prefill's" in summary
    assert "Full table: " in summary and "results/demo/results.md" in summary


def _prose(text: str) -> str:
    """The text outside fenced code blocks (a ``# comment`` in a bash block is not a heading)."""
    return re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.DOTALL | re.MULTILINE)


def links(text: str) -> list[str]:
    """Targets of the inline Markdown links outside code (fenced blocks and code spans)."""
    prose = re.sub(r"`[^`\n]*`", "", _prose(text))
    return re.findall(r"\[[^\]\n]*\]\(([^)\s]+)\)", prose)


def github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file: the heading's text lowercased, every
    character but letters, digits, ``_``, ``-`` and spaces dropped, spaces turned into ``-``; a repeated
    slug gets ``-1``, ``-2``, ... in order."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", _prose(text), flags=re.MULTILINE):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_github_anchors_follow_githubs_slug_rules() -> None:
    doc = "# A: b (`c`), 0.15 + d\n```bash\n# not a heading\n```\n## Same\n## Same\n### It's `L_full`\n"
    assert github_anchors(doc) == {"a-b-c-015--d", "same", "same-1", "its-l_full"}


def test_readme_is_a_short_manual() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes (at most {README_MAX_BYTES}): move tables to docs/"


def test_readme_relative_links_name_existing_files() -> None:
    relative = [t for t in links(README.read_text()) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]
    assert relative, "no relative link found: has the README's layout changed?"
    for target in relative:
        path = target.split("#", 1)[0]
        if path:
            assert (README.parent / path).exists(), f"README links to {target}, and {path} does not exist"


def test_readme_links_into_the_results_doc_name_its_headings() -> None:
    anchors = github_anchors(RESULTS_DOC.read_text())
    into_doc = [t for t in links(README.read_text()) if t.split("#", 1)[0] == "docs/results.md"]
    named = [t.split("#", 1)[1] for t in into_doc if "#" in t]
    assert named, "the README links to no section of docs/results.md"
    missing = [anchor for anchor in named if anchor not in anchors]
    assert not missing, f"README links to anchors no heading of docs/results.md produces: {missing}"
    own = github_anchors(README.read_text())  # and links within the README name its own headings
    for target in links(README.read_text()):
        if target.startswith("#"):
            assert target[1:] in own, f"README links to {target}, which no README heading produces"


def test_every_results_row_links_to_its_section() -> None:
    text = README.read_text()
    section = text[text.index("\n## Results"):]
    section = section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| what ")]
    assert len(rows) >= 5, "the README's results table was not found"
    for row in rows:
        assert re.search(r"\]\(docs/results\.md#[^)\s]+\)", row), f"this results row links to no section: {row}"
