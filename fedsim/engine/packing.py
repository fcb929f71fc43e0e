"""Packing a cohort of virtual clients onto worker nodes, balanced by sample count."""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def pack_balanced(client_ids: Sequence[int], sizes: Sequence[int], num_bins: int) -> list[list[int]]:
    """Greedy longest-processing-time packing: largest client first to the least-loaded bin.

    Ties break on the lower client id and bin index, so the packing is deterministic. Each bin
    lists its clients sorted by id; bins may be empty when there are fewer clients than bins.
    """
    if num_bins < 1:
        raise ValueError("need at least one bin")
    heap = [(0, b) for b in range(num_bins)]
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    for cid in sorted(client_ids, key=lambda c: (-int(sizes[c]), c)):
        load, b = heapq.heappop(heap)
        bins[b].append(cid)
        heapq.heappush(heap, (load + int(sizes[cid]), b))
    return [sorted(b) for b in bins]
