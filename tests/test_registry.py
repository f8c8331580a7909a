"""Registry-driven checks that every public callback (tests/registry.py) runs under ddp on 2 CPU
ranks with identical weights on both, and that a run interrupted at an epoch boundary and resumed
from its checkpoint ends exactly like an uninterrupted one."""

import inspect

import pytest
import torch
from harness import fast_trainer, make_strategy, run_distributed, state_of
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from registry import CASES

import litplug.callbacks

STEPS_PER_EPOCH = 4


def test_every_public_callback_is_registered():
    public = {
        name
        for name in litplug.callbacks.__all__
        if inspect.isclass(obj := getattr(litplug.callbacks, name)) and issubclass(obj, Callback)
    }
    # A short name (SAM: a subclass that adds nothing) counts as the class it names.
    classes = {_named(getattr(litplug.callbacks, n)).__name__ for n in public}
    assert classes <= set(CASES), f"callbacks missing from tests/registry.py: {sorted(classes - set(CASES))}"


def _named(cls):
    adds_nothing = set(vars(cls)) <= {"__module__", "__doc__", "__qualname__", "__firstlineno__", "__static_attributes__"}
    return cls.__base__ if adds_nothing and cls.__base__ is not object else cls


def _fit(case, tmp_dir, epochs, **kwargs):
    seed_everything(0)
    model, data = case.model(), case.data()
    callbacks = case.callbacks()
    trainer = fast_trainer(
        tmp_dir, max_epochs=epochs, limit_train_batches=STEPS_PER_EPOCH, limit_val_batches=2, callbacks=list(callbacks), **case.trainer, **kwargs
    )
    return trainer, model, data, callbacks


def ddp_worker(strategy, tmp_dir):
    out = {}
    for name, case in CASES.items():
        # A Strategy instance is bound to its first Trainer: every case gets a fresh one.
        trainer, model, data, callback = _fit(case, tmp_dir / name, 2, strategy=make_strategy("ddp"), devices=2)
        trainer.fit(model, data)
        out[name] = state_of(model)
    return out


@pytest.mark.skipif(not CASES, reason="no callbacks registered yet")
def test_every_callback_under_ddp(tmp_path):
    r0, r1 = run_distributed(ddp_worker, "ddp", tmp_path)
    assert set(r0) == set(CASES)
    for name in CASES:
        for key, value in r0[name].items():
            assert torch.equal(value, r1[name][key]), f"{name}: ranks differ at {key}"


def _callback_state(callbacks):
    return [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in c.state_dict().items()} for c in callbacks]


def _assert_same(a, b, where):
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("name", sorted(CASES))
def test_callback_resume_matches_uninterrupted(name, tmp_path):
    case = CASES[name]
    trainer, model, data, callback = _fit(case, tmp_path / "full", 2)
    trainer.fit(model, data)
    full_state, full_cb = state_of(model), _callback_state(callback)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer, model, data, callback = _fit(case, tmp_path / "part", 1, enable_checkpointing=True)
    trainer.callbacks.append(ckpt)
    trainer.fit(model, data)
    trainer, model, data, callback = _fit(case, tmp_path / "resumed", 2)
    trainer.fit(model, data, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))

    for key, value in full_state.items():
        torch.testing.assert_close(state_of(model)[key], value, rtol=0, atol=0, msg=f"{name}: {key} differs after resume")
    _assert_same(_callback_state(callback), full_cb, f"{name}.state_dict")
