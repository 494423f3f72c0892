"""SmartBatchSampler: modes, coverage, determinism, checkpoint/restore, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from synreal_ray.sampler import Batch, SmartBatchSampler

N_SYN, N_REAL, K = 40, 60, 3


def make_pairs(seed: int = 0) -> dict[str, np.ndarray]:
    """K neighbours per synthetic image, all among the first 30 reals (reals 30..59 are nobody's
    neighbour), with per-image weights repeated on each of its rows as the pairs table has them."""
    rng = np.random.default_rng(seed)
    w_syn = rng.uniform(0.1, 3.0, N_SYN)
    w_real = rng.uniform(0.1, 3.0, N_REAL)
    rows = []
    for s in range(N_SYN):
        for rank, r in enumerate(rng.choice(30, K, replace=False)):
            rows.append((f"syn{s:03d}", f"real{r:03d}", rank, 0.1 * (rank + 1), w_syn[s], w_real[r]))
    cols = list(zip(*rows))
    return {
        "syn_id": np.array(cols[0]),
        "real_id": np.array(cols[1]),
        "rank": np.array(cols[2]),
        "distance": np.array(cols[3], dtype=np.float32),
        "w_syn": np.array(cols[4]),
        "w_real": np.array(cols[5]),
    }


ALL_REALS = [f"real{r:03d}" for r in range(N_REAL)]
ALL_SYNS = [f"syn{s:03d}" for s in range(N_SYN)]


@pytest.fixture
def pairs():
    return make_pairs()


def neighbours(pairs) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for s, r in zip(pairs["syn_id"], pairs["real_id"]):
        out.setdefault(str(s), set()).add(str(r))
    return out


def table_weights(pairs) -> tuple[dict[str, float], dict[str, float]]:
    return (
        {str(s): float(w) for s, w in zip(pairs["syn_id"], pairs["w_syn"])},
        {str(r): float(w) for r, w in zip(pairs["real_id"], pairs["w_real"])},
    )


def take(sampler: SmartBatchSampler, n: int) -> list[Batch]:
    return [sampler.next_batch() for _ in range(n)]


def same(a: list[Batch], b: list[Batch]) -> bool:
    return all(
        x.syn_ids == y.syn_ids
        and x.real_ids == y.real_ids
        and np.array_equal(x.w_syn, y.w_syn)
        and np.array_equal(x.w_real, y.w_real)
        and np.array_equal(x.real_random, y.real_random)
        for x, y in zip(a, b, strict=True)
    )


def test_spfeat_pairs_are_neighbours_except_random_slots(pairs):
    nb = neighbours(pairs)
    sampler = SmartBatchSampler(pairs, real_ids=ALL_REALS, batch_size=16, real_random_share=0.25, seed=3)
    n_random = n_slots = 0
    for batch in take(sampler, 300):
        assert len(batch) == 16 and batch.w_syn.dtype == np.float32 and batch.w_real.dtype == np.float32
        for s, r, rnd in zip(batch.syn_ids, batch.real_ids, batch.real_random):
            assert rnd or r in nb[s]
        n_random += int(batch.real_random.sum())
        n_slots += len(batch)
    assert abs(n_random / n_slots - 0.25) < 0.03


def test_spfeat_neighbours_drawn_uniformly_over_ranks(pairs):
    sampler = SmartBatchSampler(pairs, batch_size=40, real_random_share=0.0, seed=0)
    ranks = {(s, r): k for s, r, k in zip(pairs["syn_id"], pairs["real_id"], pairs["rank"])}
    counts = np.zeros(K)
    for batch in take(sampler, 300):
        for s, r in zip(batch.syn_ids, batch.real_ids):
            counts[ranks[(s, r)]] += 1
    np.testing.assert_allclose(counts / counts.sum(), np.full(K, 1 / K), atol=0.02)


def test_random_pairing_covers_reals_uniformly(pairs):
    sampler = SmartBatchSampler(pairs, real_ids=ALL_REALS, batch_size=50, pairing="random", weighting="none", seed=5)
    counts = {r: 0 for r in ALL_REALS}
    for batch in take(sampler, 600):  # 30,000 draws, 500 expected per real image
        assert batch.real_random.all()
        for r in batch.real_ids:
            counts[r] += 1
    c = np.array(list(counts.values()))
    assert c.min() > 0.8 * 500 and c.max() < 1.2 * 500


def test_random_pairing_from_id_lists_only():
    w = {s: 1.0 + i for i, s in enumerate(ALL_SYNS)}
    sampler = SmartBatchSampler(syn_ids=ALL_SYNS, real_ids=ALL_REALS, syn_weights=w, batch_size=8, pairing="random", seed=1)
    batch = sampler.next_batch()
    assert set(batch.syn_ids) <= set(ALL_SYNS) and set(batch.real_ids) <= set(ALL_REALS)
    np.testing.assert_array_equal(batch.w_syn, [w[s] for s in batch.syn_ids])
    assert (batch.w_real == 1).all()  # no real weights given


def test_sampling_mode_frequencies_follow_weights(pairs):
    sampler = SmartBatchSampler(pairs, real_ids=ALL_REALS, batch_size=64, weighting="sampling", seed=11)
    w_syn, _ = table_weights(pairs)
    counts = dict.fromkeys(w_syn, 0)
    draws = 0
    for batch in take(sampler, 500):  # 32,000 draws
        assert (batch.w_syn == 1).all() and (batch.w_real == 1).all()
        for s in batch.syn_ids:
            counts[s] += 1
        draws += len(batch)
    p = np.array([w_syn[s] for s in counts]) / sum(w_syn.values())
    freq = np.array(list(counts.values())) / draws
    sigma = np.sqrt(p * (1 - p) / draws)
    assert (np.abs(freq - p) < 5 * sigma).all()


def test_sampling_mode_random_reals_follow_weights():
    w_real = {r: (5.0 if i < 10 else 1.0) for i, r in enumerate(ALL_REALS)}
    sampler = SmartBatchSampler(
        syn_ids=ALL_SYNS, real_ids=ALL_REALS, real_weights=w_real, batch_size=100,
        pairing="random", weighting="sampling", seed=2,
    )
    heavy = sum(r in set(ALL_REALS[:10]) for b in take(sampler, 200) for r in b.real_ids)
    assert abs(heavy / 20000 - 50 / 100) < 0.02  # 10 * 5 of a total weight 100


def test_zero_weight_never_drawn_in_sampling_mode(pairs):
    w = {s: (0.0 if s == "syn000" else 1.0) for s in ALL_SYNS}
    sampler = SmartBatchSampler(pairs, syn_weights=w, batch_size=64, weighting="sampling", seed=0)
    assert all("syn000" not in b.syn_ids for b in take(sampler, 100))


def test_loss_mode_returns_table_weights(pairs):
    w_syn, w_real = table_weights(pairs)
    sampler = SmartBatchSampler(pairs, real_ids=ALL_REALS, batch_size=16, weighting="loss", real_random_share=0.3, seed=2)
    for batch in take(sampler, 50):
        np.testing.assert_allclose(batch.w_syn, [w_syn[s] for s in batch.syn_ids], rtol=1e-6)
        # Reals that are nobody's neighbour are not in the table: weight 1 unless real_weights says otherwise.
        np.testing.assert_allclose(batch.w_real, [w_real.get(r, 1.0) for r in batch.real_ids], rtol=1e-6)


def test_weight_dicts_override_table(pairs):
    ws = {s: 2.0 for s in ALL_SYNS}
    wr = {r: 0.5 for r in ALL_REALS}
    batch = SmartBatchSampler(pairs, real_ids=ALL_REALS, syn_weights=ws, real_weights=wr, batch_size=32, seed=0).next_batch()
    assert (batch.w_syn == 2.0).all() and (batch.w_real == 0.5).all()


def test_none_mode_all_ones(pairs):
    sampler = SmartBatchSampler(pairs, batch_size=16, weighting="none", seed=2)
    for batch in take(sampler, 20):
        assert (batch.w_syn == 1).all() and (batch.w_real == 1).all()


@pytest.mark.parametrize("weighting", ["loss", "none"])
def test_epochs_draw_each_synthetic_image_once(pairs, weighting):
    sampler = SmartBatchSampler(pairs, batch_size=8, weighting=weighting, seed=4)
    assert sampler.steps_per_epoch == 5
    epochs = []
    for _ in range(3):
        ids = [s for b in take(sampler, 5) for s in b.syn_ids]
        assert sorted(ids) == ALL_SYNS
        epochs.append(ids)
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    assert sampler.epoch == 3 and sampler.steps == 15


def test_epoch_counter_when_batches_straddle_epochs(pairs):
    sampler = SmartBatchSampler(pairs, batch_size=30, seed=0)  # 40 synthetic images
    take(sampler, 4)  # 120 draws: exactly 3 epochs
    assert sampler.epoch == 3 and sampler.steps == 4


def test_real_random_share_shows_every_real_image(pairs):
    seen = set()
    sampler = SmartBatchSampler(pairs, real_ids=ALL_REALS, batch_size=32, real_random_share=0.1, seed=8)
    for batch in take(sampler, 200):
        seen.update(batch.real_ids)
    assert seen == set(ALL_REALS)
    # Without the random share, reals 30..59 (nobody's neighbour) are never seen.
    seen = set()
    sampler = SmartBatchSampler(pairs, real_ids=ALL_REALS, batch_size=32, real_random_share=0.0, seed=8)
    for batch in take(sampler, 200):
        seen.update(batch.real_ids)
    assert seen == set().union(*neighbours(pairs).values())


def test_deterministic_for_a_seed(pairs):
    a = take(SmartBatchSampler(pairs, real_ids=ALL_REALS, batch_size=16, seed=42), 10)
    b = take(SmartBatchSampler(pairs, real_ids=ALL_REALS, batch_size=16, seed=42), 10)
    c = take(SmartBatchSampler(pairs, real_ids=ALL_REALS, batch_size=16, seed=43), 10)
    assert same(a, b)
    assert not same(a, c)


def test_row_order_of_pairs_does_not_matter(pairs):
    perm = np.random.default_rng(0).permutation(len(pairs["syn_id"]))
    shuffled = {k: v[perm] for k, v in pairs.items()}
    a = take(SmartBatchSampler(pairs, real_ids=ALL_REALS, batch_size=16, seed=1), 10)
    b = take(SmartBatchSampler(shuffled, real_ids=ALL_REALS[::-1], batch_size=16, seed=1), 10)
    assert same(a, b)


def test_iterator_protocol(pairs):
    sampler = SmartBatchSampler(pairs, batch_size=4, seed=0)
    first = [b for _, b in zip(range(3), sampler)]
    assert len(first) == 3 and sampler.steps == 3
    assert same(first, take(SmartBatchSampler(pairs, batch_size=4, seed=0), 3))


@pytest.mark.parametrize("pairing", ["spfeat", "random"])
@pytest.mark.parametrize("weighting", ["loss", "sampling", "none"])
def test_checkpoint_restore_continues_the_same_sequence(pairs, pairing, weighting):
    def build(seed=7):
        return SmartBatchSampler(
            pairs, real_ids=ALL_REALS, batch_size=12, pairing=pairing, weighting=weighting, real_random_share=0.2, seed=seed
        )

    sampler = build()
    take(sampler, 7)  # 84 draws of 40: the saved state is mid-epoch
    state = json.loads(json.dumps(sampler.state_dict()))
    expected = take(sampler, 5)  # crosses an epoch boundary

    resumed = build(seed=999)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert resumed.steps == 7 and resumed.epoch == state["epoch"] == 2
    assert same(take(resumed, 5), expected)
    assert resumed.steps == sampler.steps and resumed.epoch == sampler.epoch


def test_restore_into_a_different_sampler_fails(pairs):
    state = SmartBatchSampler(pairs, batch_size=12, seed=7).state_dict()
    with pytest.raises(ValueError, match="batch_size 12 != 16"):
        SmartBatchSampler(pairs, batch_size=16, seed=7).load_state_dict(state)
    other = make_pairs(seed=1)
    with pytest.raises(ValueError, match="data_sha256"):
        SmartBatchSampler(other, batch_size=12, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        SmartBatchSampler(pairs, batch_size=12, seed=7).load_state_dict({"seed": 1})


def test_pyarrow_table_input(pairs):
    pa = pytest.importorskip("pyarrow")
    table = pa.table({k: v for k, v in pairs.items()})
    a = take(SmartBatchSampler(table, batch_size=16, seed=1), 5)
    b = take(SmartBatchSampler(pairs, batch_size=16, seed=1), 5)
    assert same(a, b)


def test_validation(pairs):
    with pytest.raises(ValueError, match="empty"):
        SmartBatchSampler({k: v[:0] for k, v in pairs.items()}, batch_size=4)
    with pytest.raises(ValueError, match="needs the pairs table"):
        SmartBatchSampler(batch_size=4)
    with pytest.raises(ValueError, match="no column 'real_id'"):
        SmartBatchSampler({"syn_id": pairs["syn_id"]}, batch_size=4)
    for bad in (-1.0, np.nan, np.inf):
        w = pairs["w_syn"].copy()
        w[w == w[0]] = bad
        with pytest.raises(ValueError, match="w_syn must be finite and >= 0"):
            SmartBatchSampler({**pairs, "w_syn": w}, batch_size=4)
    with pytest.raises(ValueError, match="real_weights must be finite"):
        SmartBatchSampler(pairs, real_weights={r: -1.0 for r in ALL_REALS}, batch_size=4)
    with pytest.raises(ValueError, match="have no weight"):
        SmartBatchSampler(pairs, syn_weights={"syn000": 1.0}, batch_size=4)
    w = pairs["w_syn"].copy()
    w[1] += 1  # row 1 is syn000's second neighbour: two weights for one image
    with pytest.raises(ValueError, match="differs between rows of the same id 'syn000'"):
        SmartBatchSampler({**pairs, "w_syn": w}, batch_size=4)
    with pytest.raises(ValueError, match="unknown pairing 'knn'"):
        SmartBatchSampler(pairs, batch_size=4, pairing="knn")
    with pytest.raises(ValueError, match="unknown weighting 'kliep'"):
        SmartBatchSampler(pairs, batch_size=4, weighting="kliep")
    for bs in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            SmartBatchSampler(pairs, batch_size=bs)
    for share in (-0.1, 1.5, np.nan):
        with pytest.raises(ValueError, match="real_random_share"):
            SmartBatchSampler(pairs, batch_size=4, real_random_share=share)
    with pytest.raises(ValueError, match="seed"):
        SmartBatchSampler(pairs, batch_size=4, seed=-1)
    with pytest.raises(ValueError, match="every synthetic weight is 0"):
        SmartBatchSampler({**pairs, "w_syn": np.zeros(len(pairs["w_syn"]))}, batch_size=4, weighting="sampling")
    dup = {k: np.concatenate([v, v[:1]]) for k, v in pairs.items()}
    with pytest.raises(ValueError, match="repeats the pair"):
        SmartBatchSampler(dup, batch_size=4)
    with pytest.raises(ValueError, match="not in real_ids"):
        SmartBatchSampler(pairs, real_ids=ALL_REALS[:10], batch_size=4)
    with pytest.raises(ValueError, match="no real ids"):
        SmartBatchSampler(syn_ids=ALL_SYNS, batch_size=4, pairing="random")


# --- query "real" (paper 000, 3.2.1): every real image once per epoch, its synthetic neighbour ∝ w_use

N_RQ = 24  # real images that query; reals 24..59 have no list (not visited)


def make_real_query_pairs(seed: int = 0) -> dict[str, np.ndarray]:
    """K synthetic neighbours per real image, drawn from the first 12 synthetic images with skewed
    probabilities (so uses differ a lot), with w_use = 1/uses normalised to mean 1 over used ones."""
    rng = np.random.default_rng(seed)
    w_syn, w_real = rng.uniform(0.1, 3.0, N_SYN), rng.uniform(0.1, 3.0, N_REAL)
    p = np.linspace(1, 6, 12)
    rows = [(s, r, rank) for r in range(N_RQ) for rank, s in enumerate(rng.choice(12, K, replace=False, p=p / p.sum()))]
    s, r, rank = (np.array(c) for c in zip(*rows))
    uses = np.bincount(s, minlength=N_SYN)
    inv = np.where(uses > 0, 1.0 / np.maximum(uses, 1), 0.0)
    w_use = inv / inv[uses > 0].mean()
    return {"syn_id": np.array([f"syn{i:03d}" for i in s]), "real_id": np.array([f"real{i:03d}" for i in r]),
            "rank": rank, "distance": 0.1 * (rank + 1.0), "w_syn": w_syn[s], "w_real": w_real[r], "w_use": w_use[s]}


@pytest.fixture
def rq_pairs():
    return make_real_query_pairs()


def syn_lists(pairs) -> dict[str, dict[str, float]]:
    """real id -> {synthetic neighbour: w_use}."""
    out: dict[str, dict[str, float]] = {}
    for s, r, w in zip(pairs["syn_id"], pairs["real_id"], pairs["w_use"]):
        out.setdefault(str(r), {})[str(s)] = float(w)
    return out


def test_query_is_read_off_the_table(pairs, rq_pairs):
    assert SmartBatchSampler(rq_pairs, batch_size=4).query == "real"
    assert SmartBatchSampler(pairs, batch_size=4).query == "syn"
    assert SmartBatchSampler(rq_pairs, batch_size=4, query="syn").query == "syn"  # explicit wins
    with pytest.raises(ValueError, match="unknown query 'both'"):
        SmartBatchSampler(rq_pairs, batch_size=4, query="both")


@pytest.mark.parametrize("weighting", ["loss", "source", "none"])
def test_real_query_epoch_draws_every_real_image_once(rq_pairs, weighting):
    lists = syn_lists(rq_pairs)
    sampler = SmartBatchSampler(rq_pairs, real_ids=ALL_REALS, batch_size=8, weighting=weighting, seed=4)
    assert sampler.n_anchors == N_RQ and sampler.steps_per_epoch == 3
    epochs = []
    for _ in range(3):
        batches = take(sampler, 3)
        ids = [r for b in batches for r in b.real_ids]
        assert sorted(ids) == sorted(lists)  # each real image with a list exactly once, no others
        assert all(s in lists[r] for b in batches for s, r in zip(b.syn_ids, b.real_ids))
        assert not any(b.real_random.any() for b in batches)  # real_random_share does not apply
        epochs.append(ids)
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    assert sampler.epoch == 3 and sampler.steps == 9


def test_real_query_synthetic_draws_follow_w_use(rq_pairs):
    """Over E epochs each real image r is drawn E times and gives neighbour s with probability
    w_use[s] / sum of w_use over r's list: the exact expected counts, chi-square against them."""
    from scipy.stats import chisquare

    lists = syn_lists(rq_pairs)
    epochs = 1500
    sampler = SmartBatchSampler(rq_pairs, batch_size=N_RQ, weighting="none", seed=9)
    got: dict[tuple[str, str], int] = {}
    for b in take(sampler, epochs):
        for s, r in zip(b.syn_ids, b.real_ids):
            got[(r, s)] = got.get((r, s), 0) + 1
    keys = [(r, s) for r in sorted(lists) for s in sorted(lists[r])]
    observed = np.array([got.get(key, 0) for key in keys], dtype=float)
    expected = np.array([epochs * lists[r][s] / sum(lists[r].values()) for r, s in keys])
    assert chisquare(observed, expected).pvalue > 1e-3
    # The test has power: uniform over each list (what query syn does over ranks) is rejected.
    uniform = np.array([epochs / len(lists[r]) for r, _ in keys])
    assert chisquare(observed, uniform).pvalue < 1e-6
    # and the over-used synthetic images are drawn less often than their share of the lists
    per_syn = {}
    for (_, s), n in got.items():
        per_syn[s] = per_syn.get(s, 0) + n
    uses = {s: sum(s in lst for lst in lists.values()) for s in per_syn}
    most, least = max(uses, key=uses.get), min(uses, key=uses.get)
    assert per_syn[most] / uses[most] < per_syn[least] / uses[least]


def test_real_query_loss_and_source_weights(rq_pairs):
    w_syn = {str(s): float(w) for s, w in zip(rq_pairs["syn_id"], rq_pairs["w_syn"])}
    w_real = {str(r): float(w) for r, w in zip(rq_pairs["real_id"], rq_pairs["w_real"])}
    loss = SmartBatchSampler(rq_pairs, batch_size=16, weighting="loss", seed=2)
    source = SmartBatchSampler(rq_pairs, batch_size=16, weighting="source", seed=2)
    for a, b in zip(take(loss, 10), take(source, 10)):
        assert a.syn_ids == b.syn_ids and a.real_ids == b.real_ids  # same draws, only the weights differ
        np.testing.assert_allclose(a.w_syn, [w_syn[s] for s in a.syn_ids], rtol=1e-6)
        np.testing.assert_allclose(a.w_real, [w_real[r] for r in a.real_ids], rtol=1e-6)  # eq. 12: psi
        np.testing.assert_array_equal(b.w_syn, a.w_syn)
        assert (b.w_real == 1).all()  # eq. 13: the real side unweighted


def test_source_weighting_with_syn_query_pairs(pairs):
    w_syn, _ = table_weights(pairs)
    for b in take(SmartBatchSampler(pairs, real_ids=ALL_REALS, batch_size=16, weighting="source", seed=1), 10):
        np.testing.assert_allclose(b.w_syn, [w_syn[s] for s in b.syn_ids], rtol=1e-6)
        assert (b.w_real == 1).all()


def test_real_query_sampling_mode_draws_reals_by_psi(rq_pairs):
    w_real = {str(r): float(w) for r, w in zip(rq_pairs["real_id"], rq_pairs["w_real"])}
    sampler = SmartBatchSampler(rq_pairs, batch_size=64, weighting="sampling", seed=11)
    counts = dict.fromkeys(w_real, 0)
    for b in take(sampler, 500):  # 32,000 draws
        assert (b.w_syn == 1).all() and (b.w_real == 1).all()
        for r in b.real_ids:
            counts[r] += 1
    p = np.array([w_real[r] for r in counts]) / sum(w_real.values())
    freq = np.array(list(counts.values())) / 32000
    assert (np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / 32000)).all()


@pytest.mark.parametrize("weighting", ["loss", "source", "sampling", "none"])
def test_real_query_checkpoint_restore_continues_the_same_sequence(rq_pairs, weighting):
    def build(seed=7):
        return SmartBatchSampler(rq_pairs, real_ids=ALL_REALS, batch_size=10, weighting=weighting, seed=seed)

    sampler = build()
    take(sampler, 5)  # 50 draws of 24: mid-epoch
    state = json.loads(json.dumps(sampler.state_dict()))
    expected = take(sampler, 6)  # crosses epoch boundaries
    resumed = build(seed=999)
    resumed.load_state_dict(state)
    assert resumed.steps == 5 and resumed.epoch == state["epoch"] == 2
    assert same(take(resumed, 6), expected)
    # a state of the same table read as query syn, or with other w_use, is refused
    with pytest.raises(ValueError, match="query"):
        SmartBatchSampler(rq_pairs, real_ids=ALL_REALS, batch_size=10, weighting=weighting, query="syn").load_state_dict(state)
    other = {**rq_pairs, "w_use": np.ones(len(rq_pairs["w_use"]))}
    with pytest.raises(ValueError, match="data_sha256"):
        SmartBatchSampler(other, real_ids=ALL_REALS, batch_size=10, weighting=weighting).load_state_dict(state)


def test_real_query_row_order_does_not_matter(rq_pairs):
    perm = np.random.default_rng(0).permutation(len(rq_pairs["syn_id"]))
    shuffled = {k: v[perm] for k, v in rq_pairs.items()}
    assert same(take(SmartBatchSampler(rq_pairs, batch_size=16, seed=1), 10),
                take(SmartBatchSampler(shuffled, batch_size=16, seed=1), 10))


def test_real_query_validation(rq_pairs):
    w = rq_pairs["w_use"].copy()
    w[0] += 1
    with pytest.raises(ValueError, match="w_use differs between rows of the same id"):
        SmartBatchSampler({**rq_pairs, "w_use": w}, batch_size=4)
    with pytest.raises(ValueError, match="w_use must be finite"):
        SmartBatchSampler({**rq_pairs, "w_use": -rq_pairs["w_use"]}, batch_size=4)
    dup = {k: np.concatenate([v, v[:1]]) for k, v in rq_pairs.items()}
    with pytest.raises(ValueError, match="repeats the pair"):
        SmartBatchSampler(dup, batch_size=4)
    with pytest.raises(ValueError, match="every real weight is 0"):
        SmartBatchSampler({**rq_pairs, "w_real": np.zeros(len(rq_pairs["w_real"]))}, batch_size=4, weighting="sampling")
