"""Process-parallel maps over chunks of samples, for the CPU-bound passes of the audits.

Hashing images and extracting shortcut signals hold the GIL (PIL, pydicom, small NumPy calls), so
threads would not help; worker processes are started with ``spawn`` because forking a parent that
runs torch or progress-bar threads can deadlock. Each worker imports covidscan once, so a pool only
pays off for thousands of images; callers decide when.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def map_chunks(
    func: Callable[..., list[R]], items: Sequence[T], chunk: int, workers: int, *args: Any
) -> Iterator[list[R]]:
    """``func(items[k:k + chunk], *args)`` for consecutive chunks, in ``workers`` spawned processes,
    yielded in order (``func`` must be a module-level function so it pickles)."""
    chunks = [items[k : k + chunk] for k in range(0, len(items), chunk)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(func, chunks, *([arg] * len(chunks) for arg in args))
