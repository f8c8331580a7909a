"""GradientAscentSearch: the functional core against closed forms, then real fits on the built-in
sphere task (single process, bf16-mixed, DDP and FSDP2 on 2 CPU ranks, TensorBoard read back)."""

import pytest
import torch
from harness import fast_trainer, read_scalars, run_distributed, state_of
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from litplug.callbacks import GradientAscentSearch
from litplug.datamodules import Digits, OfflineDesigns
from litplug.functional import starting_designs
from litplug.modules import MLP, Regressor

TAGS = ("offline/score_max", "offline/score_median", "offline/start_max")


def small_surrogate(dim=8):
    return Regressor(MLP(input_shape=[dim], num_outputs=1, hidden=[32, 32]))


def sphere(batch_size=64, seed=0):
    return OfflineDesigns("sphere", dim=4, num_samples=600, batch_size=batch_size, seed=seed)


def test_needs_an_offline_datamodule(tmp_path):
    trainer = fast_trainer(tmp_path, max_steps=1, callbacks=[GradientAscentSearch()])
    model = Regressor(MLP(input_shape=[1, 8, 8], num_outputs=1, hidden=[8]))
    with pytest.raises(TypeError, match="OfflineDesignsData"):
        trainer.fit(model, Digits())


def test_search_improves_on_the_sphere_logs_once_and_leaves_training_untouched(tmp_path):
    seed_everything(0)
    model, dm = small_surrogate(4), sphere()
    search = GradientAscentSearch(num_designs=32, steps=100, step_size=0.1)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = fast_trainer(tmp_path, max_epochs=8, logger=logger, log_every_n_steps=1, callbacks=[search])
    trainer.fit(model, dm)
    rng_after = torch.get_rng_state()

    scalars = read_scalars(tmp_path / "tb")
    for tag in TAGS:
        assert scalars[tag] == [(trainer.global_step, pytest.approx(search.results[tag], abs=1e-6))]
        assert trainer.callback_metrics[tag].item() == pytest.approx(search.results[tag])
    res = search.results
    # The concave sphere is the easy case: ascending the surrogate must clearly beat the best
    # offline design (a descent, or a search on the wrong model, would not).
    assert res["offline/start_max"] + 0.1 < res["offline/score_max"]
    assert res["offline/score_median"] <= res["offline/score_max"]
    # The logged scores are the true normalised scores of the returned raw designs.
    true = dm.task.objective(search.designs)
    assert search.designs.shape == (32, 4)
    assert (true.max().item() - dm.y_min) / (dm.y_max - dm.y_min) == pytest.approx(res["offline/score_max"])
    assert model.training and all(m.training for m in model.modules())
    grads = [p.grad for p in model.parameters()]

    # Same run without the callback: identical weights and global RNG afterwards.
    seed_everything(0)
    plain = small_surrogate(4)
    fast_trainer(tmp_path / "plain", max_epochs=8).fit(plain, sphere())
    for key, value in state_of(plain).items():
        assert torch.equal(state_of(model)[key], value), key
    for grad, plain_param in zip(grads, plain.parameters()):
        assert (grad is None and plain_param.grad is None) or torch.equal(grad, plain_param.grad)
    assert torch.equal(torch.get_rng_state(), rng_after)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_and_random_start(precision, tmp_path):
    seed_everything(0)
    search = GradientAscentSearch(num_designs=16, steps=5, step_size=0.05, init="random", seed=3)
    trainer = fast_trainer(tmp_path, max_steps=3, precision=precision, callbacks=[search])
    dm = sphere()
    trainer.fit(small_surrogate(4), dm)
    assert search.designs.dtype == torch.float64 and search.designs.shape == (16, 4)
    start = starting_designs(dm.designs, dm.scores, 16, "random", seed=3)
    assert search.results["offline/start_max"] == pytest.approx(dm.score(start).max().item())
    assert not torch.allclose(dm.standardise(search.designs), start, atol=1e-3)  # the designs moved


def distributed_worker(strategy, tmp_dir):
    seed_everything(0)
    search = GradientAscentSearch(num_designs=16, steps=20, step_size=0.05)
    logger = TensorBoardLogger(tmp_dir, name="tb")
    trainer = fast_trainer(
        tmp_dir, strategy=strategy, devices=2, max_epochs=2, limit_val_batches=1, logger=logger, callbacks=[search]
    )
    model = small_surrogate(4)
    trainer.fit(model, sphere(batch_size=32))
    return {
        "results": search.results,
        "designs": search.designs,
        "state": state_of(model),
        "logged": read_scalars(tmp_dir / "tb").get("offline/score_max", []) if trainer.global_rank == 0 else None,
        "step": trainer.global_step,
    }


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_distributed_search_is_identical_on_ranks_and_logged_once(strategy, tmp_path):
    r0, r1 = run_distributed(distributed_worker, strategy, tmp_path)
    assert r0["results"] == r1["results"]
    assert torch.equal(r0["designs"], r1["designs"])
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key
    assert r0["logged"] == [(r0["step"], pytest.approx(r0["results"]["offline/score_max"], abs=1e-6))]


def test_with_ignite_surrogate_training(tmp_path):
    from litplug.callbacks import SurrogateSharpness

    seed_everything(0)
    search = GradientAscentSearch(num_designs=16, steps=20, step_size=0.05)
    ignite = SurrogateSharpness(lambda_init=0.5)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = fast_trainer(tmp_path, max_epochs=2, logger=logger, log_every_n_steps=1, callbacks=[ignite, search])
    model = small_surrogate(4)
    trainer.fit(model, sphere())
    scalars = read_scalars(tmp_path / "tb")
    assert len(scalars["ignite/lambda"]) == trainer.global_step
    assert scalars["offline/score_max"] == [
        (trainer.global_step, pytest.approx(search.results["offline/score_max"], abs=1e-6))
    ]
    seed_everything(0)
    plain = small_surrogate(4)
    fast_trainer(tmp_path / "plain", max_epochs=2).fit(plain, sphere())
    assert any(
        not torch.equal(a, b) for a, b in zip(state_of(model).values(), state_of(plain).values())
    )  # IGNITE changed training
