"""Work tiles over CSR-ragged rows, built on the host once per batch (numpy, no triton).

Both kernels that serve a batch of requests cut each request's run of items (query rows, or reused keys)
into tiles of at most ``block`` items that never straddle two requests, and launch one program per tile.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def csr_tiles(offsets: Sequence[int], block: int) -> np.ndarray:
    """Tile table ``[tiles, 3]`` (int32: request, first item, end item) for CSR ``offsets``.

    Request i owns items ``[offsets[i], offsets[i+1])``; its tiles cover them in order, ``block`` each.
    """
    starts = np.asarray(offsets[:-1], dtype=np.int64)
    ends = np.asarray(offsets[1:], dtype=np.int64)
    counts = np.maximum(0, -(-(ends - starts) // block))
    req = np.repeat(np.arange(len(counts)), counts)
    first_tile = np.repeat(np.cumsum(counts) - counts, counts)
    first = starts[req] + (np.arange(int(counts.sum())) - first_tile) * block
    return np.stack([req, first, np.minimum(first + block, ends[req])], axis=1).astype(np.int32).reshape(-1, 3)
