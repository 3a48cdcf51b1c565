"""Distances between two sets of judge features (real test images and samples), for ``tasks.judging.evaluate``.

* FID: the Fréchet distance between Gaussians fitted to the two sets (Heusel et al. 2017);
* KID: the squared MMD with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, unbiased, averaged
  over random subsets, with the standard deviation of the subset estimates as its ± (Bińkowski et al.
  2018, "Demystifying MMD GANs", §4; the estimator of their code, torchmetrics and clean-fid). Unlike FID
  it is unbiased, so it is ~0 for two samples of one distribution at any sample size. Evaluation draws
  subsets of at most half the smaller set (``kid_subset_size``) so that the subsets, and so the std, vary;
* k-NN precision / recall / density / coverage (Kynkäänniemi et al. 2019; Naeem et al. 2020);
* intra-class diversity (mean pairwise distance within a class).

``too_few(n_real, n_fake)`` says why a set is too small for the set statistics (below ``MIN_SET_SIZE``
the covariance and the kernel means are noise, and a 1-image set has none at all); evaluation then
reports NaN with that reason instead of a number.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg

# Fewer images than this in either set: FID, KID and the k-NN statistics are reported as NaN with a reason.
MIN_SET_SIZE = 10
KID_SUBSETS = 100  # Bińkowski et al. 2018 / TF-GAN / torchmetrics defaults
KID_SUBSET_SIZE = 1000
_GRAM_LIMIT = 4000  # up to this many points in all, the kernel matrix is computed once (<= 128 MB float64)


def kid_subset_size(n_real: int, n_fake: int, cap: int = KID_SUBSET_SIZE) -> int:
    """The subset size evaluation uses for KID: ``cap``, at most half the smaller set. With subsets as large as
    a whole set every draw holds the same rows (permuted), and the std over subsets is 0 however noisy the
    estimate is; half-size subsets differ, so the std shows the estimate's sampling spread."""
    return max(2, min(cap, n_real // 2, n_fake // 2))


def too_few(n_real: int, n_fake: int, minimum: int = MIN_SET_SIZE) -> str | None:
    """Why FID / KID / k-NN statistics of these set sizes would be meaningless, or None when they are not."""
    if min(n_real, n_fake) >= minimum:
        return None
    return (f"FID, KID and k-NN statistics need at least {minimum} real and {minimum} generated images; "
            f"got {n_real} real and {n_fake} generated (reported as NaN)")


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) between two feature sets; NaN when either set has
    fewer than 2 rows (no covariance) or the features are not finite."""
    if min(len(f1), len(f2)) < 2 or not (np.isfinite(f1).all() and np.isfinite(f2).all()):
        return float("nan")
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.atleast_2d(np.cov(f1, rowvar=False)), np.atleast_2d(np.cov(f2, rowvar=False))
    with warnings.catch_warnings():  # singular products are handled just below
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():  # near-singular product: regularise (as in the reference code)
            eps = np.eye(len(s1)) * 1e-6
            covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real))


def polynomial_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x.y / d + 1)^3 for every row pair, (Na, Nb) (Bińkowski et al. 2018, KID's kernel)."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def mmd2_unbiased(k_xx: torch.Tensor, k_yy: torch.Tensor, k_xy: torch.Tensor) -> float:
    """The unbiased estimator of MMD^2 from kernel matrices (Gretton et al. 2012, Lemma 6), m x m, n x n, m x n:
    sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1)) - 2 sum_{i,j} k(x_i, y_j) / (m n)."""
    m, n = len(k_xx), len(k_yy)
    xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(xx + yy - 2 * k_xy.sum() / (m * n))


def kernel_inception_distance(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray, *,
                              subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
                              seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018) between two feature sets: (mean, std) of the unbiased MMD^2 with the cubic
    polynomial kernel over ``subsets`` random subsets of m = min(subset_size, |real|, |fake|) rows of each set,
    drawn without replacement (a fixed ``seed``, so two models are compared on the same subsets of the real
    set). NaN, NaN when either set has fewer than 2 rows."""
    r = torch.as_tensor(np.asarray(real)).double()
    f = torch.as_tensor(np.asarray(fake)).double()
    m = min(subset_size, len(r), len(f))
    if m < 2:
        return float("nan"), float("nan")
    z = torch.cat([r, f])
    gram = polynomial_kernel(z, z) if len(z) <= _GRAM_LIMIT else None

    def kernel(i: np.ndarray, j: np.ndarray) -> torch.Tensor:
        ti, tj = torch.from_numpy(i), torch.from_numpy(j)
        return gram[ti[:, None], tj[None, :]] if gram is not None else polynomial_kernel(z[ti], z[tj])

    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        i = rng.choice(len(r), m, replace=False)
        j = len(r) + rng.choice(len(f), m, replace=False)
        values.append(mmd2_unbiased(kernel(i, i), kernel(j, j), kernel(i, j)))
    return float(np.mean(values)), float(np.std(values))


def _pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a.double(), b.double())  # (Na, Nb) Euclidean


def knn_radii(feats: torch.Tensor | np.ndarray, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point, (N,). Row chunks keep memory
    at chunk x N distances (a 10k-image test split would otherwise need a 10k x 10k matrix)."""
    f = torch.as_tensor(np.asarray(feats)).double()
    kth = min(k + 1, len(f))  # +1: the point itself is at distance 0
    return torch.cat([_pairwise(f[i:i + chunk], f).kthvalue(kth, dim=1).values for i in range(0, len(f), chunk)])


def precision_recall(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray,
                     k: int = 3, chunk: int = 1024) -> dict[str, float]:
    """Improved precision / recall (Kynkäänniemi et al. 2019) and density / coverage (Naeem et
    al. 2020) with k-NN hyperspheres in a feature space.

    * precision: share of fake points inside some real point's k-NN ball (fidelity);
    * recall: share of real points inside some fake point's k-NN ball (diversity / coverage
      of the real manifold);
    * density: mean count of real balls containing a fake point, / k (≈1 for matched sets);
    * coverage: share of real points whose ball holds at least one fake point.
    """
    r = torch.as_tensor(np.asarray(real)).double()
    f = torch.as_tensor(np.asarray(fake)).double()
    r_real, r_fake = knn_radii(r, k, chunk), knn_radii(f, k, chunk)
    precise, density = 0, 0.0
    covered = torch.zeros(len(r), dtype=torch.bool)  # real r's ball holds a fake point
    recalled = torch.zeros(len(r), dtype=torch.bool)  # real r lies in some fake point's ball
    for i in range(0, len(f), chunk):
        d = _pairwise(f[i:i + chunk], r)  # (chunk, R)
        inside_real = d <= r_real[None, :]  # fake inside real r's ball
        precise += int(inside_real.any(1).sum())
        density += float(inside_real.double().sum())
        covered |= inside_real.any(0)
        recalled |= (d <= r_fake[i:i + chunk, None]).any(0)
    return {
        "precision": precise / len(f),
        "recall": float(recalled.double().mean()),
        "density": density / (k * len(f)),
        "coverage": float(covered.double().mean()),
    }


def intra_class_diversity(feats: torch.Tensor | np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of the mean pairwise feature distance between members of a class."""
    f = torch.as_tensor(np.asarray(feats)).double()
    labels = np.asarray(labels)
    per_class = []
    for c in np.unique(labels):
        idx = torch.from_numpy(np.flatnonzero(labels == c))
        if len(idx) < 2:
            continue
        d = _pairwise(f[idx], f[idx])
        per_class.append(float(d.sum() / (len(idx) * (len(idx) - 1))))
    return float(np.mean(per_class)) if per_class else float("nan")
