"""Metric math against independent computations; FID features from the registered tiny extractor."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from model.evaluation.metrics import FeatureStats, clip_score, frechet_distance, frechet_distance_stats

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread on shared cores


def _random_psd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / (rank or d)


def _frechet_eigh(mu1, s1, mu2, s2) -> float:
    """Independent route: Tr((S1 S2)^½) = Σ √λ(A S2 A) with A = S1^½ from an eigen-decomposition (symmetric)."""
    w, v = np.linalg.eigh(s1)
    a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S1^½
    lam = np.linalg.eigvalsh(a @ s2 @ a)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(lam, 0, None))))


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    # 1-D: (μ1-μ2)² + (σ1-σ2)²
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) == \
        pytest.approx(4.0 + 1.0)


@pytest.mark.parametrize("d", [3, 16, 64])
def test_frechet_matches_eigendecomposition_route(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d) * 0.5
    s1, s2 = _random_psd(rng, d), _random_psd(rng, d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_frechet_eigh(mu1, s1, mu2, s2), rel=1e-7, abs=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-7)
    # symmetric in its arguments
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-7)


def test_frechet_singular_covariances_stay_finite():
    """Fewer samples than dimensions (rank-deficient covariances): finite, ≥ 0, and close to the exact value."""
    rng = np.random.default_rng(1)
    d = 32
    s1, s2 = _random_psd(rng, d, rank=4), _random_psd(rng, d, rank=5)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's "matrix is singular" warning is handled, not leaked
        fid = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(fid) and fid > 0
    assert fid == pytest.approx(_frechet_eigh(mu1, s1, mu2, s2), rel=1e-3, abs=1e-3)


def test_frechet_bad_input():
    with pytest.raises(ValueError, match=r"\(D,\)"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))


def test_feature_stats_and_cache_file(tmp_path):
    feats = np.random.default_rng(2).normal(size=(50, 7))
    stats = FeatureStats.from_features(feats)
    np.testing.assert_allclose(stats.mu, feats.mean(0))
    np.testing.assert_allclose(stats.sigma, (feats - feats.mean(0)).T @ (feats - feats.mean(0)) / 49)
    stats.save(tmp_path / "s.npz")
    back = FeatureStats.load(tmp_path / "s.npz")
    assert back.count == 50 and frechet_distance_stats(stats, back) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats.from_features(feats[:1])
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        FeatureStats.from_features(feats[0])


def test_clip_score():
    img = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    txt = np.array([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0], [4.0, 3.0]])
    np.testing.assert_allclose(clip_score(img, txt), [100.0, 0.0, 0.0, 100 * 24 / 25])  # negative cos -> 0
    out = clip_score(torch.tensor(img, dtype=torch.float32), torch.tensor(txt, dtype=torch.float32))
    assert torch.is_tensor(out) and torch.allclose(out, torch.tensor([100.0, 0.0, 0.0, 96.0], dtype=out.dtype))
    with pytest.raises(ValueError, match="zero"):
        clip_score(np.zeros((1, 2)), np.ones((1, 2)))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        clip_score(np.ones((2, 3)), np.ones((3, 3)))


# ----------------------------------------------------------------------------------------------------------
# With the registered tiny torch-fidelity extractor
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fid_features(tmp_path_factory):
    from model.evaluation.features import FidFeatures
    from model.loading import load_fid_extractor
    from model.tiny import build_tiny_models

    root = tmp_path_factory.mktemp("tiny")
    build_tiny_models(root, only=("fid-extractor",))
    return FidFeatures(load_fid_extractor("tiny", root / "fid-extractor"), batch_size=8)


def _scenes(seed: int, n: int, size: int = 64, **config) -> list[np.ndarray]:
    from mlcid.synthetic import SceneConfig, make_scene

    cfg = SceneConfig(size=size, **config)
    return [make_scene(cfg, seed, i).composite for i in range(n)]


def test_fid_same_and_different_image_sets(fid_features):
    a = _scenes(0, 24)
    feats_a = fid_features(a)
    assert feats_a.shape == (24, 64) and np.isfinite(feats_a).all()
    sa = FeatureStats.from_features(feats_a)
    assert frechet_distance_stats(sa, FeatureStats.from_features(fid_features(a))) == pytest.approx(0.0, abs=1e-6)
    # the same scene distribution, another seed: small; blurred/noise images: much larger
    b = _scenes(1, 24)
    noise = [np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(24)]
    fid_ab = frechet_distance_stats(sa, FeatureStats.from_features(fid_features(b)))
    fid_an = frechet_distance_stats(sa, FeatureStats.from_features(fid_features(noise)))
    assert 0 < fid_ab < fid_an


def test_fid_agrees_with_torch_fidelity(fid_features, tmp_path):
    """Our features + Fréchet math equal torch-fidelity's own FID on the same folders and extractor."""
    import torch_fidelity

    sets = {"a": _scenes(0, 12, size=48), "b": _scenes(2, 12, size=48, shapes=("square",))}
    for name, images in sets.items():
        (tmp_path / name).mkdir()
        for i, im in enumerate(images):
            Image.fromarray(im).save(tmp_path / name / f"{i:03d}.png")
    theirs = torch_fidelity.calculate_metrics(
        input1=str(tmp_path / "a"), input2=str(tmp_path / "b"), fid=True, cuda=False, verbose=False,
        save_cpu_ram=True, **fid_features.spec.metric_kwargs())["frechet_inception_distance"]
    ours = frechet_distance_stats(*(FeatureStats.from_features(fid_features(sets[k])) for k in "ab"))
    assert ours > 0 and ours == pytest.approx(theirs, rel=1e-4)


def test_resize_rgb_centre_crops_then_resizes():
    from model.evaluation.features import resize_rgb

    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 10:30] = 200  # the centre square
    out = resize_rgb(wide, 10)
    assert out.shape == (10, 10, 3) and (out == 200).all()
    same = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_rgb(same, 16), same)
