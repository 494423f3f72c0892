"""Stage `features`: a dataset -> SP-Feat Parquet, computed on Ray Data.

Output (a folder, local or s3://):
  features/part-*.parquet  id, domain, image_uri, label_uri, height, width, feature[D] (float32)
                           file metadata: levels, num_classes, domain
  errors/part-*.parquet    uri, reason           (only with on_error="skip")
  stage.json, _SUCCESS     written last

The core (`read_label`, `features_of_batch`) is plain Python you can call in a notebook; the Ray
shell only spreads batches of samples over the cluster.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from synreal_ray import storage
from synreal_ray.config import URI, ConfigError
from synreal_ray.datasets.images import MAX_PIXELS, ImageError, decode_image
from synreal_ray.datasets.labels import IGNORE, LABEL_TO_TRAIN, NUM_CLASSES, to_train_ids, unknown_ids, unknown_ids_error
from synreal_ray.datasets.layouts import LAYOUTS, list_dataset
from synreal_ray.progress import bar as progress_bar
from synreal_ray.spfeat import feature_dim, fine_grid, levels_str, parse_levels, sp_feat, sp_feat_from_counts
from synreal_ray.stage import Stage

log = logging.getLogger(__name__)

META_KEY = b"synreal.features"
DOMAINS = ("syn", "real")


class SampleError(ValueError):
    """A bad input file; the message names the file and the problem."""


@dataclass(frozen=True)
class FeaturesConfig:
    dataset: URI
    layout: str
    out: URI
    split: str | None = None
    levels: str = "1,2,4"
    domain: str | None = None  # default: "real" for cityscapes, "syn" otherwise
    on_error: str = "raise"
    verify_images: bool = False
    batch_size: int = 32
    max_pixels: int | None = None  # per image or label; None: datasets.images.MAX_PIXELS

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ConfigError(f"{self.layout!r} is not one of {', '.join(LAYOUTS)}", "layout")
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"{self.on_error!r} must be 'raise' or 'skip'", "on_error")
        if self.domain is not None and self.domain not in DOMAINS:
            raise ConfigError(f"{self.domain!r} must be 'syn' or 'real'", "domain")
        if self.batch_size < 1:
            raise ConfigError(f"must be >= 1, got {self.batch_size}", "batch_size")
        if self.max_pixels is None:
            object.__setattr__(self, "max_pixels", MAX_PIXELS)
        elif not isinstance(self.max_pixels, int) or isinstance(self.max_pixels, bool) or self.max_pixels < 1:
            raise ConfigError(f"must be a whole number >= 1, got {self.max_pixels!r}", "max_pixels")
        try:
            object.__setattr__(self, "levels", levels_str(self.levels))  # validates and normalises
        except ValueError as e:
            raise ConfigError(str(e), "levels") from None

    @property
    def resolved_domain(self) -> str:
        return self.domain or ("real" if self.layout == "cityscapes" else "syn")


def _open_image(data: bytes, uri: str, what: str, max_pixels: int | None = None, load: bool = True) -> Image.Image:
    try:
        return decode_image(data, uri, what, max_pixels, load)
    except ImageError as e:  # unreadable, truncated, or over the pixel limit: one bad sample
        raise SampleError(str(e)) from None


def _check_label_mode(img: Image.Image, uri: str) -> None:
    if img.mode not in ("L", "P", "I", "I;16"):
        raise SampleError(f"{uri}: label map has mode {img.mode} (colour?); expected single-channel label IDs")


def _train_ids(img: Image.Image, uri: str) -> np.ndarray:
    try:
        return to_train_ids(np.asarray(img))
    except ValueError as e:
        raise SampleError(f"{uri}: {e}") from None


def read_label(uri: str, max_pixels: int | None = None) -> np.ndarray:
    """Decode a label-ID PNG and map it to train IDs (uint8, 255 = ignore)."""
    img = _open_image(storage.read_bytes(uri), uri, "label map", max_pixels)
    _check_label_mode(img, uri)
    return _train_ids(img, uri)


def image_size(uri: str, verify: bool = False, max_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) of an image: from its header only, unless `verify` decodes it whole."""
    if verify:
        img = _open_image(storage.read_bytes(uri), uri, "image", max_pixels)
    else:
        fs, path = storage.resolve(uri)
        try:
            with fs.open_input_file(path) as f:
                head = f.read(min(f.size(), 1 << 16))  # a ranged read: the header, not the pixels
        except FileNotFoundError:
            raise SampleError(f"{uri}: image file is missing") from None
        img = _open_image(head, uri, "image", max_pixels, load=False)
    return img.size[1], img.size[0]


def label_features(uri: str, levels, max_pixels: int | None = None) -> tuple[tuple[int, int], np.ndarray]:
    """((height, width), SP-Feat vector) of a label-ID PNG. An 8-bit map (mode L or P) is never
    turned into a train-ID array: Pillow counts the raw IDs of each fine cell (its C histogram) and
    the 256 counts go through the label table (spfeat.sp_feat_from_counts), which keeps SP-Feat
    near the PNG decode's own speed (jobs/bench_spfeat.py). Other modes take the numpy path."""
    return label_image_features(_open_image(storage.read_bytes(uri), uri, "label map", max_pixels), uri, levels)


def label_image_features(img: Image.Image, uri: str, levels) -> tuple[tuple[int, int], np.ndarray]:
    """`label_features` of a decoded label map (`uri` names it in errors)."""
    _check_label_mode(img, uri)
    shape = (img.size[1], img.size[0])
    if img.mode in ("L", "P"):
        rows, cols = fine_grid(*shape, parse_levels(levels))
        counts = np.array([[img.crop((int(cols[c]), int(rows[r]), int(cols[c + 1]), int(rows[r + 1]))).histogram()
                            for c in range(len(cols) - 1)] for r in range(len(rows) - 1)], dtype=np.int64)
        if (bad := unknown_ids(counts.sum(axis=(0, 1)))).size:
            raise SampleError(f"{uri}: {unknown_ids_error(bad)}")
        return shape, sp_feat_from_counts(counts, shape, levels, NUM_CLASSES, IGNORE, id_map=LABEL_TO_TRAIN)
    return shape, sp_feat(_train_ids(img, uri), NUM_CLASSES, levels)


def features_of_sample(image_uri: str, label_uri: str, levels, verify_images: bool = False,
                       max_pixels: int | None = None) -> tuple[int, int, np.ndarray]:
    (lh, lw), feat = label_features(label_uri, levels, max_pixels)
    h, w = image_size(image_uri, verify_images, max_pixels)
    if (h, w) != (lh, lw):
        raise SampleError(f"{label_uri}: label map is {lw}x{lh} but its image {image_uri} is {w}x{h}")
    return h, w, feat


def feature_schema(levels, domain: str) -> pa.Schema:
    dim = feature_dim(levels, NUM_CLASSES)
    meta = {"levels": levels_str(levels), "num_classes": NUM_CLASSES, "dim": dim, "domain": domain}
    return pa.schema([
        ("id", pa.string()), ("domain", pa.string()), ("image_uri", pa.string()), ("label_uri", pa.string()),
        ("height", pa.int32()), ("width", pa.int32()), ("feature", pa.list_(pa.float32(), dim)),
    ], metadata={META_KEY: json.dumps(meta).encode()})


ERROR_SCHEMA = pa.schema([("uri", pa.string()), ("reason", pa.string())])


def features_of_batch(batch: dict, levels, domain: str, on_error: str, verify_images: bool = False,
                      max_pixels: int | None = None) -> tuple[pa.Table, list[tuple[str, str]]]:
    """SP-Feat rows of a batch of samples (columns id, image_uri, label_uri) and the errors."""
    rows = {k: [] for k in ("id", "image_uri", "label_uri", "height", "width", "feature")}
    errors = []
    for sid, img, lab in zip(batch["id"], batch["image_uri"], batch["label_uri"]):
        try:
            h, w, feat = features_of_sample(str(img), str(lab), levels, verify_images, max_pixels)
        except SampleError as e:
            if on_error == "raise":
                raise
            errors.append((str(lab), str(e)))
            continue
        for k, v in zip(rows, (str(sid), str(img), str(lab), h, w, feat)):
            rows[k].append(v)
    schema = feature_schema(levels, domain)
    dim = schema.field("feature").type.list_size
    flat = np.concatenate(rows["feature"]) if rows["feature"] else np.zeros(0, np.float32)
    table = pa.table({
        "id": pa.array(rows["id"], pa.string()),
        "domain": pa.array([domain] * len(rows["id"]), pa.string()),
        "image_uri": pa.array(rows["image_uri"], pa.string()),
        "label_uri": pa.array(rows["label_uri"], pa.string()),
        "height": pa.array(rows["height"], pa.int32()),
        "width": pa.array(rows["width"], pa.int32()),
        "feature": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim),
    }, schema=schema)
    return table, errors


def _write_features(batch: dict, cfg: FeaturesConfig) -> dict:
    """Ray Data batch function: compute SP-Feat for a batch, write it as one Parquet object, and
    return a small summary (rows written, errors) so the driver never holds the features."""
    # Errors travel back in the summary rather than as exceptions: Ray wraps a worker's exception
    # in its own, and the user should see one line naming the file, not two stack traces.
    table, errors = features_of_batch(batch, cfg.levels, cfg.resolved_domain, "skip", cfg.verify_images,
                                      cfg.max_pixels)
    name = storage.part_name(batch["id"])
    if table.num_rows:
        storage.write_parquet(table, storage.join(cfg.out, "features", name))
    if errors and cfg.on_error == "skip":
        storage.write_parquet(pa.table({"uri": [u for u, _ in errors], "reason": [r for _, r in errors]}, schema=ERROR_SCHEMA),
                    storage.join(cfg.out, "errors", name))
    return {"rows": np.array([table.num_rows]), "errors": np.array([json.dumps(errors)])}


def run_features(cfg: FeaturesConfig, force: bool = False) -> dict:
    """Run the stage; returns its stage.json record. Skips when already published for the same inputs."""
    import ray

    from synreal_ray.cluster import init_ray

    samples, problems = list_dataset(cfg.dataset, cfg.layout, cfg.split)
    if problems and cfg.on_error == "raise":
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise SampleError(f"{problems[0].uri}: {problems[0].reason}{more}")
    settings = {**asdict(cfg), "domain": cfg.resolved_domain, "num_classes": NUM_CLASSES,
                "listing": hashlib.sha1("\n".join(f"{s.id}|{s.label_uri}" for s in samples).encode()).hexdigest()}
    settings.pop("out")
    settings.pop("batch_size")
    stage = Stage("features", cfg.out, settings, inputs=[cfg.dataset])
    if not stage.begin(force):
        return {"skipped": True, **storage.read_json(storage.join(cfg.out, "stage.json"))}
    init_ray()
    items = [{"id": s.id, "image_uri": s.image_uri, "label_uri": s.label_uri} for s in samples]
    n_blocks = max(1, min(len(items), max(2 * int(ray.cluster_resources().get("CPU", 1)), len(items) // 256)))
    ds = ray.data.from_items(items, override_num_blocks=n_blocks)
    summary = ds.map_batches(_write_features, fn_kwargs={"cfg": cfg}, batch_size=cfg.batch_size, batch_format="numpy")
    summary.context.enable_progress_bars = False  # the bar below counts label maps
    written, errors = 0, [(p.uri, p.reason) for p in problems]
    with progress_bar(len(items), "features", "img", log) as bar:
        for batch in summary.iter_batches(batch_size=None, batch_format="numpy"):
            written += int(batch["rows"].sum())
            failed = [tuple(x) for e in batch["errors"] for x in json.loads(e)]
            errors += failed
            bar.update(int(batch["rows"].sum()) + len(failed))
            if errors and cfg.on_error == "raise":  # stops the dataset; the output stays unpublished
                raise SampleError(errors[0][1])
    if problems:  # listing problems (e.g. an image without a label) are recorded like the others
        storage.write_parquet(pa.table({"uri": [p.uri for p in problems], "reason": [p.reason for p in problems]},
                              schema=ERROR_SCHEMA), storage.join(cfg.out, "errors", "part-listing.parquet"))
    if written == 0:
        raise SampleError(f"{cfg.dataset}: every sample failed; first error: {errors[0][1] if errors else '?'}")
    return stage.publish(rows=written, errors=len(errors), dim=feature_dim(cfg.levels), levels=cfg.levels,
                         domain=cfg.resolved_domain, num_classes=NUM_CLASSES)


# --- reading features back (used by the later stages) ---

def features_meta(uri: str) -> dict:
    """Levels, class count, dim and domain of a published features output."""
    storage.require_complete(uri, "features output")
    parts = storage.data_files(storage.join(uri, "features"))
    if not parts:
        raise FileNotFoundError(f"{uri}: features output holds no Parquet files")
    fs, path = storage.resolve(parts[0])
    meta = pq.read_schema(path, filesystem=fs).metadata or {}
    if META_KEY not in meta:
        raise ValueError(f"{parts[0]}: not an SP-Feat file of synreal (no {META_KEY.decode()} metadata)")
    return json.loads(meta[META_KEY])


def load_features(uri: str, columns=("id", "feature")) -> dict:
    """Whole features table as numpy (ids and an N x D float32 matrix). For sizes that fit the driver."""
    meta = features_meta(uri)
    table = storage.read_table(storage.join(uri, "features"), columns=list(columns)).sort_by("id")
    out = {c: table.column(c).to_numpy() for c in columns if c != "feature"}
    if "feature" in columns:
        out["feature"] = feature_matrix(table.column("feature"), meta["dim"])
    out["meta"] = meta
    return out


def feature_matrix(col, dim: int) -> np.ndarray:
    """A FixedSizeList column (or chunked) -> N x dim float32 numpy, without a Python loop."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def check_compatible(a: dict, b: dict, what_a: str, what_b: str) -> None:
    """Refuse to combine features of different levels or class sets."""
    for key in ("levels", "num_classes", "dim"):
        if a[key] != b[key]:
            raise ValueError(f"features of different {key}: {what_a} has {a[key]}, {what_b} has {b[key]}; "
                             f"recompute one with the same --levels")



def features_dataset(uri: str, columns=("id", "feature")):
    """A published features output as a Ray dataset (streamed from Parquet, never collected)."""
    import ray

    storage.require_complete(uri, "features output")
    files = storage.data_files(storage.join(uri, "features"))
    fs, _ = storage.resolve(files[0])
    return ray.data.read_parquet([storage.resolve(f)[1] for f in files], filesystem=fs, columns=list(columns))


# A features output of at most this many rows is read on the driver by the stages that use it:
# there, starting a Ray Data job (seconds) costs more than the work itself.
DRIVER_ROWS = 20_000


def num_rows(uri: str) -> int:
    return int(storage.read_json(storage.join(uri, "stage.json"))["rows"])


def fits_driver(uri: str) -> bool:
    """Whether a published features output is small enough to process on the driver (DRIVER_ROWS)."""
    return num_rows(uri) <= DRIVER_ROWS


def sample_features(uri: str, n: int, seed: int = 0) -> np.ndarray:
    """Up to `n` feature rows drawn at random (deterministic for a seed) without loading the rest;
    all rows in id order when there are at most `n`."""
    if fits_driver(uri):
        x = load_features(uri)["feature"]
    else:
        rows = num_rows(uri)
        ds = features_dataset(uri, columns=("id", "feature"))
        if n < rows:
            ds = ds.random_sample(min(1.0, 1.3 * n / rows), seed=seed)  # a margin, then cut to n
        table = pa.concat_tables([t for t in ds.iter_batches(batch_format="pyarrow", batch_size=None) if t.num_rows])
        x = feature_matrix(table.sort_by("id").column("feature"), features_meta(uri)["dim"])
    return x[np.random.default_rng(seed).permutation(len(x))[:n]] if len(x) > n else x
