"""torch.compile scopes (sfd_train.engine.compile) on CPU: one graph, same numbers as eager."""

import pytest
import torch
from torch._dynamo.utils import counters

from sfd_train.config.schema import Config, ModelConfig, ParallelConfig
from sfd_train.diffusion.objective import LossInputs
from sfd_train.diffusion.training import build_loss_fn
from sfd_train.engine.parallelize import prepare_blocks
from sfd_train.models import build_model

MODEL = ModelConfig(size="custom", depth=2, hidden_size=64, num_heads=4, input_size=8, in_channels=16,
                    semantic_channels=4, num_classes=10, repa_projector_dim=32, repa_feature_dim=32)


def _batch(seed: int, batch: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, MODEL.in_channels, 8, 8, generator=g)
    inputs = LossInputs(noise=torch.randn(x.shape, generator=g), tau=torch.rand(batch, generator=g),
                        labels=torch.randint(0, MODEL.num_classes + 1, (batch,), generator=g))
    features = torch.randn(batch, MODEL.repa_feature_dim, 8, 8, generator=g)
    return x, inputs, features


def _loss_and_grads(config: Config, model, batches):
    loss_fn = build_loss_fn(config)
    results = []
    for x, inputs, features in batches:
        model.zero_grad(set_to_none=True)
        out = loss_fn(model, x, inputs, features)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(({k: v.detach() for k, v in out.items()}, grads))
    return results


@pytest.mark.parametrize("scope", ["blocks", "step"])
def test_compiled_loss_and_gradients_match_eager(scope):
    torch.manual_seed(0)
    eager_model = build_model(MODEL).train()
    model = build_model(MODEL).train()
    model.load_state_dict(eager_model.state_dict())
    # Weights away from the zero init, so every parameter gets a gradient worth comparing.
    with torch.no_grad():
        for p in list(model.parameters()) + list(eager_model.parameters()):
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    compiled = Config(model=MODEL, parallel=ParallelConfig(strategy="ddp", compile=True, compile_scope=scope,
                                                            compile_backend="aot_eager"))
    prepare_blocks(model, compiled)
    batches = [_batch(1), _batch(2)]  # two calls: the second must reuse the graph with new inputs
    expected = _loss_and_grads(Config(model=MODEL), eager_model, batches)
    torch._dynamo.reset()
    counters.clear()
    got = _loss_and_grads(compiled, model, batches)
    # Compiled once, reused for the second batch; the blocks (stream in, stream out) share one graph.
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    for (want_out, want_grads), (out, grads) in zip(expected, got):
        assert set(out) == {"loss", "mse", "cos", "repa"}
        for key in want_out:
            torch.testing.assert_close(out[key], want_out[key], rtol=1e-5, atol=1e-6)
        assert grads.keys() == want_grads.keys()  # Module.compile keeps the parameter names
        for name, grad in want_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_step_scope_is_one_graph_without_breaks():
    # A graph break (a .item(), a data-dependent branch, an untraceable op) would split
    # the step and silently lose the cross-block fusion the scope exists for.
    model = build_model(MODEL).train()
    config = Config(model=MODEL)  # uncompiled loss function, handed to dynamo.explain
    explanation = torch._dynamo.explain(build_loss_fn(config))(model, *_batch(3))
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_inductor_step_on_cuda_matches_eager(mode):
    # The production path: Inductor's Triton kernels, bf16 autocast, and CUDA graph replays
    # over several steps with an optimizer changing the weights in place between them.
    from sfd_train.kernels import build_kernel_ops

    ops = build_kernel_ops(None, "cuda")
    torch.manual_seed(0)
    eager_model = build_model(MODEL, ops).cuda().train()
    model = build_model(MODEL, ops).cuda().train()
    model.load_state_dict(eager_model.state_dict())
    parallel = ParallelConfig(strategy="ddp", compile=True, compile_scope="step", compile_mode=mode)
    compiled_fn = build_loss_fn(Config(model=MODEL, parallel=parallel))
    eager_fn = build_loss_fn(Config(model=MODEL))
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager_model, model)]
    initial = torch.cat([p.detach().flatten().clone() for p in eager_model.parameters()])
    for step in range(4):
        x, inputs, features = _batch(10 + step)
        x, features = x.cuda(), features.cuda()
        inputs = LossInputs(noise=inputs.noise.cuda(), tau=inputs.tau.cuda(), labels=inputs.labels.cuda())
        losses = []
        for fn, m, opt in ((eager_fn, eager_model, optimizers[0]), (compiled_fn, model, optimizers[1])):
            if fn is compiled_fn and mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fn(m, x, inputs, features)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        # bf16 autocast: the two graphs round differently; the losses must still agree closely.
        assert losses[1] == pytest.approx(losses[0], rel=2e-2), f"step {step}: {losses}"
    eager_final = torch.cat([p.detach().flatten() for p in eager_model.parameters()])
    compiled_final = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.isfinite(compiled_final).all()
    # A lost or stale gradient (e.g. a graph replay writing where the optimizer does not
    # read) would leave the compiled weights about one whole update away from eager's.
    update = (eager_final - initial).norm()
    assert (compiled_final - eager_final).norm() < 0.25 * update
