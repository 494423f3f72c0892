"""The KLIEP stage on Ray: distributed kernel rows, streamed solve, report, S3, bad input."""


import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.stats import spearmanr

from synreal_ray import features, storage, weighting
from synreal_ray.cli import main
from synreal_ray.datasets.labels import TRAIN_ID
from synreal_ray.features import FeaturesConfig, load_features, run_features
from synreal_ray.weighting import KliepConfig, load_models, load_weights, run_kliep

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def kliep_out(demo_features, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("kliep") / "k")
    run_kliep(KliepConfig(syn=demo_features["syn"], real=demo_features["real"], out=out, centers=16, folds=4))
    return out


def test_weights_equal_the_fitted_model_on_every_sample(kliep_out, demo_features):
    weights, models = load_weights(kliep_out), load_models(kliep_out)
    for name, domain in (("w", "syn"), ("psi", "real")):
        f = load_features(demo_features[domain])
        assert sorted(weights[domain]) == list(f["id"])
        got = np.array([weights[domain][i] for i in f["id"]])
        np.testing.assert_allclose(got, models[name].weights(f["feature"]), rtol=1e-4, atol=1e-9)
        assert got.mean() == pytest.approx(1.0, abs=1e-6)  # KLIEP's constraint over the source
        assert (got >= 0).all()


def test_report_and_histogram(kliep_out):
    rep = storage.read_json(storage.join(kliep_out, "report.json"))
    for name in ("w", "psi"):
        r = rep[name]
        assert r["sigma_chosen_by"] == "cv" and len(r["cv"]) >= 5
        assert r["sigma"] in [c["sigma"] for c in r["cv"]]
        best = max(r["cv"], key=lambda c: c["score"])
        assert best["sigma"] == r["sigma"]
        assert r["converged"] and r["normalisation"]["mean_over_source"] == pytest.approx(1.0, abs=1e-6)
        assert 0 < r["raw"]["ess_fraction"] <= 1
    png = storage.read_bytes(storage.join(kliep_out, "histogram.png"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_weights_follow_the_layout_shift(kliep_out, demo_features):
    """The real side has more vegetation and fewer cars: synthetic images that look like that get
    higher w = p_real / p_syn."""
    f = load_features(demo_features["syn"])
    w = np.array([load_weights(kliep_out)["syn"][i] for i in f["id"]])
    realness = f["feature"][:, TRAIN_ID["vegetation"]] - f["feature"][:, TRAIN_ID["car"]]
    assert spearmanr(realness, w).statistic > 0.3


def test_streamed_solve_equals_in_memory(demo_features, tmp_path, monkeypatch):
    cfg = dict(syn=demo_features["syn"], real=demo_features["real"], sigma=1.0, centers=12)
    run_kliep(KliepConfig(out=str(tmp_path / "mem"), **cfg))
    monkeypatch.setattr(weighting, "IN_MEMORY_BYTES", 0)  # force block streaming from Parquet
    monkeypatch.setattr(features, "DRIVER_ROWS", 0)  # and kernel rows by Ray Data, not on the driver
    run_kliep(KliepConfig(out=str(tmp_path / "stream"), **cfg))
    a, b = load_weights(str(tmp_path / "mem")), load_weights(str(tmp_path / "stream"))
    for d in ("syn", "real"):
        np.testing.assert_allclose([a[d][i] for i in sorted(a[d])], [b[d][i] for i in sorted(b[d])], rtol=1e-6)
    rep = storage.read_json(str(tmp_path / "mem" / "report.json"))
    assert rep["w"]["sigma"] == 1.0 and rep["w"]["sigma_chosen_by"] == "given" and rep["w"]["cv"] == []
    kernels = pq.read_table(tmp_path / "mem" / "kernels" / "w" / "source")
    assert kernels.num_rows == 24 and kernels.schema.field("kernel").type.list_size == 12


def test_cli_clip_and_rerun(demo_features, tmp_path, capsys):
    out = str(tmp_path / "k")
    args = ["kliep", "--syn", demo_features["syn"], "--real", demo_features["real"], "--out", out,
            "--sigma", "0.5", "--centers", "12", "--clip", "3"]
    assert main(args) == 0
    assert "effective sample size" in capsys.readouterr().out
    rep = storage.read_json(storage.join(out, "report.json"))
    for name, d in (("w", "syn"), ("psi", "real")):
        w = np.array(list(load_weights(out)[d].values()))
        assert w.max() <= 3 + 1e-6 and w.mean() == pytest.approx(1.0, abs=1e-6)
        # the clipped weights are exactly the ones left at the limit; some are, since the raw
        # (mean-1) weights go above it
        at_limit = int(np.count_nonzero(w >= 3 - 1e-5))
        assert rep[name]["raw"]["max"] > 3 and at_limit > 0
        assert rep[name]["clipped"] == {**rep[name]["clipped"], "limit": 3, "count": at_limit}
    assert main(args) == 0
    assert "skipped" in capsys.readouterr().out


def test_s3(s3_bucket, demo_data):
    feats = {}
    for domain, layout in (("syn", "synscapes"), ("real", "cityscapes")):
        feats[domain] = f"{s3_bucket}/features/{domain}"
        run_features(FeaturesConfig(dataset=str(demo_data / domain), layout=layout, out=feats[domain]))
    out = f"{s3_bucket}/kliep"
    rec = run_kliep(KliepConfig(syn=feats["syn"], real=feats["real"], out=out, sigma=1.0, centers=8))
    assert rec["rows"] == {"syn": 24, "real": 16}
    assert storage.is_complete(out) and storage.exists(f"{out}/histogram.png")
    assert len(load_weights(out)["syn"]) == 24


def test_bad_input(demo_data, demo_features, tmp_path, capsys):
    other = str(tmp_path / "levels2")
    run_features(FeaturesConfig(dataset=str(demo_data / "real"), layout="cityscapes", out=other, levels="2"))
    assert main(["kliep", "--syn", demo_features["syn"], "--real", other, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "features of different levels" in err and other in err
    assert main(["kliep", "--syn", str(tmp_path / "missing"), "--real", other, "--out", str(tmp_path / "o")]) == 2
    assert "features output does not exist" in capsys.readouterr().err
    assert main(["kliep", "--syn", demo_features["syn"], "--real", demo_features["real"], "--out", str(tmp_path / "o"),
                 "--sigma", "-1"]) == 2
    assert "--sigma: must be > 0" in capsys.readouterr().err
    assert not storage.is_complete(str(tmp_path / "o"))
