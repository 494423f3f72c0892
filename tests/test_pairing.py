"""The pairs stage: faiss KNN actor on Ray Data, weights joined, quality report, preview, errors."""

import numpy as np
import pytest

from synreal_ray import storage
from synreal_ray.cli import main
from synreal_ray.features import FeaturesConfig, load_features, run_features
from synreal_ray.knn import brute_force_knn
from synreal_ray.pairing import PairsConfig, load_pairs, run_pairs
from synreal_ray.sampler import SmartBatchSampler
from synreal_ray.weighting import KliepConfig, load_weights, run_kliep

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def weights(demo_features, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("w") / "kliep")
    run_kliep(KliepConfig(syn=demo_features["syn"], real=demo_features["real"], out=out, sigma=1.0, centers=12))
    return out


@pytest.fixture(scope="module")
def pairs(demo_features, weights, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("p") / "pairs")
    run_pairs(PairsConfig(syn=demo_features["syn"], real=demo_features["real"], weights=weights, out=out, k=4))
    return out


def test_pairs_equal_brute_force_search(pairs, demo_features):
    syn, real = load_features(demo_features["syn"]), load_features(demo_features["real"])
    dist, idx = brute_force_knn(real["feature"], syn["feature"], 4)
    table = load_pairs(pairs)
    assert table.num_rows == 24 * 4
    got = table.to_pylist()
    for n, sid in enumerate(syn["id"]):
        rows = [r for r in got if r["syn_id"] == sid]
        assert [r["rank"] for r in rows] == [0, 1, 2, 3]
        assert [r["real_id"] for r in rows] == list(real["id"][idx[n]])
        np.testing.assert_allclose([r["distance"] for r in rows], dist[n], rtol=1e-5, atol=1e-6)


def test_weights_are_joined(pairs, weights):
    w = load_weights(weights)
    for r in load_pairs(pairs).to_pylist():
        assert r["w_syn"] == pytest.approx(w["syn"][r["syn_id"]])
        assert r["w_real"] == pytest.approx(w["real"][r["real_id"]])


def test_spfeat_pairs_agree_more_than_random_pairs(pairs):
    rep = storage.read_json(storage.join(pairs, "report.json"))
    sp, rd = rep["spfeat"], rep["random"]
    assert sp["mean_distance"] < 0.85 * rd["mean_distance"]
    assert sp["label_agreement"] > rd["label_agreement"] + 0.05, rep
    assert "| SP-Feat KNN |" in storage.read_bytes(storage.join(pairs, "report.md")).decode()


def test_sampler_consumes_the_pairs(pairs, demo_features):
    real_ids = list(load_features(demo_features["real"], columns=("id",))["id"])
    sampler = SmartBatchSampler(load_pairs(pairs), real_ids=real_ids, batch_size=4, seed=1)
    table = load_pairs(pairs).to_pylist()
    neighbours = {(r["syn_id"], r["real_id"]) for r in table}
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
    assert table.num_rows + rep["dropped_by_max_distance"] == 24 * 3
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
    rec = run_pairs(PairsConfig(syn=feats["syn"], real=feats["real"], out=out, k=2))
    assert rec["pairs"] == 48 and storage.is_complete(out) and load_pairs(out).num_rows == 48


def test_bad_input(demo_data, demo_features, weights, tmp_path, capsys):
    base = ["pairs", "--syn", demo_features["syn"], "--real", demo_features["real"], "--out", str(tmp_path / "o")]
    assert main(base + ["--k", "17"]) == 2
    assert "--k 17 is larger than the real set (16 images" in capsys.readouterr().err
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
