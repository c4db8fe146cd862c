"""Reading a checkpoint or weights file never runs code from it (sfd_train.safe_load).

Every hostile file here carries an object whose unpickling runs ``touch MARKER`` (os.system). Each
entry point that reads such files is tried with it: the marker must not appear and the command must
exit 2 naming the file; the same file with the trust switch is read (the marker appears), which
shows that the switch is the only door.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from extract_kit import make_kit
from runs import TINY, train, write_config
from sfd_train.safe_load import TRUST_ENV, InertRecord, UnsafeFileError, load_torch_file, loads_pickle


class Hostile:
    """Unpickling it runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _env(trust: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != TRUST_ENV}
    if trust:
        env[TRUST_ENV] = "1"
    return env


def _run(args: list, trust: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=_env(trust))


def _assert_refused(result: subprocess.CompletedProcess, path: Path, marker: Path) -> None:
    assert not marker.exists(), "the file's code ran"
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]  # the command's own one-line error (libraries may log above it)
    assert f"{path}: refused: reading it would call posix.system" in last and "--trust-checkpoint" in last, \
        result.stderr[-3000:]


# ------------------------------------------------------------------ the loader itself
def test_a_hostile_file_is_refused_naming_file_and_global_and_the_switch_reads_it(tmp_path, monkeypatch):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2)}, "config": Hostile(marker)}, path)
    monkeypatch.delenv(TRUST_ENV, raising=False)
    with pytest.raises(UnsafeFileError, match=r"evil\.pt: refused: reading it would call posix\.system") as info:
        load_torch_file(path)
    assert info.value.names == ["posix.system"] and not marker.exists()
    monkeypatch.setenv(TRUST_ENV, "1")
    assert load_torch_file(path)["model"]["w"].tolist() == [1.0, 1.0]
    assert marker.exists()


def test_a_plain_pickle_with_a_hostile_object_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    marker = tmp_path / "MARKER"
    data = pickle.dumps({"rng": (3, (1, 2), None), "x": Hostile(marker)})
    with pytest.raises(UnsafeFileError, match="posix.system"):
        loads_pickle(data, name="rng entry")
    assert not marker.exists()
    # what our RNG entries hold reads back: plain values, NumPy arrays, tensors inside the pickle
    state = {"python": (3, tuple(range(5)), None), "numpy": ("MT19937", np.arange(4, dtype=np.uint32), 2, 0, 0.0),
             "torch": torch.arange(3, dtype=torch.uint8)}
    back = loads_pickle(pickle.dumps(state))
    assert back["python"] == state["python"] and np.array_equal(back["numpy"][1], state["numpy"][1])
    assert torch.equal(back["torch"], state["torch"])


def _fake_module(monkeypatch, name: str, **members) -> None:
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    for key, value in members.items():
        value.__module__, value.__qualname__ = name, key
        setattr(sys.modules[name], key, value)


def lightning_checkpoint(state_dict: dict, monkeypatch) -> bytes:
    """A checkpoint as PyTorch Lightning 1.x writes it, its bookkeeping classes included (pickled
    from stand-in modules of the same names, which are gone again when the file is read)."""
    class AttributeDict(dict):
        pass

    class ModelCheckpoint:
        pass

    with monkeypatch.context() as patch:
        _fake_module(patch, "pytorch_lightning.utilities.parsing", AttributeDict=AttributeDict)
        _fake_module(patch, "pytorch_lightning.callbacks.model_checkpoint", ModelCheckpoint=ModelCheckpoint)
        hyper = AttributeDict(ddconfig={"ch": 128, "ch_mult": [1, 1, 2, 2, 4]}, embed_dim=32)
        blob = {"state_dict": state_dict, "epoch": 49, "global_step": 100, "pytorch-lightning_version": "1.4.2",
                "hyper_parameters": hyper, "hparams_name": "kwargs",
                "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5), "best_model_path": "x.ckpt"}},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]}],
                "args": argparse.Namespace(base=["configs/autoencoder.yaml"], seed=23),
                "np_loss": np.float64(0.25)}
        buffer = io.BytesIO()
        torch.save(blob, buffer)
    return buffer.getvalue()


def test_a_lightning_checkpoint_reads_its_tensors_and_logs_what_was_left_unread(tmp_path, monkeypatch, caplog,
                                                                              tokenizer_reference_path):
    from sfd_train.tokenizers.config import TextureVAEConfig
    from sfd_train.config.base import from_mapping
    from sfd_train.tokenizers.texture_vae import load_texture_vae

    monkeypatch.delenv(TRUST_ENV, raising=False)
    reference = torch.load(tokenizer_reference_path, weights_only=False)
    path = tmp_path / "ldm.ckpt"
    path.write_bytes(lightning_checkpoint(reference["vae"]["checkpoint"]["state_dict"], monkeypatch))
    assert "pytorch_lightning" not in sys.modules
    with caplog.at_level(logging.INFO, logger="sfd_train"):
        blob = load_torch_file(path)
    assert isinstance(blob["hyper_parameters"], InertRecord) and blob["hyper_parameters"]["embed_dim"] == 32
    assert blob["np_loss"] == 0.25 and blob["args"].state == {"base": ["configs/autoencoder.yaml"], "seed": 23}
    assert "pytorch_lightning" not in sys.modules  # inert: the class was never imported
    unread = " ".join(r.getMessage() for r in caplog.records if "left unread" in r.getMessage())
    assert "hyper_parameters (pytorch_lightning.utilities.parsing.AttributeDict)" in unread
    assert "key pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in unread
    assert "args (argparse.Namespace)" in unread
    # and the texture VAE loads from it strictly, as from the plain file
    plain = tmp_path / "plain.ckpt"
    torch.save(reference["vae"]["checkpoint"], plain)
    config = from_mapping(TextureVAEConfig, reference["vae"]["config"])
    expected = load_texture_vae(plain, config).state_dict()
    got = load_texture_vae(path, config).state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())


def test_deepspeed_reads_through_the_restricted_loader(tmp_path, monkeypatch):
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from sfd_train.engine.zero import use_safe_checkpoint_reads

    monkeypatch.delenv(TRUST_ENV, raising=False)
    engine = types.SimpleNamespace(checkpoint_engine=TorchCheckpointEngine())
    use_safe_checkpoint_reads(engine)
    good, evil, marker = tmp_path / "optim.pt", tmp_path / "evil.pt", tmp_path / "MARKER"
    torch.save({"zero_stage": ZeroStageEnum.gradients, "state": torch.ones(1)}, good)
    torch.save({"zero_stage": ZeroStageEnum.gradients, "x": Hostile(marker)}, evil)
    assert engine.checkpoint_engine.load(str(good))["zero_stage"] is ZeroStageEnum.gradients
    with pytest.raises(UnsafeFileError, match="evil.pt"):
        engine.checkpoint_engine.load(str(evil))
    assert not marker.exists()


def test_the_synthetic_feature_network_cache_is_read_safely(tmp_path, monkeypatch):
    from sfd_train.evaluation.synthetic import FILE, SyntheticEvaluator

    monkeypatch.delenv(TRUST_ENV, raising=False)
    marker = tmp_path / "MARKER"
    torch.save({"version": -1, "x": Hostile(marker)}, tmp_path / FILE)
    with pytest.raises(UnsafeFileError, match=FILE):
        SyntheticEvaluator(str(tmp_path))
    assert not marker.exists()


# ------------------------------------------------------------------ every entry point, end to end
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny SFD run (2 steps) and its exports."""
    root = tmp_path_factory.mktemp("safe")
    config = write_config(root / "tiny.yaml", run={**TINY["run"], "output_dir": str(root / "run")},
                          train={**TINY["train"], "max_steps": 2})
    train(config)
    return {"root": root, "config": config, "run": root / "run"}


def test_sfd_sample_refuses_a_hostile_checkpoint(tiny_run, tmp_path):
    from sfd_train.engine.weights import read_checkpoint_weights

    model, ema, config = read_checkpoint_weights(tiny_run["run"])
    marker, path = tmp_path / "MARKER", tmp_path / "evil.pt"
    torch.save({"model": model, "ema": ema, "config": Hostile(marker)}, path)
    args = ["-m", "sfd_train.sample", path, "--config", tiny_run["config"], "--labels", "0", "--out", tmp_path / "g.png"]
    _assert_refused(_run(args), path, marker)
    trusted = _run(args + ["--trust-checkpoint"])
    assert marker.exists(), trusted.stderr[-2000:]


def test_init_from_refuses_a_hostile_checkpoint(tiny_run, tmp_path):
    from sfd_train.engine.weights import read_checkpoint_weights

    model, ema, _ = read_checkpoint_weights(tiny_run["run"])
    marker, path = tmp_path / "MARKER", tmp_path / "evil.pt"
    torch.save({"model": model, "ema": ema, "config": {"x": Hostile(marker)}}, path)
    args = ["-m", "sfd_train.train", tiny_run["config"], f"run.output_dir={tmp_path / 'run'}", "train.max_steps=1",
            f"checkpoint.init_from={path}"]
    _assert_refused(_run(args), path, marker)
    trusted = _run(args, trust=True)
    assert marker.exists() and trusted.returncode == 0, trusted.stderr[-2000:]


def test_a_hostile_train_state_stops_the_resume_and_is_not_set_aside(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    checkpoint = next((run / "checkpoints").glob("step_*"))
    state = torch.load(checkpoint / "train_state.pt", weights_only=True)
    marker = tmp_path / "MARKER"
    state["data"] = {"position": Hostile(marker)}
    torch.save(state, checkpoint / "train_state.pt")
    marker_file = json.loads((checkpoint / "COMMITTED").read_text())
    marker_file["files"]["train_state.pt"] = (checkpoint / "train_state.pt").stat().st_size
    (checkpoint / "COMMITTED").write_text(json.dumps(marker_file))
    args = ["-m", "sfd_train.train", tiny_run["config"], f"run.output_dir={run}", "train.max_steps=3"]
    _assert_refused(_run(args), checkpoint / "train_state.pt", marker)
    assert checkpoint.is_dir() and not (run / "checkpoints" / "rejected").exists()
    # sfd-train export and sfd-sample read the same train state
    _assert_refused(_run(["-m", "sfd_train.cli", "export", run, "--out", tmp_path / "x.pt"]),
                    checkpoint / "train_state.pt", marker)


def test_a_hostile_dcp_metadata_is_refused(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    checkpoint = next((run / "checkpoints").glob("step_*"))
    marker = tmp_path / "MARKER"
    metadata = checkpoint / ".metadata"
    with open(metadata, "rb") as f:
        real = pickle.load(f)  # our own file, read to rebuild it with a hostile object inside
    real.storage_meta = Hostile(marker)
    metadata.write_bytes(pickle.dumps(real))
    committed = json.loads((checkpoint / "COMMITTED").read_text())
    committed["files"][".metadata"] = metadata.stat().st_size
    (checkpoint / "COMMITTED").write_text(json.dumps(committed))
    _assert_refused(_run(["-m", "sfd_train.cli", "export", run, "--out", tmp_path / "x.pt"]), metadata, marker)
    args = ["-m", "sfd_train.train", tiny_run["config"], f"run.output_dir={run}", "train.max_steps=3"]
    _assert_refused(_run(args), metadata, marker)
    assert not (run / "checkpoints" / "rejected").exists()


@pytest.mark.parametrize("network", ["vae", "dino", "semvae"])
def test_sfd_data_extract_refuses_hostile_tokenizer_weights(network, tmp_path, tokenizer_reference_path):
    from extract_kit import extract_command

    kit = make_kit(tmp_path, tokenizer_reference_path, images=3)
    marker, path = tmp_path / "MARKER", kit["files"][network]
    blob = kit["reference"][network]["checkpoint"]
    blob = {"state_dict": blob["state_dict"], "callbacks": Hostile(marker)} if network == "vae" else \
        {**blob, "extra": Hostile(marker)}
    torch.save(blob, path)
    command = extract_command(kit, tmp_path / "out")
    _assert_refused(_run(command[1:]), path, marker)
    trusted = _run(command[1:] + ["--trust-checkpoint"])
    assert marker.exists(), trusted.stderr[-2000:]


def test_sfd_eval_refuses_hostile_inception_weights(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        np.savez(tmp_path / f"{name}.npz", arr_0=rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    marker, path = tmp_path / "MARKER", tmp_path / "inception.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048), "x": Hostile(marker)}, path)
    args = ["-m", "sfd_train.evaluation.cli", tmp_path / "a.npz", tmp_path / "b.npz", "--inception", path,
            "--device", "cpu", "--cache", "", "--quiet"]
    _assert_refused(_run(args), path, marker)
    trusted = _run(args + ["--trust-checkpoint"])
    assert marker.exists() and trusted.returncode == 2, trusted.stderr[-2000:]  # read, then not Inception weights


# ------------------------------------------------------------------ safetensors export
def test_safetensors_export_round_trip_samples_like_the_pt_export(tiny_run, tmp_path):
    from safetensors import safe_open

    pt, st = tmp_path / "tiny.pt", tmp_path / "tiny.safetensors"
    for out, extra in ((pt, []), (st, ["--format", "safetensors"])):
        result = _run(["-m", "sfd_train.cli", "export", tiny_run["run"], "--out", out, *extra])
        assert result.returncode == 0, result.stderr[-2000:]
    with safe_open(str(st), framework="pt") as f:
        assert json.loads(f.metadata()["config"])["model"]["depth"] == TINY["model"]["depth"]
        keys = set(f.keys())
    exported = torch.load(pt, weights_only=True)
    assert keys == {f"model.{k}" for k in exported["model"]} | {f"ema.{k}" for k in exported["ema"]}
    grids = {}
    for source in (pt, st):
        out = tmp_path / f"{source.suffix[1:]}.png"
        result = _run(["-m", "sfd_train.sample", source, "--labels", "0", "3", "--out", out, "--quiet",
                       "sampler.num_steps=4"])
        assert result.returncode == 0, result.stderr[-2000:]
        grids[source.suffix] = torch.load(out.with_suffix(".pt"), weights_only=True)["latents"]
    assert torch.equal(grids[".pt"], grids[".safetensors"])
    # and checkpoint.init_from takes it
    result = _run(["-m", "sfd_train.train", tiny_run["config"], f"run.output_dir={tmp_path / 'ft'}",
                   "train.max_steps=1", f"checkpoint.init_from={st}"])
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_semvae_safetensors_export_loads_like_the_authors_format(tmp_path, tokenizer_reference_path):
    from sfd_train.config.base import from_mapping
    from sfd_train.tokenizers.config import SemVAEConfig
    from sfd_train.tokenizers.semvae import SemVAE, export_semvae, load_semvae

    reference = torch.load(tokenizer_reference_path, weights_only=False)
    model = SemVAE(from_mapping(SemVAEConfig, reference["semvae"]["config"]))
    export_semvae(model, tmp_path / "s.pt", iteration=5)
    export_semvae(model, tmp_path / "s.safetensors", iteration=5, format="safetensors")
    a, b = load_semvae(str(tmp_path / "s.pt")), load_semvae(str(tmp_path / "s.safetensors"))
    assert a.config == b.config
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
