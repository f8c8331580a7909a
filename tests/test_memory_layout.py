"""Memory layout of the plugins that hold state across steps: what each allocates, counted in
tensors and bytes (no timing, no process-level measurement; benchmarks/scaling.py measures the
peaks)."""

import contextlib
import weakref

import torch
from harness import fast_trainer
from lightning.pytorch import seed_everything
from torch.utils.data import DataLoader

from litplug.callbacks import EMA, SWA, UnlearningMask
from litplug.functional.masks import pack_mask, unpack_mask
from litplug.modules import MLP, Classifier


def _fit(tmp_path, callback, steps=3):
    seed_everything(0)
    model = Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[33, 17], batch_norm=True), num_classes=10)
    data = [(torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(steps)]
    fast_trainer(tmp_path, max_steps=steps, callbacks=[callback]).fit(model, DataLoader(data, batch_size=None))
    return model


def _bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def test_averages_hold_one_copy_and_the_weights_one_buffer(tmp_path):
    for callback in (EMA(decay=0.9), SWA(start_epoch=0)):
        model = _fit(tmp_path, callback)
        # one averaged copy of every parameter and buffer (integer buffers included), nothing else
        assert callback.state_bytes() == _bytes(model.parameters()) + _bytes(model.buffers()), type(callback).__name__
        # the weights were re-laid into one buffer, which the parameters view
        assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1


class _TracedEMA(EMA):
    """Counts, at every ``copy_`` of its first update, how many of the weights' original storages
    are still alive."""

    def __init__(self, refs):
        super().__init__(decay=0.9)
        self.refs, self.alive = refs, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from torch.utils._python_dispatch import TorchDispatchMode

        refs, alive = self.refs, self.alive

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten.copy_.default:
                    alive.append(sum(r() is not None for r in refs))
                return func(*args, **(kwargs or {}))

        with Count() if self.updates == 0 else contextlib.nullcontext():
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def test_ema_relayout_frees_each_old_tensor_as_it_copies(tmp_path):
    # At most one tensor is held twice during the re-layout into one buffer: when parameter i is
    # copied, the storages of parameters 0..i-1 are gone (a copy of all, then a rebind, held two).
    seed_everything(0)
    model = Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[33, 17], batch_norm=False), num_classes=10)
    refs = [weakref.ref(p.untyped_storage()) for p in model.parameters()]
    ema = _TracedEMA(refs)
    data = [(torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    fast_trainer(tmp_path, max_steps=2, callbacks=[ema]).fit(model, DataLoader(data, batch_size=None))
    assert ema.alive == list(range(len(refs), 0, -1))
    assert not any(r() is not None for r in refs)


def test_mask_holds_one_bit_per_entry_and_the_frozen_values(tmp_path):
    mask = UnlearningMask("magnitude", ratio=0.5)
    model = _fit(tmp_path, mask)
    scoped = [p for p in model.parameters() if p.dim() >= 2]
    n = sum(p.numel() for p in scoped)
    frozen = n - mask.num_selected
    assert mask.num_selected == n // 2
    assert mask.state_bytes() == sum((p.numel() + 7) // 8 for p in scoped) + frozen * 4
    floor = frozen * 4 + n / 8  # the frozen fp32 values + 1 bit per entry
    assert mask.state_bytes() <= 1.1 * floor
    assert all(m.dtype == torch.bool for m in mask.masks.values())


def test_packed_masks_round_trip_across_chunks(monkeypatch):
    import litplug.functional.masks as masks

    monkeypatch.setattr(masks, "CHUNK", 16)  # several chunks, a partial last byte
    gen = torch.Generator().manual_seed(0)
    for shape in [(0,), (1,), (7,), (3, 11), (5, 8)]:
        mask = torch.rand(shape, generator=gen) > 0.5
        packed = pack_mask(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
        assert torch.equal(unpack_mask(packed, shape), mask)
        weights = torch.randn(shape, generator=gen)
        weights.view(-1)[:1] = -0.0
        values = masks.frozen_values(weights, packed)
        moved = torch.full(shape, float("nan"))
        masks.restore_frozen_([moved], [values], [packed])
        assert torch.equal(moved[~mask].view(torch.int32), weights[~mask].view(torch.int32))  # bit-exact, -0.0 too
        assert moved[mask].isnan().all()
        grad = torch.full(shape, float("inf"))
        masks.enforce_masked_grads_([grad], [packed])
        assert (grad[~mask].view(torch.int32) == 0).all() and grad[mask].isinf().all()


# ----------------------------------------------------------------------------- sharpness penalties
def _weight_sized_storages(shape):
    """Distinct live storages of tensors of ``shape`` (the weight, its gradient, copies of either)."""
    import gc

    gc.collect()  # garbage in reference cycles (e.g. of an earlier test) is not alive
    return {
        t.untyped_storage().data_ptr()
        for t in gc.get_objects()
        if isinstance(t, torch.Tensor) and not t.is_meta and t.shape == shape
    }


def _probe(base):
    """``base`` (SAM or IGNITE) recording, at the start of every re-run pass, how many storages
    of the weight's shape are alive."""

    class Probe(base):
        seen: list[int]

        def _rerun(self, trainer, pl_module, *args, **kwargs):
            self.seen.append(len(_weight_sized_storages(pl_module.net.weight.shape)))
            return super()._rerun(trainer, pl_module, *args, **kwargs)

    probe = Probe()
    probe.seen = []
    return probe


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(37, 23, bias=False)  # a shape nothing else has

    def forward(self, x):
        return self.net(x)


def _fit_linear(tmp_path, callback, steps=3):
    from lightning.pytorch import LightningModule

    class Module(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _Linear().net

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)  # no optimizer state

    seed_everything(0)
    model = Module()
    own = model.net.weight.data_ptr()
    data = [(torch.randn(4, 37), torch.randn(4, 23)) for _ in range(steps)]
    fast_trainer(tmp_path, max_steps=steps, callbacks=[callback]).fit(model, DataLoader(data, batch_size=None))
    return model, own


def test_sam_holds_one_buffer_and_swaps_it_in_without_copies(tmp_path):
    from litplug.callbacks import SAM

    sam = _probe(SAM)
    model, own = _fit_linear(tmp_path, sam)
    weight = model.net.weight
    # the weights are back in their own storage (a pointer swap, not a copy into a new tensor)
    assert weight.data_ptr() == own
    # at the second pass: the weight's storage, the perturbed buffer swapped in; the gradient at w was dropped
    assert sam.seen == [2, 2, 2]
    # nothing else held between steps (teardown released the buffer)
    assert sam.state_bytes() == 0


def test_sam_buffer_is_allocated_once(tmp_path):
    from litplug.callbacks import SAM

    class Watch(SAM):
        ptrs: list[int] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            self.ptrs.append(sorted(b.data_ptr() for _, b in self._perturbed._buffers.values()))
            assert self.state_bytes() == pl_module.net.weight.numel() * 4

    sam = Watch()
    _fit_linear(tmp_path, sam, steps=4)
    assert len(sam.ptrs) == 4 and all(p == sam.ptrs[0] for p in sam.ptrs)


def test_ignite_holds_two_copies_at_most(tmp_path):
    from litplug.callbacks import SurrogateSharpness

    ignite = _probe(SurrogateSharpness)
    model, own = _fit_linear(tmp_path, ignite)
    assert model.net.weight.data_ptr() == own
    # first extra pass: weight, the copy of the loss gradient, the buffer (kept from the step before);
    # second: weight, perturbed buffer, the combined gradient; grad G(b) is freed after the perturbation
    assert ignite.seen == [2, 3, 3, 3, 3, 3]
