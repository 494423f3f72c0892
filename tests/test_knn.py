"""KnnIndex against a brute-force numpy search: exact pairs, ties, IVF recall, errors, GPU."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from synreal_ray import knn
from synreal_ray.knn import KnnIndex, brute_force_knn, gpu_available, measure_recall


def naive_knn(real: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Obviously-correct reference: full float64 distance matrix, ties by lower index."""
    dist = np.sqrt(((queries[:, None, :].astype(np.float64) - real[None, :, :]) ** 2).sum(-1))
    order = np.lexsort((np.broadcast_to(np.arange(real.shape[0]), dist.shape), dist), axis=-1)[:, :k]
    return np.take_along_axis(dist, order, axis=1), order


def spfeat_like(n: int, rng: np.random.Generator, cells: int = 7, classes: int = 19) -> np.ndarray:
    """Rows shaped like SP-Feat: per cell, a class histogram that sums to 1."""
    x = rng.dirichlet(np.full(classes, 0.3), size=(n, cells)).astype(np.float32)
    return x.reshape(n, cells * classes)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def with_duplicates(rng):
    """Real set with a group of 30 identical rows (wider than k, so ties straddle the k-th place)
    and some identical pairs; queries that are exact copies of real rows, and others."""
    real = spfeat_like(400, rng)
    real[50:80] = real[7]
    real[200] = real[201]
    real[300:303] = real[299]
    queries = np.concatenate([real[[7, 60, 201, 299, 0]], spfeat_like(60, rng), real[7:8] + 1e-3])
    return real, queries


def test_brute_force_equals_naive(rng, with_duplicates):
    plain = (rng.random((300, 33), dtype=np.float32), rng.random((50, 33), dtype=np.float32))
    for real, queries in [plain, with_duplicates]:
        d, i = brute_force_knn(real, queries, 12)
        nd, ni = naive_knn(real, queries, 12)
        np.testing.assert_array_equal(i, ni)
        np.testing.assert_allclose(d, nd, atol=1e-5)
        assert d.dtype == np.float32 and i.dtype == np.int64


def test_flat_equals_brute_force_random(rng):
    real = rng.random((500, 64), dtype=np.float32)
    queries = rng.random((300, 64), dtype=np.float32)
    index = KnnIndex(real, device="cpu")
    d, i = index.search(queries, 15)
    bd, bi = brute_force_knn(real, queries, 15)
    np.testing.assert_array_equal(i, bi)
    np.testing.assert_allclose(d, bd, atol=1e-4)
    assert d.dtype == np.float32 and i.dtype == np.int64
    assert (np.diff(d, axis=1) >= 0).all()
    assert index.device == "cpu"


@pytest.mark.parametrize("n_queries", [3, 66])  # faiss computes < 20 queries directly, more with BLAS
def test_flat_equals_brute_force_with_duplicates(with_duplicates, n_queries):
    real, queries = with_duplicates
    queries = queries[:n_queries]
    d, i = KnnIndex(real, device="cpu").search(queries, 15)
    bd, bi = brute_force_knn(real, queries, 15)
    np.testing.assert_array_equal(i, bi)
    np.testing.assert_allclose(d, bd, atol=1e-4)
    # An exact copy of a real row is at distance exactly 0 (not sqrt of float32 cancellation noise),
    # and the tie among the 31 copies of row 7 is broken by index: 7, 50, 51, ...
    assert (d[0] == 0).all() and (d[1] == 0).all()
    np.testing.assert_array_equal(i[0], [7] + list(range(50, 64)))
    np.testing.assert_array_equal(i[2, :2], [200, 201])


def test_ties_do_not_depend_on_thread_count(with_duplicates):
    real, queries = with_duplicates
    index = KnnIndex(real, device="cpu")
    threads = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)
        one = index.search(queries, 20)
    finally:
        faiss.omp_set_num_threads(threads)
    many = index.search(queries, 20)
    np.testing.assert_array_equal(one[1], many[1])
    np.testing.assert_array_equal(one[0], many[0])


def test_numpy_refine_fallback_gives_same_answer(monkeypatch, with_duplicates):
    real, queries = with_duplicates
    expected = KnnIndex(real, device="cpu").search(queries, 15)
    monkeypatch.delattr(knn.faiss, "fvec_L2sqr_by_idx")
    got = KnnIndex(real, device="cpu").search(queries, 15)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_allclose(got[0], expected[0], atol=1e-5)


def test_k_equal_to_n_and_empty_queries(rng):
    real = rng.random((12, 5), dtype=np.float32)
    d, i = KnnIndex(real, device="cpu").search(real, 12)
    np.testing.assert_array_equal(np.sort(i, axis=1), np.tile(np.arange(12), (12, 1)))
    assert (d[:, 0] == 0).all()
    d, i = KnnIndex(real, device="cpu").search(np.empty((0, 5), np.float32), 3)
    assert d.shape == (0, 3) and i.shape == (0, 3)


def test_unrefined_search_is_close(rng):
    real = rng.random((500, 64), dtype=np.float32)
    queries = rng.random((100, 64), dtype=np.float32)
    d, i = KnnIndex(real, device="cpu", refine=False).search(queries, 10)
    bd, bi = brute_force_knn(real, queries, 10)
    assert (i == bi).mean() > 0.99
    np.testing.assert_allclose(d, bd, atol=1e-2)


def test_ivf_recall(rng):
    centres = rng.random((20, 48), dtype=np.float32)
    real = centres[rng.integers(0, 20, 3000)] + 0.1 * rng.random((3000, 48), dtype=np.float32)
    queries = centres[rng.integers(0, 20, 300)] + 0.1 * rng.random((300, 48), dtype=np.float32)
    index = KnnIndex(real, "ivf", device="cpu")
    assert index.nlist == round(np.sqrt(3000)) and 1 <= index.nprobe <= index.nlist
    generous = KnnIndex(real, "ivf", nlist=32, nprobe=16, device="cpu")
    assert measure_recall(generous, real, queries, 10) >= 0.9
    exhaustive = KnnIndex(real, "ivf", nlist=32, nprobe=32, device="cpu")
    assert measure_recall(exhaustive, real, queries, 10) == 1.0
    assert measure_recall(KnnIndex(real, device="cpu"), real, queries, 10) == 1.0
    # IVF distances are exact for the neighbours it returns, and sorted.
    d, i = generous.search(queries, 10)
    ref = np.linalg.norm(queries[:, None, :].astype(np.float64) - real[i], axis=-1)
    np.testing.assert_allclose(d, ref, atol=1e-4)


def test_ivf_short_lists_fall_back_to_all_lists(rng):
    # 40 points per list on average, k = 100 and one probed list: faiss alone would return -1s.
    real = rng.random((400, 16), dtype=np.float32)
    queries = rng.random((50, 16), dtype=np.float32)
    d, i = KnnIndex(real, "ivf", nlist=10, nprobe=1, device="cpu").search(queries, 100)
    assert (i >= 0).all()
    np.testing.assert_array_equal(i, brute_force_knn(real, queries, 100)[1])


def test_ivf_nlist_bounded_by_training_points(rng):
    assert KnnIndex(rng.random((100, 4), dtype=np.float32), "ivf", device="cpu").nlist == 2  # 100 // 39
    assert KnnIndex(rng.random((10, 4), dtype=np.float32), "ivf", device="cpu").nlist == 1


def test_errors(rng):
    real = rng.random((10, 8), dtype=np.float32)
    index = KnnIndex(real, device="cpu")
    with pytest.raises(ValueError, match=r"K=11 is larger than the real set \(N=10\)"):
        index.search(real, 11)
    with pytest.raises(ValueError, match=r"K=11 is larger than the real set \(N=10\)"):
        brute_force_knn(real, real, 11)
    with pytest.raises(ValueError, match="positive integer"):
        index.search(real, 0)
    with pytest.raises(ValueError, match="dimension 9 does not match the index dimension 8"):
        index.search(rng.random((3, 9)), 2)
    with pytest.raises(ValueError, match="2-D"):
        index.search(real[0], 2)
    bad = real.copy()
    bad[4, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite.*row 4"):
        KnnIndex(bad, device="cpu")
    bad[4, 2] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        index.search(bad, 2)
    with pytest.raises(ValueError, match="empty"):
        KnnIndex(np.empty((0, 8), np.float32), device="cpu")
    with pytest.raises(ValueError, match="kind"):
        KnnIndex(real, "hnsw")
    with pytest.raises(ValueError, match="device"):
        KnnIndex(real, device="tpu")
    with pytest.raises(ValueError, match="nprobe"):
        KnnIndex(real, "ivf", nlist=1, nprobe=2)


def test_auto_device_without_gpu_is_cpu(rng):
    if gpu_available():
        pytest.skip("a GPU is present: covered by test_gpu_flat_equals_brute_force")
    real = rng.random((20, 4), dtype=np.float32)
    assert KnnIndex(real).device == "cpu"
    with pytest.raises(RuntimeError, match="no GPU support"):
        KnnIndex(real, device="cuda")


@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="no GPU visible to faiss")
def test_gpu_flat_equals_brute_force(rng, with_duplicates):
    assert gpu_available(), "GPUs are visible but this faiss build has no GPU support (install faiss-gpu-cu12)"
    plain = (rng.random((3000, 399), dtype=np.float32), rng.random((500, 399), dtype=np.float32))
    for real, queries in [plain, with_duplicates]:
        index = KnnIndex(real, device="cuda")
        assert index.device == "cuda:0"
        assert KnnIndex(real).device == "cuda:0"  # auto picks the GPU
        d, i = index.search(queries, 15)
        bd, bi = brute_force_knn(real, queries, 15)
        np.testing.assert_array_equal(i, bi)
        np.testing.assert_allclose(d, bd, atol=1e-4)
    real = rng.random((5000, 64), dtype=np.float32)
    queries = rng.random((200, 64), dtype=np.float32)
    ivf = KnnIndex(real, "ivf", nlist=64, nprobe=64, device="cuda")
    assert measure_recall(ivf, real, queries, 10) == 1.0


# --- assign_capped: the --max-uses assignment of the pairs stage (query real) ---

from synreal_ray.knn import assign_capped  # noqa: E402


def edges_of(dist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (query, target, distance) edges of a dense (n_queries, n_targets) distance matrix."""
    q, t = np.indices(dist.shape)
    return q.ravel(), t.ravel(), dist.ravel()


def kept(q, t, keep) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for a, b in zip(q[keep], t[keep]):
        out.setdefault(int(a), []).append(int(b))
    return {a: sorted(b) for a, b in out.items()}


def test_assign_capped_gives_surplus_queries_their_next_nearest():
    # Every query's nearest two are t0, t1; with max_uses 2 they stay with q0 and q1 (closest),
    # and q2, q3 each get their next nearest free targets, t2 and t3; nobody needs t4.
    dist = np.array([
        [0.10, 0.20, 0.90, 0.95, 0.99],
        [0.15, 0.25, 0.50, 0.60, 0.70],
        [0.30, 0.35, 0.40, 0.45, 0.80],
        [0.32, 0.33, 0.34, 0.36, 0.38],
    ])
    q, t, d = edges_of(dist)
    assert kept(q, t, assign_capped(q, t, d, k=2, max_uses=2)) == {0: [0, 1], 1: [0, 1], 2: [2, 3], 3: [2, 3]}
    assert kept(q, t, assign_capped(q, t, d, k=2)) == {i: [0, 1] for i in range(4)}  # no cap: plain KNN
    # K = 1, cap 1: t0 to q0; t1 to q1 (0.25 beats q3's 0.33, q2's 0.35); q2 and q3 both want t2
    # next: q3 is closer (0.34 < 0.40), so q2 moves on to t3
    assert kept(q, t, assign_capped(q, t, d, k=1, max_uses=1)) == {0: [0], 1: [1], 2: [3], 3: [2]}


def test_assign_capped_ties_by_query_then_target_and_short_lists():
    # three queries at the same distance from t0 (cap 1): the lowest query keeps it, the others
    # move on in query order; the last has only two candidates and they are taken: it gets none.
    q = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    t = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    d = np.array([1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0, 2.0])
    assert kept(q, t, assign_capped(q, t, d, k=1, max_uses=1)) == {0: [0], 1: [1]}
    # the input order of the edges does not matter
    perm = np.random.default_rng(0).permutation(q.size)
    assert kept(q[perm], t[perm], assign_capped(q[perm], t[perm], d[perm], k=1, max_uses=1)) == {0: [0], 1: [1]}


@pytest.mark.parametrize("max_uses", [1, 2, 3, None])
def test_assign_capped_respects_the_cap_and_is_greedy(rng, max_uses):
    """Random candidate lists (with tied distances): no target over max_uses, no query over k, and
    every rejected edge was rejected for a reason: its query or its target was already full with
    edges that come earlier in (distance, query, target) order."""
    n_q, n_t, c, k = 60, 40, 12, 4
    q = np.repeat(np.arange(n_q), c)
    t = np.concatenate([rng.choice(n_t, c, replace=False) for _ in range(n_q)])
    d = rng.integers(0, 20, q.size).astype(np.float64) / 10  # many ties
    keep = assign_capped(q, t, d, k=k, max_uses=max_uses)
    uses, per_q = np.bincount(t[keep], minlength=n_t), np.bincount(q[keep], minlength=n_q)
    assert per_q.max() <= k and (max_uses is None or uses.max() <= max_uses)
    if max_uses is not None:
        assert uses.max() == max_uses  # the cap binds here (60 * 4 edges wanted, 40 targets)
    key = np.lexsort((t, q, d))
    pos = np.empty(q.size, dtype=int)
    pos[key] = np.arange(q.size)
    for e in np.flatnonzero(~keep):
        q_full = np.count_nonzero(keep & (q == q[e]) & (pos < pos[e])) == k
        t_full = max_uses is not None and np.count_nonzero(keep & (t == t[e]) & (pos < pos[e])) == max_uses
        assert q_full or t_full, f"edge {e} rejected without a full query or target"
    # a query keeps fewer than k only when its candidates ran out (all its other targets full)
    for a in np.flatnonzero(per_q < k):
        assert max_uses is not None and all(uses[b] == max_uses for b in t[(q == a) & ~keep])


def test_assign_capped_without_cap_is_the_k_nearest(rng):
    real, queries = spfeat_like(50, rng), spfeat_like(20, rng)
    dist, idx = brute_force_knn(real, queries, 10)
    q = np.repeat(np.arange(20), 10)
    keep = assign_capped(q, idx.ravel(), dist.ravel(), k=4)
    np.testing.assert_array_equal(idx.ravel()[keep].reshape(20, 4), idx[:, :4])
    # a cap that never binds gives the same
    np.testing.assert_array_equal(assign_capped(q, idx.ravel(), dist.ravel(), k=4, max_uses=1000), keep)


def test_assign_capped_errors():
    with pytest.raises(ValueError, match="1-D of one length"):
        assign_capped([0, 1], [0], [0.0, 1.0], k=1)
    with pytest.raises(ValueError, match=">= 1"):
        assign_capped([0], [0], [0.0], k=1, max_uses=0)
    assert assign_capped([], [], [], k=2, max_uses=1).size == 0
