"""UnlearningMask: exact top-k ranking, bit-exact frozen entries under every optimizer, composition
with clipping / accumulation / SAM-like callbacks, DDP and FSDP2 masks, resume, logging."""

import pytest
import torch
from harness import fast_trainer, make_strategy, read_histograms, read_scalars, run_distributed, state_of
from lightning.pytorch import Callback, LightningModule, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, TensorDataset

from litplug.callbacks import UnlearningMask
from litplug.datamodules import Digits, ForgetRetain
from litplug.functional import topk_masks
from litplug.modules import MLP, Classifier, Unlearner

# --- functional core ---------------------------------------------------------------------------


def test_saliency_needs_forget_data(tmp_path):
    model = Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[8]))
    trainer = fast_trainer(tmp_path, callbacks=[UnlearningMask("saliency")], limit_train_batches=1)
    with pytest.raises(TypeError, match="ForgetRetainData.*forget_dataloader"):
        trainer.fit(model, Digits())


# --- exactness on a toy module ---------------------------------------------------------------
class Toy(LightningModule):
    """A separable loss sum_i a_i (w_i - c_i)^2 (+ a cross term when ``coupled``), one [6, 5]
    weight; the optimizer is warmed by unmasked steps before training starts."""

    def __init__(self, make_opt, warm_steps=3, coupled=False):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(6, 5, generator=gen))
        self.register_buffer("c", torch.randn(6, 5, generator=gen))
        self.register_buffer("a", torch.rand(6, 5, generator=gen) + 0.5)
        self.make_opt, self.warm_steps, self.coupled = make_opt, warm_steps, coupled
        self.clip_grads = []

    def training_step(self, batch, batch_idx):
        scale = batch[0].mean()  # varies per batch
        loss = (self.a * (self.w - self.c * scale) ** 2).sum()
        if self.coupled:
            loss = loss + self.w.sum() ** 2
        return loss

    def configure_optimizers(self):
        opt = self.make_opt([self.w])
        w0 = self.w.detach().clone()
        gen = torch.Generator().manual_seed(1)
        for _ in range(self.warm_steps):  # warm momentum / Adam moments everywhere
            self.w.grad = torch.randn(self.w.shape, generator=gen)
            opt.step()
        self.w.grad = None
        with torch.no_grad():
            self.w.copy_(w0)
        return opt

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_grads.append(self.w.grad.detach().clone())
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)


def toy_loader():
    gen = torch.Generator().manual_seed(2)
    return DataLoader(TensorDataset(torch.rand(16, 1, generator=gen) + 0.5), batch_size=2)


class FrozenChecker(Callback):
    """After every optimizer step: frozen entries still equal their values at train start."""

    def __init__(self, mask_cb, poison=None):
        self.mask_cb, self.poison, self.steps = mask_cb, poison, 0

    def on_train_start(self, trainer, pl_module):
        self.start = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_after_backward(self, trainer, pl_module):
        if self.poison is not None:
            for n, p in pl_module.named_parameters():
                if n in self.mask_cb.masks:
                    p.grad[~self.mask_cb.masks[n]] = self.poison

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps += 1
        num_frozen = 0
        for n, p in pl_module.named_parameters():
            if n not in self.mask_cb.masks:
                continue
            frozen = ~self.mask_cb.masks[n]
            num_frozen += int(frozen.sum())
            assert torch.equal(p.detach()[frozen], self.start[n][frozen]), f"frozen entries moved at step {self.steps}"
            assert torch.isfinite(p).all()
        assert num_frozen > 0


OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
    "adam_coupled_wd": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
}


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("poison", [None, float("inf"), float("nan")])
def test_frozen_entries_bit_exact(tmp_path, opt, poison):
    seed_everything(0)
    mask = UnlearningMask("magnitude", ratio=0.4, scope="all")
    checker = FrozenChecker(mask, poison)
    model = Toy(OPTIMIZERS[opt])
    trainer = fast_trainer(
        tmp_path, max_epochs=2, callbacks=[mask, checker], gradient_clip_val=0.5, accumulate_grad_batches=2
    )
    trainer.fit(model, toy_loader())
    assert checker.steps == 16 and trainer.global_step == 8
    assert int(mask.masks["w"].sum()) == int(30 * 0.4)
    # clipping saw the masked gradient: zero (not inf/NaN) at every frozen entry
    assert len(model.clip_grads) == 8
    for g in model.clip_grads:
        assert torch.equal(g[~mask.masks["w"]], torch.zeros_like(g[~mask.masks["w"]]))
    assert (model.w.detach()[mask.masks["w"]] != checker.start["w"][mask.masks["w"]]).all()


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_free_entries_match_unmasked_run_on_separable_loss(tmp_path, opt):
    runs = {}
    mask = UnlearningMask("magnitude", ratio=0.5, scope="all")
    for masked in (True, False):
        seed_everything(0)
        model = Toy(OPTIMIZERS[opt])
        trainer = fast_trainer(tmp_path, max_epochs=2, callbacks=[mask] if masked else [])
        trainer.fit(model, toy_loader())
        runs[masked] = model.w.detach().clone()
    free = mask.masks["w"]
    assert torch.equal(runs[True][free], runs[False][free])
    assert not torch.equal(runs[True][~free], runs[False][~free])


class SAMLike(Callback):
    """Re-runs training_step at perturbed weights inside on_before_optimizer_step (as a SAM
    callback does), *after* UnlearningMask's hook: its fresh gradients are dense again."""

    def __init__(self):
        self.dense_after_recompute = False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        with torch.no_grad():
            eps = 0.05 * pl_module.w.grad / (pl_module.w.grad.norm() + 1e-12)
            pl_module.w.add_(eps)
        pl_module.w.grad = None
        with torch.enable_grad():
            loss = pl_module.training_step((torch.ones(2, 1),), 0)
            loss.backward()
        with torch.no_grad():
            pl_module.w.sub_(eps)
        self.dense_after_recompute |= bool((pl_module.w.grad != 0).all())


class RecordingSGD(torch.optim.SGD):
    """Records the gradients that the update actually uses (after the closure ran)."""

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.used = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]
        super().step()
        return loss


def test_sam_like_callback_composes(tmp_path):
    seed_everything(0)
    mask = UnlearningMask("random", ratio=0.5, scope="all")
    checker = FrozenChecker(mask)
    sam = SAMLike()
    used = []

    class Spy(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            used.append(trainer.optimizers[0].used[0])

    model = Toy(lambda p: RecordingSGD(p, lr=0.05, momentum=0.9), warm_steps=0, coupled=True)
    trainer = fast_trainer(tmp_path, max_epochs=1, callbacks=[mask, sam, checker, Spy()])
    trainer.fit(model, toy_loader())
    assert sam.dense_after_recompute  # the SAM gradients did reach the frozen entries ...
    for g in used:  # ... but the update saw them zeroed (the step pre-hook wraps the closure)
        assert torch.equal(g[~mask.masks["w"]], torch.zeros_like(g[~mask.masks["w"]]))
        assert (g[mask.masks["w"]] != 0).any()


# --- on the real Unlearner -------------------------------------------------------------------
def _unlearner(method="random_label"):
    return Unlearner(
        MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[16]),
        None,
        method,
        optimizer=lambda p: torch.optim.Adam(p, lr=0.01),
    )


def _data():
    return ForgetRetain(Digits(batch_size=32), scenario="class", forget_classes=[1])


@pytest.mark.parametrize("criterion", ["saliency", "attribution"])
def test_gradient_criteria_rank_forget_gradients(tmp_path, criterion):
    """The default mask is SalUn's / WAGLE's rule, written out here: every parameter (biases
    included) scored, one global threshold, the top int(N * ratio) entries kept updatable."""
    seed_everything(0)
    model, data = _unlearner(), _data()
    mask = UnlearningMask(criterion, ratio=0.3, num_batches=3)
    trainer = fast_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[mask])
    w0 = state_of(model)
    trainer.fit(model, data)
    ref = _unlearner()
    ref.load_state_dict(w0)
    data.setup()
    named = list(ref.named_parameters())
    params = [p for _, p in named]

    def grads(split):  # gradient of the mean CE over the split's first 3 batches
        batches = list(getattr(data, f"{split}_dataloader")())[:3]
        loss = sum(torch.nn.functional.cross_entropy(ref(x), y, reduction="sum") for x, y in batches)
        return torch.autograd.grad(loss / sum(len(y) for _, y in batches), params)

    gf = grads("forget")
    if criterion == "saliency":
        scores = [g.abs() for g in gf]
    else:
        scores = [((p.detach() - gr / 1e-6) * g).abs() for p, g, gr in zip(params, gf, grads("retain"))]
    flat = torch.cat([s.flatten() for s in scores])
    k = int(flat.numel() * 0.3)
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.argsort(flat, descending=True, stable=True)[:k]] = True
    expected = dict(zip([n for n, _ in named], torch.split(chosen, [s.numel() for s in scores])))
    assert set(mask.masks) == set(expected)  # biases are masked too
    agree = sum(int((mask.masks[n].flatten() == e).sum()) for n, e in expected.items())
    assert agree >= flat.numel() - 2  # float summation order may swap a near-tie
    assert sum(int(m.sum()) for m in mask.masks.values()) == k
    assert any(mask.masks[n].any() for n, _ in named if n.endswith("bias"))


def test_default_scope_follows_the_reference_code():
    assert [UnlearningMask(c).scope for c in ("saliency", "attribution", "random", "magnitude")] == [
        "all",
        "all",
        "all",
        "weights",
    ]
    assert UnlearningMask("saliency", scope="weights").scope == "weights"


def test_logs_and_resume_without_recompute(tmp_path, monkeypatch):
    seed_everything(0)
    model, data = _unlearner(), _data()
    mask = UnlearningMask("saliency", ratio=0.25, num_batches=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = fast_trainer(
        tmp_path,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        callbacks=[mask, ckpt],
        logger=logger,
        enable_checkpointing=True,
    )
    trainer.fit(model, data)
    scalars, hists = read_scalars(tmp_path / "tb"), read_histograms(tmp_path / "tb")
    assert scalars["unlearn/mask_ratio"][-1][1] == pytest.approx(mask.num_selected / mask.num_entries)
    assert mask.num_selected == int(mask.num_entries * 0.25)
    hist = hists["unlearn/layer_updatable_fraction"][-1].histogram_value
    assert hist.num == len(mask.masks) and 0.0 <= hist.min <= hist.max <= 1.0
    assert "unlearn/val/UA" in scalars and "unlearn/val/MIA" in scalars

    def boom(*args, **kwargs):
        raise AssertionError("mask recomputed on resume")

    import litplug.callbacks.unlearning as unlearning

    monkeypatch.setattr(unlearning, "iter_topk_masks", boom)  # the mask selection, run only when computing
    resumed = UnlearningMask("saliency", ratio=0.25, num_batches=2)
    checker = FrozenChecker(resumed)
    trainer = fast_trainer(
        tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=[resumed, checker]
    )
    trainer.fit(_unlearner(), _data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert checker.steps == 2
    for n, m in mask.masks.items():
        assert torch.equal(resumed.masks[n], m)


# --- DDP and FSDP2 ---------------------------------------------------------------------------
class _Capture(Callback):
    """Runs after UnlearningMask at train start: full-weight reference ranking and frozen checks."""

    def on_train_start(self, trainer, pl_module):
        mask = trainer.callbacks[0]
        names = list(mask.masks)
        params = dict(pl_module.named_parameters())
        full = [params[n].full_tensor() if hasattr(params[n], "full_tensor") else params[n].detach() for n in names]
        self.reference = topk_masks([f.abs() for f in full], mask.num_selected)
        self.names = names
        self.local_shapes = {n: tuple(m.shape) for n, m in mask.masks.items()}
        self.start = {
            n: (p.to_local() if hasattr(p, "to_local") else p).detach().clone() for n, p in zip(names, mask.params)
        }
        self.frozen_ok = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        mask = trainer.callbacks[0]
        for n, p in zip(self.names, mask.params):
            local = p.to_local() if hasattr(p, "to_local") else p
            frozen = ~mask.masks[n]
            self.frozen_ok &= torch.equal(local.detach()[frozen], self.start[n][frozen])


def dist_worker(strategy, tmp_dir):
    out = {}
    # the two runs also cover the methods with extra state: npo (a frozen reference model on every
    # rank) and l1_sparse (an L1 term over sharded parameters under FSDP2)
    for criterion, method in (("magnitude", "npo"), ("saliency", "l1_sparse")):
        seed_everything(0)
        model = Unlearner(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[16]), None, method)
        with torch.no_grad():  # coarse weights: many ties at the threshold, across shards
            for p in model.parameters():
                p.copy_(torch.round(p * 8) / 8)
        mask = UnlearningMask(criterion, ratio=0.37, num_batches=5)
        capture = _Capture()
        if criterion != "magnitude":  # a Strategy instance serves one Trainer
            strategy = make_strategy("fsdp2" if isinstance(strategy, ModelParallelStrategy) else "ddp")
        trainer = fast_trainer(
            tmp_dir / criterion,
            strategy=strategy,
            devices=2,
            max_epochs=1,
            limit_train_batches=2,
            limit_val_batches=0,
            callbacks=[mask, capture],
        )
        trainer.fit(model, ForgetRetain(Digits(batch_size=16), scenario="random", forget_fraction=0.2))
        state = mask.state_dict()
        out[criterion] = {
            "masks": state["masks"],
            "k": mask.num_selected,
            "reference": [m.clone() for m in capture.reference] if criterion == "magnitude" else None,
            "names": capture.names,
            "local_shapes": capture.local_shapes,
            "frozen_ok": capture.frozen_ok,
            "weights": state_of(model),
        }
    # resume from a checkpoint of the last run (sharded under FSDP2): masks are loaded, not recomputed
    trainer.save_checkpoint(tmp_dir / "last.ckpt")
    resumed = UnlearningMask("saliency", ratio=0.37, num_batches=5)
    trainer = fast_trainer(
        tmp_dir / "resumed",
        strategy=make_strategy("fsdp2" if isinstance(strategy, ModelParallelStrategy) else "ddp"),
        devices=2,
        max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=[resumed],
    )  # fmt: skip
    model = Unlearner(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[16]), None, "gradient_difference")
    import litplug.callbacks.unlearning as unlearning

    real, unlearning.iter_topk_masks = unlearning.iter_topk_masks, None  # selecting masks again would fail
    try:
        data = ForgetRetain(Digits(batch_size=16), scenario="random", forget_fraction=0.2)
        trainer.fit(model, data, ckpt_path=str(tmp_dir / "last.ckpt"))
    finally:
        unlearning.iter_topk_masks = real
    out["resumed_masks"] = resumed.state_dict()["masks"]
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_distributed_masks(tmp_path, strategy):
    r0, r1 = run_distributed(dist_worker, strategy, tmp_path)
    for criterion in ("magnitude", "saliency"):
        a, b = r0[criterion], r1[criterion]
        assert a["frozen_ok"] and b["frozen_ok"]
        assert sum(int(m.sum()) for m in a["masks"].values()) == a["k"]
        for n in a["names"]:
            assert torch.equal(a["masks"][n], b["masks"][n]), f"{criterion}: ranks hold different masks for {n}"
        for key in a["weights"]:
            assert torch.equal(a["weights"][key], b["weights"][key])
        if criterion == "magnitude":  # global ranking with ties equals the single-process one
            for n, ref in zip(a["names"], a["reference"]):
                assert torch.equal(a["masks"][n], ref)
        if criterion == "saliency":
            for n in a["names"]:
                assert torch.equal(r0["resumed_masks"][n], a["masks"][n]) and torch.equal(
                    r1["resumed_masks"][n], a["masks"][n]
                )
        if strategy == "fsdp2":  # shard-local masks: each rank holds half the rows
            for n in a["names"]:
                rows = a["masks"][n].shape[0]
                assert a["local_shapes"][n][0] + b["local_shapes"][n][0] == rows
                assert a["local_shapes"][n][0] < rows


def _count_masking_passes(monkeypatch):
    import litplug.callbacks.unlearning as unlearning

    calls = []
    real = unlearning.enforce_masked_grads_
    monkeypatch.setattr(
        unlearning,
        "enforce_masked_grads_",
        lambda grads, keep: (calls.append(sum(g is not None for g in grads)), real(grads, keep)),
    )
    return calls


@pytest.mark.parametrize("opt", ["adamw", "adam_no_decay"])
def test_second_masking_pass_only_for_rewritten_gradients(tmp_path, monkeypatch, opt):
    # The post-closure pass skips gradients that the first pass masked and nothing wrote to since,
    # with or without the restore after the step; clipping (an in-place rewrite) makes it mask again.
    calls = _count_masking_passes(monkeypatch)
    make_opt = OPTIMIZERS["adamw"] if opt == "adamw" else (lambda p: torch.optim.Adam(p, lr=0.05))
    for clip, per_step in ((None, [1, 0]), (0.5, [1, 1])):
        calls.clear()
        seed_everything(0)
        mask = UnlearningMask("magnitude", ratio=0.5, scope="all")
        checker = FrozenChecker(mask, poison=float("nan"))
        trainer = fast_trainer(tmp_path, max_epochs=1, callbacks=[mask, checker], gradient_clip_val=clip)
        trainer.fit(Toy(make_opt, warm_steps=0), toy_loader())
        assert calls == per_step * 8, (clip, calls)
        assert checker.steps == 8


class LateWriter(Callback):
    """Writes the gradient after UnlearningMask's ``on_before_optimizer_step``: in place (under
    no_grad), as a new tensor, or by one more backward accumulated into it; nonzero at every
    entry, so that a frozen entry the mask misses moves under Adam or SGD."""

    def __init__(self, how):
        self.how = how

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        w = pl_module.w
        if self.how == "in_place":
            with torch.no_grad():
                w.grad.add_(1.0)
        elif self.how == "new_tensor":
            w.grad = torch.full_like(w, 1.0)
        elif self.how == "backward":
            with torch.enable_grad():
                w.sum().backward()


NO_RESTORE = {
    "adam": lambda p: torch.optim.Adam(p, lr=0.05),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
}


@pytest.mark.parametrize("opt", sorted(NO_RESTORE))
@pytest.mark.parametrize("how", ["in_place", "new_tensor", "backward", "sam_like"])
def test_one_pass_catches_later_writes_without_restore(tmp_path, monkeypatch, opt, how):
    # Without a restore after the step, frozen entries rely on the masking alone: gradients that
    # another callback writes after the mask's hook (in place, replaced, accumulated, SAM-like
    # recomputation at perturbed weights) are masked again before the update; with gradient
    # accumulation and clipping too. NaN at frozen entries after every backward.
    calls = _count_masking_passes(monkeypatch)
    seed_everything(0)
    mask = UnlearningMask("magnitude", ratio=0.5, scope="all")
    checker = FrozenChecker(mask, poison=float("nan"))
    writer = SAMLike() if how == "sam_like" else LateWriter(how)
    trainer = fast_trainer(
        tmp_path,
        max_epochs=1,
        callbacks=[mask, writer, checker],
        gradient_clip_val=1e3,
        accumulate_grad_batches=2,
    )
    model = Toy(NO_RESTORE[opt], warm_steps=0, coupled=True)
    trainer.fit(model, toy_loader())
    assert checker.steps == 8 and trainer.global_step == 4
    assert mask._skips_restore(trainer.optimizers[0])
    assert calls == [1, 1] * 4  # the write after the first pass is seen every step
    free = mask.masks["w"]
    assert (model.w.detach()[free] != checker.start["w"][free]).any()


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed", "16-mixed"])
def test_frozen_entries_bit_exact_under_reduced_precision(tmp_path, precision):
    # bf16-true: bf16 weights and gradients (the bit masks are 16-bit); 16-mixed: inf at frozen
    # entries (written before the mask's hooks run) never reaches the GradScaler's inf check, and
    # the scaler's in-place unscaling is masked again.
    from lightning.pytorch.plugins import MixedPrecision

    seed_everything(0)
    mask = UnlearningMask("magnitude", ratio=0.5, scope="all")
    checker = FrozenChecker(mask, poison=float("inf"))
    kwargs = {"precision": precision}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    if precision == "16-mixed":
        kwargs = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler)]}
    model = _unlearner("finetune")
    trainer = fast_trainer(tmp_path, max_steps=6, callbacks=[checker, mask], gradient_clip_val=1.0, **kwargs)
    trainer.fit(model, _data())
    assert checker.steps == 6
    if precision == "16-mixed":
        assert scaler.get_scale() == 2.0**8  # no step was skipped for an inf
    start = checker.start["backbone.1.0.weight"]
    now = dict(model.named_parameters())["backbone.1.0.weight"].detach()
    if precision == "bf16-true":
        assert now.dtype == torch.bfloat16
    free = mask.masks["backbone.1.0.weight"]
    assert not torch.equal(now[free], start[free])  # training did move the free entries


NO_DECAY = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=0.05, amsgrad=True),
    "adamw_no_decay": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.0),
    "sgd_maximize": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, maximize=True),
}


@pytest.mark.parametrize("opt", sorted(NO_DECAY))
@pytest.mark.parametrize("warm", [0, 3])
def test_restore_skipped_only_where_the_step_cannot_move_frozen_entries(tmp_path, opt, warm, monkeypatch):
    # Plain SGD/Adam/AdamW without weight decay, from optimizer state that is +0.0 at frozen
    # entries, leave them bit-identical by themselves; warmed state or maximize need the restore.
    # Frozen entries hold inf/NaN gradients and exact -0.0 / +0.0 weights (the sign of zero is the
    # first thing an inexact shortcut would lose).
    import litplug.callbacks.unlearning as unlearning

    restores = []
    real = unlearning.restore_frozen_
    monkeypatch.setattr(unlearning, "restore_frozen_", lambda *a: (restores.append(1), real(*a)))
    seed_everything(0)
    mask = UnlearningMask("magnitude", ratio=0.5, scope="all")
    checker = FrozenChecker(mask, poison=float("nan"))
    model = Toy(NO_DECAY[opt], warm_steps=warm)
    with torch.no_grad():
        model.w[0, :2] = torch.tensor([-0.0, 0.0])  # the smallest magnitudes: frozen
    trainer = fast_trainer(tmp_path, max_epochs=1, callbacks=[checker, mask], gradient_clip_val=0.5)
    trainer.fit(model, toy_loader())
    assert checker.steps == 8
    assert not mask.masks["w"][0, :2].any()
    assert torch.equal(model.w.detach()[0, :2].view(torch.int32), torch.tensor([-0.0, 0.0]).view(torch.int32))
    skipped = warm == 0 and opt != "sgd_maximize"
    assert len(restores) == (0 if skipped else 8)
