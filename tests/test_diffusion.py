"""The asynchronous objective and the three-phase sampler."""

import pytest
import torch

from sfd_train.config import ObjectiveConfig, build_config
from sfd_train.diffusion.objective import LossInputs, draw_loss_inputs, loss_terms, sfd_loss
from sfd_train.diffusion.sampler import Guidance, VelocityField, integrate_fixed, sample, time_grid
from sfd_train.diffusion.schedule import sample_global_time, training_times
from sfd_train.models import build_model


def tiny(**overrides):
    base = dict(size="custom", depth=2, hidden_size=64, num_heads=4, input_size=4, in_channels=12,
                semantic_channels=4, num_classes=5, repa_projector_dim=32, repa_feature_dim=16)
    base.update(overrides)
    return build_config({"model": base}).model


def randomised(config, seed=0):
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)
    return model


def test_training_times_follow_the_offset():
    tau = torch.tensor([0.0, 0.1, 0.3, 0.5, 1.0])
    t_tex, t_sem = training_times(tau, 0.3)
    s = tau * 1.3
    assert torch.allclose(t_sem, s.clamp(max=1))
    assert torch.allclose(t_tex, (s - 0.3).clamp(min=0))
    assert t_tex[0] == 0 and t_sem[-1] == 1 and t_tex[-1] == pytest.approx(1.0)
    assert t_tex[1] == 0 and t_sem[1] > 0  # semantics first


def test_time_distributions():
    g = torch.Generator().manual_seed(0)
    ln = sample_global_time(200_000, "logit_normal", generator=g)
    un = sample_global_time(200_000, "uniform", generator=g)
    assert abs(ln.mean() - 0.5) < 0.01 and ln.std() < un.std()  # logit-normal concentrates in the middle
    assert abs(un.mean() - 0.5) < 0.01 and abs(un.std() - (1 / 12) ** 0.5) < 0.01
    with pytest.raises(ValueError, match="logit_normal"):
        sample_global_time(3, "beta")


def test_mse_divides_by_all_elements_and_weighs_semantics():
    config = tiny()
    model = build_model(config).train()  # zero final layer: the velocity is exactly 0
    x = torch.randn(2, 12, 4, 4)
    inputs = LossInputs(noise=torch.randn_like(x), tau=torch.rand(2), labels=torch.tensor([0, 1]))
    terms = loss_terms(model, x, inputs, None, semantic_channels=4, delta_t=0.3, semantic_weight=2.0)
    u = x - inputs.noise
    expected = (u[:, :8] ** 2).sum((1, 2, 3)) + 2.0 * (u[:, 8:] ** 2).sum((1, 2, 3))
    assert torch.allclose(terms["mse"], expected / (12 * 16), atol=1e-6)
    assert "repa" not in terms


@pytest.mark.parametrize("mode", ["cos", "mse", "cos_mse"])
def test_repa_modes_follow_their_formulas(mode):
    config = tiny()
    model = randomised(config).train()
    x = torch.randn(3, 12, 4, 4)
    features = torch.randn(3, 16, 4, 4) * 3.0  # not unit scale: mse must not normalise
    inputs = LossInputs(noise=torch.randn_like(x), tau=torch.rand(3), labels=torch.tensor([0, 1, 2]))
    with torch.no_grad():
        terms = loss_terms(model, x, inputs, features, semantic_channels=4, delta_t=0.3, semantic_weight=2.0,
                           repa_mode=mode)
        _, projection = model(*_model_inputs(x, inputs))
    # An independent float64 loop over samples and tokens.
    p = projection.double()
    f = features.double().flatten(2).transpose(1, 2)
    expected = []
    for b in range(3):
        cos = sum(1 - (p[b, k] @ f[b, k]) / (p[b, k].norm() * f[b, k].norm()) for k in range(16)) / 16
        mse = sum(((p[b, k] - f[b, k]) ** 2).sum() for k in range(16)) / (16 * 16)
        expected.append({"cos": cos, "mse": mse, "cos_mse": (cos + mse) / 2}[mode])
    assert torch.allclose(terms["repa"].double(), torch.stack(expected), atol=1e-5)


def test_repa_weight_and_mode_reach_the_total():
    config = tiny()
    model = randomised(config).train()
    x = torch.randn(2, 12, 4, 4)
    features = torch.randn(2, 16, 4, 4)
    out = {}
    for mode, weight in (("cos", 1.0), ("cos_mse", 0.5)):
        objective = build_config({"objective": {"repa_mode": mode, "repa_weight": weight}}).objective
        out[mode] = sfd_loss(model, x, torch.tensor([0, 1]), features, config, objective,
                             torch.Generator().manual_seed(0), label_dropout=False)
    # Same draws, so mse and cos agree; only the REPA term and its weight differ.
    assert torch.allclose(out["cos"]["mse"], out["cos_mse"]["mse"])
    for mode, weight in (("cos", 1.0), ("cos_mse", 0.5)):
        total = out[mode]["mse"] + out[mode]["cos"] + weight * out[mode]["repa"]
        assert torch.allclose(out[mode]["loss"], total, atol=1e-6)
    assert not torch.allclose(out["cos"]["repa"], out["cos_mse"]["repa"])


def _model_inputs(x, inputs):
    from sfd_train.diffusion.schedule import interpolate, per_channel_time
    t_tex, t_sem = training_times(inputs.tau, 0.3)
    return interpolate(x, inputs.noise, per_channel_time(t_tex, t_sem, 12, 4)), t_tex, t_sem, inputs.labels


def test_label_dropout_uses_the_null_class():
    config = tiny(class_dropout_prob=0.25)
    x = torch.zeros(4000, 12, 4, 4)
    labels = torch.zeros(4000, dtype=torch.long)
    inputs = draw_loss_inputs(x, labels, config, ObjectiveConfig(), torch.Generator().manual_seed(0))
    dropped = (inputs.labels == config.num_classes).float().mean().item()
    assert 0.22 < dropped < 0.28
    kept = draw_loss_inputs(x, labels, config, ObjectiveConfig(), torch.Generator().manual_seed(0), label_dropout=False)
    assert torch.all(kept.labels == 0)


def test_sfd_loss_combines_terms_and_backpropagates():
    config = tiny()
    model = randomised(config).train()
    x, y, dino = torch.randn(3, 12, 4, 4), torch.tensor([0, 1, 2]), torch.randn(3, 16, 4, 4)
    objective = ObjectiveConfig(cos_weight=0.5, repa_weight=2.0)
    out = sfd_loss(model, x, y, dino, config, objective, torch.Generator().manual_seed(1))
    assert set(out) == {"loss", "mse", "cos", "repa"}
    assert torch.allclose(out["loss"], out["mse"] + 0.5 * out["cos"] + 2.0 * out["repa"])
    out["loss"].backward()
    assert model.repa_projector[0].weight.grad is not None
    # Same generator, same draw: the batch's randomness is reproducible.
    again = sfd_loss(model, x, y, dino, config, objective, torch.Generator().manual_seed(1))
    assert torch.equal(again["loss"].detach(), out["loss"].detach())


def test_float32_grid_keeps_the_published_phase_switch():
    grid = time_grid(13, 0.3)
    assert grid.dtype == torch.float32 and grid[3].item() < 0.3  # 0.29999998, not 0.3

    class Recorder:
        delta_t, semantic_channels = 0.3, 1

        def __call__(self, s, x):
            return torch.ones_like(x)

    x = integrate_fixed(Recorder(), torch.zeros(1, 2, 1, 1), grid, "euler")
    # Texture moves from the first grid point >= 0.3 in float32 (index 4), so by 1.3 - grid[4].
    assert x[0, 0].item() == pytest.approx((grid[-1] - grid[4]).item(), abs=1e-6)
    # Semantics move while s <= 1: the steps starting at grid points up to 1.0.
    last = max(i for i in range(13) if grid[i].item() <= 1.0)
    assert x[0, 1].item() == pytest.approx((grid[last + 1] - grid[0]).item(), abs=1e-6)


def test_guidance_interval_and_separate_scales():
    config = tiny()
    model = randomised(config).eval()
    z, y = torch.randn(2, 12, 4, 4), torch.tensor([1, 2])
    kw = dict(delta_t=0.3, semantic_channels=4, num_steps=6)
    plain = sample(model, z, y, **kw)
    early = sample(model, z, y, guidance=Guidance(3.0, 3.0, null_class=5, interval=(0.0, 0.5)), **kw)
    both = sample(model, z, y, guidance=Guidance(3.0, 3.0, null_class=5), **kw)
    never = sample(model, z, y, guidance=Guidance(3.0, 3.0, null_class=5, interval=(1.0, 1.0)), **kw)
    assert not torch.allclose(plain, both)
    assert not torch.allclose(early, plain) and not torch.allclose(early, both)
    # No step starts with a part at time exactly 1 while that part still moves.
    assert torch.allclose(never, plain, atol=1e-6)
    # ... and a texture-only scale leaves the semantic velocity unguided at every step.
    tex_only = VelocityField(model, y, 0.3, 4, Guidance(1.0, 3.0, null_class=5))
    unguided = VelocityField(model, y, 0.3, 4, None)
    s = torch.tensor(0.5)
    assert torch.allclose(tex_only(s, z)[:, 8:], unguided(s, z)[:, 8:], atol=1e-6)
    assert not torch.allclose(tex_only(s, z)[:, :8], unguided(s, z)[:, :8])


def test_autoguidance_with_a_smaller_model():
    main = randomised(tiny(), seed=0).eval()
    guide = randomised(tiny(depth=1, hidden_size=32, num_heads=2, repa_depth=1), seed=1).eval()
    z, y = torch.randn(2, 12, 4, 4), torch.tensor([1, 2])
    field = VelocityField(main, y, 0.3, 4, Guidance(2.0, 2.0, guide_model=guide))
    s = torch.tensor(0.6)
    t_tex, t_sem = torch.full((2,), 0.3), torch.full((2,), 0.6)
    expected = guide(z, t_tex, t_sem, y) + 2.0 * (main(z, t_tex, t_sem, y) - guide(z, t_tex, t_sem, y))
    assert torch.allclose(field(s, z), expected, atol=1e-5)


def test_solvers_converge_to_the_same_solution():
    # The fixed grid evaluates the phase masks at the start of each step (the published
    # convention), which makes Euler and Heun first order at the phase switches; both
    # still converge to the phase-wise dopri5 solution.
    model = randomised(tiny()).eval()
    z, y = torch.randn(2, 12, 4, 4), torch.tensor([1, 2])
    kw = dict(delta_t=0.3, semantic_channels=4)
    dopri = sample(model, z, y, method="dopri5", atol=1e-8, rtol=1e-7, **kw)
    loose = sample(model, z, y, method="dopri5", **kw)
    assert (loose - dopri).abs().max() < 1e-3
    for method in ("euler", "heun"):
        coarse = (sample(model, z, y, method=method, num_steps=26, **kw) - dopri).abs().max()
        fine = (sample(model, z, y, method=method, num_steps=208, **kw) - dopri).abs().max()
        assert fine < coarse / 4 and fine < 2e-3, (method, coarse, fine)
    with pytest.raises(ValueError, match="euler, heun or dopri5"):
        sample(model, z, y, method="rk4", **kw)


def test_timestep_shift_moves_grid_toward_noise():
    plain, shifted = time_grid(10, 0.3), time_grid(10, 0.3, timestep_shift=3.0)
    assert shifted[0] == 0 and shifted[-1] == pytest.approx(1.3)
    assert torch.all(shifted[1:-1] < plain[1:-1])
