"""Stand-in trainer (test fixture) that honours sfd-train's preemption contract.

Run under torchrun like the real one: ``fake_trainer.py CONFIG [key=value ...]``. It
reads run.output_dir, train.max_steps and checkpoint.every from the config, trains a
4-number "model" whose value depends on every step taken (so a resume from the wrong
step, or a replayed step, changes the result), and:

* SIGUSR2 / SIGTERM set a flag; all ranks agree on it at the next step (all-reduce);
  they save a checkpoint together, rank 0 writes ``REQUEUE`` (JSON: step, reason)
  once it is complete, all ranks pass a barrier, and every worker exits 75;
* on start it deletes a stale ``REQUEUE`` and resumes from the newest complete
  checkpoint (``checkpoints/step_NNNNNNNN`` with a ``COMMIT`` marker written last);
* at the end it writes ``final.pt`` (rank 0) and exits 0.

Every rank appends what happened to ``<output_dir>/events.jsonl``.
``FAKE_TRAINER_STEP_SECONDS`` (default 0.05) sets the time per step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from sfd_train.launchers.contract import REQUEUE_EXIT_CODE, requeue_file


def load_config(argv: list[str]) -> dict:
    with open(argv[0]) as f:
        config = yaml.safe_load(f)
    for item in argv[1:]:
        key, _, value = item.partition("=")
        section = config
        *parents, leaf = key.split(".")
        for name in parents:
            section = section.setdefault(name, {})
        section[leaf] = yaml.safe_load(value)
    return config


def step_update(w: torch.Tensor, step: int, world: int) -> torch.Tensor:
    """One training step: what the all-reduced gradient of ``step`` does to ``w``."""
    grad = torch.full_like(w, float(step + 1) * world * (world + 1) / 2)
    return 0.9 * w + 0.01 * grad + torch.arange(4, dtype=w.dtype) * 1e-3


def main() -> int:
    config = load_config(sys.argv[1:])
    out = Path(config["run"]["output_dir"])
    max_steps = int(config["train"]["max_steps"])
    every = int(config["checkpoint"]["every"])
    step_seconds = float(os.environ.get("FAKE_TRAINER_STEP_SECONDS", "0.05"))
    initial_usr2 = signal.getsignal(signal.SIGUSR2)

    stop: list[int] = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: stop.append(signum))
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def event(**fields) -> None:
        fields.update(rank=rank, pid=os.getpid(), restart=int(os.environ.get("SLURM_RESTART_COUNT", "0")))
        with open(out / "events.jsonl", "a") as f:
            f.write(json.dumps(fields) + "\n")

    checkpoints = out / "checkpoints"

    def save(step: int, w: torch.Tensor) -> None:
        folder = checkpoints / f"step_{step:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"step": step, "w": w}, folder / f"rank{rank}.pt")
        dist.barrier()
        if rank == 0:
            (folder / "COMMIT").write_text("")
        dist.barrier()

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        requeue_file(out).unlink(missing_ok=True)
    dist.barrier()

    step, w = 0, torch.zeros(4, dtype=torch.float64)
    complete = sorted(p for p in checkpoints.glob("step_*") if (p / "COMMIT").exists()) if checkpoints.exists() else []
    if complete:
        state = torch.load(complete[-1] / f"rank{rank}.pt")
        step, w = state["step"], state["w"]
    event(event="start", step=step, usr2_ignored_at_start=initial_usr2 == signal.SIG_IGN, world=world)

    while step < max_steps:
        flag = torch.tensor([1 if stop else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            event(event="preempt", step=step, signals=stop)
            save(step, w)
            if rank == 0:
                tmp = requeue_file(out).with_suffix(".tmp")
                reason = signal.Signals(stop[0]).name if stop else "peer"
                tmp.write_text(json.dumps({"step": step, "reason": reason}))
                os.replace(tmp, requeue_file(out))
            # Nobody exits before the REQUEUE file exists: a node whose workers end
            # early gets the others killed by srun --kill-on-bad-exit.
            dist.barrier()
            dist.destroy_process_group()
            return REQUEUE_EXIT_CODE
        w = step_update(w, step, world)
        step += 1
        if rank == 0:
            print(f"fake trainer step {step} w0={w[0].item():.6f}", flush=True)
        if every and step % every == 0 and step < max_steps:
            save(step, w)
        time.sleep(step_seconds)

    save(step, w)
    if rank == 0:
        torch.save({"step": step, "w": w}, out / "final.pt")
    event(event="done", step=step)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
