"""ADM's metrics in PyTorch: formulas against independent computations, the Inception port, sfd-eval."""

import json
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch

from sfd_train.evaluation.metrics import (
    GaussianStats,
    frechet_distance,
    inception_score,
    precision_recall,
    trace_sqrt_product,
)


def _random_psd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / (rank or d)


def test_fid_matches_scipy_on_well_conditioned_covariances():
    rng = np.random.default_rng(0)
    s1, s2 = _random_psd(rng, 40), _random_psd(rng, 40)
    mu1, mu2 = rng.normal(size=40), rng.normal(size=40)
    expected = float(np.real(np.trace(scipy.linalg.sqrtm(s1 @ s2))))
    assert trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-10)
    fid = frechet_distance(GaussianStats(mu1, s1), GaussianStats(mu2, s2))
    assert fid == pytest.approx(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * expected, rel=1e-10)


@pytest.mark.parametrize("smallest", [1e-6, 1e-12, 0.0])
def test_fid_is_exact_for_nearly_singular_covariances(smallest):
    # Shared eigenvectors: tr sqrtm(S1 S2) = sum sqrt(a_i b_i) exactly, however small some a_i are.
    rng = np.random.default_rng(1)
    d = 64
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a = np.concatenate([rng.uniform(0.5, 2.0, d - 16), np.full(16, smallest)])
    b = rng.uniform(0.5, 2.0, d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    # A zero eigenvalue comes out of float64 as ~1e-16, whose root adds ~1e-8 each: 1e-8 relative.
    assert trace_sqrt_product(s1, s2) == pytest.approx(np.sum(np.sqrt(a * b)), rel=1e-8)


def test_fid_of_rank_deficient_sample_covariances_is_finite_and_symmetric():
    # Fewer samples than dimensions, as with small evaluations: rank-deficient covariances.
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(50, 128)), rng.normal(1.0, 1.0, size=(50, 128))
    a, b = GaussianStats.of(x), GaussianStats.of(y)
    assert np.isfinite(frechet_distance(a, b)) and frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_precision_recall_match_brute_force():
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(60, 8)).astype(np.float32)
    samples = rng.normal(0.4, 1.2, size=(50, 8)).astype(np.float32)

    def radii(x, k=3):
        d = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def inside(points, centres, r):
        d = ((points[:, None].astype(np.float64) - centres[None]) ** 2).sum(-1)
        return np.array([any(d[i, j] <= r[j] for j in range(len(centres))) for i in range(len(points))])

    precision, recall = precision_recall(reference, samples)
    assert precision == pytest.approx(inside(samples, reference, radii(reference)).mean())
    assert recall == pytest.approx(inside(reference, samples, radii(samples)).mean())
    assert 0 < precision < 1 and 0 < recall < 1


def test_inception_score_matches_its_formula():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(10_000, 20))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = []
    for part in (p[:5000], p[5000:]):
        marginal = part.mean(0)
        expected.append(np.exp(np.mean([np.sum(row * np.log(row / marginal)) for row in part])))
    assert inception_score(p) == pytest.approx(np.mean(expected), rel=1e-12)
    one_hot = np.eye(20)[np.arange(5000) % 20] * (1 - 1e-9) + 1e-9 / 20
    assert inception_score(one_hot) == pytest.approx(20.0, rel=1e-6)  # 20 equally likely, certain classes


# ------------------------------------------------------------------ the Inception port and sfd-eval
@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """Random weights in the format of torch-fidelity's pt_inception-2015-12-05 file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-random.pth"
    torch.manual_seed(0)
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None), \
            mock.patch("torch_fidelity.feature_extractor_inceptionv3.torch.load", return_value={}):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    state = net.state_dict()
    for name, value in state.items():
        if name.endswith("running_var"):
            value.uniform_(0.5, 1.5)  # random weights give activations of a sensible size
    torch.save(state, path)
    return path


def test_the_inception_port_loads_its_format_strictly(inception_weights, tmp_path):
    from sfd_train.evaluation.inception import InceptionFeatures
    from sfd_train.evaluation.sources import EvalInputError

    features = InceptionFeatures(str(inception_weights))
    out = features(np.random.default_rng(0).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8))
    assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 17 * 17 * 7)
    assert out["probabilities"].shape == (2, 1008) and np.allclose(out["probabilities"].sum(1), 1.0)
    state = torch.load(inception_weights)
    del state["Mixed_6d.branch1x1.conv.weight"]
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(EvalInputError, match=r"broken.pth: not the weights of the 2015-12-05 Inception port.*"
                                             r"Mixed_6d\.branch1x1\.conv\.weight"):
        InceptionFeatures(str(broken))


def _sfd_eval(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sfd_train.evaluation.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=env)


def test_two_statistics_files_need_no_network(tmp_path):
    rng = np.random.default_rng(5)
    a, b = GaussianStats.of(rng.normal(size=(100, 16))), GaussianStats.of(rng.normal(0.5, 1, size=(100, 16)))
    np.savez(tmp_path / "a.npz", mu=a.mu, sigma=a.sigma)
    np.savez(tmp_path / "b.npz", mu=b.mu, sigma=b.sigma)
    result = _sfd_eval(tmp_path / "a.npz", tmp_path / "b.npz", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["fid"] == pytest.approx(frechet_distance(a, b), rel=1e-12)


def test_images_against_images_with_a_cached_reference(inception_weights, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(6)
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    folder = tmp_path / "reference"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    args = [tmp_path / "samples.npz", folder, "--inception", inception_weights, "--json", "--cache",
            tmp_path / "cache", "--batch-size", "4", "--device", "cpu"]
    first = _sfd_eval(*args)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["fid"] > 0 and 0 <= report["precision"] <= 1 and report["inception_score"] is None
    assert any("splits of 5000" in note for note in report["notes"])
    second = _sfd_eval(*args)
    assert "reference features from the cache" in second.stderr
    assert json.loads(second.stdout)["fid"] == pytest.approx(report["fid"], rel=1e-12)


@pytest.mark.parametrize("case,message", [
    ("no_images", "holds neither arr_0 (images) nor mu and sigma (statistics); it has labels"),
    ("floats", "arr_0 is float32, expected uint8 images"),
    ("shape", "arr_0 has shape (4, 32, 32), expected N x H x W x 3"),
    ("missing", "no such file or folder"),
])
def test_bad_inputs_are_named(tmp_path, case, message):
    path = tmp_path / f"{case}.npz"
    if case == "no_images":
        np.savez(path, labels=np.arange(4))
    elif case == "floats":
        np.savez(path, arr_0=np.zeros((4, 32, 32, 3), np.float32))
    elif case == "shape":
        np.savez(path, arr_0=np.zeros((4, 32, 32), np.uint8))
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    result = _sfd_eval(path, tmp_path / "ref.npz", "--inception", tmp_path / "none.pth")
    assert result.returncode == 2 and str(path) in result.stderr and message in result.stderr, result.stderr


def test_missing_weights_say_where_to_get_them(tmp_path):
    np.savez(tmp_path / "a.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    env = {k: v for k, v in __import__("os").environ.items() if k != "SFD_INCEPTION_WEIGHTS"}
    result = _sfd_eval(tmp_path / "a.npz", tmp_path / "a.npz", env=env)
    assert result.returncode == 2 and "SFD_INCEPTION_WEIGHTS" in result.stderr and "--inception" in result.stderr
