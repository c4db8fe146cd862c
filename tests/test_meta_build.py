"""The meta-device build (sfd_train.engine.materialize): every rank materialises only its part of
the model and the EMA, and the values are bit for bit those of the full build, on any world size
and layout; checkpoint.init_from loads into the parts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ports import free_port
from runs import TINY, train, write_config
from sfd_train.config import build_config
from sfd_train.config.registry import task_of_config
from sfd_train.engine.materialize import InitOp, InitRecordError, advance, define_on_meta

WORKER = Path(__file__).with_name("meta_build_worker.py")
SEMVAE = {"task": "semvae", "model": {"hidden_dim": 32, "transformer_heads": 4, "transformer_blocks": 1,
                                      "bottleneck_dim": 4, "input_dim": 32},
          "data": {"path": "unused"}}


def _sfd(**parallel):
    return {"model": TINY["model"], "data": {"path": "unused"}, "parallel": {"param_dtype": "fp32", **parallel}}


def _variants():
    sfd = build_config(_sfd())
    sync_gelu = build_config({"model": {**TINY["model"], "delta_t": 0.0, "use_swiglu": False, "use_rmsnorm": False,
                                        "use_repa": False}})
    return [pytest.param(sfd, id="sfd"), pytest.param(sync_gelu, id="sfd dt=0 GELU LayerNorm"),
            pytest.param(build_config(SEMVAE), id="semvae")]


@pytest.mark.parametrize("config", _variants())
def test_replaying_the_recorded_initialisation_gives_the_full_build(config):
    task = task_of_config(config).task_class()
    torch.manual_seed(5)
    full = task.build_model(config, "cpu")
    after_full = torch.rand(4)
    torch.manual_seed(5)
    model, plan = define_on_meta(lambda: task.build_model(config, "cpu"))
    assert all(t.is_meta for t in model.state_dict().values())
    model.to_empty(device="cpu")
    plan.replay(model)
    after_replay = torch.rand(4)
    expected, got = full.state_dict(), model.state_dict()
    assert expected.keys() == got.keys()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    assert torch.equal(after_full, after_replay)  # the generator ends where the full build leaves it
    # torch's default init of each Linear is drawn (the generator must advance) but not kept.
    assert any(not op.live and op.draws for op in plan.ops)


class _EveryKindOfInit(nn.Module):
    """Factories with values, torch's default inits overwritten by nn.init functions that skip meta
    tensors (trunc_normal_, orthogonal_), one that writes through out= (eye_), a view, an update."""

    def __init__(self):
        super().__init__()
        self.ones = nn.Parameter(torch.ones(4))
        self.halves = nn.Parameter(torch.full((2, 3), 0.5))
        self.register_buffer("zeros", torch.zeros(3))
        self.truncated = nn.Linear(4, 6)
        nn.init.trunc_normal_(self.truncated.weight, std=0.02)
        self.orthogonal = nn.Linear(5, 5)
        nn.init.orthogonal_(self.orthogonal.weight)
        self.eye = nn.Parameter(torch.empty(3, 3))
        nn.init.eye_(self.eye)
        self.conv = nn.Conv2d(3, 4, 2)
        nn.init.xavier_uniform_(self.conv.weight.view(4, -1))
        with torch.no_grad():
            self.conv.bias.mul_(2.0).add_(1.0)


def test_every_kind_of_recorded_initialisation_replays_exactly():
    torch.manual_seed(0)
    full = _EveryKindOfInit()
    after_full = torch.rand(4)
    torch.manual_seed(0)
    model, plan = define_on_meta(_EveryKindOfInit)
    model.to_empty(device="cpu")
    plan.replay(model)
    assert torch.equal(after_full, torch.rand(4))
    for name, value in full.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name


def _draw(func, shape, args):
    return InitOp("w", func, shape, torch.float32, args, {}, creates=False, overwrites=True, draws=True)


@pytest.mark.parametrize("func,args", [(torch.ops.aten.uniform_.default, (-0.3, 0.3)),
                                       (torch.ops.aten.normal_.default, (0.0, 0.02))], ids=["uniform_", "normal_"])
@pytest.mark.parametrize("shape,start,stop", [
    ((64,), 16, 48), ((37,), 5, 21), ((37,), 33, 37), ((37,), 0, 0), ((1003,), 1, 1002),
    ((13, 9), 27, 81), ((13, 9), 90, 117), ((256, 7), 0, 896), ((256, 7), 896, 1792),
])
def test_drawing_a_ranks_rows_gives_the_slice_of_the_whole_draw(func, args, shape, start, stop):
    """Each rank draws only its rows and steps over the rest (advance): the values must be those of
    the whole draw, and the generator must end where the whole draw leaves it, whatever the size
    modulo normal_'s blocks of 16 and wherever the rows start."""
    op = _draw(func, shape, args)
    torch.manual_seed(3)
    whole = op.apply(None).flatten()[start:stop].clone()
    after_whole = torch.rand(3)
    torch.manual_seed(3)
    rows = op.draw_rows(start, stop)
    assert torch.equal(rows, whole)
    assert torch.equal(torch.rand(3), after_whole)
    torch.manual_seed(3)
    advance(op.draw_count())  # stepping over the whole draw
    assert torch.equal(torch.rand(3), after_whole)


def test_draws_whose_count_depends_on_their_values_are_drawn_whole():
    assert _draw(nn.init.trunc_normal_, (64, 64), ()).draw_count() is None  # rejection sampling in this torch
    assert _draw(torch.ops.aten.normal_.default, (15,), ()).draw_count() is None  # torch's serial path


class _FromData(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([1.0, 2.0]))


class _OutOfPlaceDraw(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3))


class _DrawsIntoACpuTensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3))
        self.noise = torch.empty(3, device="cpu").uniform_()  # moves the generator; a replay would not


class _PartialInit(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4, 4))
        nn.init.ones_(self.weight[:2])


@pytest.mark.parametrize("module,message", [
    (_FromData, "no recorded initial value for weight"),
    (_OutOfPlaceDraw, "draws random numbers into a new tensor"),
    (_DrawsIntoACpuTensor, "draws random numbers into a cpu tensor"),
    (_PartialInit, "writes part of weight"),
])
def test_a_constructor_that_cannot_be_replayed_is_named(module, message):
    with pytest.raises(InitRecordError, match=message):
        define_on_meta(module)


def _run_worker(tmp_path: Path, cases: list[dict], nproc: int) -> dict:
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), str(WORKER), str(tmp_path / "cases.json"), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]
    for case in cases:
        for rank, results in enumerate(ranks):
            found = results[case["name"]]
            where = f"{case['name']}, rank {rank}"
            assert found["checked"] > 0, where
            assert found["model_mismatches"] == [], where
            assert found["ema_mismatches"] == [], where
            assert found["ema_shares_memory"] == [], where
            assert found["rng_in_step"], where
    return {case["name"]: [r[case["name"]] for r in ranks] for case in cases}


@pytest.mark.slow
def test_one_rank_equals_the_full_build(tmp_path):
    _run_worker(tmp_path, [
        {"name": "fsdp2", "config": _sfd(strategy="fsdp2")},
        {"name": "ddp", "config": _sfd(strategy="ddp")},
        {"name": "semvae fsdp2", "config": {**SEMVAE, "parallel": {"strategy": "fsdp2", "param_dtype": "fp32"}}},
    ], nproc=1)


@pytest.mark.slow
def test_two_ranks_fsdp2_hold_half_each_and_equal_the_full_build(tmp_path):
    # init_from a published-form file of other weights (an EMA of its own): cut to each rank's part.
    other = build_config(_sfd()).model
    from sfd_train.models import build_model

    torch.manual_seed(99)
    model, ema = build_model(other), build_model(other)
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "config": {}}, tmp_path / "other.pt")
    found = _run_worker(tmp_path, [
        {"name": "fsdp2", "config": _sfd(strategy="fsdp2")},
        {"name": "semvae fsdp2", "config": {**SEMVAE, "parallel": {"strategy": "fsdp2", "param_dtype": "fp32"}}},
        {"name": "init_from file", "config": {**_sfd(strategy="fsdp2"),
                                              "checkpoint": {"init_from": str(tmp_path / "other.pt")}}},
    ], nproc=2)
    full = sum(p.numel() for p in model.parameters())
    for per_rank in found.values():
        assert all(r["sharded_parameters"] > 0 for r in per_rank)
    # Each rank materialised only its shard: together the two hold the model once.
    assert sum(r["local_numel"] for r in found["fsdp2"]) == full
    assert max(r["local_numel"] for r in found["fsdp2"]) < 0.6 * full


@pytest.mark.slow
def test_four_ranks_hsdp_and_tensor_parallel_equal_the_full_build(tmp_path):
    # A DCP checkpoint written by one rank, read into TP 2 x FSDP 2 (each rank its own rows).
    config = write_config(tmp_path / "job.yaml", train={"max_steps": 1})
    train(config, [f"run.output_dir={tmp_path / 'run'}"])
    _run_worker(tmp_path, [
        {"name": "hsdp 2x2", "config": _sfd(strategy="fsdp2", dp_replicate=2, dp_shard=2)},
        {"name": "tp 2 x fsdp 2", "config": _sfd(strategy="fsdp2", dp_shard=2, tp=2)},
        {"name": "tp 2 x fsdp 2, init_from DCP", "config": {**_sfd(strategy="fsdp2", dp_shard=2, tp=2),
                                                           "checkpoint": {"init_from": str(tmp_path / "run")}}},
    ], nproc=4)
