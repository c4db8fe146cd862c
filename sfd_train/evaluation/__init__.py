"""Images out: decoding samples, sampling at scale, and ADM's evaluation metrics in PyTorch.

* :mod:`.decode` -- composite latents -> uint8 images (the texture VAE, or the synthetic decoder)
* :mod:`.sampling` -- ``sfd-sample --num N --out DIR``: deterministic, distributed, restartable
* :mod:`.inception` -- the evaluators' Inception (torch-fidelity's port) and its three outputs
* :mod:`.metrics` -- FID, sFID, Inception Score, precision and recall
* :mod:`.sources` -- npz / folder / statistics inputs, read in batches
* :mod:`.evaluate` -- ``sfd-eval``: features (cached, distributed), then the metrics
* :mod:`.synthetic` -- the synthetic set's own feature network (FID and class accuracy on CPUs)
"""
