"""``train.compile``: the loop's :class:`CompiledStep` runs a tiny MAE micro-step through
``torch.compile`` on the CPU with the eager loss and gradients, and falls back to eager, once,
when the compiler fails."""

from __future__ import annotations

import pytest
import torch

from raymim.config import TrainConfig, config_from_dict
from raymim.methods import build_method
from raymim.train.loop import CompiledStep


def tiny_mae() -> torch.nn.Module:
    model = dict(img_size=16, patch_size=8, hidden_size=24, mlp_dim=48, num_layers=1, num_heads=2,
                 decoder_hidden_size=24, decoder_layers=1, decoder_heads=2)
    torch.manual_seed(0)
    return build_method("mae", config_from_dict({"model": model, "method": {"name": "mae", "mask_ratio": 0.5}}))


def forward_backward(module: torch.nn.Module, batch: dict) -> object:
    out = module(batch)
    out.loss.backward()
    return out


def eager_reference(method: torch.nn.Module, batch: dict) -> tuple[float, list[torch.Tensor]]:
    torch.manual_seed(7)
    out = forward_backward(method, batch)
    grads = [p.grad.clone() for p in method.parameters() if p.grad is not None]
    method.zero_grad(set_to_none=True)
    return float(out.loss), grads


def run_compiled(method: torch.nn.Module, batch: dict, backend: str) -> tuple[CompiledStep, float, list]:
    step = CompiledStep(method, forward_backward, backend=backend)
    torch.manual_seed(7)
    out = step(batch)
    return step, float(out.loss), [p.grad.clone() for p in method.parameters() if p.grad is not None]


def test_compile_is_off_by_default():
    assert TrainConfig().compile is False


def test_compiled_step_matches_eager_aot_autograd():
    """Dynamo capture + AOTAutograd (forward and backward graphs), run without code generation."""
    torch._dynamo.reset()
    method, batch = tiny_mae(), {"image": torch.rand(2, 1, 16, 16, 16)}
    loss, grads = eager_reference(method, batch)
    step, c_loss, c_grads = run_compiled(method, batch, "aot_eager")
    assert step.compiled is not None  # no fallback happened
    assert c_loss == pytest.approx(loss, rel=1e-5)
    assert len(c_grads) == len(grads)
    for a, b in zip(c_grads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(capfd):
    calls = []

    def broken_backend(gm, example_inputs):
        calls.append(1)
        raise RuntimeError("no C++ compiler on this node")

    torch._dynamo.reset()
    method, batch = tiny_mae(), {"image": torch.rand(2, 1, 16, 16, 16)}
    loss, grads = eager_reference(method, batch)
    step, c_loss, c_grads = run_compiled(method, batch, broken_backend)
    assert calls and step.compiled is None
    assert c_loss == loss  # the failed attempt left no gradient behind: the eager rerun is exact
    for a, b in zip(c_grads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    method.zero_grad(set_to_none=True)
    step(batch)  # eager from now on: no further compile attempt, no further warning
    out = capfd.readouterr().out  # the loop's `say` writes to the real stdout
    assert out.count("train.compile failed") == 1 and "RuntimeError: no C++ compiler" in out
    assert len(calls) == 1


def test_a_real_error_in_the_step_is_not_hidden_by_the_fallback():
    torch._dynamo.reset()
    step = CompiledStep(tiny_mae(), forward_backward, backend="aot_eager")
    with pytest.raises(Exception, match="image|size|shape|channels"):
        step({"image": torch.rand(2, 3, 7, 16, 16)})  # 3 channels: the model takes 1


def test_resume_hash_ignores_how_the_same_weights_are_computed():
    """Turning train.compile or model.fused_attention on or off resumes the same checkpoint; a real
    model change does not."""
    import dataclasses

    from raymim.train.checkpoint import model_config_hash

    cfg = config_from_dict({})
    same = [dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=True)),
            dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, fused_attention=False))]
    assert {model_config_hash(c) for c in same} == {model_config_hash(cfg)}
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_layers=6))
    assert model_config_hash(other) != model_config_hash(cfg)
