"""DataPruning: DDP on 2 ranks equals one process in float64 (same scores, same kept set, same
weights), the ranks' pruned epochs cover exactly the kept set, pruned epochs take the kept share
of the batches, the logs (read back from TensorBoard), clear errors before training. Resume and
the foreign-module matrix: tests/test_registry.py."""

import warnings
from functools import partial

import pytest
import torch
from foreign import Sharded, features
from harness import (
    cut_and_resume,
    fast_trainer,
    make_strategy,
    read_histograms,
    read_scalars,
    run_distributed,
    state_of,
)
from lightning.pytorch import Callback, LightningDataModule, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, IterableDataset

from litplug.callbacks import DataPruning
from litplug.datamodules import Digits, Indexed
from litplug.functional import el2n_scores, grand_scores
from litplug.modules import MLP, Classifier
from litplug.plumbing import mix_seed

SCORES = ("el2n", "grand", "forgetting")


def _module():
    # no BatchNorm: DDP's per-rank batch statistics would differ from one process's
    return Classifier(MLP(input_shape=[6], num_outputs=3, hidden=[8]), 3, optimizer=partial(torch.optim.SGD, lr=0.5))


class Seen(Callback):
    """The training indices of every epoch, in order."""

    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.setdefault(trainer.current_epoch, []).extend(trainer.datamodule.batch_index.tolist())


def _run(score, tmp_dir, batch_size, world=1, float64=False, **kwargs):
    """float64: a float64 model on float64 inputs at precision 32-true (ModelParallelStrategy
    refuses 64-true); otherwise precision 64-true."""
    seed_everything(0)
    model = _module() if score else Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[8]), 10)
    if float64:
        model = model.double()
    # the scores of the sharded runs average the run and one re-initialised copy (trained on rank 1)
    seen, pruning = Seen(), DataPruning(score or "el2n", keep=0.25, score_epoch=1, seeds=2 if score else 1)
    precision = "32-true" if float64 else "64-true"
    trainer = fast_trainer(tmp_dir, max_epochs=3, precision=precision, callbacks=[pruning, seen], **kwargs)
    data = Sharded(batch_size, world, torch.float64 if float64 else torch.float32)
    trainer.fit(model, Indexed(data if score else Digits(batch_size=32)))
    return {"state": state_of(model), "kept": pruning.kept, "scores": pruning.scores, "seen": seen.seen}


def ddp_worker(strategy, tmp_dir):
    kwargs = dict(devices=2, use_distributed_sampler=False)
    own = {s: _run(s, tmp_dir / s, 8, 2, strategy=make_strategy("ddp"), **kwargs) for s in SCORES}
    lightning = _run(None, tmp_dir / "digits", 32, strategy=make_strategy("ddp"), devices=2, limit_val_batches=0)
    fsdp2 = {
        f"fsdp2_{s}": _run(s, tmp_dir / f"fsdp2_{s}", 8, 2, strategy=make_strategy("fsdp2"), **kwargs, float64=True)
        for s in ("grand", "forgetting")  # EL2N scores the same replica as GraNd
    }
    return {**own, "lightning": lightning, **fsdp2}


def test_ddp_and_fsdp2_match_one_process_and_the_ranks_cover_the_kept_set(tmp_path):
    r0, r1 = run_distributed(ddp_worker, "ddp", tmp_path)
    # Lightning's own sharding (a DistributedSamplerWrapper around the KeptSampler): 324 kept
    # (25% of 1294), 162 per rank, the union exactly the kept set
    a, b = r0["lightning"], r1["lightning"]
    assert torch.equal(a["kept"], b["kept"]) and len(a["kept"]) == 324
    assert len(a["seen"][2]) == len(b["seen"][2]) == 162 and sorted(a["seen"][2] + b["seen"][2]) == a["kept"].tolist()
    assert sorted(a["seen"][0] + b["seen"][0]) == list(range(1294))
    for score in SCORES:
        # one process with the global batch (2 x 8): the same batches as the two ranks together
        single = _run(score, tmp_path / score, 16)
        a, b = r0[score], r1[score]
        assert len(single["kept"]) == 16
        assert torch.equal(a["kept"], b["kept"]) and torch.equal(a["kept"], single["kept"]), score
        torch.testing.assert_close(a["scores"], single["scores"], rtol=1e-12, atol=1e-12)
        assert sorted(a["seen"][0] + b["seen"][0]) == list(range(64))
        pruned = a["seen"][2] + b["seen"][2]
        assert sorted(pruned) == single["kept"].tolist(), f"{score}: the ranks' samples are not the kept set"
        assert len(a["seen"][2]) == len(b["seen"][2]) == 8
        assert single["seen"][2] == single["kept"].tolist()  # a sequential loader: the kept set in index order
        for key, value in single["state"].items():
            assert torch.equal(a["state"][key], b["state"][key])
            torch.testing.assert_close(a["state"][key], value, rtol=0, atol=1e-10)
        if score == "el2n":
            continue
        # FSDP2 (DTensor parameters; a float64 model, as ModelParallelStrategy refuses 64-true):
        # scored on a replica with the full parameters, the seeds=2 copy trained from it
        a, b = r0[f"fsdp2_{score}"], r1[f"fsdp2_{score}"]
        assert torch.equal(a["kept"], b["kept"]) and torch.equal(a["kept"], single["kept"]), score
        torch.testing.assert_close(a["scores"], single["scores"], rtol=1e-12, atol=1e-12)
        assert sorted(a["seen"][2] + b["seen"][2]) == single["kept"].tolist()
        for key, value in single["state"].items():
            torch.testing.assert_close(a["state"][key], value, rtol=0, atol=1e-10)


def test_pruned_epochs_train_on_the_kept_share_and_log(tmp_path):
    seed_everything(0)
    model = Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[16]), 10)
    pruning, seen = DataPruning("el2n", keep=0.3, score_epoch=0, offset=0.1), Seen()
    dm = Indexed(Digits(batch_size=64))
    logger = TensorBoardLogger(tmp_path, name="", version=0)
    trainer = fast_trainer(tmp_path, max_epochs=2, callbacks=[pruning, seen], logger=logger)
    trainer.fit(model, dm)
    n = dm.num_examples
    assert len(seen.seen[0]) == n and sorted(seen.seen[1]) == pruning.kept.tolist()
    assert len(pruning.kept) == round(0.3 * n)
    order = torch.sort(-pruning.scores, stable=True).indices  # the band [0.1 n, 0.4 n) of the hardest
    assert set(pruning.kept.tolist()) == set(order[round(0.1 * n) : round(0.1 * n) + len(pruning.kept)].tolist())
    assert trainer.reload_dataloaders_every_n_epochs == 0  # the user's setting is back
    scalars = read_scalars(tmp_path)
    labels = dm.labels()
    assert scalars["pruning/kept_fraction"][0][1] == pytest.approx(len(pruning.kept) / n)
    kept_per_class = sum(
        scalars[f"pruning/kept_fraction/class_{c}"][0][1] * int((labels == c).sum()) for c in range(10)
    )
    assert kept_per_class == pytest.approx(len(pruning.kept), abs=1e-3)
    assert "pruning/scores" in read_histograms(tmp_path)


def test_forgetting_counts_events_of_the_training_forward(tmp_path):
    seed_everything(0)
    pruning = DataPruning("forgetting", keep=0.5, score_epoch=3)
    dm = Indexed(Digits(batch_size=64))
    model = Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[16]), 10)
    fast_trainer(tmp_path, max_epochs=5, callbacks=[pruning]).fit(model, dm)
    learned = (pruning.last_correct == 1) | (pruning.forgotten > 0)
    assert pruning.forgotten.sum() > 0 and learned.any() and (~learned).any()
    assert torch.isinf(pruning.scores[~learned]).all()
    assert torch.equal(pruning.scores[learned], pruning.forgotten[learned].double())


class Stream(IterableDataset):
    def __iter__(self):
        return iter([(torch.zeros(6), 0)] * 4)


class StreamData(LightningDataModule):
    def train_dataloader(self):
        return DataLoader(Stream(), batch_size=2)


def test_bad_setups_fail_before_training(tmp_path):
    model = _module()
    with pytest.raises(TypeError, match="IndexedData.*Wrap it: `litplug.datamodules.Indexed"):
        fast_trainer(tmp_path, callbacks=[DataPruning()]).fit(model, features())
    with pytest.raises(TypeError, match="map-style dataset.*IterableDataset"):
        fast_trainer(tmp_path, callbacks=[DataPruning()]).fit(model, Indexed(StreamData()))
    wrong = Classifier(MLP(input_shape=[5], num_outputs=3), 3)  # a module whose forward rejects the inputs
    with pytest.raises(ValueError, match="classifier-like module.*raised RuntimeError"):
        fast_trainer(tmp_path, callbacks=[DataPruning()]).fit(wrong, Indexed(features()))
    assert wrong.global_step == 0


@pytest.mark.parametrize(("max_epochs", "when"), [(1, "never scores"), (2, "scores after the last epoch"), (3, None)])
def test_a_score_epoch_that_leaves_no_pruned_epoch_is_warned_about(max_epochs, when, tmp_path):
    pruning = DataPruning("el2n", keep=0.5, score_epoch=1)
    trainer = fast_trainer(
        tmp_path, max_epochs=max_epochs, limit_train_batches=1, limit_val_batches=0, callbacks=[pruning]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_module(), Indexed(features()))
    said = [str(w.message) for w in caught if "no epoch trains on the kept set" in str(w.message)]
    assert len(said) == (when is not None)
    assert all(m.startswith(f"DataPruning(score_epoch=1) with max_epochs={max_epochs} {when}: ") for m in said)
    assert (pruning.kept is not None) == (max_epochs > 1)


def test_two_pruning_callbacks_are_refused_when_the_trainer_is_built(tmp_path):
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `DataPruning`"):
        fast_trainer(tmp_path, callbacks=[DataPruning(), DataPruning("grand")])


@pytest.mark.parametrize(("score", "step"), [("forgetting", 9), ("grand", 9), ("el2n", 14)])
def test_a_run_resumes_mid_epoch_exactly(score, step, tmp_path):
    """Cut in the middle of a counted epoch (forgetting: the presentations before the checkpoint are
    in it) or of a pruned epoch (the KeptShuffle's position is in it); 6 steps an epoch, scored at
    the end of epoch 1. Weights, kept set, scores and counts equal the uninterrupted run's, and
    Lightning does not warn about the loader."""

    def build(tmp_dir, **kwargs):
        seed_everything(0)
        model = Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[8]), 10)
        pruning = DataPruning(score, keep=0.5, score_epoch=1)
        trainer = fast_trainer(tmp_dir, max_epochs=3, limit_val_batches=0, callbacks=[pruning], **kwargs)
        return trainer, model, Indexed(Digits(batch_size=256)), pruning

    with warnings.catch_warnings():
        warnings.simplefilter("error", PossibleUserWarning)
        (full, a), (resumed, b) = cut_and_resume(build, tmp_path, step)
    for key, value in state_of(full).items():
        assert torch.equal(state_of(resumed)[key], value), key
    for key, value in a.state_dict().items():
        assert (
            value is None
            and b.state_dict()[key] is None
            or torch.equal(torch.as_tensor(value), torch.as_tensor(b.state_dict()[key]))
        ), key


@pytest.mark.parametrize("score", SCORES)
def test_scores_average_over_reinitialised_copies(score, tmp_path):
    """seeds=3: the run's own scores and those of two copies, each a fresh module built under seed
    mix_seed(Indexed.seed, k), trained score_epoch + 1 epochs with the module's optimizer and loss
    on shuffles drawn from mix_seed(seed_k, epoch), then scored; written out here by hand. The
    copies leave the run untouched (weights, RNG)."""
    n, batch = 64, 16

    def run(seeds):
        seed_everything(0)
        model = _module()
        pruning = DataPruning(score, keep=0.5, score_epoch=1, seeds=seeds)
        fast_trainer(tmp_path / str(seeds), max_epochs=2, callbacks=[pruning]).fit(model, Indexed(Sharded(batch)))
        return model, pruning.scores, torch.rand(1)

    model, own, after = run(1)
    averaged_model, averaged, averaged_after = run(3)
    assert torch.equal(averaged_after, after)
    for key, value in state_of(model).items():
        assert torch.equal(state_of(averaged_model)[key], value), key
    data = features(n=64)
    copies = []
    for k in (1, 2):
        seed = mix_seed(0, k)
        torch.manual_seed(seed)
        copy = _module()  # built under the seed: its layers' initialisation draws in module order
        optimizer = copy.configure_optimizers()
        last, events = torch.full((n,), -1), torch.zeros(n)
        for epoch in range(2):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
            for index in order.split(batch):
                logits = copy(data.x[index])
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(logits, data.y[index]).backward()
                optimizer.step()
                correct = (logits.argmax(-1) == data.y[index]).long()
                events[index] += ((last[index] == 1) & (correct == 0)).float()
                last[index] = correct
        copy.eval()
        loader = [(data.x[i : i + batch], data.y[i : i + batch]) for i in range(0, n, batch)]
        if score == "forgetting":
            copies.append(torch.where((last == 1) | (events > 0), events, torch.inf).double())
        else:
            copies.append((el2n_scores if score == "el2n" else grand_scores)(copy, loader))
    torch.testing.assert_close(averaged, (own + copies[0] + copies[1]) / 3, rtol=1e-6, atol=1e-6)
    assert not torch.equal(averaged, own)
