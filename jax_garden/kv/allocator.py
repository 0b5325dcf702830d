"""The page allocator of a paged KV cache."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from jax_garden.kv.errors import OutOfPages


class PageAllocator:
    """Pages of one cache: ``alloc(n)`` returns the first run of ``n`` adjacent free pages when there
    is one (adjacent pages coalesce into single writes), else the lowest free pages. Thread-safe."""

    def __init__(self, num_pages: int):
        if isinstance(num_pages, bool) or not isinstance(num_pages, (int, np.integer)) or num_pages <= 0:
            raise ValueError(f"num_pages must be a positive int, got {num_pages!r}")
        self.num_pages = int(num_pages)
        self._free = np.ones(self.num_pages, dtype=bool)
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        with self._lock:
            return int(self._free.sum())

    def is_free(self, pages: Any) -> np.ndarray:
        with self._lock:
            return self._free[np.asarray(pages, dtype=np.int64)].copy()

    def alloc(self, n: int) -> np.ndarray:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"alloc: n must be a positive int, got {n!r}")
        n = int(n)
        with self._lock:
            free = int(self._free.sum())
            if n > free:
                raise OutOfPages(f"alloc: {n} pages requested, {free} of {self.num_pages} free")
            edges = np.diff(np.concatenate(([0], self._free.view(np.int8), [0])))
            starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
            fit = np.flatnonzero(ends - starts >= n)
            if fit.size:
                pages = np.arange(starts[fit[0]], starts[fit[0]] + n)
            else:
                pages = np.flatnonzero(self._free)[:n]
            self._free[pages] = False
            return pages.astype(np.uint32)

    def free(self, pages: Any) -> None:
        pages = np.asarray(pages, dtype=np.int64).ravel()
        if pages.size == 0:
            return
        if pages.min() < 0 or pages.max() >= self.num_pages:
            raise ValueError(f"free: page {int(pages.max() if pages.max() >= self.num_pages else pages.min())} "
                             f"out of range 0..{self.num_pages - 1}")
        if np.unique(pages).size != pages.size:
            raise ValueError("free: a page appears twice")
        with self._lock:
            already = pages[self._free[pages]]
            if already.size:
                raise ValueError(f"free: page {int(already[0])} is not allocated (double free)")
            self._free[pages] = True
