"""CUDA-only checks (skipped without a GPU): fp16 GradScaler with SAM and with UnlearningMask,
bf16-mixed, EMA offloaded to host memory, no host read in a perturbation by a device scalar, FSDP2
(ModelParallelStrategy) on one GPU, and the refusal of FSDP1 and DeepSpeed on the real strategies.
Run them with ``bash benchmarks/gpu_check.sh``.

These tests have not been run on a GPU; the CPU suite covers the same mechanisms (CPU GradScaler, bf16, gloo)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from harness import fast_trainer
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.strategies import ModelParallelStrategy

from litplug.callbacks import EMA, SAM, UnlearningMask
from litplug.callbacks.passes import PerturbedWeights
from litplug.datamodules import SyntheticClassification
from litplug.modules import MLP, Classifier

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def model(seed=0):
    torch.manual_seed(seed)
    return Classifier(
        MLP(input_shape=[16], num_outputs=4, hidden=[64, 64]),
        num_classes=4,
        optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9),
    )


def data():
    return SyntheticClassification(num_samples=512, input_shape=[16], num_classes=4, batch_size=32)


def gpu_trainer(tmp_path, **kwargs):
    kwargs = {"accelerator": "cuda", "devices": 1, "limit_val_batches": 0, **kwargs}
    return fast_trainer(tmp_path, **kwargs)


class Grads(Callback):
    """The final (unscaled) gradients seen by on_before_optimizer_step, per step."""

    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([p.grad.detach().float().cpu().clone() for p in pl_module.parameters()])


def _relative(a, b):
    num = torch.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(a, b)))
    return float(num / torch.sqrt(sum((y**2).sum() for y in b)))


def test_sam_fp16_gradscaler_matches_fp32(tmp_path):
    runs = {}
    for precision in ("32-true", "16-mixed"):
        seed_everything(0)
        grads, net = Grads(), model()
        trainer = gpu_trainer(
            tmp_path, max_steps=3, precision=precision, callbacks=[SAM(rho=0.1, penalty_weight=0.5), grads]
        )
        trainer.fit(net, data())
        assert all(torch.isfinite(p).all() for p in net.parameters())
        runs[precision] = (grads.grads, trainer)
    # unscaled once, on the sum of both passes: the fp32 gradient up to half-precision error
    assert _relative(runs["16-mixed"][0][0], runs["32-true"][0][0]) < 0.05
    scaler = runs["16-mixed"][1].precision_plugin.scaler
    assert scaler is not None and scaler.get_scale() >= 2.0**15  # no step skipped by an overflow


class Frozen(Callback):
    """Frozen entries (outside UnlearningMask's masks) equal their values at train start."""

    def on_train_start(self, trainer, pl_module):
        self.start = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_end(self, trainer, pl_module):
        mask = next(c for c in trainer.callbacks if isinstance(c, UnlearningMask))
        self.checked = 0
        for n, p in pl_module.named_parameters():
            if n in mask.masks:
                frozen = ~mask.masks[n]
                assert torch.equal(p.detach()[frozen], self.start[n][frozen]), n
                self.checked += 1
        self.expected = len(mask.masks)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_unlearning_mask_frozen_entries_bit_exact_under_mixed_precision(tmp_path, precision):
    seed_everything(0)
    frozen = Frozen()
    callbacks = [UnlearningMask("magnitude", ratio=0.3, scope="all"), SAM(rho=0.05), frozen]
    trainer = gpu_trainer(tmp_path, max_steps=6, precision=precision, gradient_clip_val=1.0, callbacks=callbacks)
    trainer.fit(model(), data())
    assert frozen.checked == frozen.expected > 0


def test_bf16_mixed_sam_and_ema(tmp_path):
    seed_everything(0)
    ema = EMA(decay=0.9, dtype="float32", final_weights="live")
    net = model()
    gpu_trainer(tmp_path, max_steps=5, precision="bf16-mixed", callbacks=[SAM(rho=0.05), ema]).fit(net, data())
    assert ema.updates == 5
    average = ema.averaged_state_dict("")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in average.values() if v.is_floating_point())


def test_ema_offloaded_to_host_memory_equals_the_gpu_average(tmp_path):
    averages = {}
    for device in (None, "cpu"):
        seed_everything(0)
        ema = EMA(decay=0.8, device=device, evaluate_with="live", final_weights="live")
        net = model()
        gpu_trainer(tmp_path, max_steps=6, callbacks=[ema]).fit(net, data())
        assert next(net.parameters()).device.type == "cuda"
        held = {t.device.type for t in ema.average_tensors().values()}
        assert held == ({"cpu"} if device == "cpu" else {"cuda"})
        averages[device] = {k: v.cpu() for k, v in ema.averaged_state_dict("").items()}
    for k, v in averages[None].items():
        torch.testing.assert_close(averages["cpu"][k], v, rtol=1e-6, atol=1e-7, msg=k)


def test_fsdp2_on_one_gpu_with_sam_and_ema(tmp_path):
    seed_everything(0)
    ema = EMA(decay=0.9, final_weights="live")
    net = model()
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    gpu_trainer(tmp_path, max_steps=4, strategy=strategy, callbacks=[SAM(rho=0.05), ema]).fit(net, data())
    assert all(type(p).__name__ == "DTensor" for p in net.backbone.parameters())
    assert ema.updates == 4
    assert all(torch.isfinite(p.full_tensor()).all() for p in net.backbone.parameters())


@pytest.mark.parametrize(
    "make", [EMA, partial(SAM, rho=0.05), partial(UnlearningMask, "magnitude")], ids=["EMA", "SAM", "UnlearningMask"]
)
def test_fsdp1_refused_at_setup(tmp_path, make):
    with pytest.raises(ValueError, match="FSDPStrategy"):
        gpu_trainer(tmp_path, max_steps=1, strategy="fsdp", callbacks=[make()]).fit(model(), data())


@pytest.mark.parametrize(
    "make", [EMA, partial(SAM, rho=0.05), partial(UnlearningMask, "magnitude")], ids=["EMA", "SAM", "UnlearningMask"]
)
def test_deepspeed_refused_at_setup(tmp_path, make):
    pytest.importorskip("deepspeed")
    with pytest.raises(ValueError, match="DeepSpeedStrategy"):
        gpu_trainer(tmp_path, max_steps=1, strategy="deepspeed", callbacks=[make()]).fit(model(), data())


def test_perturbation_by_a_device_scalar_reads_nothing_back():
    """IGNITE's step size ``radius / ||grad G||`` stays on the GPU: applying and restoring the
    perturbed weights makes no device-to-host synchronisation."""
    w = torch.nn.Parameter(torch.randn(1000, device="cuda"))
    d = torch.randn(1000, device="cuda")
    alpha = 0.5 / (d.norm() + 1e-12)
    perturbed = PerturbedWeights()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        perturbed.apply_([w], [d], alpha)
        perturbed.restore_()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(perturbed._buffers[id(w)][1], w.detach() + alpha * d)
