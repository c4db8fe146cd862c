"""The model's structure: published layouts, options, dt = 0, input errors."""

import json

import pytest
import torch

from sfd_train.config import ConfigError, ModelConfig, build_config
from sfd_train.diffusion.schedule import training_times
from sfd_train.diffusion.sampler import sample
from sfd_train.models import build_model


def tiny(**overrides) -> ModelConfig:
    base = dict(size="custom", depth=2, hidden_size=64, num_heads=4, input_size=4, in_channels=12,
                semantic_channels=4, num_classes=5, repa_projector_dim=32, repa_feature_dim=16)
    base.update(overrides)
    return build_config({"model": base}).model


@pytest.fixture(scope="module")
def layout(reference_dir):
    path = reference_dir / "sfd_state_dict_layout.json"
    assert path.is_file(), f"{path} is missing"
    return json.loads(path.read_text())


@pytest.mark.parametrize("key,size", [("sfd_xl", "XL"), ("sfd_1p0", "XXL"), ("sfd_1p0", "1p0B"), ("sfd_autoguidance_b", "B")])
def test_published_layout_on_meta_device(layout, key, size):
    model = build_model(ModelConfig(size=size), device="meta")
    state = model.state_dict()
    expected = layout[key]["state_dict"]
    assert sorted(state) == sorted(expected)
    wrong = {name: (list(state[name].shape), shape) for name, shape in expected.items() if list(state[name].shape) != shape}
    assert not wrong, wrong
    assert sum(p.numel() for p in model.parameters()) == layout[key]["num_params"]


@pytest.mark.parametrize("size", ["S", "B", "L", "XL", "XXL", "1p6B"])
@pytest.mark.parametrize("patch", [1, 2])
def test_every_named_size_builds(size, patch):
    config = ModelConfig(size=size, patch_size=patch)
    model = build_model(config, device="meta")
    depth, dim, _ = config.dims()
    assert len(model.blocks) == depth
    assert model.final_layer.linear.weight.shape == (patch * patch * 48, dim)
    assert model.pos_embed.shape == (1, (16 // patch) ** 2, dim)


def test_free_form_size_and_options_run():
    for options in [
        {},
        {"patch_size": 2},
        {"use_rope": False},
        {"use_qknorm": False},
        {"use_swiglu": False},
        {"use_rmsnorm": False},
        {"wo_shift": True},
        {"use_repa": False},
        {"repa_depth": 1},
    ]:
        config = tiny(**options)
        model = build_model(config).train()
        x = torch.randn(3, 12, 4, 4)
        t = torch.rand(3)
        velocity, projection = model(x, t, t, torch.tensor([0, 1, 5]))
        assert velocity.shape == x.shape, options
        if config.use_repa:
            assert projection.shape == (3, (4 // config.patch_size) ** 2, 16), options
        else:
            assert projection is None


def test_option_parameter_names():
    names = set(build_model(tiny(use_swiglu=False, use_rmsnorm=False, use_rope=False, wo_shift=True)).state_dict())
    assert "blocks.0.mlp.fc1.weight" in names and "blocks.0.mlp.w12.weight" not in names
    assert "blocks.0.norm1.weight" not in names  # LayerNorm without affine parameters
    assert "blocks.0.attn.q_norm.weight" in names and "blocks.0.attn.q_norm.bias" in names
    assert not any(name.startswith("feat_rope") for name in names)
    model = build_model(tiny(wo_shift=True))
    assert model.blocks[0].adaLN_modulation[1].out_features == 4 * 64


def test_initialisation_is_adaln_zero():
    model = build_model(tiny())
    x = torch.randn(2, 12, 4, 4)
    t = torch.rand(2)
    out = model.eval()(x, t, t, torch.tensor([0, 1]))
    assert torch.count_nonzero(out) == 0  # zero final layer: velocity starts at 0
    assert torch.all(model.blocks[0].adaLN_modulation[1].weight == 0)


def test_meta_device_then_materialise_equals_direct_build():
    config = tiny()
    torch.manual_seed(1)
    direct = build_model(config)
    meta = build_model(config, device="meta")
    meta.to_empty(device="cpu")
    torch.manual_seed(1)
    meta.init_weights()
    for (name, a), (_, b) in zip(direct.state_dict().items(), meta.state_dict().items()):
        if name in ("pos_embed",) or name.startswith("feat_rope"):
            assert torch.equal(a, b), name


def test_dt_zero_is_the_synchronous_model():
    config = tiny(delta_t=0.0)
    model = build_model(config)
    names = set(model.state_dict())
    assert "t_embedder.mlp.0.weight" in names
    assert not any(name.startswith(("t_embedder_sem", "t_embedder_tex")) for name in names)
    assert model.t_embedder.mlp[0].weight.shape == (64, 256)  # full width, as in LightningDiT
    # Both parts share one time in training ...
    tau = torch.rand(100)
    t_tex, t_sem = training_times(tau, 0.0)
    assert torch.equal(t_tex, tau) and torch.equal(t_sem, tau)
    # ... and the sampler moves both parts on every step: plain Euler flow matching.
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model.eval()
    z, y = torch.randn(2, 12, 4, 4), torch.tensor([1, 2])
    steps = 7
    expected = z.clone()
    grid = torch.linspace(0, 1, steps + 1)
    for i in range(steps):
        s = grid[i].expand(2)
        expected = expected + (grid[i + 1] - grid[i]) * model(expected, s, s, y)
    got = sample(model, z, y, delta_t=0.0, semantic_channels=4, num_steps=steps)
    assert torch.allclose(got, expected, atol=1e-6)


def test_dual_time_embedding_order_is_semantic_then_texture():
    model = build_model(tiny())
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    t_tex, t_sem = torch.tensor([0.2]), torch.tensor([0.7])
    emb = model.embed_time(t_tex, t_sem)
    assert torch.allclose(emb[:, :32], model.t_embedder_sem(t_sem))
    assert torch.allclose(emb[:, 32:], model.t_embedder_tex(t_tex))


def test_wrong_channel_count_is_a_clear_error():
    model = build_model(tiny())
    with pytest.raises(ValueError, match=r"\(B, 12, 4, 4\).*8 texture \+ 4 semantic.*got \(2, 10, 4, 4\)"):
        model(torch.randn(2, 10, 4, 4), torch.rand(2), torch.rand(2), torch.tensor([0, 1]))


@pytest.mark.parametrize(
    "overrides,key,message",
    [
        ({"semantic_channels": 12}, "model.semantic_channels", "at least one texture channel"),
        ({"semantic_channels": 20}, "model.semantic_channels", "in \\[0, in_channels\\)"),
        ({"size": "XXXL"}, "model.size", "choose one of S, B, L, XL, 1p0B, XXL, 1p6B, custom"),
        ({"delta_t": 1.0}, "model.delta_t", "outside \\[0, 1\\)"),
        ({"delta_t": -0.1}, "model.delta_t", "outside \\[0, 1\\)"),
        ({"num_heads": 5}, "model.hidden_size", "not divisible"),
        ({"repa_depth": 3}, "model.repa_depth", "outside \\[1, depth=2\\]"),
    ],
)
def test_bad_model_config_names_the_key(overrides, key, message):
    with pytest.raises(ConfigError, match=message) as err:
        tiny(**overrides)
    assert err.value.key == key


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match="semantic_channels"):
        build_model(ModelConfig(semantic_channels=48), device="meta")
