"""Sample sets for the evaluator: independent of the world size, restartable, decoded to pictures."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from runs import train, write_config

NUM, CHUNK, BATCH = 24, 8, 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for 2 steps on the synthetic set."""
    tmp = tmp_path_factory.mktemp("sampling")
    config = write_config(tmp / "job.yaml", train={"max_steps": 2}, checkpoint={"every": 0})
    train(config, [f"run.output_dir={tmp / 'run'}"])
    return tmp / "run"


def _sample_command(run_dir, out, nproc=1, *extra):
    # the override after the options, as in the README (issue 26)
    args = [str(run_dir), "--num", str(NUM), "--chunk", str(CHUNK), "--batch-size", str(BATCH),
            "--out", str(out), "--quiet", *extra, "sampler.num_steps=4"]
    if nproc == 1:
        return [sys.executable, "-m", "sfd_train.sample", *args]
    # "--" ends torchrun's options: its --numa-binding would take --num as an abbreviation.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "--",
            "sfd_train.sample", *args]


def _run(command):
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def one_rank(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_rank") / "samples"
    _run(_sample_command(trained, out))
    return out


def test_the_set_is_in_adm_layout_with_balanced_labels(one_rank):
    with np.load(one_rank / "samples.npz") as data:
        assert data["arr_0"].shape == (NUM, 32, 32, 3) and data["arr_0"].dtype == np.uint8
        assert data["labels"].tolist() == [i % 10 for i in range(NUM)]
        assert data["arr_0"].std() > 0  # pictures, not a constant
    assert json.loads((one_rank / "plan.json").read_text())["num"] == NUM


@pytest.mark.slow
def test_two_ranks_give_the_same_set(trained, one_rank, tmp_path):
    _run(_sample_command(trained, tmp_path / "two", 2))
    with np.load(one_rank / "samples.npz") as a, np.load(tmp_path / "two" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])


def test_a_killed_job_restarted_gives_the_same_set(trained, one_rank, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(_sample_command(trained, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "chunks" / "chunk_000000.npz").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "samples.npz").exists(), "the job finished before it could be killed"
    _run(_sample_command(trained, out))
    with np.load(one_rank / "samples.npz") as a, np.load(out / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])


def test_overrides_stand_anywhere_among_the_options(capsys):
    from sfd_train.config.loader import parse_args_with_overrides
    from sfd_train.sample import build_parser, main

    args = parse_args_with_overrides(build_parser(), [
        "RUN", "sampler.seed=3", "--labels", "1", "2", "sampler.method=heun", "--out", "g.png", "--device", "auto",
        "sampler.method=dopri5"])
    assert (args.checkpoint, args.labels, args.out, args.device) == ("RUN", [1, 2], "g.png", "auto")
    assert args.overrides == ["sampler.seed=3", "sampler.method=heun", "sampler.method=dopri5"]  # the last one wins
    with pytest.raises(SystemExit) as exit:
        main(["RUN", "--num", "4", "bogus", "--out", "DIR", "sampler.seed=1"])
    assert exit.value.code == 2 and "'bogus' is neither an option nor an override" in capsys.readouterr().err


def test_other_settings_in_the_same_folder_are_refused(trained, one_rank):
    result = subprocess.run(_sample_command(trained, one_rank, 1, "--random-labels"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "random_labels differ" in result.stderr


def test_vae_decoding_uses_the_data_statistics(tokenizer_reference_path, tmp_path):
    from sfd_train.config import build_config
    from sfd_train.data_pipeline.stats import denormalize
    from sfd_train.evaluation.decode import build_decoder, to_uint8
    from sfd_train.tokenizers.texture_vae import load_texture_vae
    from sfd_train.config.base import from_mapping
    from sfd_train.tokenizers.config import TextureVAEConfig
    import yaml

    reference = torch.load(tokenizer_reference_path, weights_only=False)
    torch.save(reference["vae"]["checkpoint"], tmp_path / "vae.ckpt")
    (tmp_path / "tok.yaml").write_text(yaml.safe_dump({"vae": reference["vae"]["config"]}))
    stats = {"texture": {"mean": [0.5] * 8, "std": [2.0] * 8}, "semantic": {"mean": [0.0] * 4, "std": [1.0] * 4}}
    torch.save({"mean": torch.full((1, 8, 1, 1), 0.5), "std": torch.full((1, 8, 1, 1), 2.0)}, tmp_path / "latents_stats.pt")
    config = build_config({"model": {"size": "custom", "depth": 2, "hidden_size": 32, "num_heads": 2, "input_size": 4,
                                     "in_channels": 12, "semantic_channels": 4}, "data": {"path": "elsewhere"}})
    decoder = build_decoder(config, vae=str(tmp_path / "vae.ckpt"), tokenizers=str(tmp_path / "tok.yaml"),
                            stats=str(tmp_path / "latents_stats.pt"))
    latents = torch.randn(2, 8, 4, 4)
    vae = load_texture_vae(str(tmp_path / "vae.ckpt"), from_mapping(TextureVAEConfig, reference["vae"]["config"]))
    expected = ((vae.decode(denormalize(latents, stats)) + 1) / 2).clamp(0, 1)
    assert torch.allclose(decoder(latents), expected, atol=1e-6)
    images = to_uint8(decoder(latents))
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    with pytest.raises(Exception, match="needs its texture VAE: pass --vae"):
        build_decoder(config)


def test_nan_latents_are_an_error_naming_the_samples(tmp_path):
    from sfd_train.evaluation.sampling import SamplingJob, sample_to_folder

    with pytest.raises(ValueError, match=r"NaN or inf latents for samples 0\.\.3"):
        sample_to_folder(lambda noise, labels: noise * float("nan"), lambda t: t[:, :3].clamp(0, 1),
                         SamplingJob(num=4, batch_size=4, chunk=4), str(tmp_path), shape=(4, 2, 2), classes=2,
                         texture_channels=3, device=torch.device("cpu"), settings={})
    assert not list((tmp_path / "chunks").glob("*.npz"))
