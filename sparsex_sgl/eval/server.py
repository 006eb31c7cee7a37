"""Start and stop real SGLang servers on 127.0.0.1 (CPU flags by default), for the tests and the benchmarks."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, _decode(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, _decode(err.read())

    def hang_up_after(self, payload: dict[str, Any], events: int) -> None:
        """Send a streaming ``/generate`` and close the connection after ``events`` server-sent events (0: at
        once), as a client that gives up does: the server must abort the request and free what it held."""
        url = urllib.parse.urlparse(self.url)
        conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=600)
        conn.request("POST", "/generate", json.dumps({**payload, "stream": True}), {"Content-Type": "application/json"})
        response = conn.getresponse()
        seen = 0
        while seen < events:
            line = response.readline()
            if not line:
                break
            seen += line.startswith(b"data:")
        conn.close()

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=60) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def flush_cache(url: str, timeout: float = 60.0) -> bool:
    """``POST /flush_cache`` until it succeeds. SGLang refuses (400) while any request is running or
    waiting, and a request's scheduler-side cleanup can lag its HTTP reply, so one refusal right after
    a reply is normal. False if still refused after ``timeout`` s or unreachable."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url + "/flush_cache", data=b"", method="POST"),
                                        timeout=60) as resp:
                if resp.status == 200:
                    return True
        except urllib.error.HTTPError as err:
            if err.code != 400:
                return False
        except OSError:
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
           base_flags: Sequence[str] = CPU_FLAGS, env: Mapping[str, str] | None = None) -> Server:
    """Start ``python -m sglang.launch_server`` in its own process group; ``wait_ready`` to block.

    ``base_flags`` default to the CPU set; pass ``()`` on a GPU machine to keep SGLang's own defaults.
    ``env`` adds variables to the server's environment (e.g. ``TRITON_INTERPRET``)."""
    port = free_port()
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), *base_flags,
           "--max-total-tokens", str(max_total_tokens), "--host", "127.0.0.1", "--port", str(port), *extra]
    out = log.open("wb")
    process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                               env=None if env is None else {**os.environ, **env})
    return Server(f"http://127.0.0.1:{port}", process, log)


def wait_ready(server: Server, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}; log tail:\n{tail(server.log)}")
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    server.stop()
    raise TimeoutError(f"server not ready after {timeout} s; log tail:\n{tail(server.log)}")


def tail(log: Path, n: int = 40) -> str:
    lines = log.read_bytes().decode("utf-8", "replace").splitlines()
    return "\n".join(line for line in lines[-n:] if "server_args=" not in line)
