"""README's "Will it fit?" table: sfd-launch plan for XL/1 and XXL/1 on H100, H200 and Ascend 910B.

For each model, device and recommended layout (docs/scaling.md, "Which layout for which job"):
memory per device, the largest micro-batch that fits the device, step time, and the data the
nodes must read per second with the DINOv2 features stored in float16 and compact (int8).
Runs on the CPU (the plans trace fake tensors); a few minutes on 2 cores.

    python benchmarks/plan_table.py [--out benchmarks/results/plan]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sfd_train.config import load_config
from sfd_train.planning import resolve_device
from sfd_train.planning.data import data_bytes_per_image
from sfd_train.planning.plan import plan_job

REPO = Path(__file__).resolve().parents[1]
MODELS = {"XL": "sfd_xl", "XXL": "sfd_xxl"}
DEVICES = ("h100", "h200", "910b")
# (label, nodes, overrides): the published recipe's global batch 256 on one node (FSDP2, 32 images per
# device) and on eight (HSDP 8 x 8 with bf16 gradient reduction, 4 per device), and 32 images per
# device on 32 nodes (weak scaling, HSDP 32 x 8).
LAYOUTS = (
    ("batch 256, 1 x 8", 1, []),
    ("batch 256, 8 x 8", 8, ["parallel.reduce_dtype=bf16"]),
    ("batch 8192, 32 x 8", 32, ["train.global_batch_size=8192"]),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/plan_table.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "plan")
    args = parser.parse_args(argv)
    rows = []
    for model, preset in MODELS.items():
        for label, nodes, overrides in LAYOUTS:
            config = load_config(preset, overrides)
            for key in DEVICES:
                started = time.monotonic()
                plan = plan_job(config, nodes, 8, resolve_device(key), try_switches=False)
                compact = data_bytes_per_image(plan.config, dino_storage="int8").bytes_per_image
                per_node, _ = plan.data_mb_per_s()
                row = {"model": model, "layout": label, "device": key, "plan": plan.to_json(),
                       "data_mb_per_s_per_node_int8": compact * plan.images_per_second() / 1e6 / nodes,
                       "data_mb_per_s_per_node_float16": per_node, "seconds": time.monotonic() - started}
                rows.append(row)
                print(f"{model} {label} {key}: {plan.memory.total / 2**30:.1f} GiB, {plan.verdict()} "
                      f"({row['seconds']:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "table.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


def markdown(rows: list[dict]) -> str:
    lines = ["| model | job (nodes x 8) | device | memory per device | largest micro-batch | micro-batch now | "
             "step | data per node, float16 / int8 features |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        plan = row["plan"]
        details = plan["details"]
        lines.append(
            f"| {row['model']} | {row['layout']} | {row['device']} | {plan['memory_gib']['total']:.1f} GiB of "
            f"{details['usable_memory_gib']:.0f} | {details['memory_bound_micro_batch']} | {details['micro_batch']} | "
            f"{1e3 * plan['step_seconds']:.0f} ms | {row['data_mb_per_s_per_node_float16']:,.0f} / "
            f"{row['data_mb_per_s_per_node_int8']:,.0f} MB/s |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
