"""Stages `segment` and `seg-eval`: torchvision semantic segmenters trained on Ray Train, and
scored the way the papers score them (cityscapesscripts' IoU on the 19 Cityscapes train IDs).

    cfg = SegmentConfig(train=(TrainSource(uri="data/real", layout="cityscapes"),), out="out/seg")
    run_segment(cfg)                                   # synreal segment --train ... --out out/seg
    run_seg_eval(SegEvalConfig(model="out/seg", dataset="data/real", layout="cityscapes",
                               split="val", out="out/seg-eval"))
    model, meta = load_segmenter("out/seg")            # notebooks: the latest checkpoint, eval mode

Pure core (no Ray): `confusion_matrix`, `iou_from_confusion`, `scores`, `top_confusions`,
`recalibrate_bn`, `build_segmenter` / `load_backbone`, `augment`, `plan_steps`, `predict`.

**segment.** A model of `torchvision.models.segmentation` chosen by name (default
`lraspp_mobilenet_v3_large`; `deeplabv3_resnet50/101`, `fcn_resnet50/101`), built with
`weights=None, weights_backbone=None` (nothing is downloaded) and 19 outputs: trained from
scratch unless `backbone_weights` is given: a backbone state dict (torchvision's ImageNet
classification file, e.g. `mobilenet_v3_large-8738ca79.pth`, or a backbone's own) from a file or
s3://, or `imagenet`: torchvision's own ImageNet backbone file for the model (the one its
`weights_backbone` default names), from torch's hub cache, downloaded there (hash checked) when
missing, as torchvision does. Labels are label-ID
PNGs mapped to train IDs through datasets/labels.py (255 ignored by the loss). Training data is a
mixture `train: [{uri, layout, split, share}]`: each dataset fills a fixed number of slots of
every global batch (share x batch_size, largest remainder), drawing from its own seeded stream of
epochs (a new permutation per pass), and the slots are shuffled within the batch so every worker
sees the mixture. Each sample: random scale (`scale`, relative to the image's own resolution),
padding with ignore where the scaled image is smaller than the crop, random crop of `image_size`,
random horizontal flip; all drawn from (seed, step, slot), so a restarted run loads exactly the
batches the uninterrupted run would have. SGD with momentum, poly LR (1 - step/steps)^power,
cross-entropy, fp16 autocast + GradScaler where the worker has a GPU.

Ray Train runs it as train.py runs the GANs (the same helpers: checkpoint listing, resume point,
metrics log, Ray storage): DDP over `workers`, per-rank Ray Data streams (or, for small runs, the
same steps loaded in the workers: raytrain.IN_WORKER_MAX) rebuilt from the newest
complete checkpoint at every start of the worker group, so a killed worker (Ray Train's restart,
`max_failures`) and a killed job (`resume: true`) both continue from the last checkpoint.

**BatchNorm.** torchvision's MobileNetV3 uses BN momentum 0.01: after a few hundred steps its
running statistics still remember the random initialisation, and the eval-mode model predicts one
class (measured: mIoU 0.02 after 300 CPU steps at 64x128; 0.58 with the same weights after
recalibration; this stage on 64 demo images, 300 steps of 8: val mIoU 0.156 with `bn_batches: 0`,
0.516 with the default, from identical training runs). So before every checkpoint each worker re-estimates the running statistics with a
no-grad pass over the training batches it saw since the previous checkpoint (at most
`bn_batches`), with cumulative averaging (momentum=None), and the workers average them.

Output of `segment` under `out`:
  ray/segment/checkpoint_XXXXXXXX/   state.pt + meta.json (below)
  metrics.jsonl                      step, loss, pixel_accuracy (training crops), lr
  loss_curve.png
  val/eval.json, eval.md, confusion.png   the final checkpoint on `val` (when given)
  stage.json, _SUCCESS

Checkpoint contract:
  state.pt   torch.save({"model_name", "num_classes", "model" (state_dict), "optimizer", "scheduler",
             "scaler" (or None), "step"})
  meta.json  {"step", "model_name", "num_classes", "image_size", "batch_size", "seed",
             "bn_recalibrated" (batches per worker), "state_bytes" (size of state.pt)}

**seg-eval.** The latest checkpoint of a segment output (or a checkpoint folder) on every image of
a dataset at the image's full resolution, by a Ray Data actor pool (GPU actors when the cluster
has GPUs, else single-threaded CPU actors of num_cpus=0.5). Each batch returns its 19x19 int64
confusion matrix (rows: ground truth, columns: prediction; ground-truth 255 left out), summed
exactly on the driver. Output: eval.json (`miou`, `pixel_accuracy` as fractions, `iou` per class
name (null: not evaluated), `confusion`, `num_images`, `top_confusions`), eval.md, confusion.png,
with `save_predictions` predictions/<sample id>.png (Cityscapes label IDs), stage.json, _SUCCESS.

IoU follows cityscapesscripts' evalPixelLevelSemanticLabeling: tp / (tp + fp + fn) per class over
the whole set, pixels whose ground truth is ignored count nowhere, a class with tp + fp + fn = 0
(no ground-truth pixel and never predicted on a labelled pixel) is NaN and left out of the mean.
A class absent from the ground truth but predicted somewhere therefore scores 0, as there.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from synreal_ray import hub, storage
from synreal_ray.checkpoints import read_meta, read_state, resume_point
from synreal_ray.cluster import IN_PROCESS_MAX, actor_resources, call_in_batches, items_dataset, local_device
from synreal_ray.config import URI, ConfigError, check_pool_keys, from_dict, to_dict
from synreal_ray.datasets.images import by_shape
from synreal_ray.datasets.labels import IGNORE, LABEL_ID_OF_TRAIN, NUM_CLASSES, TRAIN_NAMES
from synreal_ray.datasets.layouts import LAYOUTS, list_dataset
from synreal_ray.progress import StepPoster, described
from synreal_ray.progress import bar as progress_bar
from synreal_ray.raytrain import Streams, fit, worker_batches
from synreal_ray.stage import Stage, read_info
from synreal_ray.train import (
    MetricsLog,
    _mean_over_workers,
    _step_seed,
    latest_checkpoint,
    parse_size,
    read_metrics,
    report_at_checkpoint,
)

log = logging.getLogger(__name__)

RUN_NAME = "segment"  # Ray Train run name under <out>/ray
STATE, META = "state.pt", "meta.json"
# ImageNet statistics: torchvision's segmentation models (and their backbones) expect them
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# name -> (output stride of the deepest BatchNorm, whether a BatchNorm follows a global pooling).
# Measured with forward passes in training mode (torchvision 0.29, batch 1 and 2, sides 1..33):
# every model runs at any size in eval mode; in training mode BatchNorm needs more than one value
# per channel, so per worker batch * ceil(H / stride) * ceil(W / stride) >= 2, and DeepLabV3's
# image-pooling branch (BatchNorm over a 1x1 map) needs at least 2 images per worker.
SEGMENTERS: dict[str, tuple[int, bool]] = {
    "lraspp_mobilenet_v3_large": (16, False),
    "deeplabv3_resnet50": (8, True),
    "deeplabv3_resnet101": (8, True),
    "fcn_resnet50": (8, False),
    "fcn_resnet101": (8, False),
}
SegmenterName = Literal["lraspp_mobilenet_v3_large", "deeplabv3_resnet50", "deeplabv3_resnet101",
                        "fcn_resnet50", "fcn_resnet101"]


# ------------------------------------------------------------------------------ metrics (pure)


def confusion_matrix(pred, target, num_classes: int = NUM_CLASSES, ignore: int = IGNORE) -> np.ndarray:
    """(num_classes, num_classes) int64 counts: row = ground truth, column = prediction. Pixels
    whose target is `ignore` are left out; any other target or prediction outside
    0..num_classes-1 is an error. Matrices of parts add up to the matrix of the whole."""
    p, t = np.asarray(pred), np.asarray(target)
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and ground truth {t.shape} differ in shape")
    p, t = p.reshape(-1).astype(np.int64), t.reshape(-1).astype(np.int64)
    keep = t != ignore
    p, t = p[keep], t[keep]
    if t.size and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"ground truth holds values outside 0..{num_classes - 1} and {ignore}: "
                         f"{np.unique(t[(t < 0) | (t >= num_classes)])[:10].tolist()}")
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"prediction holds values outside 0..{num_classes - 1} on labelled pixels")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(cm) -> np.ndarray:
    """Per-class IoU tp / (tp + fp + fn) (float64), NaN where tp + fp + fn = 0 (cityscapesscripts'
    getIouScoreForLabel: fp counts only pixels with a non-ignored ground truth, which is all `cm` holds)."""
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm)
    denom = cm.sum(axis=1) + cm.sum(axis=0) - tp  # tp + fn + fp
    return np.divide(tp, denom, out=np.full(len(tp), np.nan), where=denom > 0)


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


def scores(cm, names: tuple[str, ...] = TRAIN_NAMES) -> dict:
    """mIoU (mean over the classes with a defined IoU), pixel accuracy (correct / labelled
    pixels), per-class IoU by name (None: not evaluated) and the top confusions."""
    cm = np.asarray(cm, dtype=np.int64)
    iou = iou_from_confusion(cm)
    total = int(cm.sum())
    return {
        "miou": _num(np.nanmean(iou)) if np.isfinite(iou).any() else None,
        "pixel_accuracy": _num(np.trace(cm) / total) if total else None,
        "iou": {n: _num(v) for n, v in zip(names, iou)},
        "classes_evaluated": int(np.isfinite(iou).sum()),
        "top_confusions": top_confusions(cm, names),
        "confusion": cm.tolist(),
    }


def top_confusions(cm, names: tuple[str, ...] = TRAIN_NAMES, k: int = 5) -> list[str]:
    """The k largest off-diagonal entries (by pixels) in words: "building → vegetation: 23% of
    building pixels" (the share of that ground-truth class's pixels)."""
    cm = np.asarray(cm, dtype=np.int64)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    rows = cm.sum(axis=1)
    order = np.argsort(-off, axis=None, kind="stable")[:k]
    out = []
    for flat in order:
        i, j = divmod(int(flat), cm.shape[1])
        if off[i, j] <= 0:
            break
        out.append(f"{names[i]} → {names[j]}: {100 * cm[i, j] / rows[i]:.0f}% of {names[i]} pixels")
    return out


# --------------------------------------------------------------------------------- model (pure)


def check_crop(model: str, size: tuple[int, int], per_worker: int) -> str | None:
    """Why `model` cannot train on crops of `size` with `per_worker` images per worker, or None
    (the rule measured with forward passes, see SEGMENTERS)."""
    stride, pooled = SEGMENTERS[model]
    h, w = size
    if pooled and per_worker < 2:
        return (f"{model} needs at least 2 images per worker in training (batch_size / workers = {per_worker}): "
                "the BatchNorm of its image-pooling branch sees one value per channel per image")
    values = per_worker * math.ceil(h / stride) * math.ceil(w / stride)
    if values < 2:
        return (f"{h}x{w} is too small for {model} with {per_worker} image(s) per worker: in training its deepest "
                f"BatchNorm (output stride {stride}) sees {per_worker} x {math.ceil(h / stride)} x "
                f"{math.ceil(w / stride)} = {values} value per channel and needs 2; use a side of at least "
                f"{stride + 1} pixels or 2 images per worker")
    return None


def build_segmenter(name: str, num_classes: int = NUM_CLASSES, backbone: dict | None = None):
    """A torchvision segmentation model with random weights (nothing downloaded) and
    `num_classes` outputs; `backbone`: a state dict loaded into its backbone (`load_backbone`)."""
    from torchvision.models import segmentation

    if name not in SEGMENTERS:
        raise ValueError(f"unknown segmentation model {name!r}; choose one of {', '.join(SEGMENTERS)}")
    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None, "num_classes": num_classes}
    if not name.startswith("lraspp"):
        kwargs["aux_loss"] = False
    model = getattr(segmentation, name)(**kwargs)
    if backbone is not None:
        load_backbone(model, backbone, name)
    return model


def load_backbone(model, state: dict, what: str = "backbone weights") -> int:
    """Load `state` into `model.backbone`: a torchvision classification state dict (its
    `features.*` for MobileNetV3; `conv1`, `layer1..4` for ResNets; the classifier is ignored), a
    backbone's own, or either under `backbone.` / `module.`. Returns the tensors loaded; raises
    ValueError naming what is missing or mis-shaped."""
    for key in ("state_dict", "model"):  # common wrappers of training scripts
        if isinstance(state.get(key), dict) and not any(hasattr(v, "shape") for v in state.values()):
            state = state[key]
    target = model.backbone.state_dict()
    required = [k for k in target if not k.endswith("num_batches_tracked")]
    best: tuple[int, str, dict] = (-1, "", {})
    for prefix in ("", "features.", "backbone.", "module.", "module.features.", "module.backbone."):
        mapped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        found = sum(k in mapped for k in required)
        if found > best[0]:
            best = (found, prefix, mapped)
    found, _, mapped = best
    missing = [k for k in required if k not in mapped]
    if missing:
        raise ValueError(f"{what}: not backbone weights of this model: {len(missing)} of {len(required)} backbone "
                         f"tensors missing (e.g. {missing[0]!r}; the file has e.g. {list(state)[:3]})")
    bad = [f"{k} {tuple(mapped[k].shape)} != {tuple(target[k].shape)}" for k in required
           if tuple(mapped[k].shape) != tuple(target[k].shape)]
    if bad:
        raise ValueError(f"{what}: {len(bad)} backbone tensors have the wrong shape (e.g. {bad[0]})")
    model.backbone.load_state_dict({k: mapped.get(k, target[k]) for k in target}, strict=True)
    return len(required)


IMAGENET = "imagenet"  # backbone_weights: torchvision's ImageNet classification weights of the model's backbone


def imagenet_backbone_url(model: str) -> str:
    """The URL of the ImageNet backbone file torchvision's builder of `model` uses by default
    (its `weights_backbone` default, e.g. MobileNet_V3_Large_Weights.IMAGENET1K_V1)."""
    import inspect

    from torchvision.models import segmentation

    if model not in SEGMENTERS:
        raise ValueError(f"unknown segmentation model {model!r}; choose one of {', '.join(SEGMENTERS)}")
    return inspect.signature(getattr(segmentation, model)).parameters["weights_backbone"].default.url


def backbone_file(uri: str, model: str) -> str:
    """The file `backbone_weights` names: `imagenet` is torchvision's ImageNet backbone file for
    `model` in torch's hub cache (downloaded there, hash checked, when missing); anything else is
    the file itself (local or s3://)."""
    if uri != IMAGENET:
        return uri
    url = imagenet_backbone_url(model)
    try:
        return hub.cached_or_download(url, f"torchvision's ImageNet backbone for {model}")
    except hub.DownloadError as e:
        raise FileNotFoundError(f"backbone_weights: imagenet: {e}. On a machine with internet, download {url} and "
                                f"pass the file (--backbone-weights FILE|s3://), or place it at {hub.cache_path(url)}; "
                                "or leave backbone_weights unset to train from scratch") from None


def read_backbone(uri: str, model: str | None = None) -> dict:
    """A backbone weights file (local or s3://, or `imagenet` with `model`: see `backbone_file`) as a state dict."""
    import torch

    if uri == IMAGENET:
        if model is None:
            raise ValueError("backbone_weights: imagenet needs the model name")
        uri = backbone_file(uri, model)
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"{uri}: not a PyTorch state dict ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{uri}: expected a state dict, got {type(state).__name__}")
    return state


def _batchnorms(model) -> list:
    import torch

    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def recalibrate_bn(model, batches: Iterable) -> int:
    """Re-estimate every BatchNorm's running mean and variance from `batches` (model inputs):
    the statistics are reset, then a no-grad forward pass over each batch with momentum=None
    makes them the cumulative (equal-weight) average of the batch statistics, instead of an
    exponential average that forgets slowly. Only the BatchNorm layers are in training mode
    during the pass (dropout stays off); momenta and modes are put back after. Returns the number
    of batches used; with none, nothing changes. `model`: the bare module, not a DDP wrapper
    (whose forward would overwrite the buffers with rank 0's)."""
    import torch

    it = iter(batches)
    first = next(it, None)
    bns = _batchnorms(model)
    if first is None or not bns:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    n = 0
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for x in (first, *it):
                model(x)
                n += 1
    finally:
        for m in bns:
            m.momentum = momenta[m]
        for m, mode in modes.items():
            m.train(mode)
    return n


def to_input(images):
    """(B, H, W, 3) uint8 tensor -> (B, 3, H, W) float normalised with the ImageNet statistics."""
    import torch

    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous()


def predict(model, images: list[np.ndarray], amp: bool = True) -> list[np.ndarray]:
    """Train-ID maps (uint8, each image's own size) of uint8 RGB images of any sizes (equal sizes
    run as one batch), at full resolution; fp16 autocast on CUDA when `amp`."""
    import torch

    device = next(model.parameters()).device
    out: list = [None] * len(images)
    for idx in by_shape(images).values():
        x = to_input(torch.from_numpy(np.stack([images[i] for i in idx])).to(device))
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
            logits = model(x)["out"]
        pred = logits.argmax(dim=1).to(torch.uint8).cpu().numpy()
        for j, i in enumerate(idx):
            out[i] = pred[j]
    return out


# ----------------------------------------------------------------------------- samples (pure)


def read_sample(image_uri: str, label_uri: str) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 (H, W, 3), train IDs uint8 (H, W)) of one sample; ValueError naming the file for
    an unreadable or oversized file, a colour label map, unknown label IDs or differing sizes."""
    from synreal_ray.datasets.images import decode_image
    from synreal_ray.features import read_label

    image = np.asarray(decode_image(storage.read_bytes(image_uri), image_uri).convert("RGB"))
    label = read_label(label_uri)
    if image.shape[:2] != label.shape:
        raise ValueError(f"{label_uri}: label map is {label.shape[1]}x{label.shape[0]} but its image {image_uri} "
                         f"is {image.shape[1]}x{image.shape[0]}")
    return image, label


def augment(image: np.ndarray, label: np.ndarray, size: tuple[int, int], scale: tuple[float, float],
            flip: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random scale (uniform in `scale`, relative to the image's own resolution; bilinear image,
    nearest labels), padding (black image, ignored labels) where the scaled image is smaller than
    the crop, random crop of `size` (H, W), random horizontal flip. Draws from `rng` in a fixed
    order, so one seed gives one result."""
    from PIL import Image

    h0, w0 = label.shape
    s = rng.uniform(scale[0], scale[1])
    h, w = max(1, round(h0 * s)), max(1, round(w0 * s))
    if (h, w) != (h0, w0):
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
        label = np.asarray(Image.fromarray(label).resize((w, h), Image.Resampling.NEAREST))
    ch, cw = size
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE)
    y = int(rng.integers(0, image.shape[0] - ch + 1))
    x = int(rng.integers(0, image.shape[1] - cw + 1))
    image, label = image[y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]
    if rng.random() < 0.5 and flip:
        image, label = image[:, ::-1], label[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def batch_slots(shares: list[float], batch_size: int) -> list[int]:
    """Images of each dataset in every global batch: share x batch_size, rounded by largest
    remainder (ties to the earlier dataset). Raises when a dataset would get none."""
    total = float(sum(shares))
    exact = [s / total * batch_size for s in shares]
    slots = [math.floor(e) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: (-(exact[i] - slots[i]), i))[: batch_size - sum(slots)]:
        slots[i] += 1
    return slots


def plan_steps(sizes: list[int], slots: list[int], seed: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset, sample index) of every slot of the global batches of steps start..stop-1, each
    (stop - start, batch_size). Dataset d fills slots[d] slots per batch from its own stream:
    position k of the stream is pass k // N of a permutation of its N samples seeded by (seed, d,
    pass). The slots of a batch are then shuffled (seeded by (seed, step)). A pure function of the
    step: a run resumed at step S continues the uninterrupted run's sequence."""
    n, width = stop - start, sum(slots)
    ds = np.empty((n, width), np.int32)
    idx = np.empty((n, width), np.int64)
    owner = np.repeat(np.arange(len(slots)), slots)
    steps = np.arange(start, stop, dtype=np.int64)
    for d, (size, k) in enumerate(zip(sizes, slots)):
        pos = steps[:, None] * k + np.arange(k)[None, :]
        passes = pos // size
        picked = np.empty_like(pos)
        for p in np.unique(passes):
            perm = np.random.default_rng([seed, 0, d, int(p)]).permutation(size)
            m = passes == p
            picked[m] = perm[pos[m] % size]
        cols = np.flatnonzero(owner == d)
        idx[:, cols], ds[:, cols] = picked, d
    for i, s in enumerate(steps):
        order = np.random.default_rng([seed, 1, int(s)]).permutation(width)
        ds[i], idx[i] = ds[i, order], idx[i, order]
    return ds, idx


def load_seg_steps(batch: dict[str, np.ndarray], *, rows: dict[str, np.ndarray], sources: list[tuple[list, list]],
                   size: tuple[int, int], scale: tuple[float, float], flip: bool, seed: int) -> dict[str, np.ndarray]:
    """Ray Data UDF: local step numbers ("id" of ray.data.range) -> the augmented crops of those
    steps for one worker, one row per image, in step order."""
    local = np.asarray(batch["id"], dtype=np.int64)
    per = rows["ds"].shape[1]
    steps = np.repeat(rows["step"][local], per)
    images, labels = [], []
    for s, d, i, slot in zip(steps, rows["ds"][local].ravel(), rows["idx"][local].ravel(), rows["slot"][local].ravel()):
        image, label = read_sample(sources[d][0][i], sources[d][1][i])
        rng = np.random.default_rng([seed, 2, int(s), int(slot)])
        image, label = augment(image, label, size, scale, flip, rng)
        images.append(image)
        labels.append(label)
    return {"step": steps, "image": np.stack(images), "label": np.stack(labels)}


# ------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TrainSource:
    """One dataset of the training mixture; `share` is its fraction of every batch (shares are
    relative: they are normalised to sum 1)."""

    uri: URI
    layout: str
    split: str | None = None  # cityscapes layout: default train
    share: float = 1.0

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ConfigError(f"{self.layout!r} is not one of {', '.join(LAYOUTS)}", "layout")
        if not self.share > 0:
            raise ConfigError(f"must be > 0, got {self.share}", "share")


@dataclass(frozen=True)
class SegmentConfig:
    """Settings of the segment stage (the `segment:` section of a config file)."""

    train: tuple[TrainSource, ...]
    out: URI = "out/segment"
    val: URI | None = None  # scored with the final checkpoint into out/val (seg-eval's outputs)
    val_layout: str = "cityscapes"
    val_split: str | None = None  # None: "val" for the cityscapes layout
    model: SegmenterName = "lraspp_mobilenet_v3_large"
    backbone_weights: Literal["imagenet"] | URI | None = None  # None: from scratch; see backbone_file
    image_size: str = "512x1024"  # HxW of the training crops
    scale: tuple[float, float] = (0.5, 2.0)  # random scale range, relative to each image's resolution
    flip: bool = True
    batch_size: int = 8  # global: each worker trains on batch_size / workers crops
    steps: int = 2000
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    amp: bool = True  # fp16 autocast + GradScaler where the worker has a GPU
    workers: int = 1
    use_gpu: bool | None = None  # None: GPUs when the cluster has one per worker
    max_failures: int = 2
    checkpoint_every: int = 500
    keep_checkpoints: int | None = None
    log_every: int = 10
    bn_batches: int = 16  # BatchNorm recalibration before each checkpoint: batches per worker (0: off)
    eval_batch_size: int = 4
    eval_in_process_max: int = IN_PROCESS_MAX  # val sets up to this size are scored without an actor pool
    seed: int = 0
    resume: bool = False

    def __post_init__(self):
        if not self.train:
            raise ConfigError("needs at least one dataset: [{uri, layout, split, share}]", "train")
        if self.val_layout not in LAYOUTS:
            raise ConfigError(f"{self.val_layout!r} is not one of {', '.join(LAYOUTS)}", "val_layout")
        positive = ("batch_size", "steps", "workers", "checkpoint_every", "log_every", "eval_batch_size")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, key)}", key)
        for key in ("bn_batches", "seed", "eval_in_process_max"):
            if getattr(self, key) < 0:
                raise ConfigError(f"must be >= 0, got {getattr(self, key)}", key)
        for key in ("lr", "poly_power"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"must be > 0, got {getattr(self, key)}", key)
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ConfigError("momentum must be in [0, 1) and weight_decay >= 0", "momentum")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ConfigError(f"must be >= 1 or null (keep all), got {self.keep_checkpoints}", "keep_checkpoints")
        if self.max_failures < -1:
            raise ConfigError(f"must be >= -1 (-1: unlimited), got {self.max_failures}", "max_failures")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ConfigError(f"must be [low, high] with 0 < low <= high, got {list(self.scale)}", "scale")
        if self.batch_size % self.workers:
            raise ConfigError(f"{self.batch_size} does not split evenly over {self.workers} workers", "batch_size")
        slots = batch_slots([s.share for s in self.train], self.batch_size)
        if 0 in slots:
            d = slots.index(0)
            raise ConfigError(f"share {self.train[d].share} of batch_size {self.batch_size} gives {self.train[d].uri} "
                              "no image per batch; raise batch_size or its share", f"train[{d}].share")
        h, w = parse_size(self.image_size)
        why = check_crop(self.model, (h, w), self.batch_size // self.workers)
        if why:
            raise ConfigError(why, "image_size" if "too small" in why else "batch_size")
        object.__setattr__(self, "image_size", f"{h}x{w}")

    @property
    def size(self) -> tuple[int, int]:
        return parse_size(self.image_size)

    @property
    def slots(self) -> list[int]:
        return batch_slots([s.share for s in self.train], self.batch_size)

    @property
    def resolved_val_split(self) -> str | None:
        return self.val_split if self.val_split is not None or self.val_layout != "cityscapes" else "val"


def list_samples(uri: str, layout: str, split: str | None, what: str) -> list:
    """The samples of a dataset; any problem (an image without a label map, a path that is not
    plain) is an error here: a segmenter is trained and scored on labelled images only."""
    samples, problems = list_dataset(uri, layout, split)
    if problems:
        raise ValueError(f"{what} {uri}: {len(problems)} file(s) unusable, e.g. {problems[0].uri}: {problems[0].reason}")
    return samples


def prepare_sources(cfg: SegmentConfig) -> list[tuple[list[str], list[str]]]:
    """(image URIs, label URIs) of every training dataset, listed and checked."""
    out = []
    for i, src in enumerate(cfg.train):
        samples = list_samples(src.uri, src.layout, src.split, f"train[{i}]")
        out.append(([s.image_uri for s in samples], [s.label_uri for s in samples]))
    return out


# -------------------------------------------------------------------------------- checkpoints


def run_folder(out: str) -> str:
    """Where Ray Train keeps a segment run (and its checkpoints)."""
    return storage.join(out, "ray", RUN_NAME)


def segmenter_checkpoint(uri: str) -> str:
    """The newest complete checkpoint of a segment output (`uri` its out folder, its Ray run
    folder, or a checkpoint folder). FileNotFoundError when there is none."""
    run = run_folder(str(uri).rstrip("/"))
    return latest_checkpoint(run if storage.exists(run) else uri)


def read_segmenter(checkpoint: str) -> dict:
    """{"model_name", "num_classes", "model" (state dict), "step"} of a segment checkpoint."""
    meta = read_meta(checkpoint)
    if meta.get("model_name") not in SEGMENTERS:
        raise ValueError(f"{checkpoint}: not a segment checkpoint (its model is {meta.get('model_name')!r})")
    state = read_state(checkpoint)
    return {"model_name": state["model_name"], "num_classes": state["num_classes"], "model": state["model"],
            "step": state["step"]}


def segmenter_from_payload(payload: dict, device: Any = "cpu"):
    model = build_segmenter(payload["model_name"], payload["num_classes"])
    model.load_state_dict(payload["model"])
    return model.to(device).eval()


def load_segmenter(uri: str, device: Any = "cpu"):
    """(model in eval mode on `device`, meta.json) of the newest checkpoint of a segment output.
    Input: `to_input` of uint8 images; output["out"]: (B, 19, H, W) logits."""
    checkpoint = segmenter_checkpoint(uri)
    return segmenter_from_payload(read_segmenter(checkpoint), device), read_meta(checkpoint)


def save_checkpoint(folder: str, *, cfg: SegmentConfig, step: int, model, opt, sched, scaler, bn: int) -> None:
    """Write state.pt, then meta.json recording its size, into a local folder."""
    import torch

    path = os.path.join(folder, STATE)
    torch.save({"model_name": cfg.model, "num_classes": NUM_CLASSES, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler else None, "step": step}, path)
    meta = {"step": step, "model_name": cfg.model, "num_classes": NUM_CLASSES, "image_size": list(cfg.size),
            "batch_size": cfg.batch_size, "seed": cfg.seed, "bn_recalibrated": bn, "state_bytes": os.path.getsize(path)}
    with open(os.path.join(folder, META), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


def check_resumable(cfg: SegmentConfig, checkpoint: str) -> dict:
    meta = read_meta(checkpoint)
    for key, value in {"model_name": cfg.model, "image_size": list(cfg.size), "batch_size": cfg.batch_size}.items():
        if meta.get(key) != value:
            raise ValueError(f"{checkpoint}: cannot resume: it has {key} {meta.get(key)!r}, this config {value!r} "
                             "(start over without resume, or use another out)")
    if meta["step"] > cfg.steps:
        raise ValueError(f"{checkpoint}: cannot resume: it is at step {meta['step']}, past steps={cfg.steps}")
    return meta


# ------------------------------------------------------------------------------- worker loop


def _poly(steps: int, power: float) -> Callable[[int], float]:
    return lambda s: max(0.0, 1.0 - s / steps) ** power


def _average_batchnorms(model, world: int) -> None:
    """Every worker's recalibrated running statistics replaced by their mean over the workers."""
    import torch.distributed as dist

    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return
    for m in _batchnorms(model):
        for buf in (m.running_mean, m.running_var):
            dist.all_reduce(buf)
            buf.div_(world)


def _segment_worker(config: dict) -> None:
    """The training function of every Ray Train worker (see the module doc)."""
    import ray.train
    import ray.train.torch
    import torch

    from synreal_ray import viz
    from synreal_ray.cluster import use_assigned_cpus

    use_assigned_cpus()
    cfg: SegmentConfig = from_dict(SegmentConfig, config["cfg"])
    hook: Callable | None = config.get("step_hook")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    start, checkpoint = resume_point(run_folder(cfg.out))

    torch.manual_seed(cfg.seed)  # the same initial weights on every worker and every run
    backbone = read_backbone(cfg.backbone_weights, cfg.model) if cfg.backbone_weights and checkpoint is None else None
    model = build_segmenter(cfg.model, backbone=backbone).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _poly(cfg.steps, cfg.poly_power))
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    if checkpoint is not None:
        state = read_state(checkpoint, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        del state
    bare = model
    model = ray.train.torch.prepare_model(model)  # DDP when there are several workers
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=IGNORE, reduction="sum")
    post = StepPoster(config.get("progress") if rank == 0 else None, cfg.steps)
    metrics_log = MetricsLog(storage.join(cfg.out, "metrics.jsonl"), keep_until=start) if rank == 0 else None
    recent: deque = deque(maxlen=max(cfg.bn_batches, 1))  # this worker's batches since the last checkpoint

    step, t_first = start, None
    for batch in worker_batches(config, rank, cfg.batch_size // world):
        if not bool((batch["step"] == step).all()):
            raise RuntimeError(f"data stream out of order: expected step {step}, got {batch['step'].tolist()}")
        torch.manual_seed(_step_seed(cfg.seed, step, rank))
        images, target = batch["image"], batch["label"]
        if cfg.bn_batches:
            recent.append(images)
        x, y = to_input(images.to(device)), target.to(device).long()
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            logits = model(x)["out"]
        valid = (y != IGNORE).sum()
        loss = loss_fn(logits.float(), y) / valid.clamp(min=1)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        sched.step()
        step += 1
        if t_first is None:
            t_first = time.perf_counter()  # throughput leaves out the first (warm-up) step
        post(step, {"loss": loss.detach()})  # read (a device sync) only when posted

        last = step == cfg.steps
        save = step % cfg.checkpoint_every == 0 or last
        if save or step % cfg.log_every == 0:  # every worker averages at the same steps
            with torch.no_grad():
                correct = ((logits.argmax(1) == y) & (y != IGNORE)).sum()
            acc = float(correct) / max(int(valid), 1)
            metrics = {"step": step, **_mean_over_workers({"loss": loss.item(), "pixel_accuracy": acc}, device),
                       "lr": sched.get_last_lr()[0]}
            if last and step - start > 1:
                metrics["images_per_s"] = (step - start - 1) * cfg.batch_size / (time.perf_counter() - t_first)
            if rank == 0:
                metrics_log.add(metrics)
            if save:  # reports to Ray Train come with checkpoints only (raytrain.report_checkpoint)
                bn = recalibrate_bn(bare, (to_input(b.to(device)) for b in recent)) if cfg.bn_batches else 0
                recent.clear()
                _average_batchnorms(bare, world)
                report_at_checkpoint(
                    rank, metrics, step, metrics_log,
                    storage.join(cfg.out, "loss_curve.png"), lambda records: viz.loss_curves(
                        {cfg.model: records}, keys=("loss", "pixel_accuracy"),
                        titles={"loss": "cross-entropy loss", "pixel_accuracy": "pixel accuracy (training crops)"}),
                    functools.partial(save_checkpoint, cfg=cfg, step=step, model=bare, opt=opt, sched=sched,
                                      scaler=scaler, bn=bn))
        if hook is not None:
            hook(step=step, rank=rank, model=model)
    if step != cfg.steps:
        raise RuntimeError(f"data stream ended at step {step}, expected {cfg.steps}")


# ------------------------------------------------------------------------------------ driver


class _Streams(Streams):
    """Each rank's steps (raytrain.Streams): its columns of the plan (plan_steps) from the newest
    complete checkpoint."""

    def __init__(self, cfg: SegmentConfig, sources: list[tuple[list, list]]):
        self.cfg, self.sources = cfg, sources
        self._plan: tuple[int, tuple] | None = None

    def plan(self, rank: int):
        cfg = self.cfg
        start, _ = resume_point(run_folder(cfg.out))
        if self._plan is None or self._plan[0] != start:  # once per start, not once per rank
            self._plan = (start, plan_steps([len(s[0]) for s in self.sources], cfg.slots, cfg.seed, start, cfg.steps))
        ds, idx = self._plan[1]
        b = cfg.batch_size // cfg.workers
        cols = slice(rank * b, (rank + 1) * b)
        n = cfg.steps - start
        rows = {"step": np.arange(start, cfg.steps, dtype=np.int64), "ds": np.ascontiguousarray(ds[:, cols]),
                "idx": np.ascontiguousarray(idx[:, cols]),
                "slot": np.broadcast_to(np.arange(rank * b, (rank + 1) * b), (n, b)).copy()}
        return n, functools.partial(load_seg_steps, rows=rows, sources=self.sources, size=cfg.size,
                                    scale=tuple(cfg.scale), flip=cfg.flip, seed=cfg.seed)


# Settings that may change between a run and its continuation: more steps extend the same run
# (the poly schedule then follows the new total), and the validation set is only scored at the end.
CONTINUABLE = ("steps", "checkpoint_every", "keep_checkpoints", "max_failures", "log_every", "val", "val_layout",
               "val_split", "eval_batch_size", "eval_in_process_max")


def run_segment(cfg: SegmentConfig, force: bool = False, step_hook: Callable | None = None) -> dict:
    """Train, checkpoint, score the final checkpoint on `val`, and publish; returns the stage
    record (stage.json), with "skipped": True when an identical published run exists. Raises
    ValueError / FileNotFoundError for bad inputs, ray.train's TrainingFailedError when training
    failed more than max_failures times (the output stays unpublished; resume it).

    step_hook(step=, rank=, model=) runs on every worker after every step (tests kill a worker
    with it); it must be picklable."""
    sources = prepare_sources(cfg)
    val_samples = list_samples(cfg.val, cfg.val_layout, cfg.resolved_val_split, "val") if cfg.val else None
    if cfg.backbone_weights:  # a wrong file fails here, with its name, not in every worker
        load_backbone(build_segmenter(cfg.model), read_backbone(cfg.backbone_weights, cfg.model),
                      backbone_file(cfg.backbone_weights, cfg.model))
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("out", "resume")}
    inputs = [s.uri for s in cfg.train] + [u for u in (cfg.val, cfg.backbone_weights) if u and u != IMAGENET]
    run_settings = {k: v for k, v in settings.items() if k not in CONTINUABLE}
    stage = Stage("segment", cfg.out, settings, inputs, run_settings=run_settings, precious=True)
    if not stage.begin(force, resume=cfg.resume):
        return {**read_info(cfg.out), "skipped": True}
    try:
        start, checkpoint = resume_point(run_folder(cfg.out))
        if checkpoint is not None:
            check_resumable(cfg, checkpoint)
        images_per_s = None
        if start < cfg.steps:
            images_per_s = fit(RUN_NAME, _segment_worker, {"cfg": to_dict(cfg), "step_hook": step_hook}, cfg,
                               _Streams(cfg, sources), start)

        final = segmenter_checkpoint(cfg.out)
        records = read_metrics(cfg.out)
        outputs = {"checkpoint": final, "metrics": storage.join(cfg.out, "metrics.jsonl"),
                   "loss_curve": storage.join(cfg.out, "loss_curve.png")}
        val = None
        if val_samples is not None:
            outputs["val"] = storage.join(cfg.out, "val")
            res = evaluate(final, val_samples, outputs["val"], batch_size=cfg.eval_batch_size,
                           in_process_max=cfg.eval_in_process_max,
                           title=f"{cfg.model} on {cfg.val}", source={"dataset": cfg.val, "layout": cfg.val_layout,
                                                                    "split": cfg.resolved_val_split})
            val = {k: res[k] for k in ("miou", "pixel_accuracy", "num_images")}
    except BaseException:
        stage.release()
        raise
    return stage.publish(steps=cfg.steps, resumed_from=start, images_per_s=images_per_s,
                         final=records[-1] if records else None, val=val, outputs=outputs)


# ---------------------------------------------------------------------------------- seg-eval


class SegActor:
    """Ray Data actor: the segmenter is loaded once; each batch of samples is read, predicted at
    full resolution and scored; returns the batch's confusion matrix (and the errors of files
    it could not read), never the pixels. With `predictions`, writes each prediction as a
    label-ID PNG at predictions/<sample id>.png."""

    def __init__(self, payload, device: str = "cpu", amp: bool = True, predictions: str | None = None,
                 threads: int | None = None):
        import ray
        import torch

        if isinstance(payload, ray.ObjectRef):
            payload = ray.get(payload)
        if threads:
            torch.set_num_threads(threads)
        self.model = segmenter_from_payload(payload, device)
        self.amp, self.predictions = amp, predictions

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        ids, images, labels, errors = [], [], [], []
        for i, img, lab in zip(batch["id"], batch["image_uri"], batch["label_uri"]):
            try:
                image, label = read_sample(str(img), str(lab))
            except (ValueError, FileNotFoundError) as e:
                errors.append(str(e))
                continue
            ids.append(str(i))
            images.append(image)
            labels.append(label)
        cm = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
        for sid, pred, label in zip(ids, predict(self.model, images, self.amp), labels):
            cm += confusion_matrix(pred, label)
            if self.predictions:
                buf = io.BytesIO()
                Image.fromarray(LABEL_ID_OF_TRAIN[pred]).save(buf, format="PNG")
                storage.write_bytes(storage.safe_join(self.predictions, sid + ".png"), buf.getvalue())
        return {"cm": cm.reshape(1, -1), "images": np.array([len(ids)]), "errors": np.array([json.dumps(errors)])}


def _score_in_process(payload: dict, items: list[dict], batch_size: int, device: str, amp: bool,
                      predictions: str | None) -> tuple[Iterable[dict], str]:
    """SegActor's work in this process, batch by batch (no actor pool to start): on CPU with one
    torch thread, as each pool actor has, so a set scores the same either way."""
    dev = local_device(device)
    actor = SegActor(payload, device=dev, amp=amp, predictions=predictions)
    return call_in_batches(actor, items, batch_size, threads=1 if dev == "cpu" else None), dev


def _score_with_pool(payload: dict, items: list[dict], batch_size: int, actors: int | None, device: str, amp: bool,
                     predictions: str | None) -> tuple[Iterable[dict], int, str]:
    """SegActor in a Ray Data actor pool: single-threaded CPU actors, or one per GPU."""
    import ray

    from synreal_ray.cluster import init_ray

    init_ray()
    n_actors, resources, dev = actor_resources(actors, device, cpus_per_actor=0.5)
    ds, n_actors = items_dataset(items, batch_size, n_actors)
    ds = ds.map_batches(
        SegActor, fn_constructor_kwargs={"payload": ray.put(payload), "device": dev, "amp": amp,
                                         "predictions": predictions, "threads": 1 if dev == "cpu" else None},
        compute=ray.data.ActorPoolStrategy(size=n_actors), batch_size=batch_size, batch_format="numpy", **resources)
    ds.context.enable_progress_bars = False  # evaluate's bar counts images
    return ds.iter_batches(batch_size=None, batch_format="numpy"), n_actors, dev


def evaluate(checkpoint: str, samples: list, out: str, *, batch_size: int = 4, actors: int | None = None,
             device: str = "auto", amp: bool = True, save_predictions: bool = False, title: str = "",
             source: dict | None = None, in_process_max: int = IN_PROCESS_MAX) -> dict:
    """Score `checkpoint` on `samples` (datasets.layouts.Sample) and write eval.json, eval.md,
    confusion.png (and predictions/) under `out`. Returns eval.json's record. Sets of more than
    `in_process_max` images go through an actor pool, smaller ones are scored here."""
    from synreal_ray import viz

    payload = read_segmenter(checkpoint)
    t0 = time.time()
    items = [{"id": s.id, "image_uri": s.image_uri, "label_uri": s.label_uri} for s in samples]
    predictions = storage.join(out, "predictions") if save_predictions else None
    if len(items) <= in_process_max:
        batches, dev = _score_in_process(payload, items, batch_size, device, amp, predictions)
        n_actors = 0
    else:
        batches, n_actors, dev = _score_with_pool(payload, items, batch_size, actors, device, amp, predictions)
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    n, errors, first, after_first = 0, [], None, 0
    with progress_bar(len(items), "seg-eval", "img", log, leave=False) as bar:  # the result line below stays
        for b in batches:
            cm += np.asarray(b["cm"], np.int64).reshape(-1, NUM_CLASSES, NUM_CLASSES).sum(axis=0)
            scored, failed = int(np.sum(b["images"])), [e for part in b["errors"] for e in json.loads(str(part))]
            n, errors = n + scored, errors + failed
            bar.update(scored + len(failed))
            if first is None:  # the model is up: the rate from here on leaves its start-up out (roughly)
                first = time.time()
            else:
                after_first += scored
    if errors:
        raise ValueError(f"{len(errors)} sample(s) could not be scored, e.g. {errors[0]}")
    seconds = time.time() - t0
    steady = round(after_first / (time.time() - first), 2) if after_first else None
    record = {**scores(cm), "num_images": n, "checkpoint": checkpoint, "step": payload["step"],
              "model": payload["model_name"], **(source or {}), "ignore": IGNORE,
              "images_per_s": round(n / max(seconds, 1e-9), 2), "steady_images_per_s": steady,
              "actors": n_actors, "device": dev, "in_process": n_actors == 0,
              "convention": "cityscapesscripts: IoU = tp / (tp + fp + fn) over the set, ground truth 255 ignored, "
                            "classes with tp + fp + fn = 0 are null and left out of the mean"}
    storage.write_json(storage.join(out, "eval.json"), record)
    storage.write_bytes(storage.join(out, "eval.md"), eval_markdown(record, title).encode())
    storage.write_bytes(storage.join(out, "confusion.png"),
                        viz.confusion_matrix(cm, TRAIN_NAMES, title or f"{payload['model_name']}, step {payload['step']}"))
    where = f"{n_actors} {dev} actor(s)" if n_actors else f"in this process, {dev}"
    log.info("%s: mIoU %s%%, pixel accuracy %s%% on %d images (%.1f images/s, %s)", described("seg-eval"),
             _pct(record["miou"]), _pct(record["pixel_accuracy"]), n, record["images_per_s"], where)
    return record


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def eval_markdown(record: dict, title: str = "") -> str:
    """eval.md: the scores, a per-class table (IoU, ground-truth and predicted pixels) and the
    top confusions."""
    cm = np.asarray(record["confusion"], np.int64)
    lines = [f"# Segmentation scores{': ' + title if title else ''}", "",
             f"{record['num_images']} images, checkpoint step {record.get('step')}. mIoU **{_pct(record['miou'])}**, "
             f"pixel accuracy {_pct(record['pixel_accuracy'])} (percent; {record['classes_evaluated']} of "
             f"{len(TRAIN_NAMES)} classes evaluated, cityscapesscripts' convention).", "",
             "| class | IoU (%) | ground-truth pixels | predicted pixels |", "|---|---|---|---|"]
    for i, name in enumerate(TRAIN_NAMES):
        lines.append(f"| {name} | {_pct(record['iou'][name])} | {int(cm[i].sum())} | {int(cm[:, i].sum())} |")
    if record["top_confusions"]:
        lines += ["", "Largest confusions:", ""] + [f"- {c}" for c in record["top_confusions"]]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class SegEvalConfig:
    model: URI  # a segment output (its latest checkpoint) or a checkpoint folder
    dataset: URI
    layout: str
    out: URI
    split: str | None = None
    save_predictions: bool = False
    batch_size: int = 4
    actors: int | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    in_process_max: int = IN_PROCESS_MAX  # sets up to this size are scored without an actor pool (0: never)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ConfigError(f"{self.layout!r} is not one of {', '.join(LAYOUTS)}", "layout")
        check_pool_keys(self)


def run_seg_eval(cfg: SegEvalConfig, force: bool = False) -> dict:
    """Score a segmenter on a dataset and publish (eval.json, eval.md, confusion.png,
    predictions/, stage.json, _SUCCESS last); returns eval.json's record, with "skipped": True
    when an identical published evaluation exists."""
    checkpoint = segmenter_checkpoint(cfg.model)
    samples = list_samples(cfg.dataset, cfg.layout, cfg.split, "dataset")
    # Where the work runs (a pool of how many actors, or this process) does not change the scores.
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("out", "actors", "in_process_max")}
    stage = Stage("seg-eval", cfg.out, settings, [cfg.model, cfg.dataset])
    if not stage.begin(force):
        return {**storage.read_json(storage.join(cfg.out, "eval.json")), "skipped": True}
    try:
        record = evaluate(checkpoint, samples, cfg.out, batch_size=cfg.batch_size, actors=cfg.actors,
                          device=cfg.device, amp=cfg.amp, save_predictions=cfg.save_predictions,
                          in_process_max=cfg.in_process_max,
                          source={"dataset": cfg.dataset, "layout": cfg.layout, "split": cfg.split})
    except BaseException:
        stage.release()
        raise
    stage.publish(miou=record["miou"], pixel_accuracy=record["pixel_accuracy"], num_images=record["num_images"],
                  checkpoint=checkpoint, step=record["step"])
    return record
