"""Memory of a process tree (a run's driver, Ray's services and its workers), sampled while it runs.

RSS counts a page shared by several processes (a memory-mapped dataset, shared libraries) once in
each of them; PSS (proportional set size, Linux) splits it between them, so its sum over the tree
is what the tree holds in all.
"""

from __future__ import annotations

import os
import threading

import psutil


def tree_memory(root_pid: int, kind: str = "rss") -> int:
    """Bytes of `kind` ('rss', or 'pss' / 'uss' on Linux) summed over a process and its descendants."""
    try:
        root = psutil.Process(root_pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in family:
        try:
            info = proc.memory_info() if kind == "rss" else proc.memory_full_info()
            total += getattr(info, kind)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


class PeakMemory(threading.Thread):
    """Samples a process tree every 0.2 s and keeps the maximum of each kind of memory."""

    def __init__(self, root_pid: int | None = None, kinds: tuple[str, ...] = ("rss",)) -> None:
        super().__init__(daemon=True)
        self.root_pid = root_pid or os.getpid()
        self.kinds = kinds
        self.peaks = dict.fromkeys(kinds, 0)
        self.done = threading.Event()

    def sample(self) -> None:
        for kind in self.kinds:
            self.peaks[kind] = max(self.peaks[kind], tree_memory(self.root_pid, kind))

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.sample()

    @property
    def peak(self) -> int:
        return self.peaks[self.kinds[0]]
