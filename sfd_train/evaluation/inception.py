"""Inception features as ADM's evaluator takes them, on torch-fidelity's port of the 2015-12-05 graph.

torch-fidelity's ``inception-v3-compat`` reproduces the TensorFlow graph the evaluators use,
its bilinear resize to 299 and its input scaling included, from a local weights file
(``pt_inception-2015-12-05-6726825d.pth``). From one forward pass of uint8 images we take:

* ``pool``: ``pool_3`` (2048 channels) -- FID, precision and recall;
* ``spatial``: the first 7 channels of ``mixed_6/conv`` -- the 1x1 branch of the graph's
  ``mixed_6`` block, which is the port's ``Mixed_6d.branch1x1`` -- as 17 x 17 x 7 in the
  graph's NHWC order (2023 values) -- sFID;
* ``probabilities``: the softmax of ``pool_3`` times the 1008-way logits weights without the
  bias, as ADM computes them -- the Inception Score.
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch

from sfd_train.evaluation.sources import EvalInputError
from sfd_train.safe_load import load_torch_file

SPATIAL_CHANNELS = 7
WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


class InceptionWeightsMissing(FileNotFoundError):
    """The Inception weights file is not where it was said to be."""


def find_weights(path: str | None) -> str:
    """The Inception weights file: ``path``, else ``$SFD_INCEPTION_WEIGHTS``.

    Raises:
        InceptionWeightsMissing: neither names an existing file (the message says where to get it).
    """
    path = path or os.environ.get("SFD_INCEPTION_WEIGHTS")
    if not path or not os.path.isfile(path):
        where = f"{path!r} does not exist" if path else "no file given"
        raise InceptionWeightsMissing(
            f"Inception weights: {where}. Download torch-fidelity's {WEIGHTS_NAME} (its release "
            "'v0.2.0' on GitHub) once, then pass --inception FILE or set SFD_INCEPTION_WEIGHTS=FILE")
    return path


def _tensors_only(path: str) -> io.BytesIO:
    """The weights file re-saved from its tensors alone, for torch-fidelity to read.

    torch-fidelity reads the file with torch's full unpickler; it gets a buffer holding only
    what :func:`~sfd_train.safe_load.load_torch_file` read from the file (nothing in it runs).
    """
    state = load_torch_file(path)
    if not isinstance(state, dict):
        raise EvalInputError(f"{path}: holds a {type(state).__name__}, not the Inception state dict")
    buffer = io.BytesIO()
    torch.save({k: v for k, v in state.items() if torch.is_tensor(v)}, buffer)
    buffer.seek(0)
    return buffer


class InceptionFeatures:
    """Batched features of uint8 images (B, H, W, 3) with the evaluators' Inception.

    Args:
        weights: the weights file (see :func:`find_weights`).
        device: where the network runs.
    """

    def __init__(self, weights: str | None, device: torch.device | str = "cpu"):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = find_weights(weights)
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                   feature_extractor_weights_path=_tensors_only(path))
        except RuntimeError as err:  # load_state_dict is strict: names the missing/unexpected keys
            detail = " ".join(str(err).split()).removeprefix("Error(s) in loading state_dict for FeatureExtractorInceptionV3: ")
            raise EvalInputError(f"{path}: not the weights of the 2015-12-05 Inception port: {detail[:400]}") from None
        self.device = torch.device(device)
        self.net.to(self.device)
        self._spatial: torch.Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output) -> None:
        self._spatial = output

    @torch.no_grad()
    def __call__(self, images: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """``{"pool": (B, 2048), "spatial": (B, 2023), "probabilities": (B, 1008)}`` in float64."""
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
            raise EvalInputError(f"expected uint8 images (B, H, W, 3), got {x.dtype} {tuple(x.shape)}")
        (pool,) = self.net(x.permute(0, 3, 1, 2).contiguous().to(self.device))
        spatial = self._spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        logits = pool.double() @ self.net.fc.weight.double().T
        return {
            "pool": pool.double().cpu().numpy(),
            "spatial": spatial.double().cpu().numpy(),
            "probabilities": torch.softmax(logits, dim=1).cpu().numpy(),
        }
