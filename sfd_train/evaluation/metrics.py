"""The numbers of ADM's evaluator (guided-diffusion ``evaluations/evaluator.py``), from features.

* **FID** between two Gaussians ``(mu, sigma)`` of Inception ``pool_3`` features (2048-d);
  **sFID** the same on the first 7 channels of ``mixed_6/conv`` (17 x 17 x 7 = 2023-d).
  Covariances are ``np.cov`` (unbiased). The trace term ``tr sqrtm(S1 S2)`` is computed as
  the sum of the square roots of the eigenvalues of the symmetric ``sqrt(S1) S2 sqrt(S1)`` in
  float64, which stays accurate for nearly singular covariances, where ``scipy.linalg.sqrtm``
  of the non-symmetric product can fail or return complex garbage.
* **Inception Score**: softmax of the ``pool_3`` features times the 1008-way logits weights
  (no bias), in splits of 5,000: ``mean over splits of exp(mean_i KL(p_i || mean p))``.
* **Precision and recall** (Kynkäänniemi et al.): each set's manifold is the union of balls
  around its features whose radius is the squared distance to the 3rd nearest neighbour in
  the same set; precision is the fraction of samples inside the reference manifold, recall
  the fraction of references inside the sample manifold. Distances are squared Euclidean in
  float32 (ADM computes them in float16 first, which moves rare points on a boundary).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sfd_train.evaluation.sources import EvalInputError

IS_SPLIT = 5000
NEIGHBOURS = 3


@dataclass
class GaussianStats:
    """Mean and covariance of a set of features (what ADM's reference batches store as mu, sigma)."""

    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> "GaussianStats":
        features = np.asarray(features, dtype=np.float64)
        if len(features) < 2:
            raise EvalInputError(f"a covariance needs at least 2 feature vectors, got {len(features)}")
        return cls(features.mean(axis=0), np.cov(features, rowvar=False))


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (negative
    eigenvalues from rounding are clipped to 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr sqrtm(sigma1 @ sigma2)`` for covariance matrices, stably (float64, symmetric eigenvalues)."""
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root = _sqrt_psd(sigma1)
    middle = root @ sigma2 @ root
    values = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(values, 0.0, None)).sum())


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """``|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrtm(S1 S2)``."""
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise EvalInputError(f"the two sets' statistics have different dimensions: {a.mu.shape} and {b.mu.shape}")
    diff = np.asarray(a.mu, np.float64) - np.asarray(b.mu, np.float64)
    value = diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * trace_sqrt_product(a.sigma, b.sigma)
    return float(max(value, 0.0))


def inception_score(probabilities: np.ndarray, split: int = IS_SPLIT) -> float:
    """ADM's Inception Score of class probabilities (N, classes), in consecutive splits of ``split``."""
    p = np.asarray(probabilities, dtype=np.float64)
    if len(p) < split:
        raise ValueError(f"the Inception Score is taken over splits of {split} samples; got {len(p)}")
    scores = []
    for start in range(0, len(p), split):
        part = p[start:start + split]
        kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def _squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (len(u), len(v)), as ADM computes them (norms minus twice the products)."""
    d = (u * u).sum(1, keepdim=True) - 2.0 * (u @ v.T) + (v * v).sum(1)[None]
    return d.clamp_min_(0.0)


def manifold_radii(features: np.ndarray, k: int = NEIGHBOURS, block: int = 4096,
                   device: torch.device | str = "cpu") -> np.ndarray:
    """Squared distance of each feature to its k-th nearest neighbour in the same set (itself excluded)."""
    x = torch.as_tensor(np.asarray(features, np.float32), device=device)
    if len(x) <= k:
        raise EvalInputError(f"precision and recall (k = {k}) need more than {k} images per set, got {len(x)}")
    radii = torch.empty(len(x), dtype=torch.float32)
    for start in range(0, len(x), block):
        d = _squared_distances(x[start:start + block], x)
        radii[start:start + block] = torch.kthvalue(d, k + 1, dim=1).values.cpu()  # k + 1: the point itself is 0
    return radii.numpy()


def inside_manifold(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, block: int = 4096,
                    device: torch.device | str = "cpu") -> np.ndarray:
    """Whether each point lies within some centre's ball (squared distance <= that centre's radius)."""
    p = torch.as_tensor(np.asarray(points, np.float32), device=device)
    c = torch.as_tensor(np.asarray(centres, np.float32), device=device)
    r = torch.as_tensor(np.asarray(radii, np.float32), device=device)
    inside = torch.zeros(len(p), dtype=torch.bool)
    for start in range(0, len(p), block):
        d = _squared_distances(p[start:start + block], c)
        inside[start:start + block] = (d <= r[None]).any(dim=1).cpu()
    return inside.numpy()


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = NEIGHBOURS,
                     device: torch.device | str = "cpu") -> tuple[float, float]:
    """``(precision, recall)`` of ``samples`` against ``reference`` (both (N, D) ``pool_3`` features)."""
    reference_radii = manifold_radii(reference, k, device=device)
    sample_radii = manifold_radii(samples, k, device=device)
    precision = inside_manifold(samples, reference, reference_radii, device=device).mean()
    recall = inside_manifold(reference, samples, sample_radii, device=device).mean()
    return float(precision), float(recall)
