"""SFD's central claim at toy scale: does letting semantics run ahead (dt > 0) help?

Trains the tiny SFD on the synthetic set for every dt in ``--dts`` and every seed in
``--seeds``, all at the same budget (steps x batch), each run a plain ``sfd-train`` job in a
process of its own on one CPU thread. Every ``--eval-every`` steps the job's own evaluation
samples the EMA model with the three-phase sampler (no guidance, the same noise and labels in
every run) and scores the pictures with the synthetic set's feature network: FID in its feature
space (``fid_synthetic``) and the class accuracy of the samples.

Outputs in ``--out``:

* ``runs/dt<dt>_seed<seed>/``: each run's folder (metrics.jsonl, checkpoints, eval.png);
* ``dt_ablation.json``: the settings, every run's curve and final numbers, and per dt the mean,
  standard deviation and range over seeds;
* ``fid_vs_dt.png``: final FID and class accuracy against dt (mean +- std over seeds, and each seed);
* ``fid_vs_step.png``: FID against step for every dt (mean +- std over seeds); the paper's
  convergence claim is the dt = 0 vs dt = 0.3 pair;
* ``part_errors.png``: each part's denoising error against its own time in the final models
  (mean over seeds): what the lead does to each part (see :func:`part_errors`).

It is resumable: a finished run is read back, not redone, and an interrupted one continues from
its last checkpoint (sfd-train resumes by itself). ``--jobs`` runs go in parallel (one per core).

Example (44 minutes on 2 cores)::

    python benchmarks/dt_ablation.py --out benchmarks/results/dt_ablation
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from sfd_train.engine.metrics import read_metrics  # noqa: E402

METRICS = ("fid_synthetic", "class_accuracy", "val_loss")
PROBE_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)
"""A part's own time at which the probe measures that part's denoising error."""
PROBE_SAMPLES = 256


def run_name(dt: float, seed: int) -> str:
    return f"dt{dt:g}_seed{seed}"


def run_overrides(args: argparse.Namespace, dt: float, seed: int, run_dir: Path) -> list[str]:
    """The tiny preset at the ablation's budget; only dt and the seed differ between runs."""
    return [
        f"model.delta_t={dt}",
        f"train.seed={seed}",
        f"train.max_steps={args.steps}",
        f"train.global_batch_size={args.batch}",
        "train.sample_every=0",
        "parallel.strategy=ddp",
        "sampler.cfg_scale_sem=1.0",  # the model itself, not guidance, is what dt changes
        "sampler.cfg_scale_tex=1.0",
        f"eval.every={args.eval_every}",
        f"eval.num_samples={args.eval_samples}",
        f"eval.sampling_steps={args.sampling_steps}",
        "eval.seed=0",  # the same noise and labels for every run: differences come from the models
        f"checkpoint.every={args.eval_every}",
        "checkpoint.keep=1",
        "run.wandb_mode=disabled",
        f"run.output_dir={run_dir}",
    ]


def finished(run_dir: Path, steps: int) -> dict | None:
    """The run's evaluation at its last step, when it has one."""
    if not (run_dir / "metrics.jsonl").exists():
        return None
    for record in read_metrics(run_dir):
        if record.get("step") == steps and record.get("fid_synthetic") is not None:
            return record
    return None


@torch.no_grad()
def part_errors(run_dir: Path) -> dict:
    """Each part's denoising error, against that part's own time, in the run's final EMA model.

    Texture at ``t_tex = t`` sees the semantics at ``min(t + dt, 1)``, the pairing it was trained
    on; semantics at ``t_sem = t`` see the texture at ``max(t - dt, 0)``. At the same ``t``, a
    lower texture error for dt > 0 than for dt = 0 is what the lead buys: knowing the semantics
    better makes the texture easier to denoise. Held-out latents (the validation set), fixed
    noise, no guidance; the mean squared error of the velocity per channel of the part.
    """
    import numpy as np

    from sfd_train.config import build_config
    from sfd_train.data_pipeline.manifest import read_manifest
    from sfd_train.data_pipeline.reader import CompositeLatentLoader
    from sfd_train.data_pipeline.stats import normalize
    from sfd_train.data_pipeline.synthetic import ensure_synthetic_dataset, ensure_synthetic_validation_set
    from sfd_train.diffusion.schedule import interpolate, per_channel_time
    from sfd_train.engine.weights import read_checkpoint_weights
    from sfd_train.models import build_model

    model_state, ema_state, saved = read_checkpoint_weights(run_dir)
    config = build_config(saved)
    model = build_model(config.model).eval()
    model.load_state_dict(ema_state if ema_state is not None else model_state)
    validation = CompositeLatentLoader(ensure_synthetic_validation_set(), global_batch_size=1, micro_batch_size=1,
                                       rank=0, world_size=1, seed=0, num_workers=0, use_flip=False, normalize=False)
    batch = validation.read_samples(np.arange(PROBE_SAMPLES))
    x = normalize(batch["x"], read_manifest(ensure_synthetic_dataset()))
    labels = batch["y"]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    channels, semantic = config.model.in_channels, config.model.semantic_channels
    dt = config.model.delta_t
    target = x - noise
    errors: dict[str, dict[str, float]] = {"texture": {}, "semantic": {}}
    for t in PROBE_TIMES:
        for part, (t_tex, t_sem) in (("texture", (t, min(t + dt, 1.0))), ("semantic", (max(t - dt, 0.0), t))):
            tex = torch.full((len(x),), t_tex)
            sem = torch.full((len(x),), t_sem)
            velocity = model(interpolate(x, noise, per_channel_time(tex, sem, channels, semantic)), tex, sem, labels,
                             with_projection=False)
            part_slice = slice(0, channels - semantic) if part == "texture" else slice(channels - semantic, channels)
            errors[part][f"{t:g}"] = float(((velocity - target)[:, part_slice] ** 2).mean())
    return errors


def train_one(args: argparse.Namespace, dt: float, seed: int) -> dict:
    """Runs (or resumes, or reads back) one configuration; returns its record for the JSON."""
    run_dir = args.out / "runs" / run_name(dt, seed)
    timing = run_dir / "wall_seconds.json"
    if finished(run_dir, args.steps) is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
        command = [sys.executable, "-m", "sfd_train.train", "tiny", *run_overrides(args, dt, seed, run_dir)]
        start = time.time()
        with open(run_dir / "train.log", "a") as log:
            result = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            raise RuntimeError(f"{run_name(dt, seed)} failed (exit {result.returncode}); see {run_dir / 'train.log'}")
        spent = time.time() - start + (json.loads(timing.read_text())["wall_s"] if timing.exists() else 0.0)
        timing.write_text(json.dumps({"wall_s": round(spent, 1)}))
        print(f"  done {run_name(dt, seed)} in {spent / 60:.1f} min", flush=True)
    records = [r for r in read_metrics(run_dir) if r.get("fid_synthetic") is not None]
    probe = run_dir / "part_errors.json"
    if not probe.exists():
        probe.write_text(json.dumps(part_errors(run_dir)))
    return {
        "dt": dt, "seed": seed, "run_dir": str(run_dir.relative_to(args.out)),
        "wall_s": json.loads(timing.read_text())["wall_s"] if timing.exists() else None,
        "final": {key: records[-1].get(key) for key in METRICS},
        "curve": [{"step": r["step"], **{key: r.get(key) for key in METRICS}} for r in records],
        "part_errors": json.loads(probe.read_text()),
    }


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarise(runs: list[dict], dts: list[float]) -> dict:
    summary = {}
    for dt in dts:
        mine = [r for r in runs if r["dt"] == dt]
        summary[f"{dt:g}"] = {key: spread([r["final"][key] for r in mine]) for key in METRICS}
        summary[f"{dt:g}"]["part_errors"] = {
            part: {t: statistics.fmean(r["part_errors"][part][t] for r in mine) for t in mine[0]["part_errors"][part]}
            for part in ("texture", "semantic")
        }
    return summary


def versus_no_lead(summary: dict, dts: list[float]) -> dict:
    """Each dt's mean FID and accuracy minus dt = 0's, with the standard error of that difference."""
    if 0.0 not in dts:
        return {}
    base = summary["0"]
    out = {}
    for dt in dts:
        if dt == 0.0:
            continue
        mine = summary[f"{dt:g}"]
        out[f"{dt:g}"] = {
            key: {"difference": mine[key]["mean"] - base[key]["mean"],
                  "standard_error": (mine[key]["std"] ** 2 / mine[key]["n"] + base[key]["std"] ** 2 / base[key]["n"]) ** 0.5}
            for key in ("fid_synthetic", "class_accuracy")
        }
    return out


def _save(fig, path: Path) -> None:
    """Writes a finished figure and frees it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot(runs: list[dict], summary: dict, dts: list[float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for ax, key, title in ((axes[0], "fid_synthetic", "FID (synthetic features), lower is better"),
                           (axes[1], "class_accuracy", "class accuracy of samples")):
        means = [summary[f"{dt:g}"][key]["mean"] for dt in dts]
        stds = [summary[f"{dt:g}"][key]["std"] for dt in dts]
        ax.errorbar(dts, means, yerr=stds, marker="o", capsize=4, label="mean +- std over seeds")
        ax.scatter([r["dt"] for r in runs], [r["final"][key] for r in runs], s=10, color="gray", alpha=0.7,
                   label="each seed", zorder=3)
        ax.set_xlabel("dt (semantic lead)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    _save(fig, out / "fid_vs_dt.png")

    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=120)
    for dt in dts:
        curves = [r["curve"] for r in runs if r["dt"] == dt]
        steps = [point["step"] for point in curves[0]]
        values = [[c[i]["fid_synthetic"] for c in curves if i < len(c)] for i in range(len(steps))]
        mean = [statistics.fmean(v) for v in values]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        style = {"linewidth": 2.4} if dt in (0.0, 0.3) else {"linewidth": 1.0, "alpha": 0.6}
        line, = ax.plot(steps, mean, marker="o", markersize=3, label=f"dt = {dt:g}", **style)
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.12)
    ax.set_xlabel("training step")
    ax.set_ylabel("FID (synthetic features)")
    ax.set_yscale("log")
    ax.set_title("FID against step (mean +- std over seeds)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, out / "fid_vs_step.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for ax, part, title in ((axes[0], "texture", "texture error at t_tex (semantics at min(t_tex + dt, 1))"),
                            (axes[1], "semantic", "semantic error at t_sem (texture at max(t_sem - dt, 0))")):
        for dt in dts:
            errors = summary[f"{dt:g}"]["part_errors"][part]
            ax.plot([float(t) for t in errors], list(errors.values()), marker="o", markersize=3, label=f"dt = {dt:g}")
        ax.set_xlabel("the part's own time (0 = noise, 1 = data)")
        ax.set_ylabel("velocity MSE per channel")
        ax.set_title(title, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    _save(fig, out / "part_errors.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train tiny SFD models on the synthetic set for several dt and seeds at one budget, "
                    "and compare their FID and class accuracy (SFD's claim that dt = 0.3 beats dt = 0).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dt_ablation",
                        help="folder of the runs, the JSON and the plots (re-running resumes here)")
    parser.add_argument("--dts", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.5], help="semantic leads")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds per dt")
    parser.add_argument("--steps", type=int, default=600, help="training steps per run (the budget)")
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--eval-every", type=int, default=150, help="steps between evaluations")
    parser.add_argument("--eval-samples", type=int, default=500, help="samples per evaluation")
    parser.add_argument("--sampling-steps", type=int, default=20, help="Euler steps of the three-phase sampler")
    parser.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 8)),
                        help="runs in parallel (each on one thread)")
    parser.add_argument("--report-only", action="store_true",
                        help="only rebuild the JSON and plots from finished runs")
    args = parser.parse_args(argv)
    if args.steps % args.eval_every:
        parser.error(f"--steps {args.steps} must be a multiple of --eval-every {args.eval_every}")
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    grid = [(dt, seed) for seed in args.seeds for dt in args.dts]
    to_train = [job for job in grid if finished(args.out / "runs" / run_name(*job), args.steps) is None]
    if to_train and not args.report_only:
        # The shared caches (dataset, validation set, feature network) are built once, up front,
        # so that parallel runs do not wait on each other's locks with a core each.
        subprocess.run([sys.executable, "-c", "from sfd_train.evaluation.synthetic import prepare_synthetic_caches;"
                        "prepare_synthetic_caches()"], cwd=REPO, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        start = time.time()
        print(f"{len(to_train)} of {len(grid)} runs to train, {args.jobs} at a time, {args.steps} steps x batch "
              f"{args.batch} each", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: train_one(args, *job), to_train))
        print(f"all runs finished in {(time.time() - start) / 60:.1f} min", flush=True)
    missing = [run_name(dt, seed) for dt, seed in grid if finished(args.out / "runs" / run_name(dt, seed), args.steps) is None]
    if missing:
        print(f"unfinished runs: {', '.join(missing)}", file=sys.stderr)
        return 1
    runs = [train_one(args, dt, seed) for dt, seed in grid]
    summary = summarise(runs, args.dts)
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()
                if key not in ("report_only", "out")}
    report = {"settings": {**settings, "preset": "tiny", "guidance": "none", "sampler": "three-phase Euler"},
              "summary": summary, "versus_dt0": versus_no_lead(summary, args.dts), "runs": runs}
    (args.out / "dt_ablation.json").write_text(json.dumps(report, indent=1))
    plot(runs, summary, args.dts, args.out)
    print(f"{'dt':>5} {'FID mean':>9} {'std':>6} {'min':>6} {'max':>6} {'acc mean':>9} {'std':>6}")
    for dt in args.dts:
        fid, acc = summary[f"{dt:g}"]["fid_synthetic"], summary[f"{dt:g}"]["class_accuracy"]
        print(f"{dt:>5g} {fid['mean']:>9.2f} {fid['std']:>6.2f} {fid['min']:>6.2f} {fid['max']:>6.2f} "
              f"{acc['mean']:>9.3f} {acc['std']:>6.3f}")
    print("texture error at t_tex (semantics at t_tex + dt):")
    times = list(summary[f"{args.dts[0]:g}"]["part_errors"]["texture"])
    print(f"{'dt':>5} " + " ".join(f"{'t=' + t:>7}" for t in times))
    for dt in args.dts:
        errors = summary[f"{dt:g}"]["part_errors"]["texture"]
        print(f"{dt:>5g} " + " ".join(f"{errors[t]:>7.4f}" for t in times))
    print(f"JSON and plots in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
