"""FID: pytorch-fid's network and distance, offline weights, the Ray pipeline and its cache.

A seeded random-weight file in pytorch-fid's format stands in for the real weights (no download);
dims 64 keeps Inception cheap on CPU (only its first block runs)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from synreal_ray import fid, storage

from conftest import RUN_DIR

N = 72  # > 64 dims: full-rank covariances, no small-sample warning


def write_images(folder, n: int, seed: int, bright: float = 0.0, size=(32, 48)) -> list[str]:
    """Smooth random images (low-resolution noise up-sampled), in one flat folder as pytorch-fid
    reads them; `bright` shifts the distribution."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        low = rng.uniform(0, 1, (4, 6, 3)) * (1 - bright) + bright
        img = Image.fromarray((low * 255).astype(np.uint8)).resize((size[1], size[0]), Image.BILINEAR)
        paths.append(os.path.join(folder, f"{i:03d}.png"))
        img.save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def fid_data(tmp_path_factory, random_inception):
    root = tmp_path_factory.mktemp("fid")
    weights = random_inception
    write_images(root / "a", N, seed=1)
    write_images(root / "b", N, seed=2, bright=0.3)
    return {"root": root, "weights": weights, "a": str(root / "a"), "b": str(root / "b"), "cache": str(root / "cache")}


@pytest.fixture(scope="module")
def fid_ab(fid_data, ray_cluster):
    """FID(a, b) at dims 64 through the Ray pipeline, with a cold cache."""
    return fid.run_fid(fid.FidConfig(a=fid_data["a"], b=fid_data["b"], weights=fid_data["weights"], dims=64,
                                     cache=fid_data["cache"], batch_size=16))


def test_frechet_distance_and_statistics():
    d = 5
    # N(0, I) against N(1, 4I): |mu|^2 = d, trace term = d * (1 + 4 - 2 * 2) = d
    assert fid.frechet_distance(np.zeros(d), np.eye(d), np.ones(d), 4 * np.eye(d)) == pytest.approx(2 * d)
    acts = np.random.default_rng(0).normal(size=(50, d)).astype(np.float32)
    mu, sigma = fid.statistics(acts)
    assert mu.dtype == np.float64 and np.allclose(sigma, np.cov(acts.astype(np.float64), rowvar=False))
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    with pytest.raises(ValueError, match="at least 2 images"):
        fid.statistics(acts[:1])
    assert fid.small_sample_message(10, 64, "x") and fid.small_sample_message(64, 64, "x") is None


@pytest.mark.parametrize("na, nb, d", [(300, 200, 64), (40, 50, 64), (30, 20, 512)])
def test_fid_of_equals_pytorch_fids_formula_both_ways(na, nb, d, monkeypatch):
    """fid_of (eigenvalues) against pytorch-fid's calculate_frechet_distance (scipy sqrtm): equal to
    rounding with more images than dims; with fewer (a singular Σa Σb, where sqrtm itself is
    approximate) within 1e-6 relative. The d×d route for large sets gives the same value."""
    rng = np.random.default_rng(na)
    a = rng.normal(size=(na, d)) * rng.uniform(0.5, 2, size=d) + 1
    b = rng.normal(size=(nb, d)) + 0.3
    theirs = fid.frechet_distance(*fid.statistics(a), *fid.statistics(b))
    ours = fid.fid_of(a, b)
    assert ours == pytest.approx(theirs, rel=1e-12 if min(na, nb) > d else 1e-6)
    assert abs(fid.fid_of(a, a)) < 1e-12 * np.trace(fid.statistics(a)[1])  # a set against itself: 0
    monkeypatch.setattr(fid, "CROSS_MAX", 0)  # as for two sets too large for their cross product
    assert fid.fid_of(a, b) == pytest.approx(ours, rel=1e-7)


def explicit_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with the cubic kernel (x·y/d + 1)³, written out as double loops over two sets
    of any sizes (Bińkowski et al. 2018, eq. 2): the same-set sums leave out i = j."""
    d = x.shape[1]
    k = lambda u, v: (sum(float(a) * float(b) for a, b in zip(u, v)) / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_equals_an_explicit_double_loop():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) * 1.5 + 0.3
    # subsets as large as the sets: every subset is the whole set in some order, so every MMD² is the full one
    mean, std = fid.kid(x, y, subsets=4, subset_size=12)
    assert mean == pytest.approx(explicit_mmd2(x, y), rel=1e-10) and std == pytest.approx(0, abs=1e-12)
    # subset_size beyond the smaller set is capped; the mean over random subsets of the larger set
    # estimates the full-sample statistic (the subset U-statistics average to it)
    big = rng.normal(size=(40, 5))
    mean, std = fid.kid(big, y, subsets=3000, subset_size=1000, seed=1)
    assert abs(mean - explicit_mmd2(big, y)) < 4 * std / np.sqrt(3000)
    assert fid.kid(big, y, subsets=50, seed=1) == fid.kid(big, y, subsets=50, seed=1)  # seeded
    with pytest.raises(ValueError, match="at least 2 images"):
        fid.kid(x[:1], y)


def test_kid_of_disjoint_halves_of_one_distribution_is_about_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 16))
    same, same_std = fid.kid(x[:1000], x[1000:], subsets=50, subset_size=200)
    shifted, shifted_std = fid.kid(x[:1000], rng.normal(size=(1000, 16)) + 0.3, subsets=50, subset_size=200)
    assert abs(same) < same_std  # unbiased: centred on 0, negative values included
    assert shifted > 3 * shifted_std and shifted > 20 * abs(same)
    assert fid.parse_size("256x512") == (256, 512)
    buf = io.BytesIO()
    Image.new("RGBA", (40, 20), (10, 20, 30, 0)).save(buf, format="PNG")
    img = fid.decode_for_inception(buf.getvalue(), (8, 12))
    assert img.shape == (8, 12, 3) and img.dtype == np.uint8 and tuple(img[0, 0]) == (10, 20, 30)
    with pytest.raises(ValueError, match="HxW"):
        fid.parse_size("256")


def test_activations_equal_pytorch_fid(fid_data, tmp_path):
    """Full network (dims 2048, through the FID-patched Inception blocks): the same activations as
    pytorch-fid's get_activations with the same weights file; images of any size in one call."""
    import torch
    from pytorch_fid import inception as pfi
    from pytorch_fid.fid_score import get_activations

    paths = write_images(tmp_path / "x", 1, seed=5) + write_images(tmp_path / "y", 1, seed=6, size=(40, 30))
    model = fid.load_inception(fid_data["weights"], 2048)
    ours = fid.activations([fid.decode_for_inception(open(p, "rb").read()) for p in paths], model)
    state = torch.load(fid_data["weights"], weights_only=True)
    saved = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda url, progress=True: state
    try:
        ref_model = pfi.InceptionV3([3])
    finally:
        pfi.load_state_dict_from_url = saved
    ref = np.concatenate([get_activations([p], ref_model, batch_size=1, dims=2048, num_workers=0) for p in paths])
    assert ours.shape == (2, 2048) and ours.std() > 0.05  # random weights still give spread-out features
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_weights_missing_or_wrong(fid_data, tmp_path, monkeypatch):
    monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no hub copy either
    with pytest.raises(FileNotFoundError) as e:
        fid.find_weights(None)
    msg = str(e.value)
    assert "pt_inception-2015-12-05" in msg and "--inception-weights" in msg and fid.WEIGHTS_ENV in msg
    with pytest.raises(FileNotFoundError, match="nope.pth: Inception weights file not found"):
        fid.find_weights(str(tmp_path / "nope.pth"))
    monkeypatch.setenv(fid.WEIGHTS_ENV, fid_data["weights"])
    assert fid.find_weights(None) == fid_data["weights"]

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth: not a PyTorch state dict"):
        fid.load_inception(str(junk), 64)
    import torch

    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="other.pth: not pytorch-fid's FID Inception weights"):
        fid.load_inception(str(other), 64)


def test_cli_error_without_weights(fid_data, tmp_path):
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch")}
    env.pop(fid.WEIGHTS_ENV, None)
    p = subprocess.run([sys.executable, "-m", "synreal_ray.cli", "fid", "--a", fid_data["a"], "--b", fid_data["b"],
                        "--cache", str(tmp_path / "c")], capture_output=True, text=True, env=env, cwd=RUN_DIR,
                       timeout=240)
    assert p.returncode == 2
    # the log says what it tried to download, then one error line
    assert p.stderr.splitlines()[-1].startswith("error: no Inception weights for FID") and "--inception-weights" in p.stderr
    assert "downloading pytorch-fid's FID Inception weights" in p.stderr


@pytest.mark.slow
def test_fid_equals_pytorch_fid_command(fid_data, fid_ab):
    """`python -m pytorch_fid a b --dims 64` with the same weights file (its loader pointed at it,
    nothing else changed) gives the same FID."""
    wrapper = textwrap.dedent(f"""
        import sys, torch
        import pytorch_fid.inception as pfi
        state = torch.load({fid_data['weights']!r}, weights_only=True)
        pfi.load_state_dict_from_url = lambda url, progress=True: state
        from pytorch_fid.fid_score import main
        sys.argv = ["pytorch_fid", {fid_data['a']!r}, {fid_data['b']!r}, "--dims", "64", "--device", "cpu",
                    "--num-workers", "0"]
        main()
    """)
    p = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    theirs = float(p.stdout.strip().splitlines()[-1].split(":")[1])
    assert fid_ab["fid"] > 1.0  # the two sets differ: the comparison is not 0 == 0
    assert fid_ab["fid"] == pytest.approx(theirs, abs=1e-3)
    assert fid_ab["a"]["computed"] == fid_ab["b"]["computed"] == N and not fid_ab["warnings"]


@pytest.mark.slow
def test_self_fid_zero_and_cache_reused(fid_data, fid_ab):
    entry = fid_ab["a"]["entry"]
    parts = storage.list_files(storage.join(entry, "acts"))
    stamps = {u: os.stat(u).st_mtime_ns for u in parts}
    rec = fid.run_fid(fid.FidConfig(a=fid_data["a"], b=fid_data["a"], weights=fid_data["weights"], dims=64,
                                    cache=fid_data["cache"]))
    assert abs(rec["fid"]) < 1e-3
    assert rec["a"]["computed"] == rec["b"]["computed"] == 0 and rec["a"]["entry"] == entry
    assert {u: os.stat(u).st_mtime_ns for u in storage.list_files(storage.join(entry, "acts"))} == stamps
    # the CLI: all cached, so no Ray job at all; the last line is the FID
    p = subprocess.run([sys.executable, "-m", "synreal_ray.cli", "fid", "--a", fid_data["a"], "--b", fid_data["b"],
                        "--inception-weights", fid_data["weights"], "--dims", "64", "--cache", fid_data["cache"]],
                       capture_output=True, text=True, cwd=RUN_DIR, timeout=240)
    assert p.returncode == 0, p.stderr
    *_, kid_line, last = p.stdout.strip().splitlines()
    assert last.startswith("FID: ") and float(last[5:]) == pytest.approx(fid_ab["fid"], abs=1e-5)
    mean, std = (float(v) for v in kid_line.removeprefix("KID: ").split(" ± "))
    assert mean == pytest.approx(fid_ab["kid"], abs=1e-6) and std == pytest.approx(fid_ab["kid_std"], abs=1e-6)
    assert rec["kid"] < fid_ab["kid"]  # a set against itself scores below a set against a brighter one
    assert "all cached" in p.stdout


def test_list_images_recursive_and_subset(tmp_path):
    write_images(tmp_path / "x" / "deep", 3, seed=0)
    (tmp_path / "x" / "notes.txt").write_text("not an image")
    (tmp_path / "x" / "UPPER.PNG").write_bytes((tmp_path / "x" / "deep" / "000.png").read_bytes())
    files = fid.list_images(str(tmp_path / "x"))
    assert [f.rel for f in files] == ["UPPER.PNG", "deep/000.png", "deep/001.png", "deep/002.png"]
    sub = fid.list_images(str(tmp_path / "x"), max_images=2)
    assert len(sub) == 2 and sub == fid.list_images(str(tmp_path / "x"), max_images=2) and sub == sorted(sub, key=lambda f: f.rel)
    key = fid.cache_key(files, "w", 64, None)
    assert key != fid.cache_key(sub, "w", 64, None) and key != fid.cache_key(files, "w", 2048, None)
    with pytest.raises(ValueError, match="no images"):
        fid.list_images(str(tmp_path / "x" / "notes.txt"))


@pytest.mark.slow
def test_s3_weights_and_images_small_set_warns(fid_data, fid_ab, s3_bucket):
    """Weights and a small image set on S3: the local set's cache entry is reused (the key holds
    the weights' content, not their location), the S3 images give the same activations as their
    local copies, the small set is warned about, and a cache on S3 is read."""
    weights = f"{s3_bucket}/models/pt_inception.pth"
    storage.write_bytes(weights, open(fid_data["weights"], "rb").read())
    b = f"{s3_bucket}/images/b"
    names = sorted(os.listdir(fid_data["b"]))[:10]
    for p in names:
        storage.write_bytes(f"{b}/{p}", open(os.path.join(fid_data["b"], p), "rb").read())
    with pytest.warns(fid.SmallSampleWarning, match="10 images for 64-dimensional"):
        rec = fid.run_fid(fid.FidConfig(a=fid_data["a"], b=b, weights=weights, dims=64, cache=fid_data["cache"]))
    assert rec["a"]["computed"] == 0 and rec["b"]["computed"] == 10 and len(rec["warnings"]) == 1
    got = dict(zip(*fid._cached_acts(rec["b"]["entry"], 64)))
    ref = dict(zip(*fid._cached_acts(fid_ab["b"]["entry"], 64)))
    np.testing.assert_allclose(np.stack([got[n] for n in names]), np.stack([ref[n] for n in names]), atol=1e-5)

    # the local set's entry copied to a cache on S3 is found and used there
    cache = f"{s3_bucket}/fid-cache"
    entry = fid_ab["a"]["entry"]
    for u in storage.list_files(entry):
        storage.write_bytes(storage.join(cache, fid_ab["a"]["key"], storage.relpath(u, entry)), storage.read_bytes(u))
    rec = fid.run_fid(fid.FidConfig(a=fid_data["a"], b=fid_data["a"], weights=weights, dims=64, cache=cache))
    assert rec["a"]["computed"] == 0 and rec["a"]["entry"].startswith("s3://") and abs(rec["fid"]) < 1e-3
