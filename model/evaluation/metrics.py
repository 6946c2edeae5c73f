"""Pure metric math, apart from feature extraction: feature statistics, Fréchet distance, CLIP score.

Follows EDM's `fid.py` / pytorch-fid: FID = ‖μ₁−μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½), with `scipy.linalg.sqrtm` and
an `eps·I` offset on both covariances when their product is singular (scipy warns, or the root is not finite),
e.g. with fewer images than feature dimensions. CLIP score as in Hessel et al. / torchmetrics: 100·max(cos, 0).
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FID_EPS = 1e-6  # pytorch-fid's offset
IMAG_TOLERANCE = 1e-3  # largest imaginary component tolerated in sqrtm's result (pytorch-fid's check)


@dataclass(frozen=True)
class FeatureStats:
    """Mean (D,) and covariance (D, D) of N feature vectors, float64."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    @classmethod
    def from_features(cls, features: np.ndarray) -> "FeatureStats":
        """Statistics of features (N, D); N ≥ 2 (covariance uses N − 1, like torch-fidelity and pytorch-fid)."""
        feats = np.asarray(features, dtype=np.float64)
        if feats.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {feats.shape}")
        if feats.shape[0] < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {feats.shape[0]}")
        if not np.isfinite(feats).all():
            raise ValueError("features contain NaN or infinite values")
        return cls(mu=feats.mean(axis=0), sigma=np.cov(feats, rowvar=False), count=int(feats.shape[0]))

    def save(self, path: str | os.PathLike) -> None:
        """Write `mu`, `sigma`, `count` to an .npz (no pickle), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, mu=self.mu, sigma=self.sigma, count=np.int64(self.count))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        with np.load(path, allow_pickle=False) as data:
            return cls(mu=data["mu"], sigma=data["sigma"], count=int(data["count"]))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = FID_EPS) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): means (D,), covariances (D, D)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"means must both be (D,), got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must both be ({d}, {d}), got {sigma1.shape} and {sigma2.shape}")
    if not all(np.isfinite(x).all() for x in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("statistics contain NaN or infinite values")

    from scipy import linalg

    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("error", linalg.LinAlgWarning)  # "singular, may be inaccurate" -> offset below
        try:
            covmean = linalg.sqrtm(sigma1 @ sigma2)
            singular = not np.isfinite(covmean).all()
        except linalg.LinAlgWarning:
            singular = True
    if singular:  # e.g. fewer images than feature dimensions
        log.debug("FID: product of covariances is singular; adding %g to the diagonals", eps)
        offset = np.eye(d) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError("FID: sqrtm of the covariance product is not finite even with the eps offset")
    if np.iscomplexobj(covmean):
        largest = np.max(np.abs(covmean.imag))
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAG_TOLERANCE):
            raise ValueError(f"FID: sqrtm has an imaginary component {largest:.3g}; statistics are ill-conditioned")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_stats(a: FeatureStats, b: FeatureStats, eps: float = FID_EPS) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, eps)


def clip_score(image_embeddings, text_embeddings):
    """Per-pair CLIP score 100·max(cos(image_i, text_i), 0): embeddings (N, D) each -> (N,).

    Works on numpy arrays or torch tensors (returns the same kind); embeddings need not be normalised.
    """
    is_torch = hasattr(image_embeddings, "detach")
    img = image_embeddings.detach().double().cpu().numpy() if is_torch else np.asarray(image_embeddings, np.float64)
    txt = text_embeddings.detach().double().cpu().numpy() if hasattr(text_embeddings, "detach") else np.asarray(
        text_embeddings, np.float64)
    if img.ndim != 2 or img.shape != txt.shape:
        raise ValueError(f"image and text embeddings must both be (N, D), got {img.shape} and {txt.shape}")
    norms = np.linalg.norm(img, axis=1) * np.linalg.norm(txt, axis=1)  # (N,)
    if (norms == 0).any() or not np.isfinite(norms).all():
        raise ValueError("an embedding is zero or not finite: cosine similarity is undefined")
    scores = 100.0 * np.maximum((img * txt).sum(axis=1) / norms, 0.0)  # (N,)
    if is_torch:
        import torch

        return torch.from_numpy(scores)
    return scores
