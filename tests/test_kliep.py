"""Tests of the KLIEP core (synreal_ray.kliep): kernel, solver, honest CV, helpers."""

import json
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import norm, spearmanr

from synreal_ray.kliep import (
    KliepResult,
    clip_weights,
    effective_sample_size,
    fit_kliep,
    gaussian_kernel,
    kernel_column_mean,
    median_distance,
    select_sigma,
    solve_kliep,
)

CPU = {"device": "cpu"}


def direct_kernel(x, c, sigma):
    d2 = ((x[:, None, :].astype(np.float64) - c[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * sigma**2))


def gaussians(n_s, n_t, dim, seed=0, mu=0.5, s=0.7):
    """source N(0, I), target N(mu, s² I), and the true log ratio log p_t/p_s."""
    rng = np.random.default_rng(seed)
    xs, xt = rng.normal(0, 1, (n_s, dim)), rng.normal(mu, s, (n_t, dim))

    def log_ratio(x):
        return (norm.logpdf(x, mu, s) - norm.logpdf(x, 0, 1)).sum(1)

    return xs, xt, log_ratio


def uniform_gauss(n_s, n_t, dim, seed=0):
    """The paper's toy pair: source uniform[0, 10), target N(7, 0.5²)."""
    rng = np.random.default_rng(seed)
    xs, xt = rng.uniform(0, 10, (n_s, dim)), rng.normal(7, 0.5, (n_t, dim))
    return xs, xt, lambda x: norm.logpdf(x, 7, 0.5).sum(1)


@pytest.fixture(scope="module")
def problem():
    """A small solver problem: target kernel matrix A and source mean b."""
    xs, xt, _ = gaussians(400, 300, 3)
    c = xt[:60]
    return gaussian_kernel(xt, c, 0.8), gaussian_kernel(xs, c, 0.8).mean(0)


# ---------------------------------------------------------------------------- kernel


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_kernel_equals_direct_formula(dtype, tol):
    rng = np.random.default_rng(1)
    # The offset makes ||x||² large next to the distances: the expansion must still be accurate.
    x = (rng.normal(size=(40, 7)) + 50).astype(dtype)
    c = (rng.normal(size=(9, 7)) + 50).astype(dtype)
    k = gaussian_kernel(x, c, 1.3)
    assert k.dtype == dtype and k.shape == (40, 9)
    np.testing.assert_allclose(k, direct_kernel(x, c, 1.3), atol=tol, rtol=0)
    np.testing.assert_allclose(gaussian_kernel(x, x, 1.3).diagonal(), 1.0, atol=tol)


def test_kernel_torch_tensor_matches_numpy():
    rng = np.random.default_rng(2)
    x, c = rng.normal(size=(30, 5)), rng.normal(size=(8, 5))
    kt = gaussian_kernel(torch.from_numpy(x), torch.from_numpy(c), 0.9)
    assert isinstance(kt, torch.Tensor) and kt.dtype == torch.float64
    np.testing.assert_allclose(kt.numpy(), direct_kernel(x, c, 0.9), atol=1e-12)
    k32 = gaussian_kernel(torch.from_numpy(x).float(), c, 0.9)
    assert k32.dtype == torch.float32


def test_kernel_bad_input():
    x, c = np.zeros((3, 2)), np.ones((2, 2))
    with pytest.raises(ValueError, match="features"):
        gaussian_kernel(x, np.ones((2, 3)), 1.0)
    for bad_sigma in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sigma"):
            gaussian_kernel(x, c, bad_sigma)
    with pytest.raises(ValueError, match="NaN or inf"):
        gaussian_kernel(np.array([[0.0, np.nan]]), c, 1.0)
    with pytest.raises(ValueError, match="2-D"):
        gaussian_kernel(np.zeros(3), c, 1.0)
    with pytest.raises(ValueError, match="empty"):
        gaussian_kernel(x, np.zeros((0, 2)), 1.0)
    assert gaussian_kernel(np.zeros((0, 2)), c, 1.0).shape == (0, 2)  # an empty batch is fine


# ---------------------------------------------------------------------------- the ratio


def test_ratio_tracks_truth_1d_uniform_vs_gauss():
    xs, xt, log_ratio = uniform_gauss(500, 300, 1)
    res = fit_kliep(xs, xt, **CPU)
    w = res.weights(xs)
    assert res.converged
    assert abs(w.mean() - 1) < 1e-6  # the constraint: mean ŵ over the source is 1
    assert spearmanr(w, log_ratio(xs)).statistic > 0.9
    assert np.all(w >= 0)


@pytest.mark.parametrize("dim", [3, 5])
def test_ratio_tracks_truth_gaussians(dim):
    xs, xt, log_ratio = gaussians(500, 500, dim, seed=dim)
    res = fit_kliep(xs, xt, **CPU)
    w = res.weights(xs)
    assert res.converged
    assert abs(w.mean() - 1) < 1e-6
    assert spearmanr(w, log_ratio(xs)).statistic > 0.9


def test_sigma_none_vs_given():
    xs, xt, _ = gaussians(200, 200, 2)
    res = fit_kliep(xs, xt, sigma=0.7, **CPU)
    assert res.sigma == 0.7 and res.cv_scores == []
    assert res.centers.shape == (100, 2) and res.alpha.shape == (100,)
    # centres are target samples
    assert all(np.any(np.all(xt == c, axis=1)) for c in res.centers)


# ---------------------------------------------------------------------------- cross-validation


def test_cv_picks_a_sane_width_with_200_samples():
    """The CV's choice is close to the best width judged on 20,000 fresh samples."""
    xs, xt, _ = gaussians(200, 200, 5, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no edge-of-grid warning either
        best, scores = select_sigma(xs, xt, **CPU)
    grid = [s for s, _ in scores]
    assert len(grid) == 9 and all(np.isfinite(v) for _, v in scores)
    assert min(grid) < best < max(grid)
    oracle = {s: fresh_score(xs, xt, s, 5) for s in grid}
    assert oracle[best] > max(oracle.values()) - 0.1


def test_cv_is_honest_tiny_sigma_does_not_win():
    """In-sample likelihood rewards a tiny width (memorising the targets); the CV must not."""
    xs, xt, _ = gaussians(200, 200, 2, seed=4)
    med = median_distance(np.concatenate([xs, xt]))
    grid = [med / 200, med / 50, med / 3, med]
    # The failure the CV must avoid: with every target a centre and scored in-sample, a narrow
    # width (med/50) wins by far, each target sitting on its own bump.
    in_sample = [fit_kliep(xs, xt, sigma=s, num_centers=200, **CPU).objective for s in grid]
    assert int(np.argmax(in_sample)) == 1 and in_sample[1] > max(in_sample[2:]) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # picking med, the grid's edge, is expected here
        best, scores = select_sigma(xs, xt, sigma_grid=grid, **CPU)
    assert best >= med / 3
    assert max(scores[0][1], scores[1][1]) < scores[2][1] - 1  # narrow widths score badly
    assert all(np.isfinite(v) for _, v in scores)  # ... but finitely


def fresh_score(xs, xt, sigma, dim, gen=None):
    """Log-likelihood of the normalised model p̂_t = ŵ p_s / Z on 20,000 fresh samples per domain."""
    fresh_s, fresh_t, _ = (gen or gaussians)(20000, 20000, dim, seed=99)
    r = fit_kliep(xs, xt, sigma=sigma, **CPU)
    return np.mean(np.log(np.maximum(r.weights(fresh_t), 1e-100))) - np.log(np.mean(r.weights(fresh_s)))


def test_cv_holds_out_sources_too():
    """Holding out only targets lets narrow widths exploit sparse sources; ours must not."""
    xs, xt, _ = gaussians(200, 200, 5, seed=0)
    med = median_distance(np.concatenate([xs, xt]))
    grid = list(med * np.geomspace(1 / 16, 2, 10))
    best, _ = select_sigma(xs, xt, sigma_grid=grid, **CPU)

    parts = np.array_split(np.random.default_rng(0).permutation(len(xt)), 5)

    def target_only_cv(s):  # centres from the training targets, but every source in b
        out = []
        for k in range(5):
            tr = xt[np.concatenate(parts[:k] + parts[k + 1:])]
            c = tr[:100]
            a = solve_kliep(gaussian_kernel(tr, c, s), gaussian_kernel(xs, c, s).mean(0), **CPU).alpha
            out.append(np.mean(np.log(np.maximum(gaussian_kernel(xt[parts[k]], c, s) @ a, 1e-100))))
        return np.mean(out)

    weak_best = grid[int(np.argmax([target_only_cv(s) for s in grid]))]
    assert weak_best < best
    assert fresh_score(xs, xt, best, 5) > fresh_score(xs, xt, weak_best, 5) + 1


# ---------------------------------------------------------------------------- solver


def test_streamed_blocks_equal_single_array(problem):
    A, b = problem
    one = solve_kliep(A, b, **CPU)
    streamed = solve_kliep(lambda: (A[i:i + 37] for i in range(0, len(A), 37)), b, **CPU)
    as_list = solve_kliep([A[:100], A[100:]], b, **CPU)
    for sol in (streamed, as_list):
        np.testing.assert_allclose(sol.alpha, one.alpha, rtol=1e-9, atol=1e-12)
        assert sol.iterations == one.iterations
    # float32 blocks (as the distributed job writes them) are accepted
    f32 = solve_kliep(lambda: iter([A.astype(np.float32)]), b, **CPU)
    np.testing.assert_allclose(A @ f32.alpha, A @ one.alpha, rtol=1e-4)


def test_solver_converges_and_reports(problem):
    A, b = problem
    sol = solve_kliep(A, b, **CPU)
    assert sol.converged and sol.stop_reason == "gap" and sol.gap <= 1e-6
    assert 1 < sol.iterations < 100
    assert abs(b @ sol.alpha - 1) < 1e-12 and np.all(sol.alpha >= 0)
    capped = solve_kliep(A, b, max_iter=1, **CPU)
    assert not capped.converged and capped.stop_reason == "max_iter"
    # a converged warm start is recognised at once
    warm = solve_kliep(A, b, alpha0=sol.alpha, **CPU)
    assert warm.converged and warm.iterations == 1


def test_first_order_methods(problem):
    """pgd reaches the same optimum; the reference's non-Euclidean projection stalls below it."""
    A, b = problem
    newton = solve_kliep(A, b, **CPU)
    pgd = solve_kliep(A, b, method="pgd", max_iter=3000, **CPU)
    ref = solve_kliep(A, b, method="reference", max_iter=3000, **CPU)
    assert pgd.objective <= newton.objective + 1e-12
    assert newton.objective - pgd.objective < 1e-5
    assert newton.objective - ref.objective > 1e-3


def test_torch_path_matches_numpy_on_cpu(problem):
    A, b = problem
    np_sol = solve_kliep(A, b, **CPU)
    t_sol = solve_kliep(A, b, device="cpu", backend="torch")
    np.testing.assert_allclose(A @ t_sol.alpha, A @ np_sol.alpha, rtol=1e-5)
    xs, xt, _ = gaussians(150, 150, 2)
    r_np = fit_kliep(xs, xt, **CPU)
    r_t = fit_kliep(xs, xt, device="cpu", backend="torch")
    assert r_t.sigma == r_np.sigma
    np.testing.assert_allclose(r_t.weights(xs), r_np.weights(xs), rtol=1e-5, atol=1e-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_path_matches_numpy(problem):
    A, b = problem
    np_sol = solve_kliep(A, b, **CPU)
    for blocks in (A, torch.from_numpy(A).cuda(), lambda: (A[i:i + 50] for i in range(0, len(A), 50))):
        sol = solve_kliep(blocks, b, device="cuda")
        np.testing.assert_allclose(A @ sol.alpha, A @ np_sol.alpha, rtol=1e-5)
    xs, xt, _ = gaussians(150, 150, 2)
    np.testing.assert_allclose(fit_kliep(xs, xt, device="cuda").weights(xs),
                               fit_kliep(xs, xt, **CPU).weights(xs), rtol=1e-5, atol=1e-8)


def test_solver_bad_input(problem):
    A, b = problem
    with pytest.raises(ValueError, match="expected"):
        solve_kliep(A[:, :10], b, **CPU)
    with pytest.raises(ValueError, match="fresh iterator"):
        solve_kliep(iter([A]), b, **CPU)
    with pytest.raises(ValueError, match="empty"):
        solve_kliep(lambda: iter([]), b, **CPU)
    with pytest.raises(ValueError, match="finite"):
        solve_kliep(np.where(A > 0.5, np.nan, A), b, **CPU)
    with pytest.raises(ValueError, match="all zero"):
        solve_kliep(A, np.zeros_like(b), **CPU)
    with pytest.raises(ValueError, match="method"):
        solve_kliep(A, b, method="adam", **CPU)


# ---------------------------------------------------------------------------- big-N flow


def test_big_n_streamed_flow_matches_in_memory():
    """σ and centres from a subsample, α refitted at full scale from streamed float32 rows."""
    xs, xt, _ = gaussians(3000, 2000, 3, seed=6)
    sub = fit_kliep(xs[:300], xt[:300], **CPU)

    def rows(x):  # what the distributed job produces: float32 kernel rows, in batches
        return lambda: (gaussian_kernel(x[i:i + 256].astype(np.float32), sub.centers, sub.sigma)
                        for i in range(0, len(x), 256))

    b = kernel_column_mean(rows(xs))
    sol = solve_kliep(rows(xt), b, alpha0=sub.alpha, **CPU)
    full = sub.with_alpha(sol)
    assert full.converged and full.sigma == sub.sigma
    # the in-memory float64 refit with the same centres and σ
    ref = solve_kliep(gaussian_kernel(xt, sub.centers, sub.sigma),
                      gaussian_kernel(xs, sub.centers, sub.sigma).mean(0), **CPU)
    w = full.weights(xs)
    np.testing.assert_allclose(w, sub.with_alpha(ref.alpha).weights(xs), rtol=1e-3, atol=1e-4)
    assert abs(w.mean() - 1) < 1e-3
    w_rows = np.concatenate(list(rows(xs)())) @ full.alpha
    np.testing.assert_allclose(w_rows, w, rtol=1e-4, atol=1e-5)


def test_result_round_trips_through_json():
    xs, xt, _ = gaussians(200, 200, 2)
    res = fit_kliep(xs, xt, **CPU)
    back = KliepResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.sigma == res.sigma and back.cv_scores == res.cv_scores
    assert back.iterations == res.iterations and back.converged == res.converged
    np.testing.assert_array_equal(back.weights(xs), res.weights(xs))
    with pytest.raises(ValueError, match="shape"):
        res.with_alpha(np.ones(3))


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("make,match", [
    (lambda s, t: (s[:, :1], t), "features"),
    (lambda s, t: (s[:0], t), "empty"),
    (lambda s, t: (s, t[:, :0]), "empty"),
    (lambda s, t: (np.where(s > 2, np.nan, s), t), "NaN or inf"),
    (lambda s, t: (s, np.where(t > 2, np.inf, t)), "NaN or inf"),
    (lambda s, t: (s, np.ones_like(t)), "degenerate"),
    (lambda s, t: (np.zeros_like(s), t), "degenerate"),
    (lambda s, t: (s, t[:50]), "num_centers"),
    (lambda s, t: (s, np.zeros((2, 2, 2))), "2-D"),
])
def test_fit_bad_input(make, match):
    xs, xt, _ = gaussians(120, 120, 2)
    s, t = make(xs, xt)
    with pytest.raises(ValueError, match=match):
        fit_kliep(s, t, **CPU)


def test_fit_bad_parameters():
    xs, xt, _ = gaussians(120, 120, 2)
    for sigma in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sigma"):
            fit_kliep(xs, xt, sigma=sigma, **CPU)
    with pytest.raises(ValueError, match="folds"):
        fit_kliep(xs[:8], xt[:8], num_centers=5, folds=5, **CPU)
    with pytest.raises(ValueError, match="folds"):
        select_sigma(xs, xt, folds=1, **CPU)
    with pytest.raises(ValueError, match="sigma"):
        select_sigma(xs, xt, sigma_grid=[1.0, -2.0], **CPU)
    with pytest.raises(ValueError, match="device"):
        fit_kliep(xs, xt, device="tpu")


# ---------------------------------------------------------------------------- report helpers


def test_effective_sample_size():
    assert effective_sample_size(np.ones(50)) == pytest.approx(50)
    assert effective_sample_size([0, 0, 3.0, 0]) == pytest.approx(1)
    assert effective_sample_size([1.0, 3.0]) == pytest.approx(16 / 10)
    for bad in ([], [1.0, -1.0], [np.nan, 1.0], [0.0, 0.0]):
        with pytest.raises(ValueError):
            effective_sample_size(bad)


def test_clip_weights():
    rng = np.random.default_rng(0)
    w = rng.lognormal(0, 1.5, 1000)
    w /= w.mean()
    c, n = clip_weights(w, 5.0)
    assert c.mean() == pytest.approx(1)
    assert c.max() == pytest.approx(5.0, rel=1e-9)  # renormalising did not push them above 5
    assert n == int(np.sum(c >= 5.0 - 1e-9)) and 0 < n < 100
    # below the threshold only the order-preserving renormalisation happens
    c2, n2 = clip_weights(w * 3, 1000.0)
    np.testing.assert_allclose(c2, w)
    assert n2 == 0
    with pytest.raises(ValueError, match="max_weight"):
        clip_weights(w, 0.5)
