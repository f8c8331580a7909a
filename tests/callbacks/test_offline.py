"""GradientAscentSearch: the functional core against closed forms, then real fits on the built-in
sphere task (single process, bf16-mixed, DDP and FSDP2 on 2 CPU ranks, TensorBoard read back)."""

import pytest
import torch
from harness import fast_trainer, read_scalars, run_distributed, state_of
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from litplug.callbacks import GradientAscentSearch
from litplug.callbacks.offline import gradient_ascent, starting_designs
from litplug.datamodules import Digits, OfflineDesigns
from litplug.modules import MLP, Regressor

TAGS = ("offline/score_max", "offline/score_median", "offline/start_max")


def test_gradient_ascent_matches_closed_form_on_a_quadratic():
    # f(x) = -||x - c||^2: x_k = c + (1 - 2 eta)^k (x_0 - c).
    c = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    x0 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    eta, k = 0.1, 7
    x = gradient_ascent(lambda x: -((x - c) ** 2).sum(-1), x0, steps=k, step_size=eta)
    torch.testing.assert_close(x, c + (1 - 2 * eta) ** k * (x0 - c), rtol=0, atol=1e-12)
    assert torch.equal(gradient_ascent(lambda x: -((x - c) ** 2).sum(-1), x0, steps=0, step_size=eta), x0)


def test_gradient_ascent_projects_onto_the_box_and_leaves_parameter_grads_alone():
    net = torch.nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, -1.0]]))
    x = gradient_ascent(
        net,
        torch.zeros(3, 2),
        steps=50,
        step_size=0.1,
        lower=torch.tensor([-1.0, -0.5]),
        upper=torch.tensor([0.25, 1.0]),
    )
    assert torch.equal(x, torch.tensor([[0.25, -0.5]]).expand(3, 2))
    assert all(p.grad is None for p in net.parameters())


def test_starting_designs():
    designs = torch.arange(10.0).unsqueeze(1)
    scores = torch.tensor([3.0, 9.0, 1.0, 7.0, 0.0, 8.0, 2.0, 6.0, 5.0, 4.0])
    assert starting_designs(designs, scores, 3, "top").squeeze(1).tolist() == [1.0, 5.0, 3.0]
    a, b = (starting_designs(designs, scores, 4, "random", seed=1) for _ in range(2))
    assert torch.equal(a, b) and len(a.unique()) == 4
    assert len(starting_designs(designs, scores, 50, "top")) == 10  # capped at the data size


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_designs": 0}, "num_designs"),
        ({"steps": -1}, "steps"),
        ({"step_size": 0.0}, "step_size"),
        ({"step_size": -0.1}, "step_size"),
        ({"start": "best"}, "start"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientAscentSearch(**kwargs)


def small_surrogate(dim=8):
    return Regressor(MLP(input_shape=[dim], num_outputs=1, hidden=[32, 32]))


def sphere(batch_size=64, seed=0):
    return OfflineDesigns("sphere", dim=4, num_samples=600, batch_size=batch_size, seed=seed)


def test_needs_an_offline_datamodule(tmp_path):
    trainer = fast_trainer(tmp_path, max_steps=1, callbacks=[GradientAscentSearch()])
    model = Regressor(MLP(input_shape=[1, 8, 8], num_outputs=1, hidden=[8]))
    with pytest.raises(ValueError, match="OfflineDesigns"):
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
    search = GradientAscentSearch(num_designs=16, steps=5, step_size=0.05, start="random", seed=3)
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
