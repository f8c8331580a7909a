"""OfflineDesigns: the Design-Bench withholding protocol, standardisation, the true-score
normaliser, bad input; BoTorch tasks when the `offline` extra is installed."""

import sys

import pytest
import torch

from litplug.datamodules import OfflineDesigns
from litplug.datamodules.offline import BOTORCH_TASKS, make_task, withhold_top


def test_withhold_top_keeps_the_lower_percentile():
    scores = torch.arange(100.0)[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    keep = withhold_top(scores, 50.0)  # threshold 49.5 (linear interpolation)
    assert keep.sum() == 50 and scores[keep].max() == 49 and scores[~keep].min() == 50
    assert withhold_top(scores, 10.0).sum() == 10


def test_sphere_task_closed_form():
    task = make_task("sphere", dim=3)
    x = torch.tensor([[1.0, 2.0, -2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert task.objective(x).tolist() == [-9.0, 0.0]
    assert task.dim == 3 and task.lower.tolist() == [-5.12] * 3 and task.upper.tolist() == [5.12] * 3
    assert make_task("sphere").dim == 8


def test_offline_designs_protocol():
    dm = OfflineDesigns("sphere", dim=4, num_samples=1000, keep_percentile=30, val_fraction=0.2, batch_size=50, seed=3)
    dm.setup()
    n_kept = len(dm.scores)
    assert n_kept == 300
    # Standardised inputs and scores over the kept data.
    torch.testing.assert_close(dm.designs.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(dm.designs.std(0), torch.ones(4), atol=1e-5, rtol=0)
    assert abs(dm.scores.mean().item()) < 1e-5 and abs(dm.scores.std().item() - 1) < 1e-5
    # Raw designs are inside the box; their true scores are the kept (worst 30%) ones.
    raw = dm.unstandardise(dm.designs)
    assert (raw >= -5.12).all() and (raw <= 5.12).all()
    true = dm.task.objective(raw)
    torch.testing.assert_close(((true - dm.y_mean) / dm.y_std).float(), dm.scores, atol=1e-5, rtol=0)
    # Normalised score: the full dataset's range, withheld designs included -> kept ones < 1
    # (up to the float32 round trip of the standardised designs).
    assert dm.y_min - 1e-4 <= true.min() and true.max() < dm.y_max
    normalised = dm.score(dm.designs)
    torch.testing.assert_close(normalised, (true - dm.y_min) / (dm.y_max - dm.y_min), atol=1e-6, rtol=0)
    assert normalised.max() < 1.0
    # The box in standardised coordinates maps back onto the task's box.
    torch.testing.assert_close(dm.unstandardise(dm.lower), dm.task.lower, atol=1e-5, rtol=0)
    # Train and validation split the kept data; batches are (x [B, d], y [B]).
    assert len(dm.train_set) + len(dm.val_set) == n_kept and len(dm.val_set) == 60
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (50, 4) and y.shape == (50,) and x.dtype == y.dtype == torch.float32
    all_x = torch.cat([dm.train_set.tensors[0], dm.val_set.tensors[0]])
    assert len(torch.unique(all_x, dim=0)) == n_kept


def test_seed_determines_the_data():
    def data(seed):
        dm = OfflineDesigns("sphere", num_samples=200, seed=seed)
        dm.setup()
        return dm.designs

    assert torch.equal(data(1), data(1))
    assert not torch.equal(data(1), data(2))


def test_botorch_task_without_botorch_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "botorch.test_functions", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"litplug\[offline\]"):
        OfflineDesigns("ackley")


@pytest.mark.parametrize("name", sorted(BOTORCH_TASKS))
def test_botorch_tasks_are_botorch_negated(name):
    test_functions = pytest.importorskip("botorch.test_functions")
    cls_name, dim = BOTORCH_TASKS[name]
    reference = getattr(test_functions, cls_name)(dim=dim)
    task = make_task(name)
    assert task.dim == dim
    torch.testing.assert_close(torch.stack([task.lower, task.upper]), reference.bounds.double())
    x = task.lower + (task.upper - task.lower) * torch.rand(
        16, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(task.objective(x), -reference.evaluate_true(x))
    # The global optimum scores at least as high as any sampled design.
    dm = OfflineDesigns(name, num_samples=200)
    dm.setup()
    optimum = dm.standardise(reference.optimizers[:1].double())
    assert dm.score(optimum).item() >= 1.0 - 1e-6


def test_botorch_dim_errors():
    pytest.importorskip("botorch.test_functions")
    with pytest.raises(ValueError, match="`dim`=5 is not supported by task 'hartmann'"):
        OfflineDesigns("hartmann", dim=5)
