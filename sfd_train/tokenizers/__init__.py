"""Images in: the networks that turn images into training latents.

* :mod:`.config` -- typed architectures (defaults: the released networks)
* :mod:`.preprocess` -- the authors' image preprocessing (ADM centre crop, flips, [-1, 1])
* :mod:`.texture_vae` -- the LDM ``AutoencoderKL`` (texture latent; also decodes samples)
* :mod:`.dinov2` -- DINOv2 patch features (REPA targets, SemVAE input)
* :mod:`.semvae` -- the Semantic VAE (semantic latent), its loss and checkpoint format
* :mod:`.weights` -- strict loading of released weight files

The networks need the ``images`` extra (diffusers, timm): ``pip install sfd-train[images]``.
"""

from sfd_train.tokenizers.config import DinoConfig, SemVAEConfig, TextureVAEConfig
from sfd_train.tokenizers.weights import TokenizerWeightsError

__all__ = ["DinoConfig", "SemVAEConfig", "TextureVAEConfig", "TokenizerWeightsError"]
