"""Exact (and optionally approximate) K-nearest real neighbours of synthetic SP-Feat vectors.

`KnnIndex` holds the real features in a faiss index (flat L2 by default, IVF as an option) on the
GPU when there is one and the faiss build supports it, on the CPU otherwise. Pure numpy + faiss;
no Ray: the Ray actor that serves it lives elsewhere. "real" below names the indexed side; the
pairs stage indexes the synthetic features instead when real images are the queries (its default),
and `assign_capped` turns each query's candidates into lists with a global cap on reuse.

Why the results are post-processed rather than taken straight from faiss:

* faiss computes squared L2 as |q|^2 + |r|^2 - 2 q.r in float32. Near zero (duplicate or
  near-duplicate layouts, common in synthetic data) that cancels badly, and the square root
  magnifies it: sqrt(1e-6) = 1e-3. So the returned distances are recomputed from the differences.
* Among equal distances faiss's order is unspecified and can change with thread count or device.
  Pairs must not depend on that, so ties are broken by the lower real index, also across the
  k-th position: a few extra candidates are fetched and a row whose k-th neighbour is not clearly
  closer than every candidate left out (within faiss's rounding) is fetched again with more.

With this, the flat index returns exactly what `brute_force_knn` returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import faiss
import numpy as np

# How far faiss's squared distances may be from the true ones, relative to |q|^2 + max |r|^2.
# float32 GEMM errors are ~1e-6 of that on the CPU; the GPU margin also covers TF32 GEMMs.
_REL_TOL_CPU = 1e-5
_REL_TOL_GPU = 1e-3
_GPU_MAX_K = 1024  # faiss GPU k / nprobe limit (2048 in recent builds); beyond it the CPU copy answers
_REFINE_CHUNK_ELEMS = 1 << 21  # float32 elements per numpy refine block (8 MiB: stays in cache)
_BRUTE_CHUNK_ELEMS = 1 << 23  # float64 distance-matrix elements per block (64 MiB)

# fetch(rows, kk) -> (bound, candidates): the kk best candidates of queries[rows] (distinct real
# indices, -1 for none) and, per row, an approximate squared distance that every real point left
# out is at least (up to the tolerance).
_Fetch = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def _as_matrix(x, name: str) -> np.ndarray:
    """C-contiguous float32 (n, D) copy/view with finite values, or a clear ValueError."""
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, D) array, got shape {arr.shape}")
    if arr.size and not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise ValueError(f"{name} has non-finite values (NaN or inf), first in row {bad}")
    return arr


def _check_k(k, n_real: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"K must be a positive integer, got {k!r}")
    if k > n_real:
        raise ValueError(f"K={k} is larger than the real set (N={n_real})")
    return int(k)


def _check_dim(queries: np.ndarray, dim: int) -> None:
    if queries.shape[1] != dim:
        raise ValueError(
            f"query dimension {queries.shape[1]} does not match the index dimension {dim} "
            "(features computed with different SP-Feat levels or class counts?)"
        )


def _sq_dist_by_idx(real: np.ndarray, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """|queries[i] - real[ids[i, j]]|^2 as float32 (n, kk), from the differences; ids all valid.

    faiss's C++ fvec_L2sqr_by_idx does it without materialising the gathered rows (~25x faster
    than numpy here); the numpy path is kept for faiss builds without it.
    """
    n, kk = ids.shape
    out = np.empty((n, kk), dtype=np.float32)
    if n == 0 or kk == 0:
        return out
    if hasattr(faiss, "fvec_L2sqr_by_idx"):
        # The C code trusts its inputs: wrong layout or an out-of-range id would read stray memory.
        # swig_ptr holds no reference, so every array passed stays bound to a name during the call.
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        real = np.ascontiguousarray(real, dtype=np.float32)
        ids_c = np.ascontiguousarray(ids, dtype=np.int64)
        if ids_c.min() < 0 or ids_c.max() >= real.shape[0] or queries.shape[1] != real.shape[1]:
            raise AssertionError("internal error: candidate ids out of range or dimension mismatch")
        faiss.fvec_L2sqr_by_idx(
            faiss.swig_ptr(out), faiss.swig_ptr(queries), faiss.swig_ptr(real), faiss.swig_ptr(ids_c),
            real.shape[1], n, kk,
        )
        return out
    step = max(1, _REFINE_CHUNK_ELEMS // (kk * real.shape[1]))
    for s in range(0, n, step):
        diff = queries[s : s + step, None, :] - real[ids[s : s + step]]
        diff *= diff
        out[s : s + step] = diff.sum(axis=-1)
    return out


def _refine(real: np.ndarray, queries: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact squared distances of the candidates, each row sorted by (distance, real index).

    Differences, not the |q|^2 + |r|^2 - 2 q.r expansion, so that duplicates come out exactly 0
    and equal pairs exactly equal. Missing candidates (-1) get +inf and sort last.
    """
    valid = cand >= 0
    d2 = _sq_dist_by_idx(real, queries, np.where(valid, cand, 0))
    d2[~valid] = np.inf
    order = np.lexsort((cand, d2), axis=-1)
    return np.take_along_axis(d2, order, axis=1), np.take_along_axis(cand, order, axis=1)


def _exact_topk(
    real: np.ndarray, queries: np.ndarray, k: int, fetch: _Fetch, rel_tol: float, real_sq_max: float
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k squared distances with ties broken by real index, from approximate fetches.

    A row is final once its exact k-th distance is below the fetch bound minus the rounding
    tolerance: then no real point left out can be as close. Otherwise it is fetched again with
    twice the candidates (at most N, where nothing is left out).
    """
    n_real = real.shape[0]
    n = queries.shape[0]
    out_d2 = np.empty((n, k), dtype=np.float32)
    out_idx = np.empty((n, k), dtype=np.int64)
    tol = rel_tol * (np.einsum("ij,ij->i", queries, queries, dtype=np.float64) + real_sq_max)
    rows = np.arange(n)
    kk = min(n_real, k + max(4, k // 4))  # a few spare candidates settle most rows at once
    while rows.size:
        bound, cand = fetch(rows, kk)
        d2, idx = _refine(real, queries[rows], cand)
        if kk >= n_real:
            pending = np.zeros(rows.size, dtype=bool)
        else:
            pending = d2[:, k - 1] >= bound - tol[rows]
        done = ~pending
        out_d2[rows[done]] = d2[done, :k]
        out_idx[rows[done]] = idx[done, :k]
        rows = rows[pending]
        kk = min(n_real, 2 * kk)
    return out_d2, out_idx


def _euclidean(d2: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(d2, 0.0)).astype(np.float32)


def brute_force_knn(real, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact K nearest rows of `real` for each query, in numpy (the reference for faiss).

    Returns (distances, indices): (n, k) float32 Euclidean distances, ascending, ties broken by
    the lower real index; int64 row indices into `real`. The candidates come from a float64 BLAS
    distance matrix (what a plain numpy KNN does), then the same exact refinement as `KnnIndex`.
    """
    d2, idx = _brute_force_sq(real, queries, k)
    return _euclidean(d2), idx


def _brute_force_sq(real, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`brute_force_knn` with exact squared distances (float32)."""
    real = _as_matrix(real, "real features")
    queries = _as_matrix(queries, "queries")
    if real.shape[0] == 0:
        raise ValueError("the real set is empty: nothing to search")
    _check_dim(queries, real.shape[1])
    k = _check_k(k, real.shape[0])
    n_real = real.shape[0]
    real64 = real.astype(np.float64)
    real_sq = np.einsum("ij,ij->i", real64, real64)

    def fetch_block(block: np.ndarray) -> _Fetch:
        def fetch(rows: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
            q = block[rows].astype(np.float64)
            d2 = np.einsum("ij,ij->i", q, q)[:, None] + real_sq[None, :] - 2.0 * (q @ real64.T)
            if kk >= n_real:
                cand = np.broadcast_to(np.arange(n_real), d2.shape).copy()
            else:
                cand = np.argpartition(d2, kk - 1, axis=1)[:, :kk]
            return np.take_along_axis(d2, cand, axis=1).max(axis=1), cand

        return fetch

    out_d2 = np.empty((queries.shape[0], k), dtype=np.float32)
    out_i = np.empty((queries.shape[0], k), dtype=np.int64)
    step = max(1, _BRUTE_CHUNK_ELEMS // n_real)
    for s in range(0, queries.shape[0], step):
        block = queries[s : s + step]
        out_d2[s : s + step], out_i[s : s + step] = _exact_topk(
            real, block, k, fetch_block(block), _REL_TOL_CPU, float(real_sq.max())
        )
    return out_d2, out_i


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class KnnIndex:
    """faiss index over the real SP-Feat vectors; `search` gives each query its K nearest reals.

    kind:    "flat" (exact L2, default) or "ivf" (IndexIVFFlat: approximate, faster on large sets;
             check it with `measure_recall`).
    nlist:   IVF lists; default about sqrt(N), capped so every list has >= 39 training points
             (faiss's k-means minimum).
    nprobe:  IVF lists searched per query; default about nlist / 8.
    device:  "auto" (GPU when available, else CPU), "cpu" or "cuda" (error without GPU support).
    refine:  recompute the returned distances exactly and break ties by real index (default).
             False returns faiss's own results (sqrt of its clipped squared L2): faster for huge
             query sets on GPU, but distances near 0 are only accurate to ~1e-3 and tie order is
             faiss's. With IVF and refine=False, a missing neighbour shows as index -1 / inf.

    The real features are kept (float32, N x D) for the refinement. Attributes: n, dim, kind,
    nlist, nprobe, device ("cpu" or "cuda:<id>").
    """

    def __init__(
        self,
        real,
        kind: str = "flat",
        *,
        nlist: int | None = None,
        nprobe: int | None = None,
        device: str = "auto",
        gpu_id: int = 0,
        refine: bool = True,
    ) -> None:
        if kind not in ("flat", "ivf"):
            raise ValueError(f"unknown KNN index kind {kind!r}: use 'flat' or 'ivf'")
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda'")
        self._real = _as_matrix(real, "real features")
        self.n, self.dim = self._real.shape
        if self.n == 0:
            raise ValueError("the real set is empty: cannot build a KNN index")
        if self.dim == 0:
            raise ValueError("real features have dimension 0")
        use_gpu = device == "cuda" or (device == "auto" and gpu_available())
        if device == "cuda" and not gpu_available():
            raise RuntimeError(
                "device='cuda' but faiss has no GPU support here "
                f"(faiss {faiss.__version__}, GPUs seen: {faiss.get_num_gpus()}); "
                "install faiss-gpu-cu12 (extra 'gpu') or use device='cpu'/'auto'"
            )
        if use_gpu and not 0 <= gpu_id < faiss.get_num_gpus():
            raise ValueError(f"gpu_id={gpu_id} but faiss sees {faiss.get_num_gpus()} GPU(s)")
        self.kind = kind
        self.refine = bool(refine)
        self.nlist: int | None = None
        self.nprobe: int | None = None

        if kind == "flat":
            cpu_index = faiss.IndexFlatL2(self.dim)
        else:
            max_nlist = max(1, self.n // 39)
            self.nlist = int(nlist) if nlist is not None else max(1, min(round(math.sqrt(self.n)), max_nlist))
            if not 1 <= self.nlist <= self.n:
                raise ValueError(f"nlist={nlist} must be between 1 and the real set size N={self.n}")
            self.nprobe = int(nprobe) if nprobe is not None else max(1, round(self.nlist / 8))
            if not 1 <= self.nprobe <= self.nlist:
                raise ValueError(f"nprobe={nprobe} must be between 1 and nlist={self.nlist}")
            quantizer = faiss.IndexFlatL2(self.dim)
            cpu_index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_L2)
            cpu_index.train(self._real)
            cpu_index.nprobe = self.nprobe
            self._quantizer = quantizer  # the IVF index does not own it from Python
        cpu_index.add(self._real)
        self._cpu_index = cpu_index
        self._real_sq_max = float(np.einsum("ij,ij->i", self._real, self._real, dtype=np.float64).max())

        if use_gpu:
            self._gpu_res = faiss.StandardGpuResources()  # must outlive the GPU index
            self._index = faiss.index_cpu_to_gpu(self._gpu_res, gpu_id, cpu_index)
            if kind == "ivf":
                self._index.nprobe = self.nprobe
            self.device = f"cuda:{gpu_id}"
            self._rel_tol = _REL_TOL_GPU
        else:
            self._index = cpu_index
            self.device = "cpu"
            self._rel_tol = _REL_TOL_CPU

    def __repr__(self) -> str:
        ivf = f", nlist={self.nlist}, nprobe={self.nprobe}" if self.kind == "ivf" else ""
        return f"KnnIndex(kind={self.kind!r}, n={self.n}, dim={self.dim}{ivf}, device={self.device!r})"

    def _faiss_search(self, queries: np.ndarray, kk: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        on_gpu_ok = kk <= _GPU_MAX_K and (nprobe or 0) <= _GPU_MAX_K
        index = self._index if (self.device == "cpu" or on_gpu_ok) else self._cpu_index
        if nprobe is None or self.kind != "ivf":
            return index.search(queries, kk)
        old = index.nprobe
        index.nprobe = nprobe
        try:
            return index.search(queries, kk)
        finally:
            index.nprobe = old

    def _fetch(self, queries: np.ndarray, nprobe: int | None = None) -> _Fetch:
        def fetch(rows: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
            approx, cand = self._faiss_search(queries[rows], kk, nprobe)
            return approx[:, -1], cand  # faiss returns ascending distances

        return fetch

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """K nearest real rows of each query: (distances, indices), each (n, k).

        distances: float32 Euclidean (not squared), ascending; indices: int64 rows of the real
        array the index was built from. Ties go to the lower real index (with refine=True).
        """
        queries = _as_matrix(queries, "queries")
        _check_dim(queries, self.dim)
        k = _check_k(k, self.n)
        if queries.shape[0] == 0:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)

        if not self.refine:
            approx, idx = self._faiss_search(queries, k)
            dist = _euclidean(approx)
            dist[idx < 0] = np.inf
            return dist, idx.astype(np.int64)

        if self.kind == "flat":
            d2, idx = _exact_topk(self._real, queries, k, self._fetch(queries), self._rel_tol, self._real_sq_max)
            return _euclidean(d2), idx

        # IVF is approximate by design: only its distances and tie order are made exact. A row whose
        # probed lists hold fewer than k points is searched again over all lists (then exact).
        _, cand = self._faiss_search(queries, k)
        d2, idx = _refine(self._real, queries, cand)
        short = np.flatnonzero(idx[:, -1] < 0)
        if short.size:
            sub = queries[short]
            fetch_all_lists = self._fetch(sub, nprobe=self.nlist)
            d2[short], idx[short] = _exact_topk(self._real, sub, k, fetch_all_lists, self._rel_tol, self._real_sq_max)
        return _euclidean(d2), idx


def measure_recall(index: KnnIndex, real, queries_sample, k: int) -> float:
    """Recall@k of `index` against exact search on a sample of queries, in [0, 1].

    Tie-aware: a returned neighbour counts when it is at least as close as the true k-th neighbour
    (within float32 rounding), so an equally close substitute for a tied neighbour is not a miss.
    Without ties this is the usual |returned ∩ true| / k.
    """
    real = _as_matrix(real, "real features")
    if real.shape != (index.n, index.dim):
        raise ValueError(f"real features {real.shape} are not the ones the index holds ({index.n}, {index.dim})")
    queries_sample = _as_matrix(queries_sample, "queries")
    if queries_sample.shape[0] == 0:
        raise ValueError("measure_recall needs at least one query")
    true_d2, _ = _brute_force_sq(real, queries_sample, k)
    _, got_i = index.search(queries_sample, k)
    # Score with the same exact distances as the reference, so that ties compare equal exactly.
    got_d2, got_i = _refine(real, queries_sample, got_i)
    hits = (got_i >= 0) & (got_d2 <= true_d2[:, -1:])
    return float(hits.mean())


def assign_capped(query, target, distance, k: int, max_uses: int | None = None) -> np.ndarray:
    """Which candidate edges (query -> target) to keep: at most k per query, at most max_uses per target.

    query, target: integer arrays (n_edges,) naming each edge's query and target (any integers;
    ties are broken by their order, so pass rows in id order); distance: (n_edges,). The (query,
    target) edges must be distinct. Edges are visited in order of increasing distance, ties by
    query then target, and an edge is kept when its query has fewer than k kept edges and its
    target fewer than max_uses (None: no cap). So each target is kept by its max_uses closest
    queries, and a query past a target's share takes its next nearest candidate instead; a query
    whose candidates run out keeps fewer than k. Without a cap this is each query's k nearest
    candidates. Returns a bool mask over the edges. Pure numpy; deterministic.
    """
    query, target = np.asarray(query, dtype=np.int64), np.asarray(target, dtype=np.int64)
    distance = np.asarray(distance, dtype=np.float64)
    if not query.shape == target.shape == distance.shape or query.ndim != 1:
        raise ValueError(f"query, target and distance must be 1-D of one length, got "
                         f"{query.shape}, {target.shape}, {distance.shape}")
    if k < 1 or (max_uses is not None and max_uses < 1):
        raise ValueError(f"k and max_uses must be >= 1, got k={k}, max_uses={max_uses}")
    keep = np.zeros(query.size, dtype=bool)
    if query.size == 0:
        return keep
    if max_uses is None:  # each query's k first edges by (distance, target): no global order needed
        order = np.lexsort((target, distance, query))
        q = query[order]
        first = np.searchsorted(q, q, side="left")  # position of each query's first edge
        keep[order[np.arange(q.size) - first < k]] = True
        return keep
    order = np.lexsort((target, query, distance))
    _, q_of = np.unique(query, return_inverse=True)
    _, t_of = np.unique(target, return_inverse=True)
    q_count = [0] * (int(q_of.max()) + 1)
    t_count = [0] * (int(t_of.max()) + 1)
    for e, qi, ti in zip(order.tolist(), q_of[order].tolist(), t_of[order].tolist()):
        if q_count[qi] < k and t_count[ti] < max_uses:
            q_count[qi] += 1
            t_count[ti] += 1
            keep[e] = True
    return keep
