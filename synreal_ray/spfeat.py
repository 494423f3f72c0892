"""SP-Feat: spatial-pyramid class histograms of a semantic label map (paper 000, section 3.2.2).

For each level (a grid of rows x cols cells), each cell in row-major order holds the fraction of
its non-ignored pixels that belong to each class. Two images with similar vectors have similar
layouts: the same classes in the same places. Pure numpy; no Ray.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import numpy as np

Level = tuple[int, int]


def parse_levels(levels: str | int | Sequence | Iterable) -> tuple[Level, ...]:
    """'1,2,4' or '2x8' or (1, 2, (2, 8)) -> ((1, 1), (2, 2), (2, 8)). `n` means an n x n grid."""
    items = levels.split(",") if isinstance(levels, str) else [levels] if isinstance(levels, int) else list(levels)
    out = []
    for item in items:
        try:
            if isinstance(item, str):
                item = item.strip().lower()
                rows, cols = (int(v) for v in item.split("x")) if "x" in item else (int(item), int(item))
            elif isinstance(item, (int, np.integer)):
                rows = cols = int(item)
            else:
                rows, cols = (int(v) for v in item)
        except (ValueError, TypeError):
            raise ValueError(f"bad SP-Feat level {item!r}: use N (an N x N grid) or RxC, e.g. '1,2,4' or '2x8'") from None
        if rows < 1 or cols < 1:
            raise ValueError(f"bad SP-Feat level {item!r}: rows and columns must be >= 1")
        out.append((rows, cols))
    if not out:
        raise ValueError("SP-Feat needs at least one level")
    return tuple(out)


def feature_dim(levels, num_classes: int = 19) -> int:
    return num_classes * sum(r * c for r, c in parse_levels(levels))


def levels_str(levels) -> str:
    return ",".join(f"{r}x{c}" for r, c in parse_levels(levels))


def _bounds(size: int, parts: int) -> np.ndarray:
    return (np.arange(parts + 1) * size) // parts


@functools.lru_cache(maxsize=8)
def _fine_grid(height: int, width: int, grid: tuple[Level, ...], slots: int):
    """Per-pixel base bin of the finest grid that refines every level, and the fine boundaries.

    Every level's cell is a union of fine cells (the fine grid's boundaries are the union of all
    levels' boundaries), so one bincount over the fine grid gives all levels. Cached per shape:
    a dataset's maps usually share one size.
    """
    rows = np.unique(np.concatenate([_bounds(height, r) for r, _ in grid]))
    cols = np.unique(np.concatenate([_bounds(width, c) for _, c in grid]))
    fine_r = np.searchsorted(rows, np.arange(height), side="right") - 1
    fine_c = np.searchsorted(cols, np.arange(width), side="right") - 1
    base = (fine_r[:, None] * (len(cols) - 1) + fine_c[None, :]) * slots
    base.flags.writeable = False
    return base.astype(np.intp), rows, cols


def sp_feat(labels: np.ndarray, num_classes: int = 19, levels=(1, 2, 4), ignore_index: int = 255) -> np.ndarray:
    """SP-Feat vector of one (H, W) train-ID map: float32, length num_classes x total cells.

    One vectorised pass: one bincount counts every uint8 value per cell of the finest common grid
    (256 slots a cell, so no lookup table is needed), and each level's cells are sums of fine
    cells. Invalid IDs are counted in the same pass, so validation costs nothing extra.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"sp_feat expects an (H, W) label map, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"sp_feat expects integer train IDs, got dtype {labels.dtype}")
    if not 0 < num_classes <= 255:
        raise ValueError("sp_feat supports 1 to 255 classes")
    if labels.dtype != np.uint8:
        lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
        if lo < 0 or hi > 255:
            _raise_invalid(labels, num_classes, ignore_index)
        labels = labels.astype(np.uint8)
    grid = parse_levels(levels)
    H, W = labels.shape
    base, rows, cols = _fine_grid(H, W, grid, 256)
    counts = np.bincount((base + labels).reshape(-1), minlength=(len(rows) - 1) * (len(cols) - 1) * 256)
    counts = counts.reshape(len(rows) - 1, len(cols) - 1, 256)
    allowed = np.zeros(256, dtype=bool)
    allowed[:num_classes] = True
    if 0 <= ignore_index < 256:
        allowed[ignore_index] = True
    if counts.sum(axis=(0, 1))[~allowed].any():
        _raise_invalid(labels, num_classes, ignore_index)
    counts = counts[..., :num_classes].copy()
    if 0 <= ignore_index < num_classes:
        counts[..., ignore_index] = 0
    # Cumulative sums over fine cells: a level's cell is a difference of two of them (zero for an
    # empty cell, which happens when a grid has more cells than the map has pixels).
    cum = np.zeros((counts.shape[0] + 1, counts.shape[1] + 1, num_classes), dtype=np.int64)
    cum[1:, 1:] = counts.cumsum(0).cumsum(1)
    out = []
    for r, c in grid:
        ri, ci = np.searchsorted(rows, _bounds(H, r)), np.searchsorted(cols, _bounds(W, c))
        block = cum[ri][:, ci]
        cells = block[1:, 1:] - block[:-1, 1:] - block[1:, :-1] + block[:-1, :-1]
        out.append(cells.reshape(r * c, num_classes))
    counts = np.concatenate(out)
    totals = counts.sum(axis=1, keepdims=True)
    hist = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64), where=totals > 0)
    return hist.astype(np.float32).reshape(-1)


def _raise_invalid(labels: np.ndarray, num_classes: int, ignore_index: int):
    bad = np.unique(labels[(labels != ignore_index) & ((labels < 0) | (labels >= num_classes))])
    raise ValueError(f"train IDs {bad[:10].tolist()} outside 0..{num_classes - 1} (ignore = {ignore_index})")


def sp_feat_reference(labels: np.ndarray, num_classes: int = 19, levels=(1, 2, 4), ignore_index: int = 255) -> np.ndarray:
    """The definition written as plain loops over cells and classes: slow, obviously right.

    Kept as the yardstick for the tests and for jobs/bench_spfeat.py; do not use it in pipelines.
    """
    H, W = labels.shape
    out = []
    for rows, cols in parse_levels(levels):
        rb, cb = (np.arange(rows + 1) * H) // rows, (np.arange(cols + 1) * W) // cols
        for r in range(rows):
            for c in range(cols):
                cell = labels[rb[r]:rb[r + 1], cb[c]:cb[c + 1]]
                valid = int((cell != ignore_index).sum())
                for k in range(num_classes):
                    out.append(float((cell == k).sum()) / valid if valid else 0.0)
    return np.array(out, dtype=np.float32)
