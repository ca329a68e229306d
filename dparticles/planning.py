"""Pure planning arithmetic: which particles go in which chunk or batch, and which contiguous runs
of source images each one reads. numpy and the standard library only; no I/O."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def chunk_bounds(n: int, size: int) -> np.ndarray:
    """Boundaries [0, size, 2*size, ..., n] of consecutive chunks of at most ``size`` particles.

    >>> chunk_bounds(10, 4).tolist()
    [0, 4, 8, 10]
    """
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, got {size}")
    return np.unique(np.append(np.arange(0, n, size, dtype=np.int64), n))


class ChunkReads(NamedTuple):
    """What one chunk reads (``plan_reads``): ``runs``, rows ``(stack_id, start, stop)`` sorted by
    stack then image, each one read of consecutive images; ``order``, for each particle of the chunk
    in metadata order, its row among the images read (None when that is the identity)."""

    runs: np.ndarray
    order: np.ndarray | None


def plan_reads(stack_ids: np.ndarray, indices: np.ndarray, bounds: np.ndarray) -> list[ChunkReads]:
    """For each chunk ``[bounds[k], bounds[k+1])``, its reads in source order and the way back.

    The chunk's particles are sorted (stably) by ``(stack_id, image_index)``; an image listed twice
    is read once; neighbouring images of one stack make one run. ``images_read[order]`` is the
    chunk in metadata order. Arrays are compact (the smallest integer type that holds them).

    | chunk | particles (stack, index) | runs (stack, start, stop) | order     |
    |-------|--------------------------|---------------------------|-----------|
    | 0     | (1,4) (0,7) (0,6)        | (0,6,8) (1,4,5)           | 2 1 0     |
    | 1     | (1,3) (0,7)              | (0,7,8) (1,3,4)           | 1 0       |

    >>> c0, c1 = plan_reads(np.array([1, 0, 0, 1, 0]), np.array([4, 7, 6, 3, 7]), np.array([0, 3, 5]))
    >>> c0.runs.tolist(), c0.order.tolist()
    ([[0, 6, 8], [1, 4, 5]], [2, 1, 0])
    >>> c1.runs.tolist(), c1.order.tolist()
    ([[0, 7, 8], [1, 3, 4]], [1, 0])

    Duplicates are read once; particles already in source order need no reordering:

    >>> dup, = plan_reads(np.array([0, 0, 0]), np.array([5, 4, 5]), np.array([0, 3]))
    >>> dup.runs.tolist(), dup.order.tolist()
    ([[0, 4, 6]], [1, 0, 1])
    >>> same, = plan_reads(np.array([0, 0, 1]), np.array([2, 3, 0]), np.array([0, 3]))
    >>> same.runs.tolist(), same.order is None
    ([[0, 2, 4], [1, 0, 1]], True)
    """
    stack_ids = np.asarray(stack_ids, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    bounds = np.asarray(bounds, dtype=np.int64)
    n, k = len(indices), len(bounds) - 1
    if k < 1:
        return []
    if bounds[0] != 0 or bounds[-1] != n or (np.diff(bounds) < 0).any():
        raise ValueError(f"chunk bounds must rise from 0 to {n}")
    chunk_of = np.repeat(np.arange(k, dtype=np.int64), np.diff(bounds))
    perm = _sort_by(chunk_of, stack_ids, indices)
    c, s, i = chunk_of[perm], stack_ids[perm], indices[perm]
    new = np.ones(n, dtype=bool)  # the first of each distinct image of a chunk, in sorted order
    new[1:] = (c[1:] != c[:-1]) | (s[1:] != s[:-1]) | (i[1:] != i[:-1])
    uc, us, ui = c[new], s[new], i[new]
    slot = np.cumsum(new) - 1  # row of each sorted particle among all distinct images
    first_slot = np.searchsorted(uc, np.arange(k))  # row of each chunk's first distinct image
    local = np.empty(n, dtype=np.int64)
    local[perm] = slot - first_slot[c]
    wrong = np.bincount(chunk_of[local != np.arange(n) - bounds[chunk_of]], minlength=k)
    brk = np.ones(len(ui), dtype=bool)
    brk[1:] = (uc[1:] != uc[:-1]) | (us[1:] != us[:-1]) | (ui[1:] != ui[:-1] + 1)
    starts = np.flatnonzero(brk)
    stops = np.append(starts[1:], len(ui))
    runs = np.stack([us[starts], ui[starts], ui[starts] + (stops - starts)], axis=1)
    runs = runs.astype(_compact(runs), copy=False)
    run_bounds = np.searchsorted(uc[starts], np.arange(k + 1))
    out = []
    for j in range(k):  # one step per chunk: slices into the arrays above, copied compact
        a, b = bounds[j], bounds[j + 1]
        order = None if wrong[j] == 0 else local[a:b].astype(_compact(b - a), copy=True)
        out.append(ChunkReads(runs[run_bounds[j]:run_bounds[j + 1]].copy(), order))
    return out


def _sort_by(chunk_of: np.ndarray, stack_ids: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Stable order by (chunk, stack, index): one argsort of a combined key when it fits in int64."""
    if len(indices) == 0:
        return np.zeros(0, dtype=np.int64)
    span_i, span_s = int(indices.max()) + 1, int(stack_ids.max()) + 1
    if min(int(indices.min()), int(stack_ids.min())) >= 0 and (int(chunk_of[-1]) + 1) * span_s * span_i < 2**62:
        return np.argsort((chunk_of * span_s + stack_ids) * span_i + indices, kind="stable")
    return np.lexsort((indices, stack_ids, chunk_of))


def _compact(values) -> type:
    """The smallest of int16, int32, int64 that holds every value of ``values`` (all >= 0)."""
    top = int(np.max(values, initial=0))
    return np.int16 if top < 2**15 else np.int32 if top < 2**31 else np.int64


def byte_runs(stack_ids: np.ndarray, indices: np.ndarray, piece_bounds: np.ndarray, image_bytes: int,
              stack_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source byte ranges that copy each piece in order: maximal runs of consecutive images of one
    stack, never crossing a piece boundary. Returns ``(first_run, codes, starts, lengths)``: runs
    ``first_run[p]:first_run[p+1]`` belong to piece ``p``; ``codes`` are stack ids.

    >>> r = byte_runs(np.array([0, 0, 0, 1, 1]), np.array([3, 4, 6, 0, 1]), np.array([0, 2, 5]), 10,
    ...               np.array([1024, 1024]))
    >>> [x.tolist() for x in r]
    [[0, 1, 3], [0, 0, 1], [1054, 1084, 1024], [20, 10, 20]]
    """
    stack_ids = np.asarray(stack_ids, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    n = len(indices)
    brk = np.ones(n, dtype=bool)
    brk[1:] = (stack_ids[1:] != stack_ids[:-1]) | (indices[1:] != indices[:-1] + 1)
    inner = piece_bounds[:-1]
    brk[inner[inner < n]] = True
    starts = np.flatnonzero(brk)
    counts = np.diff(np.append(starts, n))
    codes = stack_ids[starts]
    byte_starts = np.asarray(stack_offsets, dtype=np.int64)[codes] + indices[starts] * image_bytes
    first_run = np.searchsorted(starts, piece_bounds, side="left")
    return first_run, codes, byte_starts, counts * image_bytes
