"""A real Mooncake Store master on 127.0.0.1 for the store tests (``mooncake-transfer-engine-non-cuda`` from
PyPI, TCP transport, peer-to-peer handshake: no etcd, no metadata server). Each client (a test's store, a
server) mounts a share of its own memory into the store; objects live there until that client goes."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from sparsex_sgl.testing import free_port


def mooncake_missing() -> str:
    """Why the Mooncake client cannot load here ("" when it can)."""
    try:
        import mooncake.store  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return ""


@contextmanager
def mooncake_master(log: Path) -> Iterator[dict[str, Any]]:
    """A master for the duration; yields the ``--sparsex-storage-backend-extra-config`` a client needs."""
    missing = mooncake_missing()
    if missing:
        pytest.skip(f"mooncake client unavailable: {missing}")
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "mooncake_master"), "-rpc_port", str(port),
                                 "-rpc_address", "127.0.0.1", "-metrics_port", str(free_port()),
                                 "-enable_http_metadata_server=false"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mooncake_master did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.1)
        yield {"master_server_address": f"127.0.0.1:{port}", "protocol": "tcp", "metadata_server": "P2PHANDSHAKE",
               "local_hostname": "127.0.0.1", "device_name": "", "global_segment_size": 64 << 20}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
