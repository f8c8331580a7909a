"""litplug.callbacks.sam: one Trainer step against the update computed by hand, the peer
(pytorch_optimizer.SAM), precision / accumulation / clipping / BatchNorm / logging behaviour, setup
errors, DDP and FSDP2 on 2 CPU ranks (with IGNITE and the monitor beside SAM), shipped configs."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from harness import fast_trainer, read_scalars, run_distributed
from lightning.pytorch import LightningModule, seed_everything
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy
from sharpness_helpers import (
    F64,
    Counting,
    Probe,
    _full,
    asam_scale,
    data,
    hand_grads,
    hand_step,
    loader,
    run_cli,
    tiny,
)

from litplug.callbacks import SAM, SharpnessMonitor, SurrogateSharpness
from litplug.datamodules import SyntheticClassification
from litplug.modules import MLP, Classifier

# ------------------------------------------------------------------------------------------
# one Trainer step against the equations
# ------------------------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd": partial(torch.optim.SGD, lr=0.1, momentum=0.9),
    "adamw": partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1),
}


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("adaptive,a", [(False, 1.0), (True, 1.0), (False, 0.5)])
def test_one_step_equals_hand_computed_update(tmp_path, opt, adaptive, a):
    x, y = data(dtype=F64)
    model = tiny(OPTIMIZERS[opt], dtype=F64)
    w0 = copy.deepcopy(model.backbone)
    probe = Probe()
    trainer = fast_trainer(tmp_path, max_steps=1, callbacks=[SAM(rho=0.2, adaptive=adaptive, penalty_weight=a), probe])
    trainer.fit(model, loader(x, y, 16))
    final = hand_grads(w0, [(x, y)], 0.2, adaptive, a)
    expected = hand_step(w0, final, OPTIMIZERS[opt])
    assert model.calls == 2 and trainer.global_step == 1 and len(probe.grads) == 1
    assert probe.backwards == 1  # other callbacks' backward hooks are not called by the second pass
    for got, want in zip(probe.grads[0], final):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for got, want in zip(probe.at_step[0], probe.start[0]):
        assert torch.equal(got, want)  # weights restored bit-exactly before the step
    for got, want in zip(model.backbone.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)
    # logged sharpness L(w + e) - L(w) and ||T g||
    net = copy.deepcopy(w0)
    params = list(net.parameters())
    loss = F.cross_entropy(net(x), y)
    g = torch.autograd.grad(loss, params)
    t = asam_scale(net, adaptive)
    norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
    e = [0.2 * ti**2 * gi / norm for ti, gi in zip(t, g)]
    with torch.no_grad():
        for p, ei in zip(params, e):
            p.add_(ei)
        sharpness = F.cross_entropy(net(x), y) - loss
    metrics = trainer.callback_metrics
    assert float(metrics["sam/loss_increase"]) == pytest.approx(float(sharpness), rel=1e-4, abs=1e-6)
    assert float(metrics["sam/grad_norm"]) == pytest.approx(float(norm), rel=1e-5)
    if adaptive:
        assert float(metrics["sam/perturbation_norm"]) == pytest.approx(
            float(torch.sqrt(sum((ei**2).sum() for ei in e))), rel=1e-5
        )
    else:  # plain SAM's ||e|| is rho: not logged
        assert "sam/perturbation_norm" not in metrics


def test_exclude_and_rho_to_zero(tmp_path):
    x, y = data(dtype=F64)
    # exclude: biases are not perturbed, and the norm is over the weights only
    model = tiny(dtype=F64)
    w0 = copy.deepcopy(model.backbone)
    probe = Probe()
    fast_trainer(tmp_path, max_steps=1, callbacks=[SAM(rho=0.3, exclude=["*.bias"]), probe]).fit(
        model, loader(x, y, 16)
    )
    net = copy.deepcopy(w0)
    params = list(net.parameters())
    F.cross_entropy(net(x), y).backward()
    g = [p.grad.clone() for p in params]
    weights = [i for i, (n, _) in enumerate(net.named_parameters()) if not n.endswith("bias")]
    norm = torch.sqrt(sum((g[i] ** 2).sum() for i in weights))
    with torch.no_grad():
        for i in weights:
            params[i].add_(0.3 * g[i] / norm)
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    for got, p in zip(probe.grads[0], params):
        torch.testing.assert_close(got, p.grad, rtol=1e-10, atol=1e-12)
    # rho -> 0 reproduces the base optimizer over several steps (8 steps moving by O(rho) each)
    runs = []
    for callbacks in ([SAM(rho=1e-9)], []):
        model = tiny(dtype=F64)
        fast_trainer(tmp_path, max_epochs=2, callbacks=callbacks).fit(model, loader(x, y, 4))
        runs.append([p.detach() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


class PeerSAM(LightningModule):
    """pytorch_optimizer.SAM in manual optimization: the path users take without litplug."""

    def __init__(self, backbone, rho, adaptive, lr=0.1, momentum=0.9):
        super().__init__()
        self.automatic_optimization = False
        self.backbone, self.rho, self.adaptive, self.lr, self.momentum = backbone, rho, adaptive, lr, momentum

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers().optimizer
        loss = F.cross_entropy(self.backbone(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.first_step(zero_grad=True)
        self.manual_backward(F.cross_entropy(self.backbone(x), y))
        opt.second_step(zero_grad=True)
        return loss

    def configure_optimizers(self):
        from pytorch_optimizer import SAM as PeerOptimizer

        return PeerOptimizer(
            self.parameters(), torch.optim.SGD, rho=self.rho, adaptive=self.adaptive, lr=self.lr, momentum=self.momentum
        )


@pytest.mark.parametrize("adaptive", [False, True])
def test_matches_pytorch_optimizer_sam(tmp_path, adaptive):
    """Adaptive: pytorch_optimizer scales every parameter by |w|, the ASAM authors (and litplug)
    only those named *weight*, by |w| + eta; with eta = 0 and the biases frozen they agree."""
    pytest.importorskip("pytorch_optimizer")
    x, y = data(32, dtype=F64)
    model = tiny(dtype=F64)
    if adaptive:
        for n, p in model.named_parameters():
            p.requires_grad_("weight" in n)
    peer = PeerSAM(copy.deepcopy(model.backbone), rho=0.1, adaptive=adaptive)
    fast_trainer(tmp_path, max_epochs=2, callbacks=[SAM(rho=0.1, adaptive=adaptive, eta=0.0)]).fit(
        model, loader(x, y, 8)
    )
    fast_trainer(tmp_path, max_epochs=2).fit(peer, loader(x, y, 8))
    # The peer sums ||g||^2 in float32 even for float64 gradients, so its perturbation carries a
    # float32 rounding (rho * 6e-8 per step): 1e-8 absolute over 8 steps; litplug's is float64.
    for a, b in zip(model.backbone.parameters(), peer.backbone.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8)


# ------------------------------------------------------------------------------------------
# Lightning behaviour: accumulation, precision, clipping, BatchNorm, logging, every_n_steps
# ------------------------------------------------------------------------------------------


def test_accumulation_reruns_all_micro_batches(tmp_path):
    x, y = data(dtype=F64)
    full, accum = tiny(dtype=F64), tiny(dtype=F64)
    w0 = copy.deepcopy(full.backbone)
    probe_full, probe_accum = Probe(), Probe()
    fast_trainer(tmp_path, max_steps=1, callbacks=[SAM(rho=0.2), probe_full]).fit(full, loader(x, y, 16))
    trainer = fast_trainer(tmp_path, max_steps=1, accumulate_grad_batches=2, callbacks=[SAM(rho=0.2), probe_accum])
    trainer.fit(accum, loader(x, y, 8))
    assert accum.calls == 4 and trainer.global_step == 1 and len(probe_accum.grads) == 1
    assert probe_accum.backwards == 2
    # two half batches with a mean loss = one full batch: same final gradient and update
    final = hand_grads(w0, [(x[:8], y[:8]), (x[8:], y[8:])], 0.2, False, 1.0)
    for a, b, c in zip(probe_accum.grads[0], probe_full.grads[0], final):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_gradient_clipping_applies_to_final_gradient(tmp_path):
    x, y = data(dtype=F64)
    model = tiny(partial(torch.optim.SGD, lr=1.0), dtype=F64)
    w0 = copy.deepcopy(model.backbone)
    fast_trainer(tmp_path, max_steps=1, gradient_clip_val=1e-3, callbacks=[SAM(rho=0.2)]).fit(model, loader(x, y, 16))
    final = hand_grads(w0, [(x, y)], 0.2, False, 1.0)
    norm = torch.sqrt(sum((g**2).sum() for g in final))
    assert norm > 1e-2
    for p, p0, g in zip(model.backbone.parameters(), w0.parameters(), final):
        torch.testing.assert_close(p0.detach() - p.detach(), g * 1e-3 / (norm + 1e-6), rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_final_gradient(tmp_path, precision):
    x, y = data()
    w0 = copy.deepcopy(tiny().backbone)
    final = hand_grads(w0, [(x, y)], 0.2, False, 0.5)
    model, probe = tiny(), Probe()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if precision == "16-mixed" else None
    plugin = MixedPrecision(precision, "cpu", scaler)
    callbacks = [SAM(rho=0.2, penalty_weight=0.5), probe]
    fast_trainer(tmp_path, max_steps=1, plugins=[plugin], callbacks=callbacks).fit(model, loader(x, y, 16))
    # unscaled once, on the sum of both passes: equal to the fp32 equations up to half-precision error
    num = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(probe.grads[0], final)))
    assert num / torch.sqrt(sum((b**2).sum() for b in final)) < 0.05
    if scaler is not None:
        assert scaler.get_scale() == 2.0**12  # no inf: the step was taken and the scale kept


def test_fp16_overflow_skips_step_and_keeps_weights(tmp_path):
    x, y = data()
    model = tiny()
    w0 = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # fp16 gradients overflow
    trainer = fast_trainer(
        tmp_path, max_steps=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler)], callbacks=[SAM(rho=0.2)]
    )
    trainer.fit(model, loader(x, y, 16))
    assert scaler.get_scale() < 2.0**40
    for p, p0 in zip(model.parameters(), w0):
        assert torch.equal(p.detach(), p0)


class WithTrainMetric(Counting):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from torchmetrics.classification import MulticlassAccuracy

        self.train_acc = MulticlassAccuracy(3, average="micro")

    def training_step(self, batch, batch_idx):
        self.train_acc.update(self(batch[0]).argmax(-1), batch[1])
        return super().training_step(batch, batch_idx)


def test_batchnorm_stats_metrics_logging_and_every_n_steps(tmp_path):
    x, y = data()
    # a torchmetrics train metric updated in training_step counts each batch once
    metric_states = []
    for callbacks in ([], [SAM(rho=0.2)]):
        torch.manual_seed(0)
        model = WithTrainMetric(MLP(input_shape=[4], num_outputs=3, hidden=[6]), num_classes=3)
        fast_trainer(tmp_path, max_steps=1, callbacks=callbacks).fit(model, loader(x, y, 16))
        metric_states.append(
            (model.train_acc.update_count, {k: v.clone() for k, v in model.train_acc.metric_state.items()})
        )
    assert metric_states[0][0] == metric_states[1][0] == 1
    assert all(torch.equal(v, metric_states[1][1][k]) for k, v in metric_states[0][1].items())
    # BatchNorm running statistics: the second pass leaves them as one plain step does
    stats = {}
    for name, callbacks in (
        ("plain", []),
        ("sam", [SAM(rho=0.2)]),
        ("unfrozen", [SAM(rho=0.2, freeze_bn_stats=False)]),
    ):
        model = tiny(batch_norm=True)
        fast_trainer(tmp_path, max_steps=1, callbacks=callbacks).fit(model, loader(x, y, 16))
        bn = model.backbone[1][1]
        stats[name] = (bn.running_mean.clone(), int(bn.num_batches_tracked))
    assert torch.equal(stats["sam"][0], stats["plain"][0]) and stats["sam"][1] == stats["plain"][1] == 1
    assert stats["unfrozen"][1] == 2
    # logging: the module's train/loss once per step with the unperturbed value; sam/* present
    logs = {}
    for name, callbacks in (("plain", []), ("sam", [SAM(rho=0.2, every_n_steps=2)])):
        model = tiny()
        logger = TensorBoardLogger(tmp_path, name=name)
        trainer = fast_trainer(tmp_path, max_epochs=2, logger=logger, log_every_n_steps=1, callbacks=callbacks)
        trainer.fit(model, loader(x, y, 4))
        logs[name] = read_scalars(logger.log_dir)
    assert model.calls == 8 + 4  # 8 steps, every second one perturbed
    assert [s for s, _ in logs["sam"]["train/loss"]] == list(range(8))
    assert logs["sam"]["train/loss"][0][1] == pytest.approx(logs["plain"]["train/loss"][0][1])
    sharpness = dict(logs["sam"]["sam/loss_increase"])
    assert all(sharpness[s] != sharpness[s - 1] for s in (2, 4, 6))  # new value on each perturbed step
    assert "sam/perturbation_norm" not in logs["sam"]  # plain SAM's ||e|| is rho: not logged
    assert all(v > 0 for _, v in logs["sam"]["sam/grad_norm"])


def test_sam_with_ema_averages_restored_weights(tmp_path):
    x, y = data(dtype=F64)
    probe = Probe()
    model = tiny(dtype=F64)
    fast_trainer(tmp_path, max_epochs=1, callbacks=[SAM(rho=0.2), probe]).fit(model, loader(x, y, 4))
    model_ema = tiny(dtype=F64)
    ema = EMAWeightAveraging(decay=0.5)
    fast_trainer(tmp_path, max_epochs=1, callbacks=[SAM(rho=0.2), ema]).fit(model_ema, loader(x, y, 4))
    avg = probe.after[0]
    for weights in probe.after[1:]:
        avg = [0.5 * a + 0.5 * w for a, w in zip(avg, weights)]
    for p, a in zip(model_ema.parameters(), avg):
        torch.testing.assert_close(p.detach(), a, rtol=1e-12, atol=1e-14)


class ClosureFirst(Classifier):
    """Runs the closure itself before `optimizer.step()`: no closure reaches the optimizer."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer_closure()
        optimizer.step()


def test_setup_errors(tmp_path):
    x, y = data()
    with pytest.raises(ValueError, match="`exclude`.*'\\*.nope'"):
        fast_trainer(tmp_path, max_steps=1, callbacks=[SAM(exclude=["*.nope"])]).fit(tiny(), loader(x, y, 16))
    with pytest.raises(ValueError, match="manual optimisation"):
        fast_trainer(tmp_path, max_steps=1, callbacks=[SAM()]).fit(
            PeerSAM(tiny().backbone, 0.1, False), loader(x, y, 16)
        )
    with pytest.raises(RuntimeError, match="closure=optimizer_closure"):
        model = ClosureFirst(MLP(input_shape=[4], num_outputs=3, hidden=[6]), 3)
        fast_trainer(tmp_path, max_steps=1, callbacks=[SAM()]).fit(model, loader(x, y, 16))
    with pytest.raises(ValueError, match="Only one sharpness penalty"):
        fast_trainer(tmp_path, max_steps=1, callbacks=[SAM(), SurrogateSharpness()]).fit(tiny(), loader(x, y, 16))


# ------------------------------------------------------------------------------------------
# DDP and FSDP2 on 2 CPU ranks
# ------------------------------------------------------------------------------------------


def dist_worker(strategy, tmp_dir):
    out = {}
    # The cases compared with a hand computation or another run are float64: a float64 model fed
    # float64 inputs (ModelParallelStrategy refuses precision="64-true").
    f64 = {"float64": True}
    cases = {
        "local": (lambda: SAM(rho=0.2, sync_first_pass=False), f64),
        "synced": (lambda: SAM(rho=0.2, sync_first_pass=True), f64),
        "ignite": (lambda: SurrogateSharpness(rho=0.5, radius=0.1, lambda_init=1.0, lambda_lr=0.5), f64),
        "accumulate": (lambda: SAM(rho=0.2, adaptive=True), {"accumulate_grad_batches": 2, "gradient_clip_val": 0.1}),
    }
    cases["bf16"] = (lambda: SAM(rho=0.2), {"precision": "bf16-mixed"})
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    cases["fp16"] = (lambda: SAM(rho=0.2, penalty_weight=0.5), {"plugins": [MixedPrecision("16-mixed", "cpu", scaler)]})
    if isinstance(strategy, DDPStrategy):
        bucket_view = DDPStrategy(process_group_backend="gloo", gradient_as_bucket_view=True)
        cases["ignite_bucket_view"] = (cases["ignite"][0], {"strategy": bucket_view, **f64})
        cases["gnp_bucket_view"] = (lambda: SAM(rho=0.2, penalty_weight=0.5), {"strategy": bucket_view, **f64})
        cases["gnp"] = (lambda: SAM(rho=0.2, penalty_weight=0.5), f64)
    for name, (make, kwargs) in cases.items():
        kwargs = {**kwargs, "strategy": copy.deepcopy(kwargs.get("strategy", strategy))}
        double = kwargs.pop("float64", False)
        seed_everything(0)
        model, probe, cb = tiny(dtype=F64 if double else torch.float32), Probe(), make()
        if double:
            model.on_before_batch_transfer = lambda batch, dataloader_idx: [batch[0].double(), batch[1]]
        w0 = {k: _full(v).detach().clone() for k, v in model.backbone.state_dict().items()}
        dm = SyntheticClassification(num_samples=128, input_shape=[4], num_classes=3, batch_size=8)
        callbacks = [cb, probe, SharpnessMonitor()]
        trainer = fast_trainer(tmp_dir / name, devices=2, max_steps=3, callbacks=callbacks, **kwargs)
        trainer.fit(model, dm)
        weights = [_full(p.detach()).clone() for p in model.parameters()]
        out[name] = {"w0": w0, "batches": probe.batches, "grads": probe.grads, "weights": weights, "calls": model.calls}
        out[name]["state"] = cb.state_dict()
    return out


def _reference_backbone(w0):
    net = MLP(input_shape=[4], num_outputs=3, hidden=[6]).double()
    net.load_state_dict(w0)
    return net


def _grads_at(net, batch):
    net.zero_grad()
    F.cross_entropy(net(batch[0]), batch[1]).backward()
    return [p.grad.clone() for p in net.parameters()]


def _check_distributed(r0, r1, local_perturbation):
    assert set(r0) == set(r1)
    for name in r0:
        for a, b in zip(r0[name]["weights"], r1[name]["weights"]):
            assert torch.equal(a, b), f"{name}: ranks differ"
        for a, b in zip(r0[name]["grads"][0], r1[name]["grads"][0]):
            assert torch.equal(a, b), f"{name}: final gradients differ"
        assert all(torch.isfinite(w).all() for w in r0[name]["weights"]), name
    assert r0["accumulate"]["calls"] == 3 * 2 * 2  # 3 steps x 2 micro-batches x 2 passes (the monitor uses batch_loss)
    assert torch.equal(r0["ignite"]["state"]["lambda"], r1["ignite"]["state"]["lambda"])
    assert r0["local"]["calls"] == 6  # 3 steps x 2 passes; the monitor calls batch_loss, not training_step
    for name, local in (("local", local_perturbation), ("synced", False)):
        net = _reference_backbone(r0[name]["w0"])
        batches = [(x.double(), y) for x, y in (r0[name]["batches"][0], r1[name]["batches"][0])]
        if local:  # each rank's SAM gradient with its own perturbation, averaged
            per_rank = [hand_grads(net, [b], 0.2, False, 1.0) for b in batches]
            want = [(a + b) / 2 for a, b in zip(*per_rank)]
        else:  # one perturbation from the global (mean) gradient
            g = [(a + b) / 2 for a, b in zip(*[_grads_at(copy.deepcopy(net), b) for b in batches])]
            norm = torch.sqrt(sum((t**2).sum() for t in g))
            with torch.no_grad():
                for p, t in zip(net.parameters(), g):
                    p.add_(0.2 * t / norm)
            want = [(a + b) / 2 for a, b in zip(*[_grads_at(copy.deepcopy(net), b) for b in batches])]
        for got, w in zip(r0[name]["grads"][0], want):
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-12, msg=name)


def test_ddp(tmp_path):
    r0, r1 = run_distributed(dist_worker, "ddp", tmp_path)
    _check_distributed(r0, r1, local_perturbation=True)
    for name in ("ignite", "gnp"):  # gradients as views of DDP's buckets: same result
        plain, view = r0[name], r0[f"{name}_bucket_view"]
        for a, b in zip(plain["grads"] + [plain["weights"]], view["grads"] + [view["weights"]]):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12, msg=name)


def test_fsdp2(tmp_path):
    r0, r1 = run_distributed(dist_worker, "fsdp2", tmp_path)
    # FSDP2 reduce-scatters every backward: the perturbation always comes from the global gradient
    _check_distributed(r0, r1, local_perturbation=False)


# ------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fragments", [("sam", "sharpness_monitor"), ("ignite",)])
def test_callback_configs_compose(tmp_path, fragments):
    extra = ["--trainer.max_steps", "2", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    extra += ["--trainer.limit_val_batches", "0"]
    extra += ["--trainer.default_root_dir", str(tmp_path), "--test_after_fit", "false"]
    cli = run_cli("digits/classifier.yaml", *[f"callbacks/{f}.yaml" for f in fragments], extra=extra)
    kinds = {type(cb).__name__ for cb in cli.trainer.callbacks}
    assert {"sam": "SAM", "ignite": "SurrogateSharpness"}[fragments[0]] in kinds
    assert ("SharpnessMonitor" in kinds) == (len(fragments) == 2)
    assert cli.trainer.global_step == 2


def test_label_noise_and_fragment_configs_parse():
    expected = {"sgd": None, "sam": (0.1, False, 1.0), "asam": (1.0, True, 1.0), "gnp": (0.1, False, 0.5)}
    for method, want in expected.items():
        cli = run_cli(f"digits/label_noise/{method}.yaml", run=False)
        assert cli.datamodule.label_noise == 0.4
        sam = [cb for cb in cli.trainer.callbacks if isinstance(cb, SAM)]
        assert [(c.rho, c.adaptive, c.penalty_weight) for c in sam] == ([want] if want else [])
    for fragment, want in {"asam": (0.5, True, 1.0), "gnp": (0.05, False, 0.5)}.items():
        cli = run_cli("digits/classifier.yaml", f"callbacks/{fragment}.yaml", run=False)
        sam = [cb for cb in cli.trainer.callbacks if isinstance(cb, SAM)]
        assert [(c.rho, c.adaptive, c.penalty_weight) for c in sam] == [want]
