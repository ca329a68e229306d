"""Pure planning arithmetic: which particles go in which chunk or batch, and which contiguous runs
of source images each one reads. numpy and the standard library only; no I/O."""

from __future__ import annotations

import numpy as np


def chunk_bounds(n: int, size: int) -> np.ndarray:
    """Boundaries [0, size, 2*size, ..., n] of consecutive chunks of at most ``size`` particles.

    >>> chunk_bounds(10, 4).tolist()
    [0, 4, 8, 10]
    """
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, got {size}")
    return np.unique(np.append(np.arange(0, n, size, dtype=np.int64), n))


def plan_runs(stack_ids: np.ndarray, indices: np.ndarray, bounds: np.ndarray) -> list[list[tuple[int, int, int]]]:
    """For each chunk ``[bounds[k], bounds[k+1])``, the runs ``(stack_id, start, stop)`` to read.

    A run is a maximal stretch of particles, in metadata order, that are consecutive images of one
    stack, so each run is one read. Runs never cross a chunk boundary.

    >>> plan_runs(np.array([0, 0, 0, 1, 1]), np.array([3, 4, 6, 0, 1]), np.array([0, 2, 5]))
    [[(0, 3, 5)], [(0, 6, 7), (1, 0, 2)]]
    """
    stack_ids = np.asarray(stack_ids, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    n = len(indices)
    if n == 0:
        return [[] for _ in range(len(bounds) - 1)]
    brk = np.ones(n, dtype=bool)
    brk[1:] = (stack_ids[1:] != stack_ids[:-1]) | (indices[1:] != indices[:-1] + 1)
    brk[bounds[:-1][bounds[:-1] < n]] = True
    starts = np.flatnonzero(brk)
    stops = np.append(starts[1:], n)
    run_chunk = np.searchsorted(bounds, starts, side="right") - 1
    sid, first = stack_ids[starts].tolist(), indices[starts].tolist()
    length = (stops - starts).tolist()
    out: list[list[tuple[int, int, int]]] = [[] for _ in range(len(bounds) - 1)]
    for c, s, i, m in zip(run_chunk.tolist(), sid, first, length):
        out[c].append((s, i, i + m))
    return out



def split_runs(runs: list[tuple], max_images: int) -> list[list[tuple]]:
    """Cut a batch's runs ``(stack, start, stop)`` into pieces of at most ``max_images`` images, in
    order, so a batch of any size is streamed in bounded memory.

    >>> split_runs([("a", 0, 5), ("b", 2, 4)], 3)
    [[('a', 0, 3)], [('a', 3, 5), ('b', 2, 3)], [('b', 3, 4)]]
    """
    pieces: list[list[tuple]] = [[]]
    room = max_images
    for stack, start, stop in runs:
        while start < stop:
            if room == 0:
                pieces.append([])
                room = max_images
            take = min(room, stop - start)
            pieces[-1].append((stack, start, start + take))
            start += take
            room -= take
    return [p for p in pieces if p]
