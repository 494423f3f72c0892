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
def fine_grid(height: int, width: int, grid: tuple[Level, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column boundaries of the finest grid that refines every level: the union of all
    levels' boundaries, so every level's cell is a union of fine cells and one count per fine cell
    gives all levels. Cached per shape: a dataset's maps usually share one size."""
    rows = np.unique(np.concatenate([_bounds(height, r) for r, _ in grid]))
    cols = np.unique(np.concatenate([_bounds(width, c) for _, c in grid]))
    rows.flags.writeable = cols.flags.writeable = False
    return rows, cols


@functools.lru_cache(maxsize=8)
def _fine_bins(height: int, width: int, grid: tuple[Level, ...]) -> np.ndarray:
    """Per-pixel base bin (fine cell index x 256) of the fine grid, for one bincount of all cells."""
    rows, cols = fine_grid(height, width, grid)
    fine_r = np.searchsorted(rows, np.arange(height), side="right") - 1
    fine_c = np.searchsorted(cols, np.arange(width), side="right") - 1
    base = ((fine_r[:, None] * (len(cols) - 1) + fine_c[None, :]) * 256).astype(np.intp)
    base.flags.writeable = False
    return base


def fine_counts(labels: np.ndarray, grid: tuple[Level, ...]) -> np.ndarray:
    """(fine rows, fine cols, 256) int64: how many pixels of each uint8 value each fine cell holds.
    One bincount over all cells (256 slots a cell, so any value is counted, valid or not)."""
    H, W = labels.shape
    rows, cols = fine_grid(H, W, grid)
    counts = np.bincount((_fine_bins(H, W, grid) + labels).reshape(-1), minlength=(len(rows) - 1) * (len(cols) - 1) * 256)
    return counts.reshape(len(rows) - 1, len(cols) - 1, 256)


def sp_feat_from_counts(counts: np.ndarray, shape: tuple[int, int], levels, num_classes: int = 19,
                        ignore_index: int = 255, id_map: np.ndarray | None = None) -> np.ndarray:
    """SP-Feat vector from the fine cells' value counts (`fine_counts`, or any counter of the same
    (fine rows, fine cols, 256) layout, e.g. Pillow's histogram of each fine cell).

    The counted values are class IDs, or, with `id_map` (256 entries: the class of each value,
    `ignore_index` for ignored values, anything else >= num_classes for values that must not
    occur), raw IDs mapped here: 256 slots instead of every pixel go through the table.
    Values that are neither a class nor ignored raise ValueError naming them.
    """
    if not 0 < num_classes <= 255:
        raise ValueError("sp_feat supports 1 to 255 classes")
    grid = parse_levels(levels)
    H, W = shape
    rows, cols = fine_grid(H, W, grid)
    classes = np.arange(256) if id_map is None else np.asarray(id_map, dtype=np.int64)
    present = counts.sum(axis=(0, 1)) > 0
    bad = present & (classes != ignore_index) & ((classes < 0) | (classes >= num_classes))
    if bad.any():
        raise ValueError(f"{'label IDs' if id_map is not None else 'train IDs'} {np.flatnonzero(bad)[:10].tolist()} "
                         f"{'map to no class' if id_map is not None else f'outside 0..{num_classes - 1}'} "
                         f"(ignore = {ignore_index})")
    # one-hot of each value's class (ignored and absent values: no class), then one small matmul
    onehot = np.zeros((256, num_classes), dtype=np.int64)
    keep = (classes >= 0) & (classes < num_classes) & (classes != ignore_index)
    onehot[np.flatnonzero(keep), classes[keep]] = 1
    counts = counts @ onehot
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


def sp_feat(labels: np.ndarray, num_classes: int = 19, levels=(1, 2, 4), ignore_index: int = 255,
            id_map: np.ndarray | None = None) -> np.ndarray:
    """SP-Feat vector of one (H, W) map of train IDs (or of raw IDs with `id_map`, see
    `sp_feat_from_counts`): float32, length num_classes x total cells.

    One vectorised pass: one bincount counts every uint8 value per cell of the finest common grid,
    and each level's cells are sums of fine cells. Invalid IDs are counted in the same pass, so
    validation costs nothing extra.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"sp_feat expects an (H, W) label map, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"sp_feat expects integer train IDs, got dtype {labels.dtype}")
    if labels.dtype != np.uint8:
        lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
        if lo < 0 or hi > 255:
            _raise_invalid(labels, num_classes, ignore_index)
        labels = labels.astype(np.uint8)
    return sp_feat_from_counts(fine_counts(labels, parse_levels(levels)), labels.shape, levels, num_classes,
                               ignore_index, id_map)


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
