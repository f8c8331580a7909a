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
    for callback in (EMA(decay=0.9), SWA(start=0)):
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
    import litplug.functional.masks as unlearning

    monkeypatch.setattr(unlearning, "CHUNK", 16)  # several chunks, a partial last byte
    gen = torch.Generator().manual_seed(0)
    for shape in [(0,), (1,), (7,), (3, 11), (5, 8)]:
        mask = torch.rand(shape, generator=gen) > 0.5
        packed = pack_mask(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
        assert torch.equal(unpack_mask(packed, shape), mask)
        weights = torch.randn(shape, generator=gen)
        weights.view(-1)[:1] = -0.0
        values = unlearning.frozen_values(weights, packed)
        moved = torch.full(shape, float("nan"))
        unlearning.restore_frozen_([moved], [values], [packed])
        assert torch.equal(moved[~mask].view(torch.int32), weights[~mask].view(torch.int32))  # bit-exact, -0.0 too
        assert moved[mask].isnan().all()
        grad = torch.full(shape, float("inf"))
        unlearning.enforce_masked_grads_([grad], [packed])
        assert (grad[~mask].view(torch.int32) == 0).all() and grad[mask].isinf().all()
