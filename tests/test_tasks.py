"""The registry of training tasks (sfd_train.config.registry): the engine knows no task by name, and a
new task is a module of its own plus one register_task call."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sfd_train.config import ConfigError, build_config, config_help
from sfd_train.config.registry import get_task, task_names, task_of_config

ROOT = Path(__file__).resolve().parents[1]


def test_a_config_names_its_task_and_an_unknown_one_is_refused():
    assert task_names()[0] == "sfd" and "semvae" in task_names()
    assert task_of_config(build_config({})).name == "sfd"
    assert task_of_config(build_config({"task": "semvae"})).name == "semvae"
    with pytest.raises(ConfigError, match=r"config key 'task': 'nope' is not a task; choose one of: sfd \(the default\)"):
        build_config({"task": "nope"})
    assert "model.hidden_dim" in config_help("semvae") and "model.delta_t" in config_help("sfd")
    assert get_task("semvae").task_class().config_class is get_task("semvae").config_class()


def test_the_engine_imports_no_task():
    # Statically: no import of a task's package anywhere under sfd_train/engine/ ...
    pattern = re.compile(r"^\s*(from|import)\s+sfd_train\.(diffusion|tokenizers)\b", re.MULTILINE)
    offenders = [p.name for p in (ROOT / "sfd_train" / "engine").glob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
    # ... and at run time: importing the whole engine loads neither package.
    code = ("import sys, pkgutil, importlib, sfd_train.engine as e\n"
            "[importlib.import_module(f'sfd_train.engine.{m.name}') for m in pkgutil.iter_modules(e.__path__)]\n"
            "print(sorted(m for m in sys.modules if m.startswith(('sfd_train.diffusion', 'sfd_train.tokenizers'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_semvae_is_named_only_by_its_package_its_config_and_the_registry():
    allowed = {"sfd_train/config/semvae.py", "sfd_train/config/registry.py"}
    naming = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "sfd_train").rglob("*.py")
                    if "semvae" in p.read_text().lower())
    assert [p for p in naming if p not in allowed and not p.startswith("sfd_train/tokenizers/")] == []


TOY_TASK = '''
"""A third task, outside the project: an autoencoder of the texture latent."""
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from sfd_train.config.schema import CheckpointConfig, OptimizerConfig, ParallelConfig, RunConfig, TrainConfig
from sfd_train.data_pipeline.config import DataConfig
from sfd_train.engine.task import TrainingTask


@dataclass
class ToyModelConfig:
    hidden: int = 32
    """Width of the bottleneck."""


@dataclass
class ToyJobConfig:
    task: Literal["toy"] = "toy"
    """What is trained."""
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    """The autoencoder."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The loop."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallelism."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""
    run: RunConfig = field(default_factory=RunConfig)
    """Output."""


class Autoencoder(nn.Module):
    def __init__(self, channels, hidden):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(channels, hidden), nn.Linear(hidden, channels)])

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)
        return self.blocks[1](torch.relu(self.blocks[0](tokens))).transpose(1, 2).reshape(x.shape)


class ToyTask(TrainingTask):
    config_class = ToyJobConfig

    @classmethod
    def build_model(cls, config, device_type):
        return Autoencoder(16, config.model.hidden)

    def step_draws(self, generator, device):
        return None

    def micro_batch_loss(self, model, batch, draws, rows):
        loss = torch.nn.functional.mse_loss(model(batch["x"]), batch["x"])
        return {"loss": loss, "mse": loss.detach()}

    def flops_per_image(self):
        return 6.0 * 2 * 16 * self.config.model.hidden * 64
'''


@pytest.mark.slow
def test_a_new_task_trains_without_touching_the_engine(tmp_path):
    (tmp_path / "toy_task.py").write_text(TOY_TASK)
    (tmp_path / "job.yaml").write_text(textwrap.dedent(f"""\
        task: toy
        model: {{hidden: 24}}
        data: {{path: synthetic, num_workers: 0}}
        train: {{max_steps: 6, global_batch_size: 8, mixed_precision: fp32, log_every: 1, sample_every: 0}}
        optimizer: {{lr: 0.01, warmup_steps: 0}}
        parallel: {{strategy: fsdp2, param_dtype: fp32}}
        checkpoint: {{every: 0}}
        run: {{device: cpu, wandb_mode: disabled, output_dir: {tmp_path / 'run'}}}
        """))
    code = textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from sfd_train.config.registry import TaskEntry, register_task
        register_task(TaskEntry("toy", config="toy_task:ToyJobConfig", task="toy_task:ToyTask",
                                summary="an autoencoder of the texture latent"))
        from sfd_train.train import main
        assert main(["--help-config", "toy"]) == 0
        sys.exit(main([{str(tmp_path / 'job.yaml')!r}]))
        """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "model.hidden (int, default 32)" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert "(mse " in result.stderr  # the task's loss terms in the progress line
