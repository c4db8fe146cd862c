"""benchmarks/scaling_model.py: the byte counts of real multi-rank runs agree with the formulas, and
the projection behaves as a scaling model must."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def sm():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("_bench_scaling_model", BENCH / "scaling_model.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def projection(sm):
    return sm.project_all(sm.Assumptions(), log=lambda *_: None)


# ------------------------------------------------------------------ the formulas, without running anything
def test_ring_factors(sm):
    assert sm.ring_factor("all_reduce", 4) == pytest.approx(1.5)
    assert sm.ring_factor("all_gather", 4) == sm.ring_factor("reduce_scatter", 4) == pytest.approx(0.75)
    assert sm.ring_factor("broadcast", 8) == 1.0
    assert sm.ring_factor("all_reduce", 1) == sm.ring_factor("broadcast", 1) == 0.0


def test_fsdp2_pads_dim_0_to_the_shard_count(sm):
    assert sm.fsdp_padded((1, 64, 64), 4) == 4 * 64 * 64  # pos_embed: one row, padded to one per rank
    assert sm.fsdp_padded((11, 64), 4) == 12 * 64  # the label table with its null class
    assert sm.fsdp_padded((192, 64), 4) == 192 * 64


def test_inventories_match_the_built_models(sm):
    from sfd_train.config import build_config
    from sfd_train.models import build_model

    tiny = sm.tiny_inventory()
    model = build_model(build_config(sm.TINY_CONFIG).model)
    assert tiny.total == sum(p.numel() for p in model.parameters())
    assert tiny.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert tiny.buffer_numel == sum(b.numel() for b in model.buffers())
    xxl = sm.inventory_of(sm.projected_model_config("XXL"))
    assert xxl.total / 1e6 == pytest.approx(1037.2, abs=0.05)  # README: sfd_xxl, 1037.2M
    assert (xxl.depth, xxl.hidden, xxl.tokens) == (24, 1536, 256)


def test_formulas_follow_the_textbook_volumes(sm):
    inv = sm.inventory_of(sm.projected_model_config("XL"))
    n, p = 64, inv.trainable
    st = sm.StepSettings(micro_batch=32)
    ddp = sm.by_key(sm.formula_traffic(inv, n, sm.Layout("ddp"), st))
    assert ddp["all_reduce@64/1"] == pytest.approx(2 * (n - 1) / n * p * 4)
    fsdp = sm.formula_traffic(inv, n, sm.Layout("fsdp2"), st)
    gathers = sum(f.rank_bytes for f in fsdp if f.kind == "all_gather")
    # bf16, forward + backward; the one-row pos_embed (1, 256, 1152) is padded to one row per shard.
    padded = inv.total + (n - 1) * 256 * 1152
    assert gathers == pytest.approx(2 * (n - 1) / n * padded * 2, rel=0.001)
    hsdp = sm.by_key(sm.formula_traffic(inv, n, sm.Layout("fsdp2", 8, 8), st))
    assert set(hsdp) == {"all_gather@8/1", "reduce_scatter@8/1", "all_reduce@8/8"}
    assert hsdp["all_reduce@8/8"] == pytest.approx(2 * 7 / 8 * p / 8 * 4, rel=0.01)  # only shards cross nodes


def test_tensor_parallel_moves_activations_per_block(sm):
    inv = sm.inventory_of(sm.projected_model_config("XXL"))
    st = sm.StepSettings(micro_batch=4, accumulation=2)
    flows = sm.formula_traffic(inv, 16, sm.Layout("fsdp2", 2, 4, 2), st)
    activations = [f for f in flows if f.group == "tp" and f.what.startswith("activation")]
    per_block = 4 * 256 * 1536 * 2  # (B, N, D) in bf16
    assert sum(f.payload_bytes for f in activations) == 4 * 24 * 2 * per_block


def test_links_follow_the_group(sm):
    a, h100 = sm.Assumptions(), sm.CLUSTERS["h100"]
    inside = sm.Flow("all_gather", "dp_shard", 8, 1, 1e9, 1, "forward", "")
    replicas = sm.Flow("all_reduce", "dp_replicate", 32, 8, 1e9, 1, "backward", "")
    flat = sm.Flow("all_gather", "world", 256, 1, 1e9, 1, "forward", "")
    assert sm.flow_seconds(inside, h100, a)[1] == 0.0
    assert sm.flow_seconds(replicas, h100, a)[0] == 0.0
    # A flat group's bytes leave a node over all eight NICs; a replica group's over one.
    per_byte_flat = sm.flow_seconds(flat, h100, a)[1] / flat.rank_bytes
    per_byte_replicas = sm.flow_seconds(replicas, h100, a)[1] / replicas.rank_bytes
    assert per_byte_flat < per_byte_replicas / 4


# ------------------------------------------------------------------ the projection
def test_communication_grows_with_devices_in_weak_scaling(sm, projection):
    """Fixed images per device: the exposed communication of a layout never shrinks with more devices,
    and the efficiency at 1024 devices is no better than on one node. (Efficiency itself may rise a
    little from 8 to 64 devices: sharded optimizer states shrink the optimizer step.)"""
    for cluster in sm.CLUSTERS:
        for model in sm.MODEL_SIZES_PROJECTED:
            for family in sm.FAMILIES:
                rows = sorted((r for r in projection["rows"] if r["feasible"] and r["scenario"] == "weak" and
                               (r["cluster"], r["model"], r["family"]) == (cluster, model, family.name)),
                              key=lambda r: r["devices"])
                assert [r["devices"] for r in rows] == list(sm.DEVICE_COUNTS), (cluster, model, family.name)
                exposed = [r["step_s"] - r["compute_s"] - r["optimizer_s"] for r in rows]
                assert all(b >= a - 1e-6 for a, b in zip(exposed, exposed[1:])), (cluster, model, family.name, exposed)
                assert rows[-1]["efficiency"] <= rows[0]["efficiency"] + 0.01, (cluster, model, family.name)
                assert all(0 < r["efficiency"] <= 1 for r in rows)


def test_strong_scaling_shortens_steps_until_communication_dominates(sm, projection):
    rows = {r["devices"]: r for r in projection["rows"] if r["feasible"] and
            (r["cluster"], r["model"], r["scenario"], r["family"]) == ("h100", "XXL", "strong-1024", "hsdp")}
    assert rows[64]["step_s"] < rows[8]["step_s"] / 4
    assert rows[1024]["efficiency"] < rows[256]["efficiency"] < rows[64]["efficiency"] < rows[8]["efficiency"]
    for row in rows.values():  # compute and communication never take less than the ideal
        assert row["step_s"] >= row["ideal_s"]


def test_recommended_xxl_layout_reaches_90_percent_at_256_devices(sm, projection):
    a = sm.Assumptions()
    family = sm.recommended_family("weak", 256, a)
    assert family == "hsdp"
    for cluster in sm.CLUSTERS:
        mine = sm.best_row(projection["rows"], cluster, "XXL", "weak", 256, families=[family])
        assert mine["layout"] == "hsdp 32x8"  # one shard group per node
        assert mine["efficiency"] >= 0.90, (cluster, mine)
        fastest = sm.best_row(projection["rows"], cluster, "XXL", "weak", 256)
        assert mine["step_s"] <= 1.03 * fastest["step_s"], (cluster, fastest["family"])


def test_1024_devices_at_batch_1024_have_a_usable_layout(sm, projection):
    a = sm.Assumptions()
    family = sm.recommended_family("strong-1024", 1024, a)
    for cluster in sm.CLUSTERS:
        mine = sm.best_row(projection["rows"], cluster, "XXL", "strong-1024", 1024, families=[family])
        assert mine is not None and (mine["micro_batch"], mine["accumulation"]) == (1, 1)
        on_256 = sm.best_row(projection["rows"], cluster, "XXL", "strong-1024", 256,
                             families=[sm.recommended_family("strong-1024", 256, a)])
        assert mine["images_per_s"] >= 0.9 * on_256["images_per_s"]  # no slower than a quarter of the devices
        for other in ("ddp", "fsdp2", "zero2", "zero3"):
            worse = sm.best_row(projection["rows"], cluster, "XXL", "strong-1024", 1024, families=[other])
            assert mine["step_s"] < worse["step_s"], other


def test_batch_256_on_1024_devices_needs_tensor_parallel(sm, projection):
    feasible = {r["family"] for r in projection["rows"] if r["feasible"] and
                (r["cluster"], r["model"], r["scenario"], r["devices"]) == ("h100", "XL", "strong-256", 1024)}
    assert feasible and all("tp" in family for family in feasible)


# ------------------------------------------------------------------ real runs: counted bytes vs formulas
@pytest.mark.slow
def test_counted_bytes_of_real_runs_match_the_formulas(sm, tmp_path):
    wanted = ("fsdp2", "hsdp 2x2, 2 micro-batches", "fsdp2+tp2 (2 shards x 2)")
    cases = [case for case in sm.MEASURED_CASES if case.label in wanted]
    report = sm.run_measurements(cases, tmp_path, log=lambda *_: None)
    measured = {case["label"]: case for case in report["cases"]}
    assert "fsdp2" in measured and "hsdp 2x2, 2 micro-batches" in measured, report["skipped"]
    for case in report["cases"]:
        assert case["measured_bytes"] > 0
        assert abs(case["relative_error"]) < 0.05, case
    # Each strategy shows its own collectives on its own mesh dimension...
    assert {"all_gather@4/1", "reduce_scatter@4/1"} <= set(measured["fsdp2"]["measured_by_key"])
    hsdp = measured["hsdp 2x2, 2 micro-batches"]["measured_by_key"]
    assert hsdp["all_reduce@2/2"] > 0 and "all_gather@4/1" not in hsdp
    if "fsdp2+tp2 (2 shards x 2)" in measured:  # DTensor's functional collectives are counted too
        assert measured["fsdp2+tp2 (2 shards x 2)"]["measured_by_key"]["all_reduce@2/1"] > 0
    # ...and another strategy's formula does not pass for it.
    inv = sm.tiny_inventory()
    ddp_formula = sm.total_rank_bytes(sm.formula_traffic(inv, 4, sm.Layout("ddp"), sm.StepSettings(
        micro_batch=4, param_bytes=4, reduce_bytes=4, activation_bytes=4)))
    assert abs(ddp_formula / measured["fsdp2"]["measured_bytes"] - 1) > 0.05
