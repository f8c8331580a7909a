"""litplug.callbacks.ignite (SurrogateSharpness): one step against the equations, accumulation and
mixed precision, and the shipped configs carrying the defaults."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from harness import fast_trainer
from lightning.pytorch.plugins import MixedPrecision
from references import ignite_gradient
from sharpness_helpers import F64, Probe, data, loader, run_cli, tiny

from litplug.callbacks import SurrogateSharpness


def test_surrogate_sharpness_one_step_equals_equations(tmp_path):
    x, y = data(dtype=F64)
    model = tiny(partial(torch.optim.SGD, lr=0.1), dtype=F64)
    w0 = copy.deepcopy(model.backbone)
    probe = Probe()
    cb = SurrogateSharpness(rho=0.5, radius=0.1, epsilon=0.01, lambda_init=2.0, lambda_lr=0.5)
    trainer = fast_trainer(tmp_path, max_steps=1, callbacks=[cb, probe])
    trainer.fit(model, loader(x, y, 16))
    net = copy.deepcopy(w0)
    params = list(net.parameters())

    def grad(fn):
        net.zero_grad()
        fn().backward()
        return [p.grad.clone() for p in params]

    g_loss = grad(lambda: F.cross_entropy(net(x), y))
    g_g = grad(lambda: net(x).mean())
    norm = torch.sqrt(sum((g**2).sum() for g in g_g))
    with torch.no_grad():
        for p, g in zip(params, g_g):
            p.add_(0.1 * g / norm)
    g_hat = grad(lambda: net(x).mean())
    final = ignite_gradient(g_loss, g_g, g_hat, lam=2.0, rho=0.5, radius=0.1)
    # Run in float64, but the callback takes G's mean and lambda in float32 (so that fp16/bf16
    # outputs are averaged in float32): the finite difference (x lambda rho / radius = 10) carries
    # that rounding, measured 8e-7 relative. Tolerance from float32, not from the trajectory.
    for got, want in zip(probe.grads[0], final):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(probe.at_step[0], probe.start[0]):
        assert torch.equal(got, want)
    assert float(cb.state_dict()["lambda"]) == pytest.approx(max(0.0, 2.0 + 0.5 * (0.5 * float(norm) - 0.01)), rel=1e-5)
    assert model.calls == 1  # G is the model's forward, not training_step


@pytest.mark.parametrize("variant", ["accumulate", "16-mixed", "bf16-mixed"])
def test_surrogate_sharpness_accumulation_and_precision(tmp_path, variant):
    dtype = F64 if variant == "accumulate" else torch.float32
    x, y = data(dtype=dtype)

    def final_grads(batch_size, **kwargs):
        model, probe = tiny(partial(torch.optim.SGD, lr=0.1), dtype=dtype), Probe()
        cb = SurrogateSharpness(rho=0.5, radius=0.1, epsilon=0.01, lambda_init=2.0, lambda_lr=0.5)
        fast_trainer(tmp_path, max_steps=1, callbacks=[cb, probe], **kwargs).fit(model, loader(x, y, batch_size))
        return probe.grads[0], float(cb.state_dict()["lambda"]), model.calls

    reference, lam, _ = final_grads(16)
    if variant == "accumulate":
        got, got_lam, calls = final_grads(8, accumulate_grad_batches=2)
        assert calls == 2
        for a, b in zip(got, reference):  # float64; G's float32 mean scales by powers of 2 in both
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert got_lam == pytest.approx(lam, rel=1e-6)
    else:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if variant == "16-mixed" else None
        got, got_lam, _ = final_grads(16, plugins=[MixedPrecision(variant, "cpu", scaler)])
        err = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(got, reference)))
        # The finite difference (lambda rho / radius = 10) magnifies bf16's 8-bit mantissa rounding.
        tol = 0.05 if variant == "16-mixed" else 0.15
        assert err / torch.sqrt(sum((b**2).sum() for b in reference)) < tol
        assert got_lam == pytest.approx(lam, rel=0.05)  # ||grad G|| unscaled before the dual step


def test_ignite_configs_carry_the_defaults():
    """configs/callbacks/ignite.yaml and configs/offline/ignite.yaml state SurrogateSharpness's
    defaults, whose dual step (0.1) enforces the constraint within a short run."""
    defaults = SurrogateSharpness()
    assert (defaults.rho, defaults.radius, defaults.epsilon, defaults.lambda_init, defaults.lambda_lr) == (
        0.05,
        0.05,
        0.1,
        1e-3,
        0.1,
    )
    keys = ("rho", "radius", "epsilon", "lambda_init", "lambda_lr", "adaptive_lambda", "input_index")
    for configs in (
        ("digits/classifier.yaml", "callbacks/ignite.yaml"),
        ("offline/sphere.yaml", "offline/ignite.yaml"),
    ):
        (cb,) = [c for c in run_cli(*configs, run=False).trainer.callbacks if isinstance(c, SurrogateSharpness)]
        assert [getattr(cb, k) for k in keys] == [getattr(defaults, k) for k in keys]
