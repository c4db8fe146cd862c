"""Inputs that used to be accepted and then went silently wrong are refused up front, naming the culprit.

Credentials in data.storage_options, URLs where outputs are written, labels outside the model's classes.
"""

import os
import subprocess
import sys

import pytest
import torch

from runs import TINY, write_config
from sfd_train.cli import export_main, sample_main
from sfd_train.config import ConfigError, build_config, load_config, to_dict
from sfd_train.data_pipeline.cli import main as data_main
from sfd_train.models import build_model

SECRET = "wJalrXUtnFEMI-do-not-print"


# --- 1. credentials -------------------------------------------------------------------------


def test_a_secret_override_stops_the_run_before_the_run_folder(tmp_path):
    config = write_config(tmp_path / "job.yaml")
    run_dir = tmp_path / "run"
    # max_steps=1 keeps the run short if the guard is missing and training starts.
    result = subprocess.run(
        [sys.executable, "-m", "sfd_train.train", str(config), f"run.output_dir={run_dir}", "train.max_steps=1",
         f"data.storage_options.secret={SECRET}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "config key 'data.storage_options.secret'" in result.stderr
    assert "AWS_SECRET_ACCESS_KEY" in result.stderr and "profile" in result.stderr
    assert SECRET not in result.stderr + result.stdout
    assert not run_dir.exists()


def test_a_nested_credential_in_a_yaml_file_is_refused(tmp_path):
    config = write_config(tmp_path / "job.yaml", data={
        "path": "s3://bucket/latents",
        "storage_options": {"client_kwargs": {"endpoint_url": "http://minio:9000", "AWS_Secret_Access_Key": SECRET}}})
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert err.value.key == "data.storage_options.client_kwargs.AWS_Secret_Access_Key"
    assert SECRET not in str(err.value)


@pytest.mark.parametrize("key", ["key", "TOKEN", "password", "aws_session_token", "sas_token", "connection_string",
                                 "client_secret", "api_key", "credentials"])
def test_every_credential_name_is_recognised(key):
    with pytest.raises(ConfigError, match=f"data.storage_options.{key}'"):
        build_config({"data": {"path": "s3://b/x", "storage_options": {key: SECRET}}})


def test_options_without_secrets_pass():
    options = {"profile": "research", "anon": False, "token": "anon", "requester_pays": True,
               "client_kwargs": {"endpoint_url": "http://minio:9000", "region_name": "us-east-1"}}
    assert build_config({"data": {"path": "s3://b/x", "storage_options": options}}).data.storage_options == options


def test_a_password_in_data_path_is_refused_without_printing_it():
    with pytest.raises(ConfigError) as err:
        build_config({"data": {"path": f"s3://AKIAEXAMPLE:{SECRET}@minio.local/bucket/latents"}})
    assert err.value.key == "data.path" and SECRET not in str(err.value)
    build_config({"data": {"path": "s3://bucket/latents"}})  # a plain URL stays fine


def test_sfd_data_refuses_a_secret_storage_option(tmp_path, capsys):
    assert data_main(["inspect", str(tmp_path / "nowhere"), "--storage-option", f"secret={SECRET}"]) == 2
    err = capsys.readouterr().err
    assert "--storage-option secret" in err and "AWS_SECRET_ACCESS_KEY" in err and SECRET not in err
    assert data_main(["stats", str(tmp_path / "nowhere"), "--storage-option",
                      f'client_kwargs={{"aws_access_key_id": "{SECRET}"}}']) == 2
    err = capsys.readouterr().err
    assert "--storage-option client_kwargs.aws_access_key_id" in err and SECRET not in err


def test_sfd_data_refuses_a_password_in_the_dataset_url(capsys):
    assert data_main(["inspect", f"memory://reader:{SECRET}@host/latents", "--no-check"]) == 2
    captured = capsys.readouterr()
    assert "password" in captured.err and SECRET not in captured.err + captured.out


# --- 3. outputs on object stores -------------------------------------------------------------


@pytest.mark.parametrize("url", ["s3://b/out", "gs://b/out", "file:///tmp/out", "S3A://b/out"])
def test_run_output_dir_must_not_be_a_url(url):
    with pytest.raises(ConfigError) as err:
        build_config({"run": {"output_dir": url}})
    assert err.value.key == "run.output_dir" and url in str(err.value) and "POSIX" in str(err.value)


@pytest.mark.parametrize("path", ["outputs/run", "/ckpt/xl", "weird:name/run"])
def test_run_output_dir_accepts_local_paths(path):
    assert build_config({"run": {"output_dir": path}}).run.output_dir == path


@pytest.mark.parametrize("argv", [
    ["synth", "--out", "s3://b/x", "--num-samples", "4", "--shard-size", "4", "--quiet"],
    ["convert", "--from-published", "src", "--out", "s3://b/x", "--quiet"],
])
def test_sfd_data_refuses_url_outputs(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    assert data_main(argv) == 2
    err = capsys.readouterr().err
    assert "s3://b/x" in err and "local or shared" in err
    assert not (tmp_path / "s3:").exists()


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A published-form .pt of the tiny model (random weights, 2 sampling steps): enough for the CLIs' checks."""
    config = build_config({**TINY, "data": {"path": "/no/shards", "num_workers": 0}, "sampler": {"num_steps": 2}})
    state = build_model(config.model).state_dict()
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save({"model": state, "ema": state, "config": to_dict(config)}, path)
    return path


def test_export_refuses_a_url_output(tiny_weights, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert export_main([str(tiny_weights), "--out", "s3://b/export.pt"]) == 2
    assert "s3://b/export.pt" in capsys.readouterr().err
    assert not (tmp_path / "s3:").exists()


def test_sample_refuses_a_url_output(tiny_weights, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert sample_main([str(tiny_weights), "--out", "s3://b/samples.png"]) == 2
    assert "s3://b/samples.png" in capsys.readouterr().err
    assert not (tmp_path / "s3:").exists()


# --- 4. sampling labels ----------------------------------------------------------------------


@pytest.mark.parametrize("labels,bad", [(["10"], "10"), (["3", "-1"], "-1"), (["11", "12"], "11 12")])
def test_sample_refuses_labels_outside_the_classes(tiny_weights, tmp_path, monkeypatch, capsys, labels, bad):
    monkeypatch.chdir(tmp_path)
    assert sample_main([str(tiny_weights), "--labels", *labels]) == 2
    err = capsys.readouterr().err
    assert f"--labels {bad}" in err and "0..9" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "samples.png").exists()
