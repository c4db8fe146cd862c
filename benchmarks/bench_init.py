"""Start-up of a training run: peak host memory per rank, and seconds from process start to the
first training step, for an XXL-wide model with FSDP2 on several CPU ranks.

Each measurement is a real run of the entry point (``python -m sfd_train.train`` under torchrun)
on the built-in synthetic data (8x8 composite latents, 16 channels, 32-dim features, so the model's
input and output layers are that size; the blocks are XXL's). Every rank stops when its first
training step begins and reports:

* footprint: its resident memory when the trainer starts (the interpreter, torch, the process
  group: what any rank holds before a model exists);
* peak: its peak resident memory (VmHWM) up to the first step;
* to first step: seconds from the process's start (``/proc/self/stat``) to the first step, and the
  CPU seconds the rank used until then (less disturbed by other work on the machine; with more ranks
  than cores the wall time also measures their sharing of the cores).

Goal (issue 28): peak - footprint <= (parameter + EMA bytes) / world + 1.5 GB, and a start-up that
gets shorter as ranks are added. Give ``--repo`` to measure another checkout of the project (e.g.
the commit before the meta-device build, in a ``git worktree``) with this same script.

    python benchmarks/bench_init.py --nproc 2 4 --depth 24
    python benchmarks/bench_init.py --nproc 2 4 --depth 8 --repo /tmp/before --label before
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
GB = 1e9


# ------------------------------------------------------------------ inside each rank
def _proc_status(key: str) -> int:
    """A ``kB`` field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _cpu_seconds() -> float:
    """CPU time (user + system, all threads) this process has used."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _process_start() -> float:
    """When this process started, as a ``time.time()`` value."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    started_after_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - uptime + started_after_boot


def _import_from(repo: Path) -> None:
    """Makes ``sfd_train`` and its sub-packages kept in top-level folders (``kernels/``,
    ``launchers/``, ``data_pipeline/``, see setup.py) import from ``repo``, whatever checkout the
    editable install points at."""
    import importlib.util

    class CheckoutFinder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            top = {"sfd_train": repo / "sfd_train", "sfd_train.kernels": repo / "kernels",
                   "sfd_train.launchers": repo / "launchers", "sfd_train.data_pipeline": repo / "data_pipeline"}
            if name not in top:
                return None
            return importlib.util.spec_from_file_location(name, top[name] / "__init__.py",
                                                          submodule_search_locations=[str(top[name])])

    sys.meta_path.insert(0, CheckoutFinder)


def worker(out_prefix: str, train_args: list[str]) -> int:
    """Runs the entry point; records the footprint when the trainer starts, the peak and the time
    when the first step begins, then ends this rank."""
    started = _process_start()
    _import_from(Path(os.environ["SFD_BENCH_REPO"]))
    from sfd_train.engine import trainer as trainer_module

    record: dict[str, float] = {}
    init, step = trainer_module.Trainer.__init__, trainer_module.Trainer.train_step

    def timed_init(self, *args, **kwargs):
        record.update(footprint=_proc_status("VmRSS"), trainer_start_s=time.time() - started)
        return init(self, *args, **kwargs)

    def first_step(self, batches):
        record.update(peak=_proc_status("VmHWM"), first_step_s=time.time() - started, cpu_s=_cpu_seconds(),
                      local_params=sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                       for p in self.strategy.model.parameters()))
        rank = int(os.environ.get("RANK", "0"))
        Path(f"{out_prefix}{rank}.json").write_text(json.dumps(record))
        sys.stdout.flush()
        os._exit(0)  # the measurement ends here; no step is taken

    trainer_module.Trainer.__init__, trainer_module.Trainer.train_step = timed_init, first_step
    from sfd_train.train import main

    return main(train_args)


# ------------------------------------------------------------------ the driver
def _config(depth: int, workdir: Path) -> Path:
    import yaml

    config = {
        "model": {"size": "custom", "depth": depth, "hidden_size": 1536, "num_heads": 24, "patch_size": 1,
                  "input_size": 8, "in_channels": 16, "semantic_channels": 4, "num_classes": 10,
                  "repa_projector_dim": 2048, "repa_feature_dim": 32},
        "data": {"path": "synthetic", "num_workers": 0},
        "train": {"max_steps": 1, "global_batch_size": 4, "sample_every": 0, "log_every": 1},
        "parallel": {"strategy": "fsdp2"},
        "checkpoint": {"every": 0, "resume": "never"},
        "eval": {"every": 0},
        "run": {"device": "cpu", "wandb_mode": "disabled", "output_dir": str(workdir / "run")},
    }
    path = workdir / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _parameters(depth: int) -> int:
    import torch

    from sfd_train.config import build_config
    from sfd_train.models import build_model

    model = {"size": "custom", "depth": depth, "hidden_size": 1536, "num_heads": 24, "input_size": 8,
             "in_channels": 16, "semantic_channels": 4, "num_classes": 10, "repa_projector_dim": 2048,
             "repa_feature_dim": 32}
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(build_config({"model": model}).model).parameters())


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(repo: Path, depth: int, nproc: int, timeout: float) -> list[dict]:
    """One run on ``nproc`` ranks of the checkout at ``repo``; the record of each rank."""
    from sfd_train.engine.distributed import free_port  # here, not at the top: a worker imports from --repo

    with tempfile.TemporaryDirectory(prefix="sfd-bench-init-") as tmp:
        workdir = Path(tmp)
        config = _config(depth, workdir)
        env = {**os.environ, "SFD_BENCH_REPO": str(repo), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(free_port()), str(HERE), "--worker", str(workdir / "rank"), "--", str(config)]
        result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
        records = []
        for rank in range(nproc):
            path = workdir / f"rank{rank}.json"
            if not path.is_file():
                raise RuntimeError(f"rank {rank} reported nothing (exit {result.returncode}):\n{result.stderr[-4000:]}")
            records.append(json.loads(path.read_text()))
        return records



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, nargs="+", default=[2, 4], help="ranks per run (default: 2 4)")
    parser.add_argument("--depth", type=int, default=24, help="XXL blocks (default 24, the full XXL)")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout to measure (default: this one)")
    parser.add_argument("--label", default="", help="a name for the checkout in the output (e.g. before, after)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run (default 1800)")
    parser.add_argument("--json", type=Path, default=None, help="also append the results to this JSON-lines file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("train_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.train_args)

    params = _parameters(args.depth)
    state = 2 * 4 * params  # fp32 parameters + fp32 EMA
    label = args.label or str(args.repo)
    print(f"XXL-wide, depth {args.depth}: {params / 1e6:.1f}M parameters; parameters + EMA {state / GB:.2f} GB; "
          f"checkout {args.repo} ({label})")
    print(f"{'ranks':>5} {'footprint GB':>12} {'peak GB':>8} {'over GB':>8} {'goal GB':>8} {'to step s':>10} "
          f"{'trainer->step s':>15} {'CPU s':>6}")
    for nproc in args.nproc:
        records = measure(args.repo.resolve(), args.depth, nproc, args.timeout)
        footprint = max(r["footprint"] for r in records)
        peak = max(r["peak"] for r in records)
        over = max(r["peak"] - r["footprint"] for r in records)
        goal = state / nproc + 1.5 * GB
        to_step = max(r["first_step_s"] for r in records)
        build = max(r["first_step_s"] - r["trainer_start_s"] for r in records)
        cpu = max(r["cpu_s"] for r in records)
        print(f"{nproc:>5} {footprint / GB:>12.2f} {peak / GB:>8.2f} {over / GB:>8.2f} {goal / GB:>8.2f} "
              f"{to_step:>10.1f} {build:>15.1f} {cpu:>6.1f}{'' if over <= goal else '  (over the goal)'}", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"label": label, "depth": args.depth, "params": params, "nproc": nproc,
                                    "available_before_gb": _available_bytes() / GB, "ranks": records}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
