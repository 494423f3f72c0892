"""The Cityscapes label table, written once: label IDs (as stored in Cityscapes, Synscapes and
GTA5 label PNGs) -> the 19 train IDs, with 255 as ignore. Source: cityscapesscripts'
`helpers/labels.py` (the `license plate` entry, id -1, never appears in uint8 PNGs).
"""

from __future__ import annotations

import numpy as np

IGNORE = 255
NUM_CLASSES = 19

# (label id, name, train id)
LABELS: tuple[tuple[int, str, int], ...] = (
    (0, "unlabeled", 255), (1, "ego vehicle", 255), (2, "rectification border", 255),
    (3, "out of roi", 255), (4, "static", 255), (5, "dynamic", 255), (6, "ground", 255),
    (7, "road", 0), (8, "sidewalk", 1), (9, "parking", 255), (10, "rail track", 255),
    (11, "building", 2), (12, "wall", 3), (13, "fence", 4), (14, "guard rail", 255),
    (15, "bridge", 255), (16, "tunnel", 255), (17, "pole", 5), (18, "polegroup", 255),
    (19, "traffic light", 6), (20, "traffic sign", 7), (21, "vegetation", 8), (22, "terrain", 9),
    (23, "sky", 10), (24, "person", 11), (25, "rider", 12), (26, "car", 13), (27, "truck", 14),
    (28, "bus", 15), (29, "caravan", 255), (30, "trailer", 255), (31, "train", 16),
    (32, "motorcycle", 17), (33, "bicycle", 18),
)
MAX_LABEL_ID = max(i for i, _, _ in LABELS)

TRAIN_NAMES: tuple[str, ...] = tuple(n for _, n, t in sorted(LABELS, key=lambda r: r[2]) if t != IGNORE)
TRAIN_ID: dict[str, int] = {n: i for i, n in enumerate(TRAIN_NAMES)}

# Lookup table over all 256 uint8 values; ids outside the table map to a marker (254, not a train
# ID) so that one uint8 gather both maps and flags them.
_INVALID = 254
_LUT = np.full(256, _INVALID, dtype=np.uint8)
for _id, _, _train in LABELS:
    _LUT[_id] = _train

LABEL_TO_TRAIN = _LUT.copy()  # the same table, public: the train ID of each uint8 label ID (254: none)
LABEL_TO_TRAIN.flags.writeable = False

# Label ID written for each train ID (the demo generator writes label-ID PNGs like real data).
LABEL_ID_OF_TRAIN = np.array([next(i for i, _, t in LABELS if t == k) for k in range(NUM_CLASSES)], dtype=np.uint8)

# The Cityscapes colour palette, by train ID (for pictures of label maps).
PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)], dtype=np.uint8)


def to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map a label-ID map to train IDs (uint8, 255 = ignore). Unknown IDs raise ValueError."""
    if label_ids.dtype != np.uint8:
        if label_ids.min(initial=0) < 0 or label_ids.max(initial=0) > 255:
            raise ValueError(f"label IDs outside 0..255 (min {label_ids.min()}, max {label_ids.max()})")
        label_ids = label_ids.astype(np.uint8)
    train = np.take(_LUT, label_ids)  # np.take: ~1.5x faster than fancy indexing for this gather
    if (train == _INVALID).any():  # not max() == _INVALID: ignored pixels (255) would hide it
        raise unknown_ids_error(np.unique(label_ids[train == _INVALID]))
    return train


def unknown_ids(value_counts: np.ndarray) -> np.ndarray:
    """The uint8 label IDs that occur (256 counts, one per value) but are not in the table."""
    return np.flatnonzero((np.asarray(value_counts) > 0) & (_LUT == _INVALID))


def unknown_ids_error(bad: np.ndarray) -> ValueError:
    return ValueError(f"label ID(s) {np.asarray(bad)[:10].tolist()} outside the Cityscapes table (0..{MAX_LABEL_ID})")


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """Train-ID map -> RGB picture (ignore is black)."""
    out = np.zeros(train_ids.shape + (3,), dtype=np.uint8)
    valid = train_ids < NUM_CLASSES
    out[valid] = PALETTE[train_ids[valid]]
    return out
