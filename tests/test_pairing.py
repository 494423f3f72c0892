"""The pairs stage: faiss KNN actor on Ray Data (or, for few queries, in this process), both
directions, the max-uses cap, weights joined, quality and coverage report, preview, errors."""

import numpy as np
import pytest

from synreal_ray import storage
from synreal_ray.cli import main
from synreal_ray.config import from_dict
from synreal_ray.features import FeaturesConfig, load_features, run_features
from synreal_ray.knn import assign_capped, brute_force_knn
from synreal_ray.pairing import PairsConfig, load_pairs, run_pairs, use_weights
from synreal_ray.sampler import SmartBatchSampler
from synreal_ray.weighting import KliepConfig, load_weights, run_kliep

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def weights(demo_features, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("w") / "kliep")
    run_kliep(KliepConfig(syn=demo_features["syn"], real=demo_features["real"], out=out, sigma=1.0, centers=12))
    return out


@pytest.fixture(scope="module")
def syn_pairs(demo_features, weights, tmp_path_factory):
    """query syn (the behaviour before issue 12): each synthetic image's 4 nearest real images."""
    out = str(tmp_path_factory.mktemp("p") / "pairs")
    run_pairs(PairsConfig(syn=demo_features["syn"], real=demo_features["real"], weights=weights, out=out, k=4,
                          query="syn"))
    return out


@pytest.fixture(scope="module")
def pairs(demo_features, weights, tmp_path_factory):
    """query real (the default): each real image's 4 nearest synthetic images."""
    out = str(tmp_path_factory.mktemp("p") / "pairs")
    run_pairs(PairsConfig(syn=demo_features["syn"], real=demo_features["real"], weights=weights, out=out, k=4))
    return out


@pytest.fixture(scope="module")
def capped(demo_features, weights, tmp_path_factory):
    """query real with --max-uses 3 (16 real x 4 = 64 list places, 24 synthetic images x 3 = 72)."""
    out = str(tmp_path_factory.mktemp("p") / "pairs")
    run_pairs(PairsConfig(syn=demo_features["syn"], real=demo_features["real"], weights=weights, out=out, k=4,
                          max_uses=3, candidates=12))
    return out


def test_syn_query_pairs_equal_brute_force_search(syn_pairs, demo_features):
    syn, real = load_features(demo_features["syn"]), load_features(demo_features["real"])
    dist, idx = brute_force_knn(real["feature"], syn["feature"], 4)
    table = load_pairs(syn_pairs)
    assert table.num_rows == 24 * 4 and "w_use" not in table.column_names
    got = table.to_pylist()
    for n, sid in enumerate(syn["id"]):
        rows = [r for r in got if r["syn_id"] == sid]
        assert [r["rank"] for r in rows] == [0, 1, 2, 3]
        assert [r["real_id"] for r in rows] == list(real["id"][idx[n]])
        np.testing.assert_allclose([r["distance"] for r in rows], dist[n], rtol=1e-5, atol=1e-6)
    assert storage.read_json(storage.join(syn_pairs, "report.json"))["query"] == "syn"


def test_real_query_pairs_equal_brute_force_search(pairs, demo_features):
    syn, real = load_features(demo_features["syn"]), load_features(demo_features["real"])
    dist, idx = brute_force_knn(syn["feature"], real["feature"], 4)  # the index holds the synthetic side
    table = load_pairs(pairs)
    assert table.num_rows == 16 * 4
    got = table.to_pylist()
    for n, rid in enumerate(real["id"]):
        rows = [r for r in got if r["real_id"] == rid]
        assert [r["rank"] for r in rows] == [0, 1, 2, 3]
        assert [r["syn_id"] for r in rows] == list(syn["id"][idx[n]])
        np.testing.assert_allclose([r["distance"] for r in rows], dist[n], rtol=1e-5, atol=1e-6)
    # w_use: 1 / (real lists the synthetic image is in), mean 1 over the used synthetic images
    uses = {s: sum(r["syn_id"] == s for r in got) for s in {r["syn_id"] for r in got}}
    inv = {s: 1 / u for s, u in uses.items()}
    mean = np.mean(list(inv.values()))
    for r in got:
        assert r["w_use"] == pytest.approx(inv[r["syn_id"]] / mean)
    assert max(uses.values()) > min(uses.values())  # the demo has over-used synthetic images


def test_max_uses_caps_and_replaces_with_the_next_nearest(capped, demo_features):
    syn, real = load_features(demo_features["syn"]), load_features(demo_features["real"])
    dist, idx = brute_force_knn(syn["feature"], real["feature"], 12)
    table = load_pairs(capped).to_pylist()
    uses = np.bincount([list(syn["id"]).index(r["syn_id"]) for r in table], minlength=24)
    assert uses.max() <= 3
    plain = np.bincount(idx[:, :4].ravel(), minlength=24)
    assert plain.max() > 3  # without the cap some synthetic image is in more than 3 lists
    # exactly the greedy assignment over each real image's 12 nearest candidates
    q = np.repeat(np.arange(16), 12)
    keep = assign_capped(q, idx.ravel(), dist.ravel(), k=4, max_uses=3)
    want = {(real["id"][a], syn["id"][b]) for a, b in zip(q[keep], idx.ravel()[keep])}
    assert {(r["real_id"], r["syn_id"]) for r in table} == want
    for rid in real["id"]:  # ranks follow distance within each list
        d = [r["distance"] for r in table if r["real_id"] == rid]
        assert d == sorted(d) and [r["rank"] for r in table if r["real_id"] == rid] == list(range(len(d)))
    w = use_weights(uses)
    for r in table:
        assert r["w_use"] == pytest.approx(w[list(syn["id"]).index(r["syn_id"])])
    rep = storage.read_json(storage.join(capped, "report.json"))
    assert rep["max_uses"] == 3 and rep["uses"]["max"] == uses.max() <= 3
    assert rep["coverage"] == pytest.approx(np.count_nonzero(uses) / 24)
    assert rep["coverage"] > np.count_nonzero(plain) / 24  # the replacements reach more synthetic images


@pytest.mark.parametrize("which, settings", [("pairs", {}), ("capped", {"max_uses": 3, "candidates": 12}),
                                             ("syn_pairs", {"query": "syn"})])
def test_in_process_search_gives_the_pools_pairs(which, settings, request, demo_features, weights, tmp_path):
    """The fixtures' few queries are searched in this process; an actor pool (in_process_max 0)
    writes the same pairs and report."""
    here = request.getfixturevalue(which)
    pool = str(tmp_path / "pool")
    rec = run_pairs(PairsConfig(syn=demo_features["syn"], real=demo_features["real"], weights=weights, out=pool, k=4,
                                in_process_max=0, **settings))
    assert rec["actors"] == 1 and storage.read_json(storage.join(here, "stage.json"))["actors"] == 0
    assert load_pairs(pool).equals(load_pairs(here))
    assert storage.read_json(storage.join(pool, "report.json")) == storage.read_json(storage.join(here, "report.json"))


@pytest.mark.parametrize("which", ["pairs", "syn_pairs"])
def test_weights_are_joined(which, request, weights):
    w = load_weights(weights)
    for r in load_pairs(request.getfixturevalue(which)).to_pylist():
        assert r["w_syn"] == pytest.approx(w["syn"][r["syn_id"]])
        assert r["w_real"] == pytest.approx(w["real"][r["real_id"]])


@pytest.mark.parametrize("which", ["pairs", "syn_pairs"])
def test_spfeat_pairs_agree_more_than_random_pairs(which, request):
    out = request.getfixturevalue(which)
    rep = storage.read_json(storage.join(out, "report.json"))
    sp, rd = rep["spfeat"], rep["random"]
    assert sp["mean_distance"] < 0.85 * rd["mean_distance"]
    assert sp["label_agreement"] > rd["label_agreement"] + 0.05, rep
    assert "| SP-Feat KNN |" in storage.read_bytes(storage.join(out, "report.md")).decode()


def test_report_coverage_uses_and_draw_concentration(pairs, demo_features):
    """`synreal pairs` end to end (query real, the default): the report's new fields against the
    table it wrote."""
    syn_ids = list(load_features(demo_features["syn"], columns=("id",))["id"])
    table = load_pairs(pairs)
    assert table.column_names[:7] == ["syn_id", "real_id", "rank", "distance", "w_syn", "w_real", "w_use"]
    rep = storage.read_json(storage.join(pairs, "report.json"))
    uses = np.array([table.column("syn_id").to_pylist().count(s) for s in syn_ids])
    assert rep["query"] == "real" and rep["max_uses"] is None and rep["pairs"] == 64
    assert rep["coverage"] == pytest.approx(np.count_nonzero(uses) / 24) and rep["coverage"] < 1
    assert rep["syn_without_pairs"] == 24 - np.count_nonzero(uses)
    u = rep["uses"]
    assert (u["min"], u["median"], u["max"]) == (0, np.median(uses), uses.max())
    assert sum(u["histogram"]["counts"]) == 24
    assert u["histogram"]["counts"][0] == np.count_nonzero(uses == 0)  # integer bins: [0, 1), [1, 2), ...
    assert rep["short_queries"] == 0 and rep["queries"] == 16
    c = rep["concentration"]
    assert c["draws"] == c["epochs"] * 16  # one batch of 64 per epoch: 16 real images, each once
    # every real image is drawn once per epoch: the top 1% (1 image of 16) takes exactly 1/16
    assert c["top1pct_share"]["real"] == pytest.approx(1 / 16)
    assert 1 / 24 < c["top1pct_share"]["syn"] < 1
    md = storage.read_bytes(storage.join(pairs, "report.md")).decode()
    assert f"Coverage: {rep['coverage']:.1%}" in md and "16 real query images" in md
    rec = storage.read_json(storage.join(pairs, "stage.json"))
    assert rec["settings"]["query"] == "real"


def test_syn_query_report_concentrates_real_draws(syn_pairs):
    rep = storage.read_json(storage.join(syn_pairs, "report.json"))
    assert rep["coverage"] == 1 and rep["uses"]["min"] == rep["uses"]["max"] == 4
    # query syn draws reals by how many synthetic lists hold them: the top one takes more than 1/16
    assert rep["concentration"]["top1pct_share"]["real"] > 1.5 / 16


@pytest.mark.parametrize("which", ["pairs", "syn_pairs"])
def test_sampler_consumes_the_pairs(which, request, demo_features):
    out = request.getfixturevalue(which)
    real_ids = list(load_features(demo_features["real"], columns=("id",))["id"])
    table = load_pairs(out)
    sampler = SmartBatchSampler(table, real_ids=real_ids, batch_size=4, seed=1)
    assert sampler.query == ("real" if which == "pairs" else "syn")
    neighbours = {(r["syn_id"], r["real_id"]) for r in table.to_pylist()}
    b = sampler.next_batch()
    assert len(b.syn_ids) == 4
    assert all((s, r) in neighbours or rr for s, r, rr in zip(b.syn_ids, b.real_ids, b.real_random))


def test_cli_max_distance_preview_and_no_weights(demo_features, tmp_path, capsys):
    out, png = str(tmp_path / "p"), str(tmp_path / "grid.png")
    assert main(["pairs", "--syn", demo_features["syn"], "--real", demo_features["real"], "--k", "3",
                 "--max-distance", "1.6", "--out", out, "--preview", "3", "--out-png", png]) == 0
    printed = capsys.readouterr().out
    rep = storage.read_json(storage.join(out, "report.json"))
    table = load_pairs(out)
    assert table.num_rows + rep["dropped_by_max_distance"] == 16 * 3  # query real: 16 lists of 3
    assert rep["short_queries"] > 0
    assert rep["dropped_by_max_distance"] > 0 and f"dropped {rep['dropped_by_max_distance']} pairs" in printed
    assert max(table.column("distance").to_pylist()) <= 1.6
    assert set(table.column("w_syn").to_pylist()) == {1.0} == set(table.column("w_real").to_pylist())
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| random |" in printed
    assert main(["pairs", "--syn", demo_features["syn"], "--real", demo_features["real"], "--out", str(tmp_path / "q"),
                 "--index", "ivf", "--nprobe", "64"]) == 2
    assert "nprobe=64 must be between 1 and nlist" in capsys.readouterr().err


def test_ivf_index_reports_recall(demo_data, tmp_path):
    # enough real images for IVF lists: reuse the synthetic set as the "real" side
    feats = str(tmp_path / "f")
    run_features(FeaturesConfig(dataset=str(demo_data / "syn"), layout="synscapes", out=feats, domain="real"))
    out = str(tmp_path / "p")
    run_pairs(PairsConfig(syn=feats, real=feats, out=out, k=2, index="ivf"))
    rep = storage.read_json(storage.join(out, "report.json"))
    assert rep["ivf_recall_at_k"] == pytest.approx(1.0)
    first = [r for r in load_pairs(out).to_pylist() if r["rank"] == 0]
    assert all(r["syn_id"] == r["real_id"] and r["distance"] == 0 for r in first)  # each image is its own neighbour


def test_s3(s3_bucket, demo_data):
    feats = {}
    for domain, layout in (("syn", "synscapes"), ("real", "cityscapes")):
        feats[domain] = f"{s3_bucket}/f/{domain}"
        run_features(FeaturesConfig(dataset=str(demo_data / domain), layout=layout, out=feats[domain]))
    out = f"{s3_bucket}/pairs"
    # a pool: Ray Data streams the queries from S3 (in this process they are read as the indexed side is)
    rec = run_pairs(PairsConfig(syn=feats["syn"], real=feats["real"], out=out, k=2, in_process_max=0))
    assert rec["actors"] == 1 and rec["pairs"] == 32 and storage.is_complete(out) and load_pairs(out).num_rows == 32  # 16 real x 2


def test_bad_input(demo_data, demo_features, weights, tmp_path, capsys):
    base = ["pairs", "--syn", demo_features["syn"], "--real", demo_features["real"], "--out", str(tmp_path / "o")]
    assert main(base + ["--k", "25"]) == 2
    assert "--k 25 is larger than the synthetic set (24 images" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--k 17 is larger than the real set \\(16 images"):
        run_pairs(PairsConfig(syn=demo_features["syn"], real=demo_features["real"], out=str(tmp_path / "o"), k=17,
                              query="syn"))
    for bad, key in ((dict(query="both"), "query"), (dict(query="syn", max_uses=2), "max_uses"),
                     (dict(max_uses=0), "max_uses"), (dict(k=4, candidates=3), "candidates"),
                     (dict(in_process_max=-1), "in_process_max")):
        with pytest.raises(ValueError, match=f"^{key}: "):
            from_dict(PairsConfig, dict(syn=demo_features["syn"], real=demo_features["real"], out="o", **bad))
    other = str(tmp_path / "lv")
    run_features(FeaturesConfig(dataset=str(demo_data / "real"), layout="cityscapes", out=other, levels="1,2"))
    assert main(["pairs", "--syn", demo_features["syn"], "--real", other, "--out", str(tmp_path / "o")]) == 2
    assert "features of different levels" in capsys.readouterr().err
    # weights computed from other features: ids that the features do not have
    val = str(tmp_path / "val")
    run_features(FeaturesConfig(dataset=str(demo_data / "real"), layout="cityscapes", split="val", out=val))
    assert main(["pairs", "--syn", demo_features["syn"], "--real", val, "--weights", weights, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert weights in err and "real id(s) in the weights are not in the real features" in err
    assert not storage.is_complete(str(tmp_path / "o"))
