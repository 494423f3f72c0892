"""Dataset layouts: list a dataset (local or s3://) as samples (id, image uri, label uri).

The id of a sample is its image's path relative to the dataset root, without extension: stable
across runs and machines, and readable in error messages and pair tables.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from synreal_ray import storage

LAYOUTS = ("cityscapes", "synscapes", "gta5", "folder")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")

# Where each layout keeps its images, to recognise a dataset given with the wrong --layout.
_MARKERS = {"cityscapes": "leftImg8bit", "synscapes": "img/rgb", "gta5": "images", "folder": "images"}


@dataclass(frozen=True)
class Sample:
    id: str
    image_uri: str
    label_uri: str


@dataclass(frozen=True)
class Problem:
    uri: str
    reason: str


def _stem(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path))[0]


def _rel(uri: str, root: str) -> str:
    return storage.relpath(uri, root)


def _match(root: str, images: list[str], label_for: dict[str, str], key) -> tuple[list[Sample], list[Problem]]:
    samples, problems = [], []
    for img in images:
        lab = label_for.get(key(img))
        if lab is None:
            problems.append(Problem(img, "image has no label map"))
            continue
        samples.append(Sample(posixpath.splitext(_rel(img, root))[0], img, lab))
    return samples, problems


def list_dataset(root: str, layout: str, split: str | None = None) -> tuple[list[Sample], list[Problem]]:
    """List `root` in `layout`. Returns (samples sorted by id, problems such as missing labels).

    Raises ValueError when the dataset is empty or is not in the given layout.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    root = str(root).rstrip("/")
    if layout == "cityscapes":
        split = split or "train"
        img_dir = storage.join(root, "leftImg8bit", split)
        lab_dir = storage.join(root, "gtFine", split)
        images = [u for u in storage.list_files(img_dir) if u.endswith("_leftImg8bit.png")]
        labels = [u for u in storage.list_files(lab_dir) if u.endswith("_gtFine_labelIds.png")]
        # key: city/frame prefix, e.g. "aachen/aachen_000000_000019"
        label_for = {_rel(u, lab_dir)[: -len("_gtFine_labelIds.png")]: u for u in labels}
        samples, problems = _match(root, images, label_for, lambda u: _rel(u, img_dir)[: -len("_leftImg8bit.png")])
        expected = f"{img_dir}/<city>/*_leftImg8bit.png"
    else:
        img_sub, lab_sub = {"synscapes": ("img/rgb", "img/class"), "gta5": ("images", "labels"),
                            "folder": ("images", "labels")}[layout]
        img_dir, lab_dir = storage.join(root, *img_sub.split("/")), storage.join(root, *lab_sub.split("/"))
        images = storage.list_files(img_dir, IMAGE_EXTS)
        labels = storage.list_files(lab_dir, IMAGE_EXTS)
        if layout == "folder":  # any stem, matched by stem
            key = _stem
        else:  # N.png with N.png: same relative path
            key = lambda u, d=img_dir: posixpath.splitext(_rel(u, d))[0]  # noqa: E731
        label_for = {(key(u) if layout == "folder" else posixpath.splitext(_rel(u, lab_dir))[0]): u for u in labels}
        samples, problems = _match(root, images, label_for, key)
        expected = f"{img_dir}/*.png with labels in {lab_dir}/"
    if not samples and not problems:
        hint = [name for name, m in _MARKERS.items() if name != layout and storage.is_dir(storage.join(root, *m.split("/")))]
        msg = f"{root}: no images found for layout {layout!r} (expected {expected})"
        if hint:
            msg += f"; the folder looks like the {' or '.join(repr(h) for h in hint)} layout"
        raise ValueError(msg)
    return sorted(samples, key=lambda s: s.id), problems


def image_root(root: str, layout: str, split: str | None = None) -> str:
    """The folder that holds a dataset's images and nothing else (what FID should look at)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "cityscapes":
        return storage.join(root, "leftImg8bit", split or "train")
    return storage.join(root, *_MARKERS[layout].split("/"))
