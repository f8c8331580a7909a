"""litplug.callbacks.monitor (SharpnessMonitor): a measurement leaves RNG, weights and gradients as
they were; a monitored run trains exactly as an unmonitored one and logs per-layer sharpness."""

from __future__ import annotations

from functools import partial

import torch
from harness import fast_trainer, read_scalars
from lightning.pytorch.loggers import TensorBoardLogger
from sharpness_helpers import Counting, data, loader, tiny

from litplug.callbacks import SharpnessMonitor
from litplug.modules import MLP


def test_monitor_measure_restores_rng_weights_and_grads():
    x, y = data()
    torch.manual_seed(0)
    model = Counting(MLP(input_shape=[4], num_outputs=3, hidden=[6], dropout=0.5, batch_norm=True), num_classes=3)
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monitor = SharpnessMonitor(rho=0.1)
    monitor.held = [(x, y)]
    rng = torch.get_rng_state()
    values = monitor.measure(model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert model.training and all(m.training for m in model.modules())
    layers = {"layer/00_Linear_backbone.1.0", "layer/01_BatchNorm1d_backbone.1.1", "layer/02_Linear_backbone.2"}
    assert set(values) == {"model"} | layers


def test_monitor_leaves_training_untouched_and_logs_layers(tmp_path):
    x, y = data()
    runs = []
    for callbacks in ([], [SharpnessMonitor(rho=0.1)]):
        model = tiny(partial(torch.optim.Adam, lr=0.01), batch_norm=True)
        logger = TensorBoardLogger(tmp_path, name=str(len(callbacks)))
        trainer = fast_trainer(tmp_path, max_epochs=2, logger=logger, callbacks=callbacks)
        trainer.fit(model, loader(x, y, 4))
        runs.append((model, read_scalars(logger.log_dir), trainer.optimizers[0].state_dict()))
    (plain, _, opt_plain), (monitored, logs, opt_mon) = runs
    for a, b in zip(plain.state_dict().values(), monitored.state_dict().values()):
        assert torch.equal(a, b)
    for s_plain, s_mon in zip(opt_plain["state"].values(), opt_mon["state"].values()):
        assert all(torch.equal(s_plain[k], s_mon[k]) for k in s_plain)
    assert len(logs["sharpness/model"]) == 2 and all(v > 0 for _, v in logs["sharpness/model"])
    layers = ["00_Linear_backbone.1.0", "01_BatchNorm1d_backbone.1.1", "02_Linear_backbone.2"]
    assert {f"sharpness/layer/{name}" for name in layers} <= set(logs)
