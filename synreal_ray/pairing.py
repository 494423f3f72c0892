"""Stage `pairs`: SP-Feat nearest neighbours between the synthetic and the real set.

Direction, `query`:
  "real" (default; paper 000, section 3.2.1): each real image queries the synthetic features for
         its K nearest synthetic images. A synthetic image's *uses* is the number of real images
         whose lists it is in; the paper gives it "a weight inversely proportional" to that:
         w_use = 1 / uses, normalised to mean 1 over the synthetic images that are used. The
         sampler draws a real image's neighbour with probability ∝ w_use (sampler.py).
         `max_uses` N caps the uses ("replace it with the next nearest neighbour for every query
         image"): each real image's nearest `candidates` synthetic images are searched, then
         `knn.assign_capped` visits all candidate edges in order of increasing distance (ties by
         real id, then synthetic id) and keeps an edge while its real image has < K neighbours and
         its synthetic image < N uses. A synthetic image thus stays with its N closest real
         images and every other real image gets its next nearest free candidate; a real image
         whose candidates run out keeps fewer than K (counted in the report).
  "syn": each synthetic image queries the real set for its K nearest real images (the behaviour
         before issue 12; no w_use column, no cap). Real images are then drawn ∝ p_syn/p_real.

A faiss KNN actor holds the index of the other side's features (a GPU index when the actor has a
GPU; with several GPUs, one actor per GPU: the index replicated, the queries sharded); Ray Data
streams the query features to it in batches. Query "syn": each batch's pairs are written as one
Parquet part by the actor itself. Query "real": the actors return each batch's candidates, since
the cap is global, and the driver assigns them (pure numpy) and writes the parts. At most
`in_process_max` query rows (IN_PROCESS_QUERIES) are searched by the same actor class in the
calling process instead, with no pool to start: the same pairs.

Output under `out`:
  pairs/part-*.parquet  syn_id, real_id, rank (0..K-1 in the query image's list), distance, w_syn,
                        w_real, w_use (query real only), syn_image_uri, real_image_uri,
                        syn_label_uri, real_label_uri
  report.json / report.md   pairing quality against random pairing on the same data; coverage,
                        uses, short lists and how concentrated the sampler's draws are
  stage.json, _SUCCESS
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from synreal_ray import storage
from synreal_ray.config import URI, ConfigError
from synreal_ray.datasets.images import decode_image
from synreal_ray.datasets.labels import IGNORE, to_train_ids
from synreal_ray.features import DRIVER_ROWS, check_compatible, feature_matrix, features_dataset, features_meta, load_features
from synreal_ray.progress import bar as progress_bar
from synreal_ray.sampler import pairs_query
from synreal_ray.stage import Stage

log = logging.getLogger(__name__)

PAIR_COLUMNS = ("syn_id", "real_id", "rank", "distance", "w_syn", "w_real",
                "syn_image_uri", "real_image_uri", "syn_label_uri", "real_label_uri")
QUERIES = ("real", "syn")
SIDE_NAMES = {"syn": "synthetic", "real": "real"}
PART_ROWS = 100_000  # rows per Parquet part written by the driver (query real)
CONCENTRATION_EPOCHS = 10  # sampler epochs drawn for the report's concentration figures
CONCENTRATION_BATCH = 64
KNN_BATCH_ROWS = 4096  # query rows per KnnActor call
# Query sets of at most this many rows are searched in this process, not by an actor pool. Rows,
# not cluster.IN_PROCESS_MAX's images: a query is one SP-Feat vector, and faiss searches thousands
# in the time a pool takes to start (~12 s on 2 cores). 20,000 queries against 25,000 vectors
# (dim 399, Synscapes-sized) took ~7.5 s on one core here, which is also what the pool's single
# CPU actor would spend; only GPUs or many actors beat that on larger sets. The driver already
# reads feature sets this size (features.DRIVER_ROWS), so the bound is the same.
IN_PROCESS_QUERIES = DRIVER_ROWS


@dataclass(frozen=True)
class PairsConfig:
    syn: URI
    real: URI
    out: URI
    weights: URI | None = None  # output of `synreal kliep`; all weights 1 without it
    query: str = "real"  # "real": each real image's K nearest synthetic images (the paper); "syn": the reverse
    k: int = 5
    max_uses: int | None = None  # query real: most real images' lists one synthetic image may be in; None: no cap
    candidates: int | None = None  # query real with max_uses: synthetic images searched per real image; None: 4 k
    max_distance: float | None = None
    index: str = "flat"  # or "ivf" (approximate; its recall is measured and reported)
    nprobe: int | None = None
    actors: int = 1  # CPU actors; with GPUs, one actor per GPU instead
    in_process_max: int = IN_PROCESS_QUERIES  # at most this many query rows: searched in this process, no actor pool
    quality_samples: int = 200  # query images used for the quality report
    seed: int = 0

    def __post_init__(self):
        if self.query not in QUERIES:
            raise ConfigError(f"must be real or syn, got {self.query!r}", "query")
        if self.k < 1:
            raise ConfigError(f"must be >= 1, got {self.k}", "k")
        if self.max_uses is not None and (self.query != "real" or self.max_uses < 1):
            raise ConfigError(f"must be >= 1 and needs query real, got {self.max_uses} with query {self.query}",
                              "max_uses")
        if self.candidates is not None and self.candidates < self.k:
            raise ConfigError(f"must be >= k ({self.k}) or null, got {self.candidates}", "candidates")
        if self.max_distance is not None and not self.max_distance > 0:
            raise ConfigError(f"must be > 0 or null (keep all pairs), got {self.max_distance}", "max_distance")
        if self.index not in ("flat", "ivf"):
            raise ConfigError(f"must be flat or ivf, got {self.index!r}", "index")
        if self.nprobe is not None and self.nprobe < 1:
            raise ConfigError(f"must be >= 1 or null, got {self.nprobe}", "nprobe")
        for key in ("actors", "quality_samples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, key)}", key)
        if self.in_process_max < 0:
            raise ConfigError(f"must be >= 0, got {self.in_process_max}", "in_process_max")
        if self.seed < 0:
            raise ConfigError(f"must be >= 0, got {self.seed}", "seed")

    @property
    def indexed(self) -> str:
        """The side the KNN index holds: the one that is not the query."""
        return "syn" if self.query == "real" else "real"

    def uri(self, side: str) -> str:
        return self.syn if side == "syn" else self.real

    def search_k(self, n_indexed: int) -> int:
        """Neighbours searched per query: k, or under a cap the candidates (at most the indexed set)."""
        return self.k if self.max_uses is None else min(n_indexed, self.candidates or 4 * self.k)


def _fetched(box: list):
    """The one item of `box`: a pool actor gets an object-store reference (in a list, so that Ray
    passes it on as is) and fetches it; in the driver it is the value itself."""
    import ray

    return ray.get(box[0]) if isinstance(box[0], ray.ObjectRef) else box[0]


class KnnActor:
    """Ray Data actor (or, for a small query set, called in the driver): the index built once; per
    query batch, query syn: one Parquet part of pairs; query real: the batch's candidates
    (real_id, syn_row, distance), returned for the assignment. indexed_ref: [the indexed side's
    columns]; w_query_ref: [the query side's weights by id, or None]; num_threads: faiss's
    threads (None: as they are)."""

    def __init__(self, indexed_ref: list, cfg: PairsConfig, w_query_ref: list, num_threads: int | None = None):
        import faiss

        from synreal_ray.knn import KnnIndex

        if num_threads:  # Ray sets OMP_NUM_THREADS to the actor's CPU count; say it so faiss agrees
            faiss.omp_set_num_threads(num_threads)
        side = _fetched(indexed_ref)
        self.ids, self.images, self.labels, self.w = side["id"], side["image_uri"], side["label_uri"], side["w"]
        self.index = KnnIndex(side["feature"], kind=cfg.index, nprobe=cfg.nprobe)
        self.w_query = _fetched(w_query_ref)
        self.cfg = cfg

    def __call__(self, batch: pa.Table) -> dict:
        cfg = self.cfg
        q = feature_matrix(batch.column("feature"), self.index.dim)
        dist, idx = self.index.search(q, cfg.search_k(self.index.n))
        query_ids = np.asarray(batch.column("id").to_pylist(), dtype=object)
        if cfg.query == "real":  # the cap is global: the driver assigns all candidates at once
            return {"real_id": np.repeat(query_ids, dist.shape[1]).astype(str), "syn_row": idx.ravel(),
                    "distance": dist.ravel()}
        keep = np.ones_like(dist, dtype=bool) if cfg.max_distance is None else dist <= cfg.max_distance
        rows, ranks = np.nonzero(keep)
        ri = idx[rows, ranks]
        w_syn = np.array([self.w_query.get(s, 1.0) if self.w_query is not None else 1.0 for s in query_ids])
        table = pa.table({
            "syn_id": pa.array(query_ids[rows], pa.string()),
            "real_id": pa.array(self.ids[ri], pa.string()),
            "rank": pa.array(ranks, pa.int32()),
            "distance": pa.array(dist[rows, ranks], pa.float32()),
            "w_syn": pa.array(w_syn[rows], pa.float64()),
            "w_real": pa.array(self.w[ri], pa.float64()),
            "syn_image_uri": pa.array(np.asarray(batch.column("image_uri").to_pylist(), dtype=object)[rows], pa.string()),
            "real_image_uri": pa.array(self.images[ri], pa.string()),
            "syn_label_uri": pa.array(np.asarray(batch.column("label_uri").to_pylist(), dtype=object)[rows], pa.string()),
            "real_label_uri": pa.array(self.labels[ri], pa.string()),
        })
        storage.write_parquet(table, storage.join(cfg.out, "pairs", storage.part_name(query_ids)))
        return {"pairs": np.array([len(rows)]), "dropped": np.array([int((~keep).sum())]),
                "distance_sum": np.array([float(dist[keep].sum())]), "queries": np.array([len(query_ids)])}


def queries_in(batch: dict) -> int:
    """Query images answered in one of KnnActor's output batches (query real: the candidates of
    each query, which never straddle batches; query syn: counted by the actor)."""
    return int(batch["queries"].sum()) if "queries" in batch else len(np.unique(batch["real_id"]))


def _check_weight_ids(weights: dict[str, float], ids, domain: str, uri: str) -> None:
    ids = set(ids)
    extra, missing = sorted(set(weights) - ids), sorted(ids - set(weights))
    if extra:
        raise ValueError(f"{uri}: {len(extra)} {domain} id(s) in the weights are not in the {domain} features, "
                         f"e.g. {extra[:3]} (weights computed from other features?)")
    if missing:
        raise ValueError(f"{uri}: {len(missing)} {domain} id(s) of the features have no weight, e.g. {missing[:3]}")


def use_weights(uses: np.ndarray) -> np.ndarray:
    """Over-use weight per synthetic image from its uses: 1 / uses, mean 1 over the used images
    (0 for unused ones: they are in no list)."""
    uses = np.asarray(uses, dtype=np.float64)
    w = np.divide(1.0, uses, out=np.zeros_like(uses), where=uses > 0)
    return w / w[uses > 0].mean() if (uses > 0).any() else w


def real_query_pairs(cfg: PairsConfig, real_id, syn_row, distance, syn: dict, real: dict) -> tuple[pa.Table, int]:
    """The pairs table of query real from all candidate edges, and how many candidates
    max_distance dropped. syn / real: id-sorted columns (id, image_uri, label_uri, w)."""
    from synreal_ray.knn import assign_capped

    real_row = np.searchsorted(real["id"].astype(str), np.asarray(real_id).astype(str))  # ids are sorted
    ok = np.ones(real_row.size, dtype=bool) if cfg.max_distance is None else distance <= cfg.max_distance
    r, s, d = real_row[ok], np.asarray(syn_row, dtype=np.int64)[ok], np.asarray(distance)[ok]
    keep = assign_capped(r, s, d, cfg.k, cfg.max_uses)
    r, s, d = r[keep], s[keep], d[keep]
    order = np.lexsort((s, d, r))
    r, s, d = r[order], s[order], d[order]
    rank = np.arange(r.size) - np.searchsorted(r, r, side="left")
    w_use = use_weights(np.bincount(s, minlength=len(syn["id"])))
    table = pa.table({
        "syn_id": pa.array(syn["id"][s], pa.string()),
        "real_id": pa.array(real["id"][r], pa.string()),
        "rank": pa.array(rank, pa.int32()),
        "distance": pa.array(d, pa.float32()),
        "w_syn": pa.array(syn["w"][s], pa.float64()),
        "w_real": pa.array(real["w"][r], pa.float64()),
        "w_use": pa.array(w_use[s], pa.float64()),
        "syn_image_uri": pa.array(syn["image_uri"][s], pa.string()),
        "real_image_uri": pa.array(real["image_uri"][r], pa.string()),
        "syn_label_uri": pa.array(syn["label_uri"][s], pa.string()),
        "real_label_uri": pa.array(real["label_uri"][r], pa.string()),
    })
    return table, int((~ok).sum())


QUERY_COLUMNS = ("id", "image_uri", "label_uri", "feature")


def _search_in_process(cfg: PairsConfig, indexed: dict, w_query: dict | None):
    """KnnActor's work in this process over the query features, KNN_BATCH_ROWS rows at a time
    (no actor pool to start): its output batches."""
    actor = KnnActor([indexed], cfg, [w_query])
    table = storage.read_table(storage.join(cfg.uri(cfg.query), "features"), columns=list(QUERY_COLUMNS))
    return (actor(table.slice(s, KNN_BATCH_ROWS)) for s in range(0, table.num_rows, KNN_BATCH_ROWS))


def _search_with_pool(cfg: PairsConfig, indexed: dict, w_query: dict | None):
    """KnnActor on a Ray Data actor pool streaming the query features: (its output batches, the
    pool size)."""
    import ray

    from synreal_ray.cluster import init_ray

    init_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors, per_actor = (gpus, {"num_gpus": 1}) if gpus else (cfg.actors, {"num_cpus": 1})
    ds = features_dataset(cfg.uri(cfg.query), columns=QUERY_COLUMNS)
    actor_kwargs = {"indexed_ref": [ray.put(indexed)], "cfg": cfg, "w_query_ref": [ray.put(w_query)],
                    "num_threads": 1 if gpus else per_actor["num_cpus"]}
    out = ds.map_batches(KnnActor, fn_constructor_kwargs=actor_kwargs,
                         compute=ray.data.ActorPoolStrategy(size=actors), batch_format="pyarrow",
                         batch_size=KNN_BATCH_ROWS, **per_actor)
    out.context.enable_progress_bars = False  # run_pairs' bar counts queries
    return out.iter_batches(batch_size=None, batch_format="numpy"), actors


def run_pairs(cfg: PairsConfig, force: bool = False) -> dict:
    from synreal_ray.knn import KnnIndex, measure_recall
    from synreal_ray.weighting import load_weights

    meta_s, meta_r = features_meta(cfg.syn), features_meta(cfg.real)
    check_compatible(meta_s, meta_r, cfg.syn, cfg.real)
    cols = ("id", "image_uri", "label_uri")
    sides = {d: load_features(cfg.uri(d), columns=cols + (("feature",) if d == cfg.indexed else ()))
             for d in ("syn", "real")}
    indexed = sides[cfg.indexed]
    n_indexed = len(indexed["id"])
    if cfg.k > n_indexed:
        raise ValueError(f"--k {cfg.k} is larger than the {SIDE_NAMES[cfg.indexed]} set "
                         f"({n_indexed} images in {cfg.uri(cfg.indexed)})")
    # Built once here too: a bad index setting fails now with a clear message rather than inside
    # every actor, and the IVF recall is measured on this copy.
    index = KnnIndex(indexed["feature"], kind=cfg.index, nprobe=cfg.nprobe, device="cpu")
    weights = {d: None for d in sides}
    if cfg.weights:
        weights = load_weights(cfg.weights)
        for d in sides:
            _check_weight_ids(weights[d], sides[d]["id"], d, cfg.weights)
    for d, side in sides.items():
        side["w"] = np.ones(len(side["id"])) if weights[d] is None else np.array([weights[d][i] for i in side["id"]])
    inputs = [cfg.syn, cfg.real] + ([cfg.weights] if cfg.weights else [])
    settings = {k: v for k, v in asdict(cfg).items()
                if k not in ("syn", "real", "out", "weights", "actors", "in_process_max")}
    stage = Stage("pairs", cfg.out, settings, inputs=inputs)
    if not stage.begin(force):
        return {"skipped": True, **storage.read_json(storage.join(cfg.out, "stage.json"))}

    n_queries = len(sides[cfg.query]["id"])
    columns = {k: indexed[k] for k in ("id", "image_uri", "label_uri", "feature", "w")}
    if n_queries <= cfg.in_process_max:  # a pool's start-up would outweigh the search
        found, actors = _search_in_process(cfg, columns, weights[cfg.query]), 0
    else:
        found, actors = _search_with_pool(cfg, columns, weights[cfg.query])
    batches = []
    with progress_bar(n_queries, "pairs", "query", log) as bar:
        for b in found:
            batches.append(b)
            bar.update(queries_in(b))
    if cfg.query == "real":
        cand = {c: np.concatenate([b[c] for b in batches]) for c in ("real_id", "syn_row", "distance")}
        table, dropped = real_query_pairs(cfg, cand["real_id"], cand["syn_row"], cand["distance"],
                                          sides["syn"], sides["real"])
        for s in range(0, table.num_rows, PART_ROWS):
            part = table.slice(s, PART_ROWS)
            name = storage.part_name(part.column("real_id").to_pylist())
            storage.write_parquet(part, storage.join(cfg.out, "pairs", name))
        totals = {"pairs": table.num_rows, "dropped": dropped,
                  "distance_sum": float(np.sum(table.column("distance").to_numpy(), dtype=np.float64))}
    else:
        totals = {key: sum(b[key].sum() for b in batches) for key in ("pairs", "dropped", "distance_sum")}
    if totals["pairs"] == 0:
        raise ValueError(f"--max-distance {cfg.max_distance} dropped every pair (smallest distances are larger)")
    report = quality_report(cfg, indexed)
    pairs = table if cfg.query == "real" else load_pairs_unpublished(cfg.out)  # query syn: written by the actors
    report.update(pairs=int(totals["pairs"]), dropped_by_max_distance=int(totals["dropped"]),
                  mean_distance_all=float(totals["distance_sum"] / totals["pairs"]), max_uses=cfg.max_uses,
                  **pairing_stats(pairs, sides["syn"]["id"], sides["real"]["id"], cfg.k),
                  concentration=draw_concentration(pairs, sides["syn"]["id"], sides["real"]["id"], cfg.seed))
    if cfg.index == "ivf":
        queries = np.stack(list(_features_of(cfg.uri(cfg.query), _sample_ids(cfg)).values()))
        report["ivf_recall_at_k"] = measure_recall(index, indexed["feature"], queries, cfg.k)
    storage.write_json(storage.join(cfg.out, "report.json"), report)
    storage.write_bytes(storage.join(cfg.out, "report.md"), quality_markdown(report).encode())
    log.info("pairs: %d pairs, query %s, coverage %.1f%% of synthetic images, %d query lists shorter than K "
             "(searched %s)", report["pairs"], cfg.query, 100 * report["coverage"], report["short_queries"],
             f"by {actors} actor(s)" if actors else "in this process")
    return stage.publish(pairs=int(totals["pairs"]), k=cfg.k, query=cfg.query, max_uses=cfg.max_uses, actors=actors,
                         dropped=int(totals["dropped"]), coverage=report["coverage"],
                         syn_features=cfg.syn, real_features=cfg.real, weights=cfg.weights,
                         quality={m: report[m] for m in ("spfeat", "random")})


# --- reading pairs back ---

def load_pairs(uri: str) -> pa.Table:
    """The published pairs, each query image's list in rank order (query real: by real_id)."""
    storage.require_complete(uri, "pairs output")
    table = storage.read_table(storage.join(uri, "pairs"))
    return table.sort_by([(f"{pairs_query(table.column_names)}_id", "ascending"), ("rank", "ascending")])


# --- what the pairs cover and how the sampler's draws spread ---

def _counts(ids: np.ndarray, all_ids: np.ndarray) -> np.ndarray:
    """How often each of all_ids (sorted) occurs in ids."""
    return np.bincount(np.searchsorted(all_ids, ids), minlength=len(all_ids))


def pairing_stats(pairs: pa.Table, syn_ids, real_ids, k: int) -> dict:
    """Coverage (share of synthetic images in at least one pair), the uses of the synthetic images
    (pairs each is in: for query real, the real images' lists it is in), and query images whose
    list is shorter than K (max_distance, or candidates exhausted under max_uses)."""
    syn_ids, real_ids = np.sort(np.asarray(syn_ids, dtype=str)), np.sort(np.asarray(real_ids, dtype=str))
    query = pairs_query(pairs.column_names)
    col = lambda c: pairs.column(c).to_numpy(zero_copy_only=False).astype(str)  # noqa: E731
    uses = _counts(col("syn_id"), syn_ids)
    per_query = _counts(col(f"{query}_id"), syn_ids if query == "syn" else real_ids)
    top = int(uses.max())
    counts, edges = np.histogram(uses, bins=np.arange(top + 2) if top <= 30 else 20)
    return {"query": query, "coverage": float((uses > 0).mean()), "syn_without_pairs": int((uses == 0).sum()),
            "uses": {"min": int(uses.min()), "median": float(np.median(uses)), "mean": float(uses.mean()), "max": top,
                     "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}},
            "short_queries": int((per_query < k).sum()), "queries": int(per_query.size)}


def top_share(counts: np.ndarray, share: float = 0.01) -> float:
    """Share of all draws taken by the `share` most-drawn images (at least one image)."""
    m = max(1, math.ceil(share * counts.size))
    return float(np.sort(counts)[::-1][:m].sum() / counts.sum())


def draw_concentration(pairs: pa.Table, syn_ids, real_ids, seed: int, epochs: int = CONCENTRATION_EPOCHS) -> dict:
    """Run the training sampler (weighting none: the draws of loss and source too) for `epochs`
    epochs and report, per side, the share of draws taken by the top 1% most-drawn images."""
    from synreal_ray.sampler import SmartBatchSampler

    cols = [c for c in ("syn_id", "real_id", "rank", "w_syn", "w_real", "w_use") if c in pairs.column_names]
    table = pairs.select(cols)
    n = SmartBatchSampler(table, syn_ids=syn_ids, real_ids=real_ids, batch_size=1).n_anchors
    bs = min(CONCENTRATION_BATCH, n)
    sampler = SmartBatchSampler(table, syn_ids=syn_ids, real_ids=real_ids, batch_size=bs, weighting="none", seed=seed)
    drawn = {"syn": [], "real": []}
    for _ in range(math.ceil(epochs * n / bs)):
        b = sampler.next_batch()
        drawn["syn"] += b.syn_ids
        drawn["real"] += b.real_ids
    out = {"draws": epochs * n, "epochs": epochs, "top1pct_share": {}}
    for side, ids in (("syn", syn_ids), ("real", real_ids)):
        got = np.asarray(drawn[side][: epochs * n], dtype=str)  # whole epochs only
        out["top1pct_share"][side] = top_share(_counts(got, np.sort(np.asarray(ids, dtype=str))))
    return out


# --- quality: SP-Feat pairing against random pairing on the same query images ---

AGREEMENT_SIZE = (64, 128)  # label maps are compared at this size (nearest neighbour): layout, not detail


def _small_labels(uri: str) -> np.ndarray:
    img = decode_image(storage.read_bytes(uri), uri, "label map")
    return to_train_ids(np.asarray(img.resize(AGREEMENT_SIZE[::-1], Image.NEAREST)))


def label_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pixels with the same class, over pixels valid in both maps."""
    valid = (a != IGNORE) & (b != IGNORE)
    return float((a[valid] == b[valid]).mean()) if valid.any() else 0.0


def quality_report(cfg: PairsConfig, other: dict) -> dict:
    """Mean SP-Feat distance and label agreement of the pairs of a sample of query images, and of
    the same images paired with random images of the other (indexed) side instead."""
    q, o = cfg.query, cfg.indexed
    pairs = load_pairs_unpublished(cfg.out)
    query_ids = np.unique(pairs.column(f"{q}_id").to_numpy(zero_copy_only=False))
    rng = np.random.default_rng(cfg.seed)
    sample = set(rng.choice(query_ids, min(cfg.quality_samples, len(query_ids)), replace=False))
    rows = [r for r in pairs.select([f"{q}_id", "distance", f"{q}_label_uri", f"{o}_label_uri"]).to_pylist()
            if r[f"{q}_id"] in sample]
    query_f = _features_of(cfg.uri(q), sample)
    labels: dict[str, np.ndarray] = {}

    def lab(uri):
        if uri not in labels:
            labels[uri] = _small_labels(uri)
        return labels[uri]

    random_other = rng.integers(0, len(other["id"]), size=len(rows))
    sp_d, sp_a, rd_d, rd_a = [], [], [], []
    for r, j in zip(rows, random_other):
        sp_d.append(r["distance"])
        sp_a.append(label_agreement(lab(r[f"{q}_label_uri"]), lab(r[f"{o}_label_uri"])))
        rd_d.append(float(np.linalg.norm(query_f[r[f"{q}_id"]] - other["feature"][j])))
        rd_a.append(label_agreement(lab(r[f"{q}_label_uri"]), lab(other["label_uri"][j])))
    return {"samples": len(sample), "k": cfg.k, "query": q,
            "spfeat": {"mean_distance": float(np.mean(sp_d)), "label_agreement": float(np.mean(sp_a))},
            "random": {"mean_distance": float(np.mean(rd_d)), "label_agreement": float(np.mean(rd_a))}}


def load_pairs_unpublished(out: str) -> pa.Table:
    return storage.read_table(storage.join(out, "pairs"))


def _features_of(uri: str, ids) -> dict[str, np.ndarray]:
    meta = features_meta(uri)
    t = storage.read_table(storage.join(uri, "features"), columns=["id", "feature"], filters=[("id", "in", sorted(ids))])
    return dict(zip(t.column("id").to_pylist(), feature_matrix(t.column("feature"), meta["dim"])))


def _sample_ids(cfg: PairsConfig) -> list[str]:
    ids = load_features(cfg.uri(cfg.query), columns=("id",))["id"]
    return list(np.random.default_rng(cfg.seed).choice(ids, min(cfg.quality_samples, len(ids)), replace=False))


def quality_markdown(report: dict) -> str:
    sp, rd = report["spfeat"], report["random"]
    query = report.get("query", "syn")
    md = (f"Pairing quality on {report['samples']} {SIDE_NAMES[query]} query images, K = {report['k']}\n\n"
          "| pairing | mean SP-Feat distance | mean label agreement |\n|---|---|---|\n"
          f"| SP-Feat KNN | {sp['mean_distance']:.4f} | {sp['label_agreement']:.1%} |\n"
          f"| random | {rd['mean_distance']:.4f} | {rd['label_agreement']:.1%} |\n")
    if "coverage" in report:
        u, c = report["uses"], report["concentration"]
        md += (f"\nCoverage: {report['coverage']:.1%} of synthetic images are in at least one pair "
               f"(max uses: {report.get('max_uses') or 'no cap'}). Uses per synthetic image: min {u['min']}, "
               f"median {u['median']:g}, max {u['max']}. Query images with fewer than K neighbours: "
               f"{report['short_queries']} of {report['queries']}.\n"
               f"Sampler draws ({c['epochs']} epochs, {c['draws']} pairs): the top 1% most-drawn images take "
               f"{c['top1pct_share']['syn']:.1%} of the synthetic and {c['top1pct_share']['real']:.1%} "
               "of the real draws.\n")
    return md


# --- picture: query images beside their nearest neighbours (paper 000, Figure 5) ---

def preview_grid(uri: str, n: int, tile: tuple[int, int] = (96, 192)) -> bytes:
    """n query images (the first by id), each beside its neighbours in rank order."""
    from PIL import ImageDraw

    table = load_pairs(uri)
    q = pairs_query(table.column_names)
    o = "syn" if q == "real" else "real"
    by_query: dict[str, list[dict]] = {}
    for r in table.to_pylist():
        by_query.setdefault(r[f"{q}_id"], []).append(r)
    chosen = sorted(by_query)[:n]
    k = max(len(by_query[s]) for s in chosen)
    th, tw = tile
    canvas = Image.new("RGB", ((k + 1) * (tw + 4), len(chosen) * (th + 4)), "white")
    draw = ImageDraw.Draw(canvas)

    def load(u):
        return decode_image(storage.read_bytes(u), u).convert("RGB").resize((tw, th), Image.BILINEAR)

    for row, s in enumerate(chosen):
        y = row * (th + 4)
        canvas.paste(load(by_query[s][0][f"{q}_image_uri"]), (0, y))
        draw.text((3, y + 2), f"{q} {s.split('/')[-1]}", fill="yellow")
        for r in by_query[s]:
            x = (r["rank"] + 1) * (tw + 4)
            canvas.paste(load(r[f"{o}_image_uri"]), (x, y))
            draw.text((x + 3, y + 2), f"#{r['rank'] + 1} d={r['distance']:.2f}", fill="yellow")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
