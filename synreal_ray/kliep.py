"""KLIEP density-ratio estimation (Sugiyama et al. 2007), the pure numpy/torch core.

The model is ŵ(x) = Σ_l α_l K(x, c_l) with Gaussian kernels K centred on target samples c_l.
α maximises the mean log ŵ over target samples subject to mean ŵ over source samples = 1 and
α ≥ 0, so ŵ estimates p_target(x) / p_source(x). In this project:

    fit_kliep(source=syn, target=real).weights(x_syn)   # w = p_real / p_syn on synthetic samples
    fit_kliep(source=real, target=syn).weights(x_real)  # ψ = p_syn / p_real on real samples

Big-N flow (kernel rows computed elsewhere, e.g. by Ray Data ``map_batches``)::

    res = fit_kliep(src_subsample, tgt_subsample)                    # σ by honest CV + centres
    # distributed: rows = gaussian_kernel(batch, res.centers, res.sigma) for every sample
    b = kernel_column_mean(iter_source_rows)                          # one streamed pass
    sol = solve_kliep(iter_target_rows, b, alpha0=res.alpha)          # iter_*: callables -> iterators
    full = res.with_alpha(sol)
    w_source = source_rows @ full.alpha                               # == full.weights(x_source)

This module must not import Ray (it runs inside Ray workers). torch (GPU path) and scipy (the
Newton subproblem's NNLS) are imported lazily, so numpy-only callers such as the kernel map
function stay cheap to start.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "KliepResult",
    "KliepSolution",
    "clip_weights",
    "effective_sample_size",
    "fit_kliep",
    "gaussian_kernel",
    "kernel_column_mean",
    "median_distance",
    "select_sigma",
    "sigma_grid_around",
    "solve_kliep",
]

# ŵ can underflow to 0 for a target far from every centre; log(0) would make a CV candidate -inf and
# the comparison meaningless, so such points score log(_W_FLOOR) ≈ -230: very bad but finite. The
# same floor bounds 1/ŵ in the gradient and Hessian, whose squares must not overflow.
_W_FLOOR = 1e-100
# Centres whose source mean b_l is this small relative to the largest have no source mass nearby:
# their α would be unbounded by the constraint, so they are left out of the model (α_l = 0).
_B_REL_FLOOR = 1e-12
# Kernel values and 1/ŵ-scaled rows below this are set to 0 in the solver: far below anything that
# can matter next to _W_FLOOR, and products of such values are subnormal floats, which make BLAS
# 10-100x slower (a narrow σ in CV produces many of them).
_FLUSH = 1e-150

Blocks = Any  # np.ndarray | torch.Tensor | Callable[[], Iterable[np.ndarray]]


# --------------------------------------------------------------------------------------------
# kernel


def _is_tensor(x: Any) -> bool:
    # A tensor can only exist if torch is already imported, so this never imports torch itself.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _check_sigma(sigma: float) -> float:
    try:
        s = float(sigma)
    except (TypeError, ValueError):
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r}") from None
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
    return s


def gaussian_kernel(x: Any, centers: Any, sigma: float) -> Any:
    """Gaussian kernel matrix K[i, l] = exp(-||x_i - c_l||² / (2 σ²)), shape (n, b).

    Squared distances are written as ||x||² + ||c||² - 2 x cᵀ (one matrix product, clipped at 0).
    numpy in → numpy out in x's float dtype (float32 stays float32; other dtypes → float64); a
    torch tensor x → torch tensor on x's device and dtype, same formula. Both inputs are shifted
    by the centres' mean first: distances do not change, but the norms in the expansion get
    smaller, which keeps float32 cancellation errors small. Values below the dtype's smallest
    normal number are returned as 0 (subnormals make every later product 10-100x slower).
    """
    s = _check_sigma(sigma)
    if _is_tensor(x) or _is_tensor(centers):
        return _gaussian_kernel_torch(x, centers, s)
    x = np.asarray(x)
    centers = np.asarray(centers)
    dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    x = x.astype(dtype, copy=False)
    centers = centers.astype(dtype, copy=False)
    _check_pair(x, centers)
    shift = centers.mean(axis=0, dtype=np.float64).astype(dtype)
    x = x - shift
    c = centers - shift
    d2 = (x * x).sum(1)[:, None] + (c * c).sum(1)[None, :] - 2.0 * (x @ c.T)
    np.maximum(d2, 0, out=d2)
    k = np.exp(d2 * dtype.type(-0.5 / (s * s)))
    k[k < np.finfo(dtype).tiny] = 0  # subnormals are slow in every later product
    return k


def _gaussian_kernel_torch(x: Any, centers: Any, s: float) -> Any:
    import torch

    x = torch.as_tensor(x)
    if not x.is_floating_point():
        x = x.to(torch.float64)
    centers = torch.as_tensor(centers, dtype=x.dtype, device=x.device)
    _check_pair(x, centers)
    shift = centers.mean(0)
    x = x - shift
    c = centers - shift
    d2 = (x * x).sum(1)[:, None] + (c * c).sum(1)[None, :] - 2.0 * (x @ c.T)
    k = torch.exp(d2.clamp_min_(0) * (-0.5 / (s * s)))
    return k.masked_fill_(k < torch.finfo(k.dtype).tiny, 0)


def _check_pair(x: Any, centers: Any) -> None:
    if x.ndim != 2 or centers.ndim != 2:
        raise ValueError(f"x and centers must be 2-D (rows × features), got shapes "
                         f"{tuple(x.shape)} and {tuple(centers.shape)}")
    if x.shape[1] != centers.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but centers have {centers.shape[1]}")
    if centers.shape[0] == 0:
        raise ValueError("centers is empty")
    lib = sys.modules["torch"] if _is_tensor(x) else np
    if not bool(lib.isfinite(x).all()) or not bool(lib.isfinite(centers).all()):
        raise ValueError("x or centers contain NaN or inf")


def median_distance(x: np.ndarray, max_samples: int = 1000, seed: int = 0) -> float:
    """Median pairwise Euclidean distance between distinct rows of x (on a subsample for big N)."""
    x = _as_samples(x, "x")
    if len(x) > max_samples:
        x = x[np.random.default_rng(seed).choice(len(x), max_samples, replace=False)]
    sq = (x * x).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    iu = np.triu_indices(len(x), k=1)
    return float(np.sqrt(np.maximum(np.median(d2[iu]), 0.0))) if len(iu[0]) else 0.0


def sigma_grid_around(median: float, num: int = 9, span: float = 8.0) -> list[float]:
    """Log-spaced widths median × [1/span … span] (num values)."""
    m = _check_sigma(median)
    return [float(m * f) for f in np.geomspace(1.0 / span, span, num)]


# --------------------------------------------------------------------------------------------
# solver


@dataclass
class KliepSolution:
    """Output of :func:`solve_kliep`.

    objective: mean log ŵ over the target rows. gap: max_l g_l / b_l - 1 with g the gradient of
    the objective; the objective is at most `gap` below its optimum (0 at the optimum).
    stop_reason: "gap" (within gap_tol of the optimum), "rel_change" (the objective stopped
    improving), "no_ascent" (no step improves it at machine precision) or "max_iter".
    """

    alpha: np.ndarray
    objective: float
    iterations: int
    converged: bool
    gap: float
    stop_reason: str


def _project_simplex(v: np.ndarray) -> np.ndarray | None:
    """Euclidean projection onto {β ≥ 0, Σβ = 1} (sort-based); None if v is not finite."""
    if not np.all(np.isfinite(v)):
        return None
    u = np.sort(v)[::-1]
    lam = (np.cumsum(u) - 1.0) / np.arange(1, len(u) + 1)
    k = np.nonzero(u > lam)[0]
    return np.maximum(v - lam[k[-1]], 0.0) if len(k) else None


def _project_reference(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """The reference algorithm's map onto b·α = 1, α ≥ 0 (not a Euclidean projection)."""
    a = np.maximum(a + (1.0 - b @ a) * b / (b @ b), 0.0)
    s = b @ a
    return a / s if s > 0 and np.all(np.isfinite(a)) else None


def _newton_target(g: np.ndarray, h: np.ndarray, x: np.ndarray) -> np.ndarray | None:
    """Maximiser over y ≥ 0 of the quadratic model of φ(β) = mean log(Ãβ) - Σβ around x.

    φ has the same maximiser as the objective on the simplex (scaling β by c changes φ by
    log c - (c-1)Σβ, so Σβ = 1 at the optimum) but only bound constraints, which makes the
    subproblem a non-negative least-squares problem (as in mix-SQP, Kim et al. 2020): with
    h + δI = RᵀR, minimise ||R y - R⁻ᵀ q|| over y ≥ 0, q = g - 1 + h x. The small ridge δ keeps
    it well posed, since h is nearly singular when kernel columns overlap. b-dimensional work
    only: no pass over the data.
    """
    from scipy.linalg import cholesky, solve_triangular
    from scipy.optimize import nnls

    nb = len(x)
    hr = h + (1e-8 * np.trace(h) / nb + 1e-300) * np.eye(nb)
    try:
        r = cholesky(hr)
        y, _ = nnls(r, solve_triangular(r.T, g - 1.0 + hr @ x, lower=True), maxiter=50 * nb)
    except (np.linalg.LinAlgError, RuntimeError, ValueError):
        return None
    return y if np.all(np.isfinite(y)) and y.sum() > 0 else None


class _Pass:
    """One streamed pass over the target kernel blocks: objective, gradient (and Hessian) at α."""

    def __init__(self, blocks: Blocks, nb: int, backend: str, device: str):
        self.nb, self.backend, self.device = nb, backend, device
        self.checked = self.single = False
        if isinstance(blocks, Iterator):
            raise ValueError("target_kernel_blocks is a one-shot iterator, but every iteration "
                             "streams the blocks again: pass a callable returning a fresh iterator")
        if callable(blocks):
            self.get_blocks = blocks
        elif isinstance(blocks, (list, tuple)):
            self.get_blocks = lambda: blocks
        else:
            # A single matrix is converted (and moved to the device) once, not on every pass.
            one = self._convert(blocks, check=True)
            self.checked = self.single = True
            self.get_blocks = lambda: (one,)

    def _convert(self, blk: Any, check: bool) -> Any:
        """float64 on the backend's device, tiny values flushed to 0 (a copy: never edits input)."""
        if self.backend == "torch":
            import torch
            blk, lib = torch.as_tensor(blk, dtype=torch.float64, device=self.device), torch
        else:
            blk, lib = np.asarray(blk.detach().cpu() if _is_tensor(blk) else blk, dtype=np.float64), np
        if check:
            if blk.ndim != 2 or blk.shape[1] != self.nb:
                raise ValueError(f"target kernel block has shape {tuple(blk.shape)}, expected "
                                 f"(rows, {self.nb}) to match source_kernel_mean")
            if not bool(lib.isfinite(blk).all()) or bool((blk < 0).any()):
                raise ValueError("target kernel blocks must be finite and non-negative")
        return lib.where(blk < _FLUSH, 0.0, blk)

    def __call__(self, alpha: np.ndarray, hessian: bool) -> tuple[float, np.ndarray, np.ndarray | None]:
        """mean log(Aα), its gradient Aᵀ(1/Aα)/n and, if asked, minus its Hessian MᵀM/n (M = A/Aα)."""
        if self.backend == "torch":
            import torch
            a = torch.as_tensor(alpha, dtype=torch.float64, device=self.device)
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            grad = torch.zeros(self.nb, dtype=torch.float64, device=self.device)
            hess = torch.zeros((self.nb, self.nb), dtype=torch.float64, device=self.device)
            log = torch.log
        else:
            a, total, grad = alpha, 0.0, np.zeros(self.nb)
            hess = np.zeros((self.nb, self.nb)) if hessian else None
            log = np.log
        n = 0
        for blk in self.get_blocks():
            if not self.single:
                blk = self._convert(blk, check=not self.checked)
            w = blk @ a
            w = w.clamp_min(_W_FLOOR) if self.backend == "torch" else np.maximum(w, _W_FLOOR)
            total = total + log(w).sum()
            m = blk / w[:, None]
            grad += m.sum(0)
            if hessian:
                m[m < _FLUSH] = 0
                hess += m.T @ m
            n += blk.shape[0]
        if n == 0:
            raise ValueError("target kernel blocks are empty (no rows)")
        self.checked = True
        if self.backend == "torch":
            total, grad = total.item(), grad.cpu().numpy()
            hess = hess.cpu().numpy() if hessian else None
        return float(total) / n, grad / n, (hess / n if hessian else None)


def _resolve_backend(device: str, backend: str) -> tuple[str, str]:
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if backend == "auto":
        backend = "torch" if device.startswith("cuda") else "numpy"
    if backend not in ("numpy", "torch"):
        raise ValueError(f"backend must be 'auto', 'numpy' or 'torch', got {backend!r}")
    if backend == "numpy" and device != "cpu":
        raise ValueError("backend='numpy' runs on the CPU only; use backend='torch' for cuda")
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' requested but torch sees no CUDA GPU")
    return device, backend


def solve_kliep(
    target_kernel_blocks: Blocks,
    source_kernel_mean: Any,
    *,
    alpha0: np.ndarray | None = None,
    method: str = "newton",
    tol: float = 1e-9,
    gap_tol: float = 1e-6,
    max_iter: int = 1000,
    device: str = "auto",
    backend: str = "auto",
) -> KliepSolution:
    """Maximise mean_j log(A_j·α) subject to b·α = 1, α ≥ 0 (the KLIEP problem).

    target_kernel_blocks: A, the target-vs-centres kernel matrix (n × b): one array/tensor, a
        list of blocks, or a callable returning a fresh iterator of (n_i × b) blocks each time it
        is called (every iteration streams over all blocks once). float32 is fine; sums are float64.
    source_kernel_mean: b, the mean over source rows of the source-vs-centres kernel (length b);
        see :func:`kernel_column_mean` for streamed source rows.
    alpha0: warm start, e.g. the α of a fit on a subsample with the same centres and σ.
    method: the problem is concave; all methods ascend in β_l = b_l α_l, where the feasible set
        is the probability simplex, and every accepted step increases the objective.
        "newton" (default): sequential quadratic programming. Each pass also accumulates the
            b × b Hessian; the quadratic model is maximised without touching the data (a
            non-negative least-squares problem, see _newton_target), then a backtracking line
            search along that direction. Typically 3-40 passes; the Hessian costs O(n b²) per
            pass against O(n b) for the gradient, which is cheap next to reading the blocks.
        "pgd": the reference algorithm's projected gradient ascent with an exact projection and an
            adaptive step (×2 after an accepted step, ×1/4 after a rejected one). One pass per
            step, but thousands of passes when the kernel columns are nearly collinear (small
            dimension, many centres): 20,000 passes left 1-D/2-D toy problems 1e-4–6e-3 nats short.
        "reference": the same with the reference's α ← α + (1 - b·α) b/(b·b); α ← max(0, α);
            α ← α/(b·α) in α-coordinates. That map is not a projection: when the optimum has some
            α_l = 0 its fixed points lie below the optimum, and it stalled 0.02–0.3 nats short in
            our tests. Kept for comparison only.
    tol: also stop when the objective improved by less than tol·max(1, |f|) over 10 steps.
    gap_tol: stop when `gap` (see KliepSolution) is below it: a certificate of optimality.
    max_iter: safety net on the number of passes over the blocks (the cost unit: iterations).
    device / backend: "auto" runs the passes on CUDA through torch when available, else numpy;
        backend="torch", device="cpu" runs the torch code on the CPU. The b-dimensional
        updates always run in numpy float64.
    """
    if method not in ("newton", "pgd", "reference"):
        raise ValueError(f"method must be 'newton', 'pgd' or 'reference', got {method!r}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    b = np.asarray(source_kernel_mean.detach().cpu() if _is_tensor(source_kernel_mean)
                   else source_kernel_mean, dtype=np.float64)
    if b.ndim != 1 or b.size == 0:
        raise ValueError(f"source_kernel_mean must be a non-empty 1-D vector, got shape {b.shape}")
    if not np.all(np.isfinite(b)) or np.any(b < 0):
        raise ValueError("source_kernel_mean must be finite and non-negative")
    if b.max() <= 0:
        raise ValueError("source_kernel_mean is all zero: no source sample is near any centre "
                         "(sigma too small for these data?)")
    device, backend = _resolve_backend(device, backend)
    f_pass = _Pass(target_kernel_blocks, b.size, backend, device)
    newton, ref = method == "newton", method == "reference"

    on = b > _B_REL_FLOOR * b.max()  # centres the constraint can bound
    bo = b[on]

    def to_alpha(x: np.ndarray) -> np.ndarray:
        a = np.zeros_like(b)
        a[on] = x if ref else x / bo
        return a

    x0 = np.ones(bo.size)
    if alpha0 is not None:
        a0 = np.asarray(alpha0, dtype=np.float64)
        if a0.shape != b.shape or not np.all(np.isfinite(a0)) or np.any(a0 < 0):
            raise ValueError(f"alpha0 must be finite, non-negative and of length {b.size}")
        if (a0[on] * bo).sum() > 0:
            x0 = a0[on] if ref else a0[on] * bo
    # A rescaled warm start is feasible, so a converged α0 comes back unchanged.
    x = _project_reference(x0, bo) if ref else x0 / x0.sum()
    step = 1.0 / float(bo @ bo) if ref else 1.0  # the β-gradient is ~1 per coordinate near the optimum

    f, g, h = f_pass(to_alpha(x), newton)
    it, history, stop = 1, [f], ""
    while not stop:
        gap = float(np.max(g[on] / bo) - 1.0)
        if gap <= gap_tol:
            stop = "gap"
        elif len(history) > 10 and history[-1] - history[-11] <= tol * max(1.0, abs(f)):
            stop = "rel_change"
        if stop:
            break
        if newton:
            y = _newton_target(g[on] / bo, h[np.ix_(on, on)] / np.outer(bo, bo), x)
            if y is None:  # fall back to a gradient step for this iteration
                y = _project_simplex(x + g[on] / bo)
            if y is None:
                stop = "no_ascent"
                break
            direction, step = y - x, 1.0
        rejects = 0
        while True:  # one step: shrink it until the objective increases
            if it >= max_iter:
                stop = "max_iter"
                break
            if rejects >= 40:  # below float resolution: nothing left to gain
                stop = "no_ascent"
                break
            if newton:
                cand = x + step * direction  # between two points ≥ 0: stays ≥ 0
                cand = cand / cand.sum()  # rescaling onto the simplex only increases φ
            elif ref:
                cand = _project_reference(x + step * g[on], bo)
            else:
                cand = _project_simplex(x + step * g[on] / bo)
            fc = -math.inf
            if cand is not None:
                fc, gc, hc = f_pass(to_alpha(cand), newton)
                it += 1
            if fc > f:
                x, f, g, h = cand, fc, gc, hc
                history.append(f)
                step = step if newton else step * 2
                break
            step, rejects = step / (2 if newton else 4), rejects + 1
    gap = float(np.max(g[on] / bo) - 1.0)
    converged = stop in ("gap", "rel_change") or (stop == "no_ascent" and not ref)
    return KliepSolution(alpha=to_alpha(x), objective=f, iterations=it, converged=converged,
                         gap=gap, stop_reason=stop)


def kernel_column_mean(blocks: Blocks) -> np.ndarray:
    """Mean over rows of a kernel matrix given as one array or an iterable/callable of blocks.

    This is b = mean_i K(x_i^source, c_l) for :func:`solve_kliep` from streamed source rows.
    """
    if callable(blocks) and not isinstance(blocks, np.ndarray):
        blocks = blocks()
    elif isinstance(blocks, np.ndarray) or _is_tensor(blocks):
        blocks = (blocks,)
    total, n = None, 0
    for blk in blocks:
        blk = np.asarray(blk.detach().cpu() if _is_tensor(blk) else blk, dtype=np.float64)
        if blk.ndim != 2 or (total is not None and blk.shape[1] != total.size):
            raise ValueError(f"kernel block has shape {blk.shape}, expected (rows, centres)")
        if not np.all(np.isfinite(blk)):
            raise ValueError("kernel blocks contain NaN or inf")
        total = blk.sum(0) if total is None else total + blk.sum(0)
        n += blk.shape[0]
    if n == 0:
        raise ValueError("kernel blocks are empty (no rows)")
    return total / n


# --------------------------------------------------------------------------------------------
# model selection and the fitted model


def _as_samples(x: Any, name: str) -> np.ndarray:
    """Validated float64 (n, D) array; a 1-D array is taken as n scalar samples."""
    if _is_tensor(x):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D (samples × features), got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {x.shape})")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _sq_dists(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    # Distances do not depend on σ, so CV computes them once per fold and only re-exponentiates.
    shift = c.mean(0)
    x, c = x - shift, c - shift
    return np.maximum((x * x).sum(1)[:, None] + (c * c).sum(1)[None, :] - 2.0 * (x @ c.T), 0.0)


def _check_pair_samples(source: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    source, target = _as_samples(source, "source"), _as_samples(target, "target")
    if source.shape[1] != target.shape[1]:
        raise ValueError(f"source has {source.shape[1]} features but target has {target.shape[1]}")
    for name, x in (("source", source), ("target", target)):
        if np.all(x == x[0]):
            raise ValueError(f"{name} is degenerate: all {len(x)} samples are identical")
    return source, target


def select_sigma(
    source: Any,
    target: Any,
    num_centers: int = 100,
    folds: int = 5,
    seed: int = 0,
    sigma_grid: Iterable[float] | None = None,
    median_samples: int = 1000,
    **solver_kw: Any,
) -> tuple[float, list[tuple[float, float]]]:
    """Pick σ by likelihood cross-validation (LCV); returns (best σ, [(σ, score) per candidate]).

    Both domains are split into `folds` folds. For fold k the model is fitted on the other folds
    only: centres drawn from the training targets (at most num_centers), α from the training
    targets, and the constraint mean ŵ = 1 over the training sources. It is scored on the held-out
    samples by the log-likelihood of the normalised target model p̂_t = ŵ p_s / Z:

        score_k = mean_{held targets} log ŵ(x)  -  log max(1, mean_{held sources} ŵ(x))

    (ŵ floored at 1e-100, so a target no centre reaches costs ≈ -230). Holding out targets alone
    is not enough: a narrow model normalised on the very sources it is scored against puts large
    α on centres that happen to have few sources nearby, and its held-out target likelihood then
    beats the true ratio's. The held-out sources expose that (Z ≫ 1). Z < 1 earns no credit, as a
    spiky ŵ that the few held-out sources miss would otherwise be rewarded.

    Default grid: median pairwise distance of the pooled samples × [1/8 … 8], 9 log-spaced values
    (pooled, because the ratio needs the source density resolved as well as the target's).
    """
    source, target = _check_pair_samples(source, target)
    if folds < 2:
        raise ValueError(f"folds must be >= 2 for cross-validation, got {folds}")
    if min(len(source), len(target)) < 2 * folds:
        raise ValueError(f"need at least 2*folds={2 * folds} source and target samples for "
                         f"{folds}-fold CV, got {len(source)} and {len(target)}")
    if num_centers < 1:
        raise ValueError(f"num_centers must be >= 1, got {num_centers}")
    rng = np.random.default_rng(seed)
    if sigma_grid is None:
        half = max(median_samples // 2, 2)
        pooled = [x[rng.choice(len(x), half, replace=False)] if len(x) > half else x
                  for x in (source, target)]
        med = median_distance(np.concatenate(pooled), median_samples, seed)
        if med <= 0:
            raise ValueError("the samples are degenerate: median pairwise distance is 0")
        grid = sigma_grid_around(med)
    else:
        grid = [_check_sigma(s) for s in sigma_grid]
        if not grid:
            raise ValueError("sigma_grid is empty")

    t_parts = np.array_split(rng.permutation(len(target)), folds)
    s_parts = np.array_split(rng.permutation(len(source)), folds)
    fold_data = []  # squared distances to the fold's centres; σ only rescales them
    for k in range(folds):
        t_train = target[np.concatenate(t_parts[:k] + t_parts[k + 1:])]
        s_train = source[np.concatenate(s_parts[:k] + s_parts[k + 1:])]
        centers = t_train[rng.choice(len(t_train), min(num_centers, len(t_train)), replace=False)]
        fold_data.append([_sq_dists(x, centers)
                          for x in (t_train, s_train, target[t_parts[k]], source[s_parts[k]])])

    scores = []
    for s in grid:
        c = -0.5 / (s * s)
        fold_scores = []
        for d_t, d_s, d_t_held, d_s_held in fold_data:
            b = np.exp(c * d_s).mean(0)
            if b.max() <= 0:  # σ so small that no source reaches any centre: worst score
                fold_scores.append(math.log(_W_FLOOR))
                continue
            alpha = solve_kliep(np.exp(c * d_t), b, **solver_kw).alpha
            w_t = np.exp(c * d_t_held) @ alpha
            z = float(np.mean(np.exp(c * d_s_held) @ alpha))
            fold_scores.append(float(np.mean(np.log(np.maximum(w_t, _W_FLOOR))))
                               - math.log(max(z, 1.0)))
        scores.append((float(s), float(np.mean(fold_scores))))
    best = max(scores, key=lambda t: t[1])[0]
    if len(grid) > 2 and best in (min(grid), max(grid)):
        warnings.warn(f"KLIEP CV picked sigma={best:.4g} at the edge of the grid "
                      f"[{min(grid):.4g}, {max(grid):.4g}]; consider a wider sigma_grid",
                      stacklevel=2)
    return best, scores


@dataclass
class KliepResult:
    """A fitted KLIEP model ŵ(x) = Σ_l alpha_l exp(-||x - c_l||² / 2σ²) ≈ p_target / p_source."""

    sigma: float
    centers: np.ndarray
    alpha: np.ndarray
    cv_scores: list[tuple[float, float]] = field(default_factory=list)
    iterations: int = 0
    converged: bool = False
    objective: float = float("nan")  # mean log ŵ over the fitting targets

    def weights(self, x: Any, batch_size: int = 65536) -> np.ndarray:
        """ŵ(x) for rows of x (float64), in batches so a big x never makes a big kernel matrix."""
        x = _as_samples(x, "x")
        if x.shape[1] != self.centers.shape[1]:
            raise ValueError(f"x has {x.shape[1]} features, the model has {self.centers.shape[1]}")
        return np.concatenate([gaussian_kernel(x[i:i + batch_size], self.centers, self.sigma)
                               @ self.alpha for i in range(0, len(x), batch_size)])

    def with_alpha(self, alpha: KliepSolution | np.ndarray) -> KliepResult:
        """Same σ and centres with a new α, e.g. refitted at full scale by solve_kliep."""
        sol = alpha if isinstance(alpha, KliepSolution) else None
        a = np.asarray(sol.alpha if sol else alpha, dtype=np.float64)
        if a.shape != self.alpha.shape:
            raise ValueError(f"alpha has shape {a.shape}, expected {self.alpha.shape}")
        return KliepResult(self.sigma, self.centers, a, list(self.cv_scores),
                           sol.iterations if sol else 0, sol.converged if sol else False,
                           sol.objective if sol else float("nan"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (floats keep full precision through json)."""
        return {"sigma": self.sigma, "centers": self.centers.tolist(), "alpha": self.alpha.tolist(),
                "cv_scores": [[s, v] for s, v in self.cv_scores], "iterations": self.iterations,
                "converged": self.converged, "objective": self.objective}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KliepResult:
        return cls(sigma=float(d["sigma"]), centers=np.asarray(d["centers"], dtype=np.float64),
                   alpha=np.asarray(d["alpha"], dtype=np.float64),
                   cv_scores=[(float(s), float(v)) for s, v in d.get("cv_scores", [])],
                   iterations=int(d.get("iterations", 0)), converged=bool(d.get("converged", False)),
                   objective=float(d.get("objective", float("nan"))))


def fit_kliep(
    source: Any,
    target: Any,
    sigma: float | None = None,
    num_centers: int = 100,
    folds: int = 5,
    seed: int = 0,
    sigma_grid: Iterable[float] | None = None,
    device: str = "auto",
    backend: str = "auto",
    **solver_kw: Any,
) -> KliepResult:
    """Fit ŵ ≈ p_target / p_source from samples (rows; a 1-D array is n scalar samples).

    fit_kliep(source=syn, target=real).weights(x_syn) gives w = p_real / p_syn for synthetic
    samples; swap the roles for ψ = p_syn / p_real on real samples.

    sigma=None selects σ with :func:`select_sigma` (honest likelihood CV over the targets; every
    candidate's score is kept in .cv_scores). The final model uses num_centers centres drawn
    without replacement from all targets and every sample; mean ŵ over the source rows is 1.
    Extra keyword arguments (tol, gap_tol, max_iter, projection) go to :func:`solve_kliep`.
    """
    source, target = _check_pair_samples(source, target)
    if num_centers < 1 or num_centers > len(target):
        raise ValueError(f"num_centers must be in [1, {len(target)}] (the number of target "
                         f"samples), got {num_centers}")
    solver_kw.update(device=device, backend=backend)
    cv_scores: list[tuple[float, float]] = []
    if sigma is None:
        sigma, cv_scores = select_sigma(source, target, num_centers, folds, seed, sigma_grid,
                                        **solver_kw)
    sigma = _check_sigma(sigma)
    rng = np.random.default_rng([seed, 1])  # independent of the CV's draws
    centers = target[rng.choice(len(target), num_centers, replace=False)]
    b = gaussian_kernel(source, centers, sigma).mean(0)
    sol = solve_kliep(gaussian_kernel(target, centers, sigma), b, **solver_kw)
    return KliepResult(sigma=sigma, centers=centers, alpha=sol.alpha, cv_scores=cv_scores,
                       iterations=sol.iterations, converged=sol.converged, objective=sol.objective)


# --------------------------------------------------------------------------------------------
# report helpers


def _as_weights(w: Any) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64).ravel()
    if w.size == 0:
        raise ValueError("weights are empty")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and non-negative")
    if w.sum() <= 0:
        raise ValueError("weights are all zero")
    return w


def effective_sample_size(w: Any) -> float:
    """Kish's effective sample size (Σw)² / Σw²: n for equal weights, 1 if one weight dominates."""
    w = _as_weights(w)
    s = w / w.max()  # scale-free, and avoids overflow in the squares
    return float(s.sum() ** 2 / (s * s).sum())


def clip_weights(w: Any, max_weight: float) -> tuple[np.ndarray, int]:
    """Clip the largest weights and renormalise to mean 1 so that afterwards none exceeds max_weight.

    Renormalising after a plain clip would push the clipped weights above max_weight again, so the
    clip threshold t is solved for: t / mean(min(w, t)) = max_weight (bisection; the left side
    increases with t). Returns (weights with mean 1, number of weights that were clipped).
    """
    w = _as_weights(w)
    m = float(max_weight)
    if not math.isfinite(m) or m < 1:
        raise ValueError(f"max_weight must be finite and >= 1 (weights have mean 1), got {max_weight}")
    if w.max() <= m * w.mean():
        return w / w.mean(), 0
    lo, hi = 0.0, float(w.max())
    for _ in range(200):
        t = 0.5 * (lo + hi)
        if t / np.minimum(w, t).mean() > m:
            hi = t
        else:
            lo = t
        if hi - lo <= 1e-15 * hi:
            break
    c = np.minimum(w, lo)
    return c / c.mean(), int(np.count_nonzero(w > lo))
