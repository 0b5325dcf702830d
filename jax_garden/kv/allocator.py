"""The page allocator of a paged KV cache."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from jax_garden._validate import check_int_array, check_positive_int
from jax_garden.kv.errors import OutOfPages


class PageAllocator:
    """Pages of one cache: ``alloc(n)`` returns the first run of ``n`` adjacent free pages when there
    is one (adjacent pages coalesce into single writes), else the lowest free pages; ``take(pages)``
    reserves given pages. Thread-safe."""

    def __init__(self, num_pages: int):
        self.num_pages = check_positive_int("num_pages", num_pages)
        self._free = np.ones(self.num_pages, dtype=bool)
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        with self._lock:
            return int(self._free.sum())

    def _pages(self, name: str, pages: Any, distinct: bool = True) -> np.ndarray:
        return check_int_array(name, pages, minimum=0, maximum=self.num_pages - 1, distinct=distinct).ravel()

    def is_free(self, pages: Any) -> np.ndarray:
        """Whether each of ``pages`` is free (bool array)."""
        pages = self._pages("is_free: pages", pages, distinct=False)
        with self._lock:
            return self._free[pages].copy()

    def alloc(self, n: int) -> np.ndarray:
        """``n`` free pages (uint32): a run of adjacent pages when there is one, else the lowest free
        ones. ``OutOfPages`` when fewer are free."""
        n = check_positive_int("alloc: n", n)
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

    def take(self, pages: Any) -> np.ndarray:
        """Reserve exactly ``pages`` (distinct page ids, in the order given; returned as uint32).
        ``OutOfPages`` naming the first one that is not free (then nothing is taken)."""
        pages = self._pages("take: pages", pages)
        if pages.size == 0:
            raise ValueError("take: no pages given")
        with self._lock:
            busy = pages[~self._free[pages]]
            if busy.size:
                raise OutOfPages(f"take: page {int(busy[0])} is not free ({busy.size} of the {pages.size} pages are "
                                 "in use)")
            self._free[pages] = False
        return pages.astype(np.uint32)

    def free(self, pages: Any) -> None:
        """Give ``pages`` back (``ValueError`` for a page that is not allocated: a double free)."""
        pages = self._pages("free: pages", pages)
        if pages.size == 0:
            return
        with self._lock:
            already = pages[self._free[pages]]
            if already.size:
                raise ValueError(f"free: page {int(already[0])} is not allocated (double free)")
            self._free[pages] = True
