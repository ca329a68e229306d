"""Pure arithmetic of the store step: which particles go in which output file, where the pieces
that tasks write begin and end, and which source byte ranges an unchanged copy moves. numpy only.

Output file ``k`` holds particles ``[k * batch_size, (k + 1) * batch_size)``. Tasks are pieces, not
files: a piece is a stretch of particles inside one file and one dask chunk, so how many particles
go in a file never decides how many tasks run.
"""

from __future__ import annotations

import numpy as np


def bounds(n: int, size: int) -> np.ndarray:
    """Boundaries ``[0, size, 2*size, ..., n]`` of consecutive groups of at most ``size``.

    >>> bounds(10, 4).tolist()
    [0, 4, 8, 10]
    >>> bounds(0, 4).tolist()
    [0]
    """
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    return np.append(np.arange(0, n, size, dtype=np.int64), np.int64(n)) if n else np.zeros(1, np.int64)


def pieces(file_bounds: np.ndarray, chunk_bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Piece boundaries (every file and chunk boundary) and the file of each piece.

    >>> b, f = pieces(np.array([0, 4, 8, 10]), np.array([0, 3, 6, 10]))
    >>> b.tolist(), f.tolist()
    ([0, 3, 4, 6, 8, 10], [0, 0, 1, 1, 2])
    """
    b = np.union1d(file_bounds, chunk_bounds).astype(np.int64)
    return b, np.searchsorted(file_bounds, b[:-1], side="right") - 1


def copy_bounds(n: int, batch_size: int, max_images: int) -> np.ndarray:
    """Piece boundaries for copies: each file cut into pieces of at most ``max_images``.

    >>> copy_bounds(10, 4, 3).tolist()
    [0, 3, 4, 7, 8, 10]
    """
    files = bounds(n, batch_size)[:-1]
    steps = np.arange(0, batch_size, max(1, max_images), dtype=np.int64)
    cuts = (files[:, None] + steps[None, :]).ravel()
    return np.append(cuts[cuts < n], np.int64(n)) if n else np.zeros(1, np.int64)


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
