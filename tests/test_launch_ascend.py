"""The Ascend node script, run for real with a stand-in CANN set_env.sh (in a temp
folder, chosen through launcher.ascend.cann_set_env) and a stand-in torchrun on PATH
that records its arguments and environment."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from fake_cluster import harness
from sfd_train.launchers import cli
from sfd_train.launchers.ascend import CANN_SET_ENV_PATHS

# Reads LD_LIBRARY_PATH, which is unset here: sourcing it must not trip `set -u`.
SET_ENV = """# stand-in CANN set_env.sh
export ASCEND_TOOLKIT_HOME={root}/ascend-toolkit/latest
export LD_LIBRARY_PATH=${{ASCEND_TOOLKIT_HOME}}/lib64:${{LD_LIBRARY_PATH}}
export FAKE_CANN_SOURCED=1
"""


def render(tmp_path: Path, capsys, *args: str) -> tuple[dict[str, str], list[str]]:
    """`sfd-launch ascend --dry-run`: writes node.sh; returns the per-node environment and command."""
    config = harness.write_job_config(tmp_path / "job.yaml")
    code = cli.main(["ascend", str(config), f"run.output_dir={tmp_path / 'run'}", "--dry-run", *args])
    out = capsys.readouterr().out
    assert code == 0, out
    words = shlex.split(out.rstrip().splitlines()[-1])
    env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("/"))
    return env, [w for w in words if "=" not in w]


def run_node(tmp_path: Path, node_env: dict[str, str], command: list[str], **extra: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    record = tmp_path / "torchrun.jsonl"
    env = harness.base_env(harness.TORCHRUN_BIN, FAKE_TORCHRUN_RECORD=str(record), **node_env, **extra)
    env.pop("LD_LIBRARY_PATH", None)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    starts = harness.read_jsonl(record) if record.exists() else []
    return result, (starts[0] if starts else None)


@pytest.fixture
def cann(tmp_path) -> Path:
    path = tmp_path / "Ascend" / "set_env.sh"
    path.parent.mkdir()
    path.write_text(SET_ENV.format(root=path.parent))
    return path


def test_two_node_run_exports_the_ascend_settings_and_starts_torchrun(tmp_path, capsys, cann):
    node_env, command = render(tmp_path, capsys, "--nodes", "2", "--devices-per-node", "2", "--node-rank", "1",
                               "--master-addr", "127.0.0.1", "--master-port", "29777", "--cann-set-env", str(cann))
    result, start = run_node(tmp_path, node_env, command)
    assert result.returncode == 0, result.stdout + result.stderr
    config_file = tmp_path / "run" / "launch" / "config.yaml"
    assert start["argv"] == [
        "--nnodes=2", "--nproc-per-node=2", "--node-rank=1", "--master-addr=127.0.0.1", "--master-port=29777",
        "--max-restarts=0", "-m", "sfd_train.train", str(config_file), "parallel.backend=hccl", "run.device=npu",
        "parallel.dp_replicate=2", "parallel.dp_shard=2",  # HSDP for the two nodes (node.sh adds it)
    ]
    env = start["env"]
    assert env["FAKE_CANN_SOURCED"] == "1" and env["LD_LIBRARY_PATH"].startswith(str(cann.parent))
    expected = {
        "HCCL_CONNECT_TIMEOUT": "1200", "HCCL_EXEC_TIMEOUT": "1800", "HCCL_WHITELIST_DISABLE": "1",
        "HCCL_IF_IP": "127.0.0.1",  # the source address of the route to the master
        "ASCEND_RT_VISIBLE_DEVICES": "0,1", "TASK_QUEUE_ENABLE": "2", "CPU_AFFINITY_CONF": "1",
        "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True", "COMBINED_ENABLE": "1",
    }
    assert {k: env.get(k) for k in expected} == expected
    for absent in ("RANK_TABLE_FILE", "HCCL_SOCKET_IFNAME", "SFD_ENABLE_MINDSPEED"):
        assert absent not in env
    assert start["usr2_ignored"]
    assert f"CANN environment: {cann}" in result.stdout


def test_rank_table_interface_names_and_user_settings(tmp_path, capsys, cann):
    table = tmp_path / "ranktable.json"
    table.write_text('{"version": "1.0", "server_count": "1", "server_list": [], "status": "completed"}')
    node_env, command = render(
        tmp_path, capsys, "--devices-per-node", "4", "--rank-table", str(table), "--cann-set-env", str(cann),
        "launcher.socket_ifname=lo", "launcher.ascend.hccl_exec_timeout=0", "launcher.ascend.task_queue_enable=1",
        "launcher.env={ASCEND_GLOBAL_LOG_LEVEL: 3, TASK_QUEUE_ENABLE: 0}",
    )
    result, start = run_node(tmp_path, node_env, command, ASCEND_RT_VISIBLE_DEVICES="4,5,6,7")
    assert result.returncode == 0, result.stdout + result.stderr
    env = start["env"]
    assert env["RANK_TABLE_FILE"] == str(table)
    assert env["HCCL_SOCKET_IFNAME"] == "lo" and env["GLOO_SOCKET_IFNAME"] == "lo"
    assert "HCCL_IF_IP" not in env  # it would override the interface chosen above
    assert env["HCCL_EXEC_TIMEOUT"] == "0" and env["ASCEND_GLOBAL_LOG_LEVEL"] == "3"
    assert env["TASK_QUEUE_ENABLE"] == "0"  # launcher.env wins over the defaults
    assert env["ASCEND_RT_VISIBLE_DEVICES"] == "4,5,6,7"  # what the cluster set is kept
    assert start["options"]["nnodes"] == "1" and start["options"]["node-rank"] == "0"


def test_missing_rank_table_is_an_error(tmp_path, capsys, cann):
    node_env, command = render(tmp_path, capsys, "--rank-table", str(tmp_path / "missing.json"), "--cann-set-env", str(cann))
    result, start = run_node(tmp_path, node_env, command)
    assert result.returncode == 78 and start is None
    assert f"rank table {tmp_path / 'missing.json'} not found" in result.stderr


@pytest.mark.skipif(any(Path(p).exists() for p in CANN_SET_ENV_PATHS), reason="CANN is installed here")
def test_missing_cann_is_a_clear_error(tmp_path, capsys):
    node_env, command = render(tmp_path, capsys)
    result, start = run_node(tmp_path, node_env, command)
    assert result.returncode == 78 and start is None
    assert "no CANN environment on this node: tried /usr/local/Ascend/ascend-toolkit/set_env.sh " \
           "/usr/local/Ascend/cann/set_env.sh" in result.stderr
    assert "launcher.ascend.cann_set_env" in result.stderr


def test_missing_configured_cann_names_the_path(tmp_path, capsys):
    missing = tmp_path / "cann" / "set_env.sh"
    node_env, command = render(tmp_path, capsys, "--cann-set-env", str(missing))
    result, start = run_node(tmp_path, node_env, command)
    assert result.returncode == 78 and start is None
    assert f"tried {missing} (fix launcher.ascend.cann_set_env)" in result.stderr


def test_mindspeed_is_checked_then_enabled(tmp_path, capsys, cann):
    node_env, command = render(tmp_path, capsys, "--cann-set-env", str(cann), "launcher.ascend.mindspeed=true")
    result, start = run_node(tmp_path, node_env, command)
    assert result.returncode == 78 and start is None
    assert "launcher.ascend.mindspeed is true but python cannot import mindspeed" in result.stderr
    assert "No module named 'mindspeed'" in result.stderr

    package = tmp_path / "pylib" / "mindspeed"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    result, start = run_node(tmp_path, node_env, command, PYTHONPATH=str(package.parent))
    assert result.returncode == 0, result.stderr
    assert start["env"]["SFD_ENABLE_MINDSPEED"] == "1"


def test_sfd_launch_ascend_runs_the_node_script(tmp_path, cann):
    """The real command (not a dry run) replaces itself with `bash node.sh`."""
    record = tmp_path / "torchrun.jsonl"
    env = harness.base_env(harness.TORCHRUN_BIN, FAKE_TORCHRUN_RECORD=str(record), FAKE_TORCHRUN_EXIT="3")
    env.pop("LD_LIBRARY_PATH", None)
    config = harness.write_job_config(tmp_path / "job.yaml")
    result = harness.sfd_launch(["ascend", str(config), f"run.output_dir={tmp_path / 'run'}", "--devices-per-node", "8",
                                 "--cann-set-env", str(cann)], env, tmp_path)
    assert result.returncode == 3, result.stdout + result.stderr  # torchrun's status comes back
    assert "$ SFD_NNODES=1 SFD_NODE_RANK=0 SFD_MASTER_ADDR=127.0.0.1 SFD_MASTER_PORT=29500 bash " in result.stdout
    start = harness.read_jsonl(record)[0]
    assert start["options"]["nproc-per-node"] == "8" and start["env"]["FAKE_CANN_SOURCED"] == "1"
    assert os.path.isfile(tmp_path / "run" / "launch" / "config.yaml")


def test_missing_torchrun_is_a_set_up_error(tmp_path, capsys, cann):
    node_env, command = render(tmp_path, capsys, "--cann-set-env", str(cann), "launcher.torchrun=no-such-torchrun")
    result, start = run_node(tmp_path, node_env, command)
    assert result.returncode == 78 and start is None
    assert "torchrun not found (no-such-torchrun)" in result.stderr
