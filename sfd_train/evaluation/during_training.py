"""Evaluation during SFD training (``eval.every``): how good the EMA model is, as numbers over steps.

Every ``eval.every`` steps, all ranks together:

* **samples**: ``eval.num_samples`` EMA samples (labels balanced, noise seeded per sample:
  the same set of noise at every evaluation), split over the ranks, decoded to pictures, scored
  with the synthetic set's own network (``fid_synthetic``, ``class_accuracy``) or with Inception
  against ``eval.reference`` (``fid``, and ``sfid``, ``inception_score``, ``precision``,
  ``recall`` where the number of samples and the reference allow);
* **validation loss** (``val_loss``): the training loss of held-out latents, each at five fixed
  times with fixed noise, no label dropout, so that it moves only with the weights.

Nothing here draws from the global random generators, touches the training data's position or
the trained weights: the training trajectory, and an exact resume, are unchanged.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sfd_train.evaluation.sampling import SamplingJob, noise_and_labels

if TYPE_CHECKING:
    from sfd_train.engine.trainer import Trainer

logger = logging.getLogger("sfd_train")

VALIDATION_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)
"""Global times ``tau`` of the validation loss (the schedule maps each to the two parts' times)."""


class TrainingEvaluator:
    """The SFD task's periodic evaluation (see the module docstring).

    Args:
        config: the job config.
        loader: the training loader (its manifest normalises the validation latents).
        device: this rank's device.
    """

    def __init__(self, config: Any, loader: Any, device: torch.device):
        self.config, self.loader, self.device = config, loader, device
        self.eval = config.eval
        self._scorer = None
        self._decoder = None
        self._validation = None

    # ------------------------------------------------------------------ samples
    def _synthetic(self) -> bool:
        return self.config.data.path == "synthetic"

    def _setup_samples(self):
        from sfd_train.evaluation.decode import build_decoder

        if self._decoder is not None or not (self.eval.reference or self._synthetic()):
            return
        self._decoder = build_decoder(self.config, vae=self.eval.vae or None, device=self.device)
        if self.eval.reference:
            from sfd_train.evaluation.inception import InceptionFeatures

            self._scorer = InceptionFeatures(self.eval.inception or None, self.device)
        else:
            from sfd_train.data_pipeline.synthetic import ensure_synthetic_dataset
            from sfd_train.evaluation.synthetic import SyntheticEvaluator

            self._scorer = SyntheticEvaluator(ensure_synthetic_dataset(self.config.data.synthetic_dir or None))
            logger.info(f"synthetic feature network: held-out class accuracy {self._scorer.held_out_accuracy:.1%} "
                        f"on real pictures (the ceiling of the samples' class_accuracy)")

    @torch.no_grad()
    def sample_features(self, trainer: "Trainer") -> dict[str, np.ndarray] | None:
        """Features of this evaluation's samples (rank 0; None elsewhere)."""
        from sfd_train.diffusion.sampler import sample_with_config

        config, eval_config = self.config, self.eval
        world, rank = trainer.world.world_size, trainer.world.rank
        # The ranks of a tensor-parallel group compute the same samples together.
        data_world, data_rank = trainer.data_world, trainer.data_rank
        # The same number of batches on every rank: a sharded model's forward is a collective.
        per_rank = -(-eval_config.num_samples // data_world)
        indices = np.arange(data_rank * per_rank, (data_rank + 1) * per_rank)
        job = SamplingJob(num=eval_config.num_samples, seed=eval_config.seed)
        shape = (config.model.in_channels, config.model.input_size, config.model.input_size)
        ema = trainer.strategy.ema_for_sampling()
        parts: dict[str, list[np.ndarray]] = {}
        for lo in range(0, per_rank, eval_config.batch_size):
            batch = indices[lo:lo + eval_config.batch_size]
            noise, labels = noise_and_labels(job, batch, shape, config.model.num_classes, self.device)
            with trainer.autocast:
                latents = sample_with_config(ema, noise, labels, config.model, config.sampler,
                                             num_steps=eval_config.sampling_steps)
            pictures = self._decoder(latents[:, :config.model.texture_channels].float())
            keep = batch < eval_config.num_samples
            for name, value in self._score(pictures, labels).items():
                parts.setdefault(name, []).append(value[keep])
        mine = {name: np.concatenate(values) for name, values in parts.items()}
        if world > 1:
            gathered = [None] * world if rank == 0 else None
            torch.distributed.gather_object(mine, gathered, dst=0, group=trainer.world.control_group)
            if rank != 0:
                return None
            firsts = gathered[:: world // data_world]  # one rank of each tensor-parallel group
            mine = {name: np.concatenate([g[name] for g in firsts]) for name in mine}
        return mine

    def _score(self, pictures: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
        from sfd_train.evaluation.decode import to_uint8
        from sfd_train.evaluation.synthetic import SyntheticEvaluator

        if isinstance(self._scorer, SyntheticEvaluator):
            features, predicted = self._scorer.features(pictures)
            return {"features": features, "predicted": predicted, "labels": labels.cpu().numpy()}
        return self._scorer(to_uint8(pictures))

    def sample_metrics(self, features: dict[str, np.ndarray]) -> dict[str, float | None]:
        from sfd_train.evaluation.synthetic import SyntheticEvaluator

        if isinstance(self._scorer, SyntheticEvaluator):
            return self._scorer.metrics(features["features"], features["predicted"], features["labels"])
        from sfd_train.evaluation.evaluate import metrics, reference_features
        from sfd_train.evaluation.sources import StatsOnly, open_input

        reference = open_input(self.eval.reference)
        if not isinstance(reference, StatsOnly):
            reference = reference_features(reference, self._scorer, 100, os.path.join(self.config.run.output_dir, "eval_cache"),
                                           "inception", progress=False)
        result = metrics(features, reference)
        return {k: v for k, v in result.items() if k in ("fid", "sfid", "inception_score", "precision", "recall")}

    # ------------------------------------------------------------------ validation loss
    def _validation_set(self):
        if self._validation is None:
            from sfd_train.data_pipeline.reader import CompositeLatentLoader

            path = self.eval.val_data
            if not path and self._synthetic():
                from sfd_train.data_pipeline.synthetic import ensure_synthetic_validation_set

                path = ensure_synthetic_validation_set(self.config.data.synthetic_dir or None)
            if not path:
                self._validation = False
                return False
            val = CompositeLatentLoader(path, global_batch_size=1, micro_batch_size=1, rank=0, world_size=1, seed=0,
                                        num_workers=0, use_flip=False, normalize=False,
                                        storage_options=dict(self.config.data.storage_options))
            count = min(self.eval.val_samples, val.manifest.num_samples)
            batch = val.read_samples(np.arange(count))
            self._validation = batch
        return self._validation

    @torch.no_grad()
    def validation_loss(self, trainer: "Trainer", uses_repa: bool) -> float | None:
        """The loss of the held-out latents at :data:`VALIDATION_TIMES` (the same on every rank)."""
        from sfd_train.data_pipeline.stats import normalize
        from sfd_train.diffusion.objective import LossInputs, combine_terms, objective_terms

        batch = self._validation_set()
        if batch is False:
            return None
        config = self.config
        x = normalize(batch["x"], self.loader.manifest).to(self.device)
        features = batch.get("dino").to(self.device) if uses_repa and "dino" in batch else None
        generator = torch.Generator().manual_seed(self.eval.seed + 1)
        noise = torch.randn(x.shape, generator=generator).to(self.device)
        labels = batch["y"].to(self.device)
        ema = trainer.strategy.ema_for_sampling()
        total = 0.0
        for tau in VALIDATION_TIMES:
            inputs = LossInputs(noise=noise, tau=torch.full((len(x),), tau, device=self.device), labels=labels)
            with trainer.autocast:
                terms = objective_terms(ema, x, inputs, features, config.model, config.objective)
            total += float(combine_terms(terms, config.objective)["loss"])
        return total / len(VALIDATION_TIMES)

    # ------------------------------------------------------------------ both
    def run(self, trainer: "Trainer", uses_repa: bool) -> dict[str, float | None]:
        """One evaluation; rank 0 logs it (metrics.jsonl, W&B, console, eval.png) and returns it."""
        self._setup_samples()
        values: dict[str, float | None] = {}
        if self._decoder is not None:
            features = self.sample_features(trainer)
            if features is not None:
                values.update(self.sample_metrics(features))
        val = self.validation_loss(trainer, uses_repa)
        if val is not None:
            values["val_loss"] = val
        if not trainer.world.is_main or not values:
            return values
        shown = " | ".join(f"{k} {v:.4g}" for k, v in values.items() if v is not None)
        trainer.metrics.log(trainer.step, values, f"step {trainer.step} | eval ({self.eval.num_samples} samples): {shown}")
        from sfd_train.engine.metrics import read_metrics
        from sfd_train.engine.visualize import save_eval_plot

        save_eval_plot(read_metrics(trainer.run_dir), trainer.run_dir / "eval.png")
        return values


def summary(records: list[dict]) -> list[str]:
    """Lines showing each evaluation metric over the steps it was measured at."""
    lines = []
    for key in ("fid", "fid_synthetic", "class_accuracy", "val_loss"):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            lines.append(f"{key:>15s}: " + "  ".join(f"step {step} {value:.4g}" for step, value in points))
    return lines
