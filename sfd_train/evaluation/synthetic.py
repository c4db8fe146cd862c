"""A real metric for the synthetic set: its own small feature network, trained once, deterministically.

Inception features mean little on 32 x 32 pictures of five shapes, and the tests and the
quickstart cannot download Inception. So the synthetic set gets a small CNN classifier of its
ten classes, trained on pictures as the texture decoder shows them (rendered, encoded,
decoded), on one thread with a fixed seed, so that every machine trains the same network.
It is cached beside the dataset with its held-out accuracy and the statistics of held-out real
pictures. It gives:

* ``fid_synthetic``: the Frechet distance between its 64-d features of generated pictures and
  of real ones (the same formula as FID, in this network's feature space);
* ``class_accuracy``: how often it recognises the class a sample was generated for.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sfd_train.evaluation.metrics import GaussianStats, frechet_distance
from sfd_train.safe_load import load_torch_file

logger = logging.getLogger("sfd_train")

FILE = "feature_net.pt"
VERSION = 1
TRAIN_SEED, HELD_OUT_SEED = 101, 202  # picture seeds, apart from the dataset's own (0)
TRAIN_PICTURES, HELD_OUT_PICTURES = 8192, 2048


class SyntheticFeatureNet(nn.Module):
    """Pictures (B, 3, 32, 32) in [0, 1] -> 64-d features and 10 class logits."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(64, classes)

    def forward(self, pictures: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body((pictures - 0.5) * 2.0)
        return features, self.head(features)


def decoded_pictures(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real pictures as the texture decoder shows them (render -> encode -> decode), and labels."""
    from sfd_train.data_pipeline import synthetic

    pictures, labels = [], []
    for start in range(0, count, 512):
        images, _, y = synthetic.render(np.arange(start, min(start + 512, count)), seed)
        pictures.append(synthetic.decode_texture(synthetic.encode_texture(torch.from_numpy(images))))
        labels.append(torch.from_numpy(np.asarray(y)))
    return torch.cat(pictures), torch.cat(labels).long()


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reduction order everywhere: the same network everywhere
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_feature_net(epochs: int = 5, batch: int = 128) -> tuple[SyntheticFeatureNet, dict]:
    """The network, and ``{"held_out_accuracy", "reference": {"mu", "sigma"}}``."""
    with _one_thread(), torch.random.fork_rng():
        torch.manual_seed(0)
        net = SyntheticFeatureNet()
        pictures, labels = decoded_pictures(TRAIN_PICTURES, TRAIN_SEED)
        optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
        order = torch.Generator().manual_seed(1)
        net.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(labels), generator=order).split(batch):
                loss = F.cross_entropy(net(pictures[idx])[1], labels[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        net.eval()
        held_out, held_labels = decoded_pictures(HELD_OUT_PICTURES, HELD_OUT_SEED)
        with torch.no_grad():
            features, logits = net(held_out)
        accuracy = float((logits.argmax(1) == held_labels).float().mean())
        stats = GaussianStats.of(features.double().numpy())
    return net, {"held_out_accuracy": accuracy, "reference": {"mu": stats.mu, "sigma": stats.sigma}}


class SyntheticEvaluator:
    """The synthetic set's metrics of generated pictures.

    Args:
        folder: where the network is cached (the synthetic dataset's folder); trained there once.
    """

    def __init__(self, folder: str):
        path = os.path.join(folder, FILE)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, ".feature_net.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # ranks and jobs sharing the folder train it once
            blob = load_torch_file(path) if os.path.exists(path) else None
            if blob is None or blob.get("version") != VERSION:
                logger.info(f"training the synthetic set's feature network once (cached in {path})")
                net, info = train_feature_net()
                blob = {"version": VERSION, "state_dict": net.state_dict(), **info}
                torch.save(blob, path + ".tmp")
                os.replace(path + ".tmp", path)
        self.net = SyntheticFeatureNet()
        self.net.load_state_dict(blob["state_dict"])
        self.net.eval()
        self.held_out_accuracy = blob["held_out_accuracy"]
        self.reference = GaussianStats(blob["reference"]["mu"], blob["reference"]["sigma"])

    @torch.no_grad()
    def features(self, pictures: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``(features (B, 64), predicted classes (B,))`` of pictures (B, 3, 32, 32) in [0, 1]."""
        features, logits = self.net(pictures.float().cpu())
        return features.double().numpy(), logits.argmax(1).numpy()

    def metrics(self, features: np.ndarray, predicted: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return {"fid_synthetic": frechet_distance(GaussianStats.of(features), self.reference),
                "class_accuracy": float(np.mean(predicted == labels))}


def prepare_synthetic_caches(folder: str | None = None) -> SyntheticEvaluator:
    """Builds everything a synthetic run with evaluation reads (dataset, validation set, feature
    network) once, up front, e.g. before starting many runs that share the folder."""
    from sfd_train.data_pipeline.synthetic import ensure_synthetic_dataset, ensure_synthetic_validation_set

    ensure_synthetic_validation_set(folder)
    return SyntheticEvaluator(ensure_synthetic_dataset(folder))
