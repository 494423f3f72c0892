"""Fréchet Inception Distance between two folders of images (local or s3://), pytorch-fid's numbers.

The network is pytorch-fid's own `InceptionV3` (the port of TensorFlow's FID Inception,
`use_fid_inception=True`); the images are prepared as its command does (RGB, ToTensor, bilinear
resize to 299 and scaling to [-1, 1] inside the network), so a value here equals
`python -m pytorch_fid A B --dims D` with the same weights. The distance is the same formula as its
`calculate_frechet_distance`, with the one costly term, tr(sqrtm(Σa Σb)), taken from singular
values instead of scipy's general `sqrtm` (`trace_sqrt_product`): 27 s → 0.2 s at 2048 dims here, and
exact where sqrtm struggles (fewer images than dims: a singular product). Tests hold the two equal.
What differs: folders are searched recursively, images may have different sizes, the
activations are computed by an actor pool on Ray Data (GPU actors where the cluster has GPUs),
and they are cached as Parquet keyed by a fingerprint of (image listing, weights, dims, size),
so a fixed set (the real one) is computed once.

Weights: `--inception-weights` (a local or s3:// file in pytorch-fid's `pt_inception-2015-12-05`
state-dict format), else $SYNREAL_INCEPTION_WEIGHTS, else pytorch-fid's own file in torch's hub
cache, downloaded there on first use as pytorch-fid does (its FID_WEIGHTS_URL, or a mirror in
$SYNREAL_INCEPTION_URL), with the hash in its name checked (synreal_ray/hub.py). Offline and not
cached: FileNotFoundError saying how to provide the file.

Cache layout (one entry per image set): <cache>/<key>/acts/part-*.parquet (rel, act[dims]),
stage.json, _SUCCESS. An entry without _SUCCESS is resumed (only the missing images are computed).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np

from synreal_ray import hub, storage
from synreal_ray.cluster import IN_PROCESS_MAX, actor_resources, call_in_batches, items_dataset, local_device
from synreal_ray.config import URI, ConfigError, check_pool_keys
from synreal_ray.datasets.images import by_shape
from synreal_ray.progress import bar as progress_bar

DIMS = (64, 192, 768, 2048)
WEIGHTS_ENV = "SYNREAL_INCEPTION_WEIGHTS"
URL_ENV = "SYNREAL_INCEPTION_URL"  # a mirror of pytorch-fid's weights file (same name, same hash)
CACHE_ENV = "SYNREAL_FID_CACHE"
# pytorch-fid's own extensions (it globs these; we search recursively and ignore case)
IMAGE_EXTS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
CACHE_VERSION = 1  # bump when the activation definition changes: old cache entries stop matching

log = logging.getLogger(__name__)


class SmallSampleWarning(UserWarning):
    """Fewer images than feature dimensions: the covariance is rank-deficient and FID biased."""


# --- weights ----------------------------------------------------------------------------------

def _fid_weights_url() -> str:
    from pytorch_fid.inception import FID_WEIGHTS_URL

    return FID_WEIGHTS_URL


def weights_url() -> str:
    """Where the weights are downloaded from: $SYNREAL_INCEPTION_URL, else pytorch-fid's FID_WEIGHTS_URL."""
    return os.environ.get(URL_ENV) or _fid_weights_url()


def hub_weights_path() -> str:
    """Where pytorch-fid's own download puts the weights (its loader finds them there)."""
    return hub.cache_path(_fid_weights_url())


def find_weights(weights: str | None = None) -> str:
    """The weights file to use: the argument, else $SYNREAL_INCEPTION_WEIGHTS, else pytorch-fid's
    file in torch's hub cache, downloaded there (hash checked) when missing. Raises
    FileNotFoundError saying how to provide one when it is not cached and cannot be downloaded."""
    if weights:
        if not storage.exists(weights):
            raise FileNotFoundError(f"{weights}: Inception weights file not found")
        return weights
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        if not storage.exists(env):
            raise FileNotFoundError(f"{env} (from ${WEIGHTS_ENV}): Inception weights file not found")
        return env
    if os.path.exists(hub_weights_path()):  # pytorch-fid's own copy, whatever mirror is set
        return hub_weights_path()
    url = weights_url()
    try:
        return hub.cached_or_download(url, "pytorch-fid's FID Inception weights (~92 MB)")
    except hub.DownloadError as e:
        raise FileNotFoundError(
            f"no Inception weights for FID: {e}. On a machine with internet, download {_fid_weights_url()} , copy the file "
            f"here or to object storage, and pass --inception-weights PATH|s3://URI, or set {WEIGHTS_ENV}=PATH|s3://URI, "
            f"or place it at {hub_weights_path()}") from None


def read_state_dict(data: bytes, uri: str = "<bytes>") -> dict:
    import torch

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"{uri}: not a PyTorch state dict ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{uri}: expected a state dict of pytorch-fid's FID Inception, got {type(state).__name__}")
    return state


_build_lock = threading.Lock()


@contextlib.contextmanager
def _offline_fid_inception(state_dict_for):
    """While active, pytorch-fid builds its FID Inception with the state dict returned by
    `state_dict_for(net)` instead of downloading FID_WEIGHTS_URL. Patching its loader (not
    re-implementing `fid_inception_v3`) keeps the network exactly pytorch-fid's."""
    import pytorch_fid.inception as pfi

    built = {}
    make_base = pfi._inception_v3

    def capture(*args, **kwargs):  # the torchvision Inception3 that fid_inception_v3 patches and loads
        built["net"] = make_base(*args, **kwargs)
        return built["net"]

    def load(url, *args, **kwargs):
        if url != pfi.FID_WEIGHTS_URL:
            raise RuntimeError(f"unexpected weights download {url} (only the FID weights are handled offline)")
        return state_dict_for(built["net"])

    with _build_lock:
        saved = pfi._inception_v3, pfi.load_state_dict_from_url
        pfi._inception_v3, pfi.load_state_dict_from_url = capture, load
        try:
            yield
        finally:
            pfi._inception_v3, pfi.load_state_dict_from_url = saved


def load_inception(weights, dims: int = 2048, device="cpu"):
    """pytorch-fid's InceptionV3 for `dims` (64, 192, 768 or 2048) in eval mode on `device`.

    weights: a local or s3:// file, its bytes, or a state dict (pytorch-fid's format)."""
    from pytorch_fid.inception import InceptionV3

    if dims not in DIMS:
        raise ValueError(f"dims: {dims} is not one of {DIMS} (pytorch-fid's feature sizes)")
    name = weights if isinstance(weights, str) else "Inception weights"
    if isinstance(weights, str):
        weights = storage.read_bytes(weights)
    state = read_state_dict(weights, name) if isinstance(weights, (bytes, bytearray, memoryview)) else weights
    try:
        with _offline_fid_inception(lambda net: state):
            model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
    except RuntimeError as e:  # load_state_dict: missing/unexpected keys or shapes
        raise ValueError(f"{name}: not pytorch-fid's FID Inception weights ({str(e).splitlines()[0]})") from None
    return model.to(device).eval()


def make_random_inception_weights(path: str, seed: int = 0) -> str:
    """Write a seeded random-weight file in pytorch-fid's FID Inception format to `path` (local or
    s3://). For tests and demos only: FIDs with it are not comparable with published ones.

    He-normal convolutions and identity batch norms keep activations at a usable scale through the
    ~100 layers (PyTorch's default init shrinks them towards zero, which makes every FID ~0)."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def randomise(net):
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
            elif isinstance(m, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(m.weight)
                torch.nn.init.zeros_(m.bias)
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
            elif isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=0.01, generator=g)
                torch.nn.init.zeros_(m.bias)
        return {k: v.clone() for k, v in net.state_dict().items()}

    from pytorch_fid.inception import fid_inception_v3

    with torch.no_grad(), _offline_fid_inception(randomise):
        net = fid_inception_v3()
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    storage.write_bytes(path, buf.getvalue())
    return path


# --- the pure core ----------------------------------------------------------------------------

def parse_size(text: str | None) -> tuple[int, int] | None:
    """'HxW' -> (H, W); None stays None (images keep their size)."""
    if text is None:
        return None
    try:
        h, w = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ConfigError(f"{text!r} is not HxW (e.g. 256x512)", "size") from None
    if h < 1 or w < 1:
        raise ConfigError(f"{text!r}: both sides must be >= 1", "size")
    return h, w


def decode_for_inception(data: bytes, size: tuple[int, int] | None = None, uri: str = "<bytes>") -> np.ndarray:
    """Image bytes -> uint8 (H, W, 3) RGB as pytorch-fid reads it; with `size` (H, W) resized
    first with PIL's bilinear filter (antialiased when shrinking)."""
    from PIL import Image

    from synreal_ray.datasets.images import decode_image

    img = decode_image(data, uri).convert("RGB")
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(img)


def activations(images, model) -> np.ndarray:
    """Inception activations (N, dims) float32 of uint8 RGB images: an (N, H, W, 3) array or a list
    of (H, W, 3) arrays of any sizes (equal sizes run as one batch)."""
    import torch
    from torch.nn.functional import adaptive_avg_pool2d

    images = list(images)
    device = next(model.parameters()).device
    out: list = [None] * len(images)
    for idx in by_shape(images).values():
        x = torch.from_numpy(np.stack([images[i] for i in idx])).to(device)
        # what ToTensor does to a uint8 image: HWC -> CHW, float, / 255
        x = x.permute(0, 3, 1, 2).float().div(255)
        with torch.no_grad():
            pred = model(x)[0]
        if pred.shape[2:] != (1, 1):  # dims < 2048: global average pool, as pytorch-fid does
            pred = adaptive_avg_pool2d(pred, output_size=(1, 1))
        pred = pred[:, :, 0, 0].float().cpu().numpy()
        for j, i in enumerate(idx):
            out[i] = pred[j]
    if not out:
        return np.zeros((0, 0), np.float32)
    return np.stack(out).astype(np.float32, copy=False)


def statistics(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance in float64, as pytorch-fid computes them."""
    acts = np.asarray(acts, dtype=np.float64)
    if acts.ndim != 2 or len(acts) < 2:
        raise ValueError(f"FID needs at least 2 images; got activations of shape {acts.shape}")
    return acts.mean(axis=0), np.cov(acts, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's Fréchet distance between two Gaussians (its function, not a re-implementation):
    the reference fid_of is tested against."""
    from pytorch_fid.fid_score import calculate_frechet_distance
    from scipy.linalg import LinAlgWarning

    with warnings.catch_warnings():
        # scipy's "Matrix is singular" for sets smaller than dims, which small_sample_message
        # reports in words (pytorch-fid then adds its eps offset itself)
        warnings.simplefilter("ignore", LinAlgWarning)
        return float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))


# Above this many entries (8 bytes each) the cross product of two sets' activations is not formed
# (see trace_sqrt_product): 50M entries = 400 MB.
CROSS_MAX = 50_000_000


def trace_sqrt_product(acts_a, acts_b) -> float:
    """tr(sqrtm(Σa Σb)) of two sets' sample covariances, exactly, without a general matrix square
    root. With A, B the centred activations (Σa = AᵀA/(na−1), Σb = BᵀB/(nb−1)), the nonzero
    eigenvalues of Σa Σb are the squared singular values of A Bᵀ / sqrt((na−1)(nb−1)), so the
    trace is their sum (Mathiasen & Hvilshøj 2020, "Fast Fréchet Inception Distance"): the
    singular values of an na×nb matrix. Large sets on both sides (A Bᵀ over
    CROSS_MAX entries) use the d×d form instead: tr sqrt(Σa^½ Σb Σa^½), a symmetric PSD matrix."""
    a = np.asarray(acts_a, np.float64)
    b = np.asarray(acts_b, np.float64)
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    na, nb = len(a), len(b)
    if na * nb <= CROSS_MAX:
        return float(np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((na - 1) * (nb - 1)))
    lam_a, vec = np.linalg.eigh(a.T @ a / (na - 1))
    root = (vec * np.sqrt(np.clip(lam_a, 0, None))) @ vec.T
    lam = np.linalg.eigvalsh(root @ (b.T @ b / (nb - 1)) @ root)
    return float(np.sqrt(np.clip(lam, 0, None)).sum())


def fid_of(acts_a, acts_b) -> float:
    """The Fréchet distance between two activation sets: |μa − μb|² + tr Σa + tr Σb − 2 tr sqrt(Σa Σb),
    the formula of pytorch-fid's calculate_frechet_distance (frechet_distance), with the last term
    from trace_sqrt_product."""
    mu_a, sigma_a = statistics(acts_a)
    mu_b, sigma_b = statistics(acts_b)
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_sqrt_product(acts_a, acts_b))


def small_sample_message(n: int, dims: int, what: str) -> str | None:
    if n < dims:
        return (f"{what}: {n} images for {dims}-dimensional features: the covariance is rank-deficient "
                f"and the FID biased (use at least {dims} images, or fewer --dims)")
    return None


def kid(acts_a, acts_b, subsets: int = 100, subset_size: int = 1000, degree: int = 3, gamma: float | None = None,
        coef0: float = 1, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018, as torch-fidelity and clean-fid compute it):
    the unbiased estimate of MMD² with the polynomial kernel k(x, y) = (gamma x·y + coef0)^degree
    (default gamma = 1/d: the cubic kernel (x·y/d + 1)³), on `subsets` random pairs of subsets of
    `subset_size` activations drawn without replacement (capped by the smaller set); returns the
    mean and the (population) standard deviation over the subsets. Float64 throughout; seeded.

    Per subset of size m: [Σ_{i≠j} k(x_i, x_j) + Σ_{i≠j} k(y_i, y_j)] / (m(m-1)) - 2 Σ_{i,j} k(x_i, y_j) / m²."""
    a, b = np.asarray(acts_a, np.float64), np.asarray(acts_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"KID needs two (N, d) activation matrices of the same d; got {a.shape} and {b.shape}")
    m = min(int(subset_size), len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 images per set (and subset_size >= 2); got {len(a)} and {len(b)}, "
                         f"subset_size {subset_size}")
    if subsets < 1:
        raise ValueError(f"KID: subsets must be >= 1, got {subsets}")
    g = 1.0 / a.shape[1] if gamma is None else float(gamma)

    def kernel(x, y):
        return (x @ y.T * g + coef0) ** degree

    # Small sets: the three kernel matrices once, subsets index them. Large ones: per subset.
    whole = (len(a) + len(b)) ** 2 <= 40_000_000  # <= 320 MB of float64
    if whole:
        kaa, kbb, kab = kernel(a, a), kernel(b, b), kernel(a, b)
    rng = np.random.default_rng(seed)
    mmds = np.empty(subsets, np.float64)
    for s in range(subsets):
        ia, ib = rng.choice(len(a), m, replace=False), rng.choice(len(b), m, replace=False)
        if whole:
            kxx, kyy, kxy = kaa[np.ix_(ia, ia)], kbb[np.ix_(ib, ib)], kab[np.ix_(ia, ib)]
        else:
            x, y = a[ia], b[ib]
            kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
        same = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        mmds[s] = same - 2.0 * kxy.sum() / (m * m)
    return float(mmds.mean()), float(mmds.std())


# --- listing and cache keys ------------------------------------------------------------------

@dataclass(frozen=True)
class ImageFile:
    uri: str
    rel: str  # path relative to the set's root, forward slashes
    size: int  # bytes
    mtime_ns: int


def list_images(root: str, max_images: int | None = None, seed: int = 0) -> list[ImageFile]:
    """Image files under `root` (recursive), sorted; with max_images a seeded random subset."""
    if not storage.exists(root):
        raise FileNotFoundError(f"{root}: no such folder")
    single = not storage.is_dir(root)  # a single image file
    files = [ImageFile(root if single else storage.join(root, *rel.split("/")), rel, int(size or 0), int(mtime or 0))
             for rel, size, mtime in storage.listing(root) if rel.lower().endswith(IMAGE_EXTS)]
    files.sort(key=lambda f: f.rel)
    if not files:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTS)}) found")
    if max_images is not None and len(files) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(files), max_images, replace=False))
        files = [files[i] for i in keep]
    return files


def cache_key(files: list[ImageFile], weights_sha256: str, dims: int, size) -> str:
    """Fingerprint of what the activations depend on. Names, byte sizes and modification times
    stand in for content: re-written images (a new translation) get a new key without hashing
    every image."""
    h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "weights": weights_sha256, "dims": dims,
                                   "size": list(size) if size else None}).encode())
    for f in files:
        h.update(f"\n{f.rel}|{f.size}|{f.mtime_ns}".encode())
    return h.hexdigest()[:20]


def default_cache() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "synreal", "fid")


# --- the Ray shell ---------------------------------------------------------------------------

def _act_schema(dims: int):
    import pyarrow as pa

    return pa.schema([("rel", pa.string()), ("act", pa.list_(pa.float32(), dims))])


def _acts_table(rels: list[str], acts: np.ndarray, dims: int):
    import pyarrow as pa

    flat = pa.array(np.asarray(acts, np.float32).reshape(-1), pa.float32())
    return pa.table({"rel": pa.array(rels, pa.string()), "act": pa.FixedSizeListArray.from_arrays(flat, dims)},
                    schema=_act_schema(dims))


class InceptionActor:
    """Ray Data actor: loads Inception once, then turns batches of image URIs into activation
    Parquet parts in their cache entries (one part per entry per batch, named by its rows, so a
    retried batch overwrites its own part). Returns only counts: activations never pass through
    the driver."""

    def __init__(self, weights, dims: int, size=None, device: str = "cpu"):
        import ray

        if isinstance(weights, ray.ObjectRef):
            weights = ray.get(weights)
        self.model = load_inception(weights, dims, device)
        self.dims, self.size = dims, size

    def __call__(self, batch: dict) -> dict:
        images = [decode_for_inception(storage.read_bytes(str(u)), self.size, str(u)) for u in batch["uri"]]
        acts = activations(images, self.model)
        entries = [str(e) for e in batch["entry"]]
        for entry in sorted(set(entries)):
            idx = [i for i, e in enumerate(entries) if e == entry]
            rels = [str(batch["rel"][i]) for i in idx]
            storage.write_parquet(_acts_table(rels, acts[idx], self.dims),
                                  storage.join(entry, "acts", storage.part_name(rels)))
        return {"n": np.array([len(images)])}


def _cached_acts(entry: str, dims: int):
    """Activations already in a cache entry: {rel: row index} and the (N, dims) matrix."""

    if not storage.data_files(storage.join(entry, "acts")):
        return [], np.zeros((0, dims), np.float32)
    table = storage.read_table(storage.join(entry, "acts"), schema=_act_schema(dims))
    rels = table.column("rel").to_pylist()
    col = table.column("act").combine_chunks()
    acts = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dims)
    return rels, acts




@dataclass(frozen=True)
class FidConfig:
    a: URI
    b: URI
    weights: URI | None = None
    dims: int = 2048
    size: str | None = None  # "HxW": resize before Inception (Inception itself then resizes to 299)
    max_images: int | None = None
    cache: URI | None = None
    batch_size: int = 50
    actors: int | None = None
    seed: int = 0  # of the --max-images subset
    device: str = "auto"  # of the Inception actors: auto (GPU when the cluster has one), cpu or cuda
    in_process_max: int = IN_PROCESS_MAX  # at most this many images to compute: in this process, no actor pool

    def __post_init__(self):
        if self.dims not in DIMS:
            raise ConfigError(f"{self.dims} is not one of {', '.join(map(str, DIMS))}", "dims")
        parse_size(self.size)
        if self.max_images is not None and self.max_images < 2:
            raise ConfigError(f"must be >= 2 or null (all images), got {self.max_images}", "max_images")
        if self.seed < 0:
            raise ConfigError(f"must be >= 0, got {self.seed}", "seed")
        check_pool_keys(self)


def _acts_with_pool(todo: list[dict], cfg: FidConfig, size, weights: bytes):
    """InceptionActor on a Ray Data actor pool over `todo`: (its output batches, the pool size)."""
    import ray

    from synreal_ray.cluster import init_ray

    init_ray()
    n_actors, resources, device = actor_resources(cfg.actors, cfg.device, key="--device")
    ds, n_actors = items_dataset(todo, cfg.batch_size, n_actors)
    out = ds.map_batches(InceptionActor, fn_constructor_kwargs={"weights": ray.put(weights), "dims": cfg.dims,
                                                                  "size": size, "device": device},
                         compute=ray.data.ActorPoolStrategy(size=n_actors), batch_size=cfg.batch_size,
                         batch_format="numpy", **resources)
    out.context.enable_progress_bars = False  # set_activations' bar counts images
    return out.iter_batches(batch_size=None, batch_format="numpy"), n_actors


def set_activations(roots: list[str], cfg: FidConfig, weights_uri: str, weights: bytes) -> list[dict]:
    """Activations of each image set in `roots`, from the cache or computed (one Ray Data pipeline
    over every missing image, so the actors load Inception once). Returns per set:
    {"acts", "rels" (the images' names, in the order of acts), "key", "entry", "images", "computed", "root"},
    and the pipeline's rates when it ran."""
    from synreal_ray.stage import Stage

    size = parse_size(cfg.size)
    wsha = hashlib.sha256(weights).hexdigest()
    cache = cfg.cache or default_cache()
    sets, todo, seen = [], [], set()
    for root in roots:
        files = list_images(root, cfg.max_images, cfg.seed)
        key = cache_key(files, wsha, cfg.dims, size)
        entry = storage.join(cache, key)
        info = {"root": root, "key": key, "entry": entry, "images": len(files), "files": files, "computed": 0}
        if not storage.is_complete(entry) and entry not in seen:
            have = set(_cached_acts(entry, cfg.dims)[0])  # parts left by an interrupted run
            missing = [f for f in files if f.rel not in have]
            todo += [{"uri": f.uri, "rel": f.rel, "entry": entry} for f in missing]
            info["computed"] = len(missing)
        seen.add(entry)
        sets.append(info)

    if todo:
        t0 = time.time()
        if len(todo) <= cfg.in_process_max:  # InceptionActor's work here, batch by batch: no pool to start
            model = InceptionActor(weights, cfg.dims, size, local_device(cfg.device, "--device"))
            batches = call_in_batches(model, todo, cfg.batch_size)
            n_actors = 0
        else:
            batches, n_actors = _acts_with_pool(todo, cfg, size, weights)
        bar = progress_bar(len(todo), "fid activations", "img", log)
        done, first, after_first = 0, None, 0
        for batch in batches:
            n = int(batch["n"].sum())
            done += n
            bar.update(n)
            if first is None:  # an actor is up: the rate from here on leaves start-up out (roughly)
                first = time.time()
            else:
                after_first += n
        bar.close()
        seconds = time.time() - t0
        rates = {"images_per_s": round(done / max(seconds, 1e-9), 2), "actors": n_actors,
                 "steady_images_per_s": round(after_first / (time.time() - first), 2) if after_first else None}
        for info in sets:
            if info["computed"] and not storage.is_complete(info["entry"]):
                stage = Stage("fid-activations", info["entry"], {})
                stage.fp, stage.started = info["key"], t0
                stage.publish(images=info["images"], root=info["root"], weights=weights_uri, dims=cfg.dims,
                              size=cfg.size, computed=info["computed"], **rates)
            info.update(rates)

    for info in sets:
        rels, acts = _cached_acts(info["entry"], cfg.dims)
        row = {}
        for i, r in enumerate(rels):  # a retried or resumed batch may have left a duplicate row
            row.setdefault(r, i)
        wanted = info["rels"] = [f.rel for f in info.pop("files")]
        lost = [r for r in wanted if r not in row]
        if lost:
            raise FileNotFoundError(
                f"{info['entry']}: activations of {len(lost)} image(s) are missing (e.g. {lost[0]}); on a "
                f"multi-node cluster --cache must be shared storage such as s3://")
        info["acts"] = acts[[row[r] for r in wanted]]
    return sets


def run_fid(cfg: FidConfig) -> dict:
    """FID and KID between folders cfg.a and cfg.b: {"fid", "kid", "kid_std", "a": {...}, "b": {...}, "weights",
    "dims", "warnings"} (KID: `kid` with its defaults, on the same activations)."""
    weights_uri = find_weights(cfg.weights)
    weights = storage.read_bytes(weights_uri)
    read_state_dict(weights, weights_uri)  # a bad file fails here, on the driver, with its name
    a, b = set_activations([cfg.a, cfg.b], cfg, weights_uri, weights)
    notes = []
    for name, s in (("--a", a), ("--b", b)):
        msg = small_sample_message(s["images"], cfg.dims, f"{name} {s['root']}")
        if msg:
            warnings.warn(msg, SmallSampleWarning, stacklevel=2)
            notes.append(msg)
    acts_a, acts_b = a.pop("acts"), b.pop("acts")
    a.pop("rels"), b.pop("rels")  # the record stays a summary (sizes, cache entries), not a listing
    value = fid_of(acts_a, acts_b)
    kid_mean, kid_std = kid(acts_a, acts_b)  # the same cached activations
    return {"fid": value, "kid": kid_mean, "kid_std": kid_std, "a": a, "b": b, "weights": weights_uri,
            "dims": cfg.dims, "size": cfg.size, "warnings": notes}
