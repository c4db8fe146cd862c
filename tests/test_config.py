"""Typed configs: YAML + overrides, errors that name the key, the authors' configs, presets."""

import dataclasses

import pytest
import yaml

from sfd_train.config.semvae import SemVAEJobConfig
from sfd_train.config import Config, ConfigError, build_config, config_help, load_config, save_config
from sfd_train.config.base import field_docs
from sfd_train.config.loader import read_yaml
from sfd_train.config.published import model_mapping_from_hparams
from sfd_train.config.schema import parse_duration

from conftest import REFERENCE_DIR

PUBLISHED = REFERENCE_DIR / "published_configs"


def _sections(cls):
    yield cls
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type if not isinstance(f.type, str) else None):
            yield from _sections(f.type)


def test_every_field_has_a_docstring():
    sections = [type(getattr(Config(), f.name)) for f in dataclasses.fields(Config)] + [Config]
    for section in sections:
        docs = field_docs(section)
        missing = [f.name for f in dataclasses.fields(section) if f.name not in docs]
        assert not missing, f"{section.__name__} fields without a docstring: {missing}"
    text = config_help()
    assert "model.delta_t" in text and "Semantic-first offset" in text


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model:\n  size: B\ntrain:\n  max_steps: 10\n")
    config = load_config(path, ["train.max_steps=20", "optimizer.lr=3e-4", "sampler.guidance_interval=[0.1,0.9]"])
    assert config.model.size == "B" and config.train.max_steps == 20
    assert config.optimizer.lr == pytest.approx(3e-4)
    assert config.sampler.guidance_interval == (0.1, 0.9)


@pytest.mark.parametrize(
    "override,key,message",
    [
        ("model.sise=B", "model.sise", "unknown key; known keys of 'model' are: size"),
        ("parallel.strategy=zero4", "parallel.strategy", "choose one of 'ddp', 'fsdp2', 'zero1', 'zero2', 'zero3'"),
        ("train.max_steps=ten", "train.max_steps", "expected an integer"),
        ("train.max_steps=0", "train.max_steps", "must be >= 1"),
        ("objective.time_sampling=beta", "objective.time_sampling", "'logit_normal', 'uniform'"),
        ("objective.repa_mode=l2", "objective.repa_mode", "'cos', 'mse', 'cos_mse'"),
        ("run.time_limit=soon", "run.time_limit", "not a duration"),
        ("bogus.key=1", "bogus", "unknown key"),
    ],
)
def test_bad_values_name_the_key_and_the_choices(override, key, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, [override])
    assert err.value.key == key


@pytest.mark.parametrize(
    "overrides,key,message",
    [
        (["parallel.strategy=zero2", "parallel.compile_scope=step"], "parallel.compile_scope", "use 'blocks'"),
        (["parallel.strategy=fsdp2", "parallel.compile_mode=reduce-overhead"], "parallel.compile_mode", "fixed address"),
        (["parallel.strategy=zero3", "parallel.compile_mode=max-autotune"], "parallel.compile_mode", "fixed address"),
        (["parallel.compile_backend=aot_eager", "parallel.compile_mode=max-autotune-no-cudagraphs"],
         "parallel.compile_mode", "Inductor mode"),
    ],
)
def test_compile_combinations_that_cannot_work_are_refused(overrides, key, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, ["parallel.compile=true", *overrides])
    assert err.value.key == key
    # The same keys are accepted while compile is off (nothing is compiled).
    load_config(None, overrides)


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.max_steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_config.yaml")


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(path)


@pytest.mark.parametrize("text,key,lines", [
    ("train:\n  max_steps: 10\nmodel:\n  size: B\ntrain:\n  seed: 3\n", "train", " \\(line 1 and line 5\\)"),
    ("model:\n  size: B\ntrain:\n  max_steps: 10\n  seed: 1\n  max_steps: 20\n", "max_steps", " \\(line 4 and line 6\\)"),
    ("train: {seed: 1, seed: 2}\n", "seed", ""),
])
def test_a_key_given_twice_is_refused_with_both_lines(tmp_path, text, key, lines):
    # Plain YAML keeps the second and silently drops the first (a whole section, for `train:`).
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"twice.yaml: key '{key}' is given twice{lines}"):
        load_config(path)


def test_merge_keys_may_still_be_overridden(tmp_path):
    # `<<: *base` then an explicit key is an override, not a duplicate; `mid` is expanded
    # before `top` merges it, which must not look like a duplicate either. The values are
    # whatever plain PyYAML makes of merges.
    path = tmp_path / "merge.yaml"
    path.write_text("base: &base {a: 1, b: 2}\nmid: &mid\n  <<: *base\n  a: 3\ntop:\n  <<: *mid\n  b: 4\n")
    data = read_yaml(path)
    assert data == yaml.safe_load(path.read_text())
    assert data["mid"] == {"a": 3, "b": 2} and data["top"]["b"] == 4


def test_save_and_reload_round_trip(tmp_path):
    config = load_config(None, ["model.size=L", "train.seed=7"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize(
    "name,size,max_steps",
    [
        ("lightningdit_xl__train.yaml", "XL", 4_000_000),
        ("lightningdit_1p0__train.yaml", "1p0B", 4_000_000),
        ("autoguidance_b__train.yaml", "B", 400_000),
        ("autoguidance_b__inference.yaml", "B", 400_000),
        ("lightningdit_xl__inference_4m_autoguidance.yaml", "XL", 4_000_000),
    ],
)
def test_authors_yaml_translates(name, size, max_steps):
    notes = []
    config = load_config(PUBLISHED / name, notes=notes)
    assert config.model.size == size and config.model.patch_size == 1
    assert config.model.in_channels == 48 and config.model.semantic_channels == 16
    assert config.model.delta_t == pytest.approx(0.3) and config.model.repa_depth == 2
    assert config.model.repa_feature_dim == 768 and config.model.input_size == 16
    assert config.objective.semantic_weight == 2.0 and config.objective.cos_weight == 1.0
    assert config.objective.time_sampling == "logit_normal"
    assert config.train.max_steps == max_steps and config.train.global_batch_size == 256
    assert config.optimizer.lr == pytest.approx(1e-4) and config.optimizer.beta2 == pytest.approx(0.999)
    assert config.sampler.method == "dopri5"
    assert any("sfd-data convert" in note for note in notes)


def test_authors_80_epoch_yaml_translates_to_the_preset(tmp_path):
    """Their train_80ep_lr2e-4.yaml: the XL file with lr 2e-4, beta2 0.95, 400K steps and
    ``repa_weight`` / ``repa_mode`` in the model section, where their trainer reads them."""
    theirs = yaml.safe_load((PUBLISHED / "lightningdit_xl__train.yaml").read_text())
    theirs["optimizer"].update(lr=2e-4, beta2=0.95)
    theirs["train"]["max_steps"] = 400_000
    theirs["model"].update(repa_weight=0.5, repa_mode="cos_mse")
    path = tmp_path / "train_80ep_lr2e-4.yaml"
    path.write_text(yaml.safe_dump(theirs))
    translated, preset = load_config(path), load_config("sfd_xl_80ep")
    assert translated.objective.repa_mode == "cos_mse" and translated.objective.repa_weight == 0.5
    for section in ("model", "objective", "optimizer"):
        assert getattr(translated, section) == getattr(preset, section), section
    assert translated.train.max_steps == preset.train.max_steps == 400_000
    # Without the two keys their trainer uses cos at weight 1, and so do we.
    plain = load_config(PUBLISHED / "lightningdit_xl__train.yaml").objective
    assert (plain.repa_mode, plain.repa_weight) == ("cos", 1.0)


def test_authors_yaml_with_unsupported_values(tmp_path):
    path = tmp_path / "theirs.yaml"
    path.write_text("model:\n  model_type: LightningDiT-XL/1\ntransport:\n  path_type: GVP\n")
    with pytest.raises(ConfigError, match="only Linear"):
        load_config(path)
    path.write_text("model:\n  model_type: LightningDiT-XL/1\n  frobnicate: 1\n")
    with pytest.raises(ConfigError, match="model.frobnicate"):
        load_config(path)
    path.write_text("model:\n  model_type: LightningDiT-XXXL/1\n")
    with pytest.raises(ValueError, match="unknown model type"):
        load_config(path)


def test_constructor_hparams_translate():
    hparams = dict(input_size=16, patch_size=1, in_channels=48, hidden_size=1152, depth=28, num_heads=16,
                   mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, use_qknorm=True, use_swiglu=True,
                   use_rope=True, use_rmsnorm=True, wo_shift=False, use_repa=True,
                   repa_dino_version="dinov2_vitb14_reg", repa_depth=2, repa_projector_dim=2048,
                   semantic_chans=16, semfirst_delta_t=0.3, learn_sigma=False, use_checkpoint=False)
    model = build_config({"model": model_mapping_from_hparams(hparams)}).model
    assert model.size == "XL" and model.dims() == (28, 1152, 16)
    with pytest.raises(ConfigError, match="no counterpart"):
        model_mapping_from_hparams({**hparams, "mystery": 1})


def test_presets_load(repo_root):
    presets = sorted((repo_root / "configs").glob("*.yaml"))
    assert {p.stem for p in presets} >= {"sfd_xl", "sfd_xl_80ep", "sfd_xxl", "sfd_b_autoguidance", "tiny"}
    for preset in presets:
        config = load_config(preset.stem)
        expected = SemVAEJobConfig if preset.stem.startswith("semvae") else Config
        assert isinstance(config, expected), preset
    assert load_config("sfd_xxl").model.dims() == (24, 1536, 24)
    assert load_config("sfd_b_autoguidance").train.max_steps == 400_000


def test_global_batch_arithmetic():
    train = build_config({"train": {"global_batch_size": 256, "micro_batch_size": 16}}).train
    assert train.accumulation_steps(8) == 2 and train.per_rank_batch(8) == 16
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        train.accumulation_steps(3)


def test_durations():
    assert parse_duration("3:50:00") == 3 * 3600 + 50 * 60
    assert parse_duration("230m") == 230 * 60
    assert parse_duration("1.5h") == 5400
    with pytest.raises(ValueError):
        parse_duration("later")
