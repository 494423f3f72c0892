"""Stage `pairs`: each synthetic image paired with its K nearest real images in SP-Feat space.

A faiss KNN actor holds the index of the real features (a GPU index when the actor has a GPU;
with several GPUs, one actor per GPU: the real index replicated, the queries sharded); Ray Data
streams the synthetic features to it in batches. Each batch's pairs are written as one Parquet
part by the actor itself, so the pairs never pass through the driver.

The paper (000, section 3.2) queries with real images and finds synthetic neighbours; here each
synthetic image queries the real set (the direction training samples in), and the paper's
down-weighting of over-used synthetic images is replaced by the KLIEP weights.

Output under `out`:
  pairs/part-*.parquet  syn_id, real_id, rank (0..K-1), distance, w_syn, w_real, syn_image_uri,
                        real_image_uri, syn_label_uri, real_label_uri
  report.json / report.md   pairing quality against random pairing on the same data
  stage.json, _SUCCESS
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from synreal_ray import storage
from synreal_ray.config import URI, ConfigError
from synreal_ray.datasets.images import decode_image
from synreal_ray.datasets.labels import IGNORE, to_train_ids
from synreal_ray.features import check_compatible, feature_matrix, features_dataset, features_meta, load_features
from synreal_ray.stage import Stage

PAIR_COLUMNS = ("syn_id", "real_id", "rank", "distance", "w_syn", "w_real",
                "syn_image_uri", "real_image_uri", "syn_label_uri", "real_label_uri")


@dataclass(frozen=True)
class PairsConfig:
    syn: URI
    real: URI
    out: URI
    weights: URI | None = None  # output of `synreal kliep`; all weights 1 without it
    k: int = 5
    max_distance: float | None = None
    index: str = "flat"  # or "ivf" (approximate; its recall is measured and reported)
    nprobe: int | None = None
    actors: int = 1  # CPU actors; with GPUs, one actor per GPU instead
    quality_samples: int = 200  # synthetic images used for the quality report
    seed: int = 0

    def __post_init__(self):
        if self.k < 1:
            raise ConfigError(f"must be >= 1, got {self.k}", "k")
        if self.max_distance is not None and not self.max_distance > 0:
            raise ConfigError(f"must be > 0 or null (keep all pairs), got {self.max_distance}", "max_distance")
        if self.index not in ("flat", "ivf"):
            raise ConfigError(f"must be flat or ivf, got {self.index!r}", "index")
        if self.nprobe is not None and self.nprobe < 1:
            raise ConfigError(f"must be >= 1 or null, got {self.nprobe}", "nprobe")
        for key in ("actors", "quality_samples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, key)}", key)
        if self.seed < 0:
            raise ConfigError(f"must be >= 0, got {self.seed}", "seed")


class KnnActor:
    """Ray Data actor: the real index built once, then one Parquet part of pairs per query batch."""

    def __init__(self, real_ref, cfg: PairsConfig, w_syn_ref, num_threads: int):
        import faiss
        import ray

        from synreal_ray.knn import KnnIndex

        # Ray sets OMP_NUM_THREADS to the actor's CPU count; say it explicitly so faiss agrees.
        faiss.omp_set_num_threads(max(1, num_threads))
        real = ray.get(real_ref[0])
        self.real_ids, self.real_images, self.real_labels, self.w_real = (
            real["id"], real["image_uri"], real["label_uri"], real["w_real"])
        self.index = KnnIndex(real["feature"], kind=cfg.index, nprobe=cfg.nprobe)
        self.w_syn = ray.get(w_syn_ref[0])
        self.cfg = cfg

    def __call__(self, batch: pa.Table) -> dict:
        cfg = self.cfg
        q = feature_matrix(batch.column("feature"), self.index.dim)
        dist, idx = self.index.search(q, cfg.k)
        syn_ids = np.asarray(batch.column("id").to_pylist(), dtype=object)
        keep = np.ones_like(dist, dtype=bool) if cfg.max_distance is None else dist <= cfg.max_distance
        rows, ranks = np.nonzero(keep)
        ri = idx[rows, ranks]
        w_syn = np.array([self.w_syn.get(s, 1.0) if self.w_syn is not None else 1.0 for s in syn_ids])
        table = pa.table({
            "syn_id": pa.array(syn_ids[rows], pa.string()),
            "real_id": pa.array(self.real_ids[ri], pa.string()),
            "rank": pa.array(ranks, pa.int32()),
            "distance": pa.array(dist[rows, ranks], pa.float32()),
            "w_syn": pa.array(w_syn[rows], pa.float64()),
            "w_real": pa.array(self.w_real[ri], pa.float64()),
            "syn_image_uri": pa.array(np.asarray(batch.column("image_uri").to_pylist(), dtype=object)[rows], pa.string()),
            "real_image_uri": pa.array(self.real_images[ri], pa.string()),
            "syn_label_uri": pa.array(np.asarray(batch.column("label_uri").to_pylist(), dtype=object)[rows], pa.string()),
            "real_label_uri": pa.array(self.real_labels[ri], pa.string()),
        })
        storage.write_parquet(table, storage.join(cfg.out, "pairs", storage.part_name(syn_ids)))
        return {"pairs": np.array([len(rows)]), "dropped": np.array([int((~keep).sum())]),
                "unpaired": np.array([int((~keep.any(axis=1)).sum())]),
                "distance_sum": np.array([float(dist[keep].sum())])}


def _check_weight_ids(weights: dict[str, float], ids, domain: str, uri: str) -> None:
    ids = set(ids)
    extra, missing = sorted(set(weights) - ids), sorted(ids - set(weights))
    if extra:
        raise ValueError(f"{uri}: {len(extra)} {domain} id(s) in the weights are not in the {domain} features, "
                         f"e.g. {extra[:3]} (weights computed from other features?)")
    if missing:
        raise ValueError(f"{uri}: {len(missing)} {domain} id(s) of the features have no weight, e.g. {missing[:3]}")


def run_pairs(cfg: PairsConfig, force: bool = False) -> dict:
    import ray

    from synreal_ray.cluster import init_ray
    from synreal_ray.weighting import load_weights

    meta_s, meta_r = features_meta(cfg.syn), features_meta(cfg.real)
    check_compatible(meta_s, meta_r, cfg.syn, cfg.real)
    real = load_features(cfg.real, columns=("id", "image_uri", "label_uri", "feature"))
    n_real = len(real["id"])
    if cfg.k > n_real:
        raise ValueError(f"--k {cfg.k} is larger than the real set ({n_real} images in {cfg.real})")
    from synreal_ray.knn import KnnIndex, measure_recall

    # Built once here too: a bad index setting fails now with a clear message rather than inside
    # every actor, and the IVF recall is measured on this copy.
    index = KnnIndex(real["feature"], kind=cfg.index, nprobe=cfg.nprobe, device="cpu")
    w_syn = None
    real["w_real"] = np.ones(n_real)
    if cfg.weights:
        weights = load_weights(cfg.weights)
        syn_ids = load_features(cfg.syn, columns=("id",))["id"]
        _check_weight_ids(weights["syn"], syn_ids, "syn", cfg.weights)
        _check_weight_ids(weights["real"], real["id"], "real", cfg.weights)
        w_syn = weights["syn"]
        real["w_real"] = np.array([weights["real"][i] for i in real["id"]])
    inputs = [cfg.syn, cfg.real] + ([cfg.weights] if cfg.weights else [])
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("syn", "real", "out", "weights", "actors")}
    stage = Stage("pairs", cfg.out, settings, inputs=inputs)
    if not stage.begin(force):
        return {"skipped": True, **storage.read_json(storage.join(cfg.out, "stage.json"))}

    init_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors, per_actor = (gpus, {"num_gpus": 1}) if gpus else (cfg.actors, {"num_cpus": 1})
    real_ref, w_ref = ray.put({k: real[k] for k in ("id", "image_uri", "label_uri", "feature", "w_real")}), ray.put(w_syn)
    ds = features_dataset(cfg.syn, columns=("id", "image_uri", "label_uri", "feature"))
    summary = ds.map_batches(KnnActor, fn_constructor_kwargs={"real_ref": [real_ref], "cfg": cfg, "w_syn_ref": [w_ref],
                                                              "num_threads": 1 if gpus else per_actor["num_cpus"]},
                             compute=ray.data.ActorPoolStrategy(size=actors), batch_format="pyarrow",
                             batch_size=4096, **per_actor)
    totals = {"pairs": 0, "dropped": 0, "unpaired": 0, "distance_sum": 0.0}
    for b in summary.iter_batches(batch_size=None, batch_format="numpy"):
        for key in totals:
            totals[key] += b[key].sum()
    if totals["pairs"] == 0:
        raise ValueError(f"--max-distance {cfg.max_distance} dropped every pair (smallest distances are larger)")
    report = quality_report(cfg, real)
    report.update(pairs=int(totals["pairs"]), dropped_by_max_distance=int(totals["dropped"]),
                  syn_without_pairs=int(totals["unpaired"]), mean_distance_all=float(totals["distance_sum"] / totals["pairs"]))
    if cfg.index == "ivf":
        queries = np.stack(list(_features_of(cfg.syn, _sample_ids(cfg)).values()))
        report["ivf_recall_at_k"] = measure_recall(index, real["feature"], queries, cfg.k)
    storage.write_json(storage.join(cfg.out, "report.json"), report)
    storage.write_bytes(storage.join(cfg.out, "report.md"), quality_markdown(report).encode())
    return stage.publish(pairs=int(totals["pairs"]), k=cfg.k, dropped=int(totals["dropped"]),
                         syn_features=cfg.syn, real_features=cfg.real, weights=cfg.weights,
                         quality={m: report[m] for m in ("spfeat", "random")})


# --- reading pairs back ---

def load_pairs(uri: str) -> pa.Table:
    storage.require_complete(uri, "pairs output")
    return storage.read_table(storage.join(uri, "pairs")).sort_by([("syn_id", "ascending"), ("rank", "ascending")])


# --- quality: SP-Feat pairing against random pairing on the same synthetic images ---

AGREEMENT_SIZE = (64, 128)  # label maps are compared at this size (nearest neighbour): layout, not detail


def _small_labels(uri: str) -> np.ndarray:
    img = decode_image(storage.read_bytes(uri), uri, "label map")
    return to_train_ids(np.asarray(img.resize(AGREEMENT_SIZE[::-1], Image.NEAREST)))


def label_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pixels with the same class, over pixels valid in both maps."""
    valid = (a != IGNORE) & (b != IGNORE)
    return float((a[valid] == b[valid]).mean()) if valid.any() else 0.0


def quality_report(cfg: PairsConfig, real: dict) -> dict:
    """Mean SP-Feat distance and label agreement of the pairs of a sample of synthetic images,
    and of the same images paired with random real images instead."""
    pairs = load_pairs_unpublished(cfg.out)
    syn_ids = np.unique(pairs.column("syn_id").to_numpy(zero_copy_only=False))
    rng = np.random.default_rng(cfg.seed)
    sample = set(rng.choice(syn_ids, min(cfg.quality_samples, len(syn_ids)), replace=False))
    rows = [r for r in pairs.select(["syn_id", "real_id", "distance", "syn_label_uri", "real_label_uri"]).to_pylist()
            if r["syn_id"] in sample]
    syn_f = _features_of(cfg.syn, sample)
    labels: dict[str, np.ndarray] = {}

    def lab(uri):
        if uri not in labels:
            labels[uri] = _small_labels(uri)
        return labels[uri]

    random_real = rng.integers(0, len(real["id"]), size=len(rows))
    sp_d, sp_a, rd_d, rd_a = [], [], [], []
    for r, j in zip(rows, random_real):
        sp_d.append(r["distance"])
        sp_a.append(label_agreement(lab(r["syn_label_uri"]), lab(r["real_label_uri"])))
        rd_d.append(float(np.linalg.norm(syn_f[r["syn_id"]] - real["feature"][j])))
        rd_a.append(label_agreement(lab(r["syn_label_uri"]), lab(real["label_uri"][j])))
    return {"samples": len(sample), "k": cfg.k,
            "spfeat": {"mean_distance": float(np.mean(sp_d)), "label_agreement": float(np.mean(sp_a))},
            "random": {"mean_distance": float(np.mean(rd_d)), "label_agreement": float(np.mean(rd_a))}}


def load_pairs_unpublished(out: str) -> pa.Table:
    return storage.read_table(storage.join(out, "pairs"))


def _features_of(uri: str, ids) -> dict[str, np.ndarray]:
    meta = features_meta(uri)
    t = storage.read_table(storage.join(uri, "features"), columns=["id", "feature"], filters=[("id", "in", sorted(ids))])
    return dict(zip(t.column("id").to_pylist(), feature_matrix(t.column("feature"), meta["dim"])))


def _sample_ids(cfg: PairsConfig) -> list[str]:
    ids = load_features(cfg.syn, columns=("id",))["id"]
    return list(np.random.default_rng(cfg.seed).choice(ids, min(cfg.quality_samples, len(ids)), replace=False))


def quality_markdown(report: dict) -> str:
    sp, rd = report["spfeat"], report["random"]
    return (f"Pairing quality on {report['samples']} synthetic images, K = {report['k']}\n\n"
            "| pairing | mean SP-Feat distance | mean label agreement |\n|---|---|---|\n"
            f"| SP-Feat KNN | {sp['mean_distance']:.4f} | {sp['label_agreement']:.1%} |\n"
            f"| random | {rd['mean_distance']:.4f} | {rd['label_agreement']:.1%} |\n")


# --- picture: synthetic images beside their nearest real images (paper 000, Figure 5) ---

def preview_grid(uri: str, n: int, tile: tuple[int, int] = (96, 192)) -> bytes:
    from PIL import ImageDraw

    pairs = load_pairs(uri).to_pylist()
    by_syn: dict[str, list[dict]] = {}
    for r in pairs:
        by_syn.setdefault(r["syn_id"], []).append(r)
    chosen = sorted(by_syn)[:n]
    k = max(len(by_syn[s]) for s in chosen)
    th, tw = tile
    canvas = Image.new("RGB", ((k + 1) * (tw + 4), len(chosen) * (th + 4)), "white")
    draw = ImageDraw.Draw(canvas)

    def load(u):
        return decode_image(storage.read_bytes(u), u).convert("RGB").resize((tw, th), Image.BILINEAR)

    for row, s in enumerate(chosen):
        y = row * (th + 4)
        canvas.paste(load(by_syn[s][0]["syn_image_uri"]), (0, y))
        draw.text((3, y + 2), f"syn {s.split('/')[-1]}", fill="yellow")
        for r in by_syn[s]:
            x = (r["rank"] + 1) * (tw + 4)
            canvas.paste(load(r["real_image_uri"]), (x, y))
            draw.text((x + 3, y + 2), f"#{r['rank'] + 1} d={r['distance']:.2f}", fill="yellow")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
