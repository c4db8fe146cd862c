"""The training engine on CPU with gloo: strategies agree, errors come early, outputs appear."""

import os
import subprocess
import sys

import pytest

from runs import TINY, losses, train, write_config
from sfd_train.config import build_config
from sfd_train.engine.zero import deepspeed_config
from sfd_train.models import build_model


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    config = write_config(tmp / "job.yaml", parallel={"strategy": "ddp"})
    train(config, [f"run.output_dir={tmp / 'run'}"])
    return losses(tmp / "run")


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy,micro_batch",
    [("ddp", None), ("fsdp2", 4), ("zero1", None), ("zero2", 4), ("zero3", None)],
)
def test_two_ranks_follow_the_single_process_trajectory(tmp_path, single_process_losses, strategy, micro_batch):
    # Same global batch (16); micro batch 4 on 2 ranks also exercises accumulation (2 steps).
    config = write_config(tmp_path / "job.yaml", parallel={"strategy": strategy},
                          train={"micro_batch_size": micro_batch})
    train(config, [f"run.output_dir={tmp_path / 'run'}"], nproc=2)
    mine = losses(tmp_path / "run")
    assert sorted(mine) == sorted(single_process_losses) == list(range(1, TINY["train"]["max_steps"] + 1))
    for step, expected in single_process_losses.items():
        assert mine[step] == pytest.approx(expected, rel=2e-5, abs=1e-6), f"{strategy} step {step}"
    assert mine[8] < mine[1]  # and it learns


@pytest.mark.parametrize(
    "strategy,scope,nproc,micro_batch",
    [("ddp", "blocks", 1, None), ("ddp", "step", 1, None), ("fsdp2", "step", 1, None), ("fsdp2", "step", 2, 4)],
)
def test_compiled_runs_follow_the_eager_trajectory(tmp_path, single_process_losses, strategy, scope, nproc,
                                                   micro_batch):
    # aot_eager: dynamo and AOTAutograd as in production, without Inductor's minutes of C++ builds.
    config = write_config(tmp_path / "job.yaml", train={"micro_batch_size": micro_batch}, parallel={
        "strategy": strategy, "compile": True, "compile_scope": scope, "compile_backend": "aot_eager"})
    train(config, [f"run.output_dir={tmp_path / 'run'}"], nproc=nproc)
    mine = losses(tmp_path / "run")
    assert sorted(mine) == sorted(single_process_losses)
    for step, expected in single_process_losses.items():
        assert mine[step] == pytest.approx(expected, rel=2e-5, abs=1e-6), f"{strategy}/{scope} step {step}"


def _run_cli(args, env=None):
    return subprocess.run([sys.executable, "-m", "sfd_train.train", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


@pytest.mark.parametrize(
    "overrides,env,key",
    [
        (["parallel.strategy=zero4"], {}, "parallel.strategy"),
        (["train.global_batch_size=16"], {"WORLD_SIZE": "3"}, "train.global_batch_size"),
        (["train.micro_batch_size=3"], {}, "train.global_batch_size"),
        (["parallel.strategy=ddp", "parallel.compile=true", "parallel.compile_mode=reduce-overhead"],
         {"WORLD_SIZE": "2"}, "parallel.compile_mode"),
        (["data.path="], {}, "data.path"),
    ],
)
def test_config_errors_stop_before_any_process_group(tmp_path, overrides, env, key):
    config = write_config(tmp_path / "job.yaml")
    run_dir = tmp_path / "run"
    # WORLD_SIZE=3 without torchrun: a process group would wait forever for the other
    # ranks, so a prompt exit proves the check came first.
    result = _run_cli([str(config), f"run.output_dir={run_dir}", *overrides], env)
    assert result.returncode == 2, result.stderr
    assert f"config key '{key}'" in result.stderr
    assert not run_dir.exists()


def test_help_lists_every_key():
    result = _run_cli(["--help-config"])
    assert result.returncode == 0 and "parallel.strategy" in result.stdout and "checkpoint.every" in result.stdout
    help_text = _run_cli(["--help"]).stdout
    assert "sfd-train tiny" in help_text and "75" in help_text


def test_dt_zero_differs_only_in_time_embedding_and_objective():
    base = dict(TINY["model"])
    dual = build_model(build_config({"model": base}).model).state_dict()
    sync = build_model(build_config({"model": {**base, "delta_t": 0.0}}).model).state_dict()
    only_dual = {k.split(".")[0] for k in set(dual) - set(sync)}
    only_sync = {k.split(".")[0] for k in set(sync) - set(dual)}
    assert only_dual == {"t_embedder_sem", "t_embedder_tex"} and only_sync == {"t_embedder"}
    assert all(dual[k].shape == sync[k].shape for k in set(dual) & set(sync))


@pytest.mark.slow
def test_dt_zero_trains(tmp_path):
    config = write_config(tmp_path / "job.yaml", model={"delta_t": 0.0}, train={"max_steps": 3})
    train(config, [f"run.output_dir={tmp_path / 'run'}"])
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3]


def test_deepspeed_config_is_generated_with_pass_through():
    config = build_config({**TINY, "parallel": {"strategy": "zero3", "deepspeed": {"zero_optimization": {"reduce_bucket_size": 123}}},
                           "train": {**TINY["train"], "micro_batch_size": 2, "grad_clip": 1.0}})
    ds = deepspeed_config(config, world_size=4, device_type="cpu")
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["reduce_bucket_size"] == 123
    assert ds["zero_optimization"]["contiguous_gradients"] is True


@pytest.mark.slow
def test_tiny_preset_leaves_checkpoint_samples_and_plot(tmp_path):
    run_dir = tmp_path / "run"
    # The preset's evaluation at a test's size: the final one, with few samples and steps.
    train("tiny", [f"run.output_dir={run_dir}", "train.max_steps=6", "train.sample_every=3", "train.sample_steps=4",
                   "checkpoint.every=3", "train.log_every=3", "run.wandb_mode=offline", "eval.num_samples=20",
                   "eval.sampling_steps=3", "eval.val_samples=16"], nproc=2)
    assert (run_dir / "checkpoints" / "step_000000006" / "COMMITTED").is_file()
    assert (run_dir / "samples" / "step_000000006.png").is_file()
    assert (run_dir / "loss.png").is_file() and (run_dir / "config.yaml").is_file()
    assert (run_dir / "eval.png").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb offline run folder missing"
    log = (run_dir / "metrics.jsonl").read_text()
    assert '"images_per_s"' in log and '"memory_gib"' in log
    # No credentials end up in saved configs or logs.
    for path in [run_dir / "config.yaml", run_dir / "metrics.jsonl"]:
        assert "WANDB_API_KEY" not in path.read_text()
