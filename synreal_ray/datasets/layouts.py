"""Dataset layouts: list a dataset (local or s3://) as samples (id, image uri, label uri).

The id of a sample is its image's path relative to the dataset root, without extension: stable
across runs and machines, and readable in error messages and pair tables. Ids and relative paths
come from the data and later name output files, so a file whose path under the root is not plain
(an S3 key with `..`, `.` or empty parts) is refused as a problem, never listed as a sample.
"""

from __future__ import annotations

import os
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


def _path(uri: str) -> str:
    """The path of a URI as listed, for prefix comparison: S3 keys verbatim (a key may hold `..`
    or `//`, which normalising would hide), local paths absolute."""
    uri = str(uri)
    if storage.is_s3(uri):
        return uri[len("s3://"):]
    return os.path.abspath(uri).replace(os.sep, "/")


def _rel(uri: str, root: str) -> str:
    """Path of a listed file relative to `root`, not normalised (see `_path`)."""
    p, r = _path(uri), _path(root).rstrip("/") + "/"
    if not p.startswith(r):
        raise ValueError(f"{uri}: listed under {root} but not inside it")
    return p[len(r):]


def is_plain_relative(rel: str) -> bool:
    """True for a relative path that `storage.safe_join` accepts: not absolute, not empty, no
    empty, `.` or `..` parts."""
    try:
        storage.safe_join("", rel)
    except ValueError:
        return False
    return True


def check_split(split: str) -> str:
    """A Cityscapes split is one folder name under leftImg8bit/ and gtFine/."""
    if not split or split in (".", "..") or "/" in split or "\\" in split:
        raise ValueError(f"split {split!r}: must be one folder name under leftImg8bit/ and gtFine/ "
                         f"(not empty, no '/', not '.' or '..')")
    return split


def _plain_files(files: list[str], root: str) -> tuple[list[str], list[Problem]]:
    """Split listed files into those with a plain relative path under `root` and problems."""
    ok, problems = [], []
    for u in files:
        rel = _rel(u, root)
        if is_plain_relative(rel):
            ok.append(u)
        else:
            problems.append(Problem(u, f"path {rel!r} under the dataset root is not a plain relative path "
                                       f"(absolute, empty, '.' or '..' parts): refused"))
    return ok, problems


def _by_name(files: list[str], folder: str, what: str) -> dict[str, str]:
    """Files of `folder` by their path relative to it without extension (`a/b.png` -> `a/b`);
    two files with the same name apart from the extension are refused."""
    out: dict[str, str] = {}
    for u in files:
        key = posixpath.splitext(_rel(u, folder))[0]
        if key in out:
            raise ValueError(f"{out[key]} and {u}: two {what} with the same path apart from the extension; "
                             f"keep one of them")
        out[key] = u
    return out


def _match(root: str, images: dict[str, str], labels: dict[str, str]) -> tuple[list[Sample], list[Problem]]:
    samples, problems = [], []
    for key, img in images.items():
        lab = labels.get(key)
        if lab is None:
            problems.append(Problem(img, "image has no label map"))
            continue
        samples.append(Sample(posixpath.splitext(_rel(img, root))[0], img, lab))
    return samples, problems


def list_dataset(root: str, layout: str, split: str | None = None) -> tuple[list[Sample], list[Problem]]:
    """List `root` in `layout`. Returns (samples sorted by id, problems such as missing labels or
    files whose path is not plain).

    Raises ValueError when the dataset is empty, is not in the given layout, the split is not a
    plain folder name, or two images (or two labels) differ only in their extension.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    root = str(root).rstrip("/")
    if layout == "cityscapes":
        split = "train" if split is None else check_split(split)
        img_dir = storage.join(root, "leftImg8bit", split)
        lab_dir = storage.join(root, "gtFine", split)
        images = [u for u in storage.list_files(img_dir) if u.endswith("_leftImg8bit.png")]
        labels = [u for u in storage.list_files(lab_dir) if u.endswith("_gtFine_labelIds.png")]
        images, bad = _plain_files(images, root)
        labels, bad_labels = _plain_files(labels, root)
        # key: city/frame prefix, e.g. "aachen/aachen_000000_000019"
        image_of = {_rel(u, img_dir)[: -len("_leftImg8bit.png")]: u for u in images}
        label_of = {_rel(u, lab_dir)[: -len("_gtFine_labelIds.png")]: u for u in labels}
        expected = f"{img_dir}/<city>/*_leftImg8bit.png"
    else:
        # every other layout: an image and its label have the same path under their folders,
        # subfolders included, extension aside (images/a/b.jpg <-> labels/a/b.png)
        img_sub, lab_sub = {"synscapes": ("img/rgb", "img/class"), "gta5": ("images", "labels"),
                            "folder": ("images", "labels")}[layout]
        img_dir, lab_dir = storage.join(root, *img_sub.split("/")), storage.join(root, *lab_sub.split("/"))
        images, bad = _plain_files(storage.list_files(img_dir, IMAGE_EXTS), root)
        labels, bad_labels = _plain_files(storage.list_files(lab_dir, IMAGE_EXTS), root)
        image_of = _by_name(images, img_dir, "images")
        label_of = _by_name(labels, lab_dir, "label maps")
        expected = f"{img_dir}/*.png with labels in {lab_dir}/"
    samples, problems = _match(root, image_of, label_of)
    problems = bad + bad_labels + problems
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
        return storage.join(root, "leftImg8bit", "train" if split is None else check_split(split))
    return storage.join(root, *_MARKERS[layout].split("/"))
