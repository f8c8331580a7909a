"""EMA: the update rule against closed forms and Lightning's EMAWeightAveraging, the swap for
validation, final weights, bf16 models with a float32 average."""

import pytest
import torch
from averaging_helpers import Probe, assert_states_equal, fit, small_classifier
from harness import fast_trainer, read_scalars, state_of
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from litplug.callbacks import EMA
from litplug.datamodules import Digits
from litplug.functional import ema_decay
from litplug.modules import MLP


# ----------------------------------------------------------------------------- Trainer behaviour
def test_ema_swaps_for_validation_exactly_and_ends_on_average(tmp_path):
    probe = Probe()
    ema = EMA(decay=0.9, warmup=True, export_path=str(tmp_path / "ema.pt"))
    logger = TensorBoardLogger(tmp_path / "tb")
    trainer, model = fit(tmp_path, ema, probe=probe, logger=logger, log_every_n_steps=1, val_check_interval=2)
    assert ema.updates == 8 and len(probe.val_start) == 4
    # during validation the model holds the average, afterwards the live weights bit-exactly
    live_before_val = [probe.after_step[i] for i in (1, 3, 5, 7)]
    for before, during, after in zip(live_before_val, probe.val_start, probe.val_end):
        assert_states_equal(before, after)
        assert any(not torch.equal(before[k], during[k]) for k in before if k.endswith("weight"))
    # the average equals a hand-rolled EMA of the recorded live states, paired by name
    avg = {k: v.clone() for k, v in probe.after_step[0].items()}
    for t, live in enumerate(probe.after_step[1:], start=1):
        d = ema_decay(t, 0.9, warmup=True)
        for k, v in live.items():
            avg[k] = v.clone() if not v.is_floating_point() else d * avg[k] + (1 - d) * v
    final = state_of(model)
    for k in avg:
        torch.testing.assert_close(final[k], avg[k], rtol=1e-5, atol=1e-6, msg=k)
    assert (
        final["backbone.1.1.num_batches_tracked"] == probe.after_step[-1]["backbone.1.1.num_batches_tracked"]
    )  # copied
    assert_states_equal(probe.val_start[-1], final)  # last validation ran on the (final) average
    # logs: ema/decay follows the warmup rule, ema/updates counts
    scalars = read_scalars(tmp_path / "tb")
    assert [v for _, v in scalars["ema/updates"]] == [float(i) for i in range(1, 9)]
    assert [v for _, v in scalars["ema/decay"]] == pytest.approx([ema_decay(t, 0.9, True) for t in range(8)])
    # export: a plain state dict that loads into the bare backbone
    exported = torch.load(tmp_path / "ema.pt")
    bare = MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[16], batch_norm=True)
    bare.load_state_dict(exported)
    assert_states_equal({"backbone." + k: v for k, v in state_of(bare).items()}, final)
    assert_states_equal(exported, ema.averaged_state_dict("auto"))
    assert_states_equal(exported, ema.averaged_state_dict("backbone."))


def test_ema_without_update_keeps_trained_weights(tmp_path):
    probe = Probe()
    ema = EMA(start_step=100)
    trainer, model = fit(tmp_path, ema, probe=probe)
    assert ema.updates == 0
    assert_states_equal(probe.after_step[-1], state_of(model))
    assert_states_equal(probe.after_step[3], probe.val_start[0])  # validation used the live weights
    assert_states_equal(ema.averaged_state_dict(), state_of(model))


def test_ema_live_final_weights_every_n_steps(tmp_path):
    probe = Probe()
    ema = EMA(decay=0.5, every_n_steps=3, final_weights="live", evaluate_with="live")
    trainer, model = fit(tmp_path, ema, probe=probe)
    assert ema.updates == 3 and ema.last_update == 7  # after steps 1, 4 and 7 of 8
    assert_states_equal(probe.after_step[-1], state_of(model))
    assert_states_equal(probe.after_step[3], probe.val_start[0])
    avg = ema.averaged_state_dict()
    k = "backbone.2.weight"
    w = [probe.after_step[i][k] for i in (0, 3, 6)]
    torch.testing.assert_close(avg[k], 0.5 * (0.5 * w[0] + 0.5 * w[1]) + 0.5 * w[2])
    # test on the average, then back to the live weights, also after the module's storage moved
    # (as Lightning's teardown on GPUs does): the callback rebinds its average by name
    ema.evaluate_with = "average"
    model.to(torch.float64).to(torch.float32)
    trainer.test(model, Digits(batch_size=32), verbose=False)
    assert_states_equal(probe.test_start, ema.averaged_state_dict())
    assert_states_equal(probe.after_step[-1], state_of(model))


@pytest.mark.parametrize("after,every", [(0, 3), (2, 3)])
def test_ema_update_steps_match_lightning(tmp_path, after, every):
    """EMA updates after the same optimizer steps as Lightning's EMAWeightAveraging (both run in
    one Trainer): step index i = global_step - 1 with i >= start_step, i % n == 0."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    ours = EMA(decay=0.5, start_step=after, every_n_steps=every, final_weights="live", evaluate_with="live")
    peer = EMAWeightAveraging(decay=0.5, update_every_n_steps=every, update_starting_at_step=after)

    class Steps(Callback):
        ours_at, peer_at = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if ours.updates > len(self.ours_at):
                self.ours_at.append(trainer.global_step)
            if int(peer._average_model.n_averaged) > len(self.peer_at):
                self.peer_at.append(trainer.global_step)

    steps = Steps()
    seed_everything(0)
    trainer = fast_trainer(
        tmp_path, max_epochs=1, limit_train_batches=11, limit_val_batches=0, callbacks=[ours, peer, steps]
    )
    trainer.fit(small_classifier(batch_norm=False), Digits(batch_size=32))
    assert steps.ours_at == steps.peer_at == [t for t in range(1, 12) if t - 1 >= after and (t - 1) % every == 0]


def test_ema_bf16_model_fp32_average(tmp_path):
    ema16, ema32 = EMA(decay=0.999), EMA(decay=0.999, dtype="float32")
    for ema in (ema16, ema32):
        trainer, model = fit(tmp_path, ema, model=small_classifier(batch_norm=False), precision="bf16-true")
        assert next(model.parameters()).dtype == torch.bfloat16
    assert next(iter(ema16.average_tensors().values())).dtype == torch.bfloat16
    assert next(iter(ema32.average_tensors().values())).dtype == torch.float32
    a16, a32 = ema16.averaged_state_dict(), ema32.averaged_state_dict()
    # the fp32 average moved away from the first snapshot where the bf16 one rounded updates away
    assert sum(int((a32[k].bfloat16() != a16[k]).sum()) for k in a16) > 0
