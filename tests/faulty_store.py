"""A store that fails on demand, for the fault tests: SGLang's own ``file`` backend behind SGLang's ``dynamic``
loader (``--sparsex-storage-backend dynamic``), whose reads hang or raise while the file ``FAULT`` in its
directory says so. A server loads it by module path, so the tests put this folder on its ``PYTHONPATH``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sglang.srt.mem_cache.hicache_storage import HiCacheFile


class FaultyFileStore(HiCacheFile):
    """``FAULT`` holding ``hang``: every read blocks until the file changes; ``raise``: every read raises;
    ``raise@R``: reads raise on tensor-parallel rank R only."""

    def __init__(self, storage_config: Any, kwargs: Any = None) -> None:
        super().__init__(storage_config)
        self.control = Path(self.file_path) / "FAULT"
        self.rank = int(storage_config.tp_rank)

    def _mode(self) -> str:
        try:
            return self.control.read_text().strip()
        except FileNotFoundError:
            return ""

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> Any:
        if self._mode() in ("raise", f"raise@{self.rank}"):
            raise RuntimeError("injected store failure")
        while self._mode() == "hang":
            time.sleep(0.05)
        return super().get(key, target_location, target_sizes)
