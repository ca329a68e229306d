"""Pure planning arithmetic: which particles go in which chunk or batch, and which contiguous runs
of source images each one reads. numpy and the standard library only; no I/O."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def fit_chunks(chunks: Sequence[int], peak: Callable[[int], int], budget: int, group: int) -> tuple[int, ...]:
    """``chunks`` (particles per task) with every chunk whose ``peak`` exceeds ``budget`` cut into
    pieces that fit, the others kept. ``peak(n)`` must not fall as ``n`` grows through multiples of
    ``group``, nor below ``group``; between them it may (a task of 17 may need more than one of 32,
    when its images are padded to 32). So a chunk is cut into tasks of the most whole groups that fit,
    then its remainder, kept whole if it fits, else cut into whole groups (when a group fits) and
    pieces of the most particles below ``group`` that fit.

    >>> peak = lambda n: 10 * n + (16 - n % 16) % 16 * 20  # 10 a particle, 20 a padding image
    >>> fit_chunks([100, 40, 6], peak, 400, 16)
    (32, 32, 32, 4, 32, 8, 6)
    >>> fit_chunks([20], lambda n: 100 * n + (16 - n % 16) % 16 * 20, 1000, 16)  # not even 16 fit
    (8, 8, 4)

    Raises ValueError if a task of one particle does not fit.
    """
    if peak(1) > budget:
        raise ValueError(f"a task of one particle needs {peak(1)} bytes, more than the budget {budget}")
    small = _largest(lambda n: peak(n) <= budget, min(group - 1, max(chunks, default=1)))
    big = group * _largest(lambda k: peak(group * k) <= budget, max(chunks, default=0) // group)
    out: list[int] = []
    for c in chunks:
        if peak(c) <= budget:
            out.append(c)
            continue
        whole, rest = divmod(c, big) if big else (0, c)
        out += [big] * whole
        if rest and peak(rest) > budget:
            head = rest - rest % group if big else 0  # whole groups, at most ``big``: they fit
            tail, last = divmod(rest - head, small) if rest > head else (0, 0)
            out += [head] * (head > 0) + [small] * tail + [last] * (last > 0)
        elif rest:
            out.append(rest)
    return tuple(out)


def _largest(fits: Callable[[int], bool], top: int) -> int:
    """The largest ``k`` in ``1..top`` with ``fits(k)`` (0 if none), for ``fits`` true up to some k."""
    lo, hi = 0, top
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


class ReadPlan(NamedTuple):
    """What every chunk reads (``plan_chunks``), as a few flat arrays rather than an object per chunk.

    Chunk ``j`` reads ``runs[run_bounds[j]:run_bounds[j+1]]``, rows ``(stack, start, stop)`` in which
    ``stack`` numbers the chunk's own stacks, ``stacks[stack_bounds[j]:stack_bounds[j+1]]`` (ids,
    ascending), from 0. ``order[bounds[j]:bounds[j+1]]`` puts the images it reads back in metadata
    order; it is needed only where ``reorder[j]`` (elsewhere it is the identity)."""

    runs: np.ndarray
    run_bounds: np.ndarray
    stacks: np.ndarray
    stack_bounds: np.ndarray
    order: np.ndarray
    reorder: np.ndarray


BLOCK = 2**18  # particles planned at a time: the temporaries are a few dozen bytes each, whatever the set


def plan_chunks(stack_ids: np.ndarray, indices: np.ndarray, bounds: np.ndarray) -> ReadPlan:
    """For each chunk ``[bounds[k], bounds[k+1])``, its reads in source order and the way back, as a
    few flat arrays for every chunk at once (see ``ReadPlan``).

    The chunk's particles are sorted (stably) by ``(stack_id, image_index)``; an image listed twice
    is read once; neighbouring images of one stack make one run. ``images_read[order]`` is the
    chunk in metadata order.

    Planned ``BLOCK`` particles (whole chunks) at a time, so that the sort and its temporaries take
    tens of MB whatever the number of particles; what is kept is compact: ``order`` in the smallest
    type that holds a chunk's rows, ``runs`` in the smallest that holds an image index (the stacks
    are numbered within their chunk).

    >>> p = plan_chunks(np.array([1, 0, 0, 1, 0]), np.array([4, 7, 6, 3, 7]), np.array([0, 3, 5]))
    >>> p.runs.tolist(), p.run_bounds.tolist(), p.stacks.tolist(), p.stack_bounds.tolist()
    ([[0, 6, 8], [1, 4, 5], [0, 7, 8], [1, 3, 4]], [0, 2, 4], [0, 1, 0, 1], [0, 2, 4])
    >>> p.order.tolist(), p.reorder.tolist()
    ([2, 1, 0, 1, 0], [True, True])

    Duplicates are read once; particles already in source order need no reordering:

    >>> dup = plan_chunks(np.array([0, 0, 0]), np.array([5, 4, 5]), np.array([0, 3]))
    >>> dup.runs.tolist(), dup.order.tolist(), dup.reorder.tolist()
    ([[0, 4, 6]], [1, 0, 1], [True])
    >>> same = plan_chunks(np.array([0, 0, 1]), np.array([2, 3, 0]), np.array([0, 3]))
    >>> same.runs.tolist(), same.stacks.tolist(), same.reorder.tolist()
    ([[0, 2, 4], [1, 0, 1]], [0, 1], [False])
    """
    stack_ids, indices = (a if a.dtype.kind in "iu" else a.astype(np.int64) for a in map(np.asarray, (stack_ids, indices)))
    bounds = np.asarray(bounds, dtype=np.int64)
    n, k = len(indices), len(bounds) - 1
    if k >= 1 and (bounds[0] != 0 or bounds[-1] != n or (np.diff(bounds) < 0).any()):
        raise ValueError(f"chunk bounds must rise from 0 to {n}")
    widest = int(np.diff(bounds).max(initial=1))
    order = np.empty(n, dtype=_compact(widest - 1))
    run_type, stack_type = _compact([widest, _top(indices) + 1]), _compact(_top(stack_ids))
    parts = []
    j = 0
    while j < k:  # a block of whole chunks, about BLOCK particles
        stop = min(k, max(j + 1, int(np.searchsorted(bounds, bounds[j] + BLOCK, side="right")) - 1))
        a, b = int(bounds[j]), int(bounds[stop])
        runs, run_bounds, stacks, stack_bounds, reorder = _plan_block(stack_ids[a:b], indices[a:b],
                                                                      bounds[j:stop + 1] - a, order[a:b])
        parts.append((runs.astype(run_type), run_bounds, stacks.astype(stack_type), stack_bounds, reorder))
        j = stop
    runs = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, 3), dtype=run_type)
    run_bounds = _join_bounds([p[1] for p in parts])
    stacks = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, dtype=stack_type)
    stack_bounds = _join_bounds([p[3] for p in parts])
    reorder = np.concatenate([p[4] for p in parts]) if parts else np.zeros(0, dtype=bool)
    return ReadPlan(runs, run_bounds, stacks, stack_bounds, order, reorder)


def _plan_block(stack_ids: np.ndarray, indices: np.ndarray, bounds: np.ndarray,
                order: np.ndarray) -> tuple[np.ndarray, ...]:
    """One block of chunks: (runs with stacks numbered per chunk, run bounds, stacks, stack bounds,
    reorder), filling ``order`` (the block's rows of it)."""
    n, k = len(indices), len(bounds) - 1
    sizes = np.diff(bounds)
    chunk_of = np.repeat(np.arange(k, dtype=np.int64), sizes)
    perm = _sort_by(chunk_of, stack_ids, indices)
    s, i = stack_ids[perm].astype(np.int64, copy=False), indices[perm].astype(np.int64, copy=False)
    new = np.ones(n, dtype=bool)  # the first of each distinct image of a chunk, in sorted order
    new[1:] = (chunk_of[1:] != chunk_of[:-1]) | (s[1:] != s[:-1]) | (i[1:] != i[:-1])
    slot = np.cumsum(new)  # 1 + row of each sorted particle among the block's distinct images
    before = np.zeros(k, dtype=np.int64)  # distinct images of the block before each chunk
    inner = bounds[:-1] > 0
    before[inner] = slot[bounds[:-1][inner] - 1]
    slot -= np.repeat(before + 1, sizes)  # row among its chunk's distinct images
    order[perm] = slot
    del slot
    reorder = np.bincount(chunk_of[(perm != np.arange(n)) | ~new], minlength=k) > 0
    del perm
    uc, us, ui = chunk_of[new], s[new], i[new]
    del s, i, new
    brk = np.ones(len(ui), dtype=bool)  # where a run starts
    brk[1:] = (uc[1:] != uc[:-1]) | (us[1:] != us[:-1]) | (ui[1:] != ui[:-1] + 1)
    starts = np.flatnonzero(brk)
    lengths = np.diff(np.append(starts, len(ui)))
    rc, rs = uc[starts], us[starts]
    fresh = np.ones(len(starts), dtype=bool)  # runs that start a chunk's next stack
    fresh[1:] = (rc[1:] != rc[:-1]) | (rs[1:] != rs[:-1])
    local = np.cumsum(fresh) - 1
    stack_bounds = np.searchsorted(rc[fresh], np.arange(k + 1))
    local -= stack_bounds[rc]
    runs = np.stack([local, ui[starts], ui[starts] + lengths], axis=1)
    return runs, np.searchsorted(rc, np.arange(k + 1)), rs[fresh], stack_bounds, reorder


def _join_bounds(parts: list[np.ndarray]) -> np.ndarray:
    """Per-block bounds [0 .. m_b] joined into one [0 .. sum m_b]."""
    if not parts:
        return np.zeros(1, dtype=np.int64)
    shift = np.cumsum([0] + [int(p[-1]) for p in parts[:-1]])
    return np.concatenate([parts[0][:1]] + [p[1:] + d for p, d in zip(parts, shift)])


def _top(values: np.ndarray) -> int:
    return int(np.max(values, initial=0))


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
