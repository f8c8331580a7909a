"""UnlearningEvaluation scores an Unlearner on FictitiousQA against the retain model of the oracle;
the oracle trains each model once; wrong inputs are refused before training."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from litplug.callbacks import UnlearningEvaluation
from litplug.datamodules import FictitiousQA, ForgetRetain
from litplug.functional.unlearning_metrics import unlearning_suite
from litplug.modules import CausalTransformer, Unlearner
from litplug.oracle import backbone, main, oracle_paths, read_settings, train_oracle, train_oracle_model

CORPUS = {"num_entities": 20, "forget_percent": 10}


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    out = tmp_path_factory.mktemp("qa")
    return train_oracle(out, 10, seed=0, num_entities=20, epochs=2)


def test_the_oracle_trains_once_and_the_retain_model_never_saw_the_forget_people(oracle, capsys):
    out = oracle["target"].parents[1]
    stamps = {k: p.stat().st_mtime_ns for k, p in oracle.items()}
    main(["--out", str(out), "--forget-percent", "10", "--seeds", "0", "--num-entities", "20", "--epochs", "2"])
    assert {k: p.stat().st_mtime_ns for k, p in oracle.items()} == stamps  # cached: nothing retrained
    assert "forget 10% seed 0" in capsys.readouterr().out
    target, retain = (torch.load(oracle[k], weights_only=True) for k in ("target", "retain"))
    assert target.keys() == retain.keys() and not all(torch.equal(target[k], retain[k]) for k in target)
    # nested forget sets and held-out people never trained on: one target model for every forget size
    five = train_oracle(out, 5, seed=0, num_entities=20, epochs=2)
    assert five["target"] == oracle["target"] and five["target"].stat().st_mtime_ns == stamps["target"]
    assert five["retain"] != oracle["retain"] and five["retain"].exists()
    assert oracle_paths(out, 5, 0, model_seed=7)["retain"].name == "retain05_model7.pt"
    with pytest.raises(ValueError, match="lr: 0.003 there, 0.01 here"):  # every recorded setting has a flag
        main(["--out", str(out), "--forget-percent", "10", "--num-entities", "20", "--epochs", "2", "--lr", "0.01"])


def test_the_oracle_records_its_settings_and_refuses_a_model_trained_with_others(oracle, tmp_path):
    out = oracle["target"].parents[1]
    recorded = read_settings(oracle["retain"])
    assert recorded == {
        "kind": "retain", "num_entities": 20, "seed": 0, "forget_percent": 10, "epochs": 2, "lr": 3e-3,
        "batch_size": 64, "model_seed": 0, "architecture": {"dim": 64, "depth": 2, "heads": 4},
    }  # fmt: skip
    assert "forget_percent" not in read_settings(oracle["target"])  # one target model for every forget size
    stamps = {k: p.stat().st_mtime_ns for k, p in oracle.items()}
    for other, named in (({"epochs": 3}, "epochs: 2 there, 3 here"), ({"lr": 1e-3}, "lr: 0.003 there, 0.001 here"),
                         ({"num_entities": 30}, "num_entities: 20 there, 30 here"),
                         ({"batch_size": 8}, "batch_size: 64 there, 8 here")):  # fmt: skip
        with pytest.raises(ValueError, match=f"trained with other settings \\({named}\\).*another `out`"):
            train_oracle(out, 10, seed=0, **{"num_entities": 20, "epochs": 2, **other})
    with pytest.raises(ValueError, match="epochs: 2 there, 3 here"):
        main(["--out", str(out), "--forget-percent", "10", "--seeds", "0", "--num-entities", "20", "--epochs", "3"])
    assert {k: p.stat().st_mtime_ns for k, p in oracle.items()} == stamps  # nothing replaced

    copy = oracle_paths(tmp_path, 10, 0)["target"]  # a model without its settings file
    copy.parent.mkdir(parents=True)
    copy.write_bytes(oracle["target"].read_bytes())
    with pytest.raises(ValueError, match="has no settings file 'target.json'"):
        train_oracle_model(tmp_path, "target", 10, 0, num_entities=20, epochs=2)
    copy.with_suffix(".json").write_text("{not json")
    with pytest.raises(ValueError, match="target.json' could not be read as JSON"):
        train_oracle_model(tmp_path, "target", 10, 0, num_entities=20, epochs=2)
    copy.with_suffix(".json").write_text(oracle["target"].with_suffix(".json").read_text())
    assert train_oracle_model(tmp_path, "target", 10, 0, num_entities=20, epochs=2) == copy


@pytest.mark.parametrize("corpus, named", [({"seed": 1}, "seed: 0 there, 1 here"),
                                           ({"num_entities": 40}, "num_entities: 20 there, 40 here"),
                                           ({"forget_percent": 5}, "forget_percent: 10 there, 5 here")])  # fmt: skip
def test_a_retain_model_of_another_corpus_is_refused_before_training(oracle, corpus, named):
    dm = FictitiousQA(**{**CORPUS, **corpus})
    model = Unlearner(backbone(dm), None, "retrain", objective="causal_lm")
    trainer = Trainer(max_epochs=1, callbacks=[UnlearningEvaluation(str(oracle["retain"]))], logger=False)
    with pytest.raises(ValueError, match=f"another corpus than the datamodule's \\({named}, from retain10.json"):
        trainer.fit(model, ForgetRetain(dm, scenario="class", forget_classes=[1]))
    assert trainer.global_step == 0


def test_the_suite_is_logged_and_equals_the_function(oracle, tmp_path, monkeypatch):
    import litplug.callbacks.unlearning_evaluation as module

    scored = []
    real = module.suite_statistics
    monkeypatch.setattr(module, "suite_statistics", lambda m, *a, **k: scored.append(m) or real(m, *a, **k))
    dm = FictitiousQA(**CORPUS)
    model = Unlearner(backbone(dm), str(oracle["target"]), "gradient_difference", objective="causal_lm")
    evaluation = UnlearningEvaluation(str(oracle["retain"]))
    trainer = Trainer(
        max_epochs=2, limit_train_batches=2, callbacks=[evaluation], logger=CSVLogger(tmp_path),
        enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(model, ForgetRetain(dm, scenario="class", forget_classes=[1]))
    logged = {k[len("unlearn/suite/") :]: float(v) for k, v in trainer.callback_metrics.items() if "suite" in k}
    retain = backbone(dm)
    retain.load_state_dict(torch.load(oracle["retain"], weights_only=True))
    expected = unlearning_suite(model.backbone.eval(), retain.eval(), *dm.evaluation_sets())
    assert logged.keys() == expected.keys() and evaluation.results == expected
    assert all(logged[k] == pytest.approx(v, rel=1e-5, abs=1e-6) or math.isnan(v) for k, v in expected.items())
    assert not any("retain" in n for n, _ in model.named_parameters())
    # two validation epochs: the model scored twice, the retain model once
    assert len(scored) == 3 and sum(m is evaluation._retain[0] for m in scored) == 1


def test_a_retain_model_of_another_vocabulary_is_refused_before_training(tmp_path):
    dm = FictitiousQA(**CORPUS)
    other = CausalTransformer(vocab_size=dm.vocab_size + 3, max_len=dm.max_len, dim=64, depth=2, heads=4)
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    model = Unlearner(backbone(dm), None, "retrain", objective="causal_lm")
    trainer = Trainer(max_epochs=1, callbacks=[UnlearningEvaluation(str(path))], logger=False, accelerator="cpu")
    with (
        pytest.warns(UserWarning, match="has no settings file 'other.json' beside it, so the corpus"),
        pytest.raises(ValueError, match="does not fit the model being unlearned"),
    ):
        trainer.fit(model, ForgetRetain(dm, scenario="class", forget_classes=[1]))
    assert trainer.global_step == 0


def test_missing_retain_model_and_wrong_datamodule(tmp_path, oracle):
    from litplug.datamodules import MarkovText

    dm = FictitiousQA(**CORPUS)
    missing = Trainer(max_epochs=1, callbacks=[UnlearningEvaluation(str(tmp_path / "missing.pt"))], logger=False)
    with pytest.raises(ValueError, match="train the retain model first"):
        missing.fit(Unlearner(backbone(dm), None, "retrain", objective="causal_lm"), ForgetRetain(dm, "class", [1]))

    model = Unlearner(CausalTransformer(vocab_size=16, max_len=24), None, "retrain", objective="causal_lm")
    trainer = Trainer(max_epochs=1, callbacks=[UnlearningEvaluation(str(oracle["retain"]))], logger=False)
    with pytest.raises(TypeError, match="evaluation_sets"):
        trainer.fit(model, ForgetRetain(MarkovText(), scenario="class", forget_classes=[1]))


def test_a_classifier_is_scored_in_the_same_language(tmp_path):
    from scipy.stats import ks_2samp
    from sklearn.metrics import roc_auc_score

    from litplug.datamodules import Digits
    from litplug.functional.unlearning_metrics import classifier_losses
    from litplug.modules import MLP

    torch.manual_seed(0)
    make = lambda: MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[16])  # noqa: E731
    retain_path = tmp_path / "retain.pt"
    torch.save(make().state_dict(), retain_path)
    dm = ForgetRetain(Digits(batch_size=64), scenario="class", forget_classes=[3])
    model = Unlearner(make(), None, "retrain")
    evaluation = UnlearningEvaluation(str(retain_path))
    trainer = Trainer(max_epochs=1, limit_train_batches=3, callbacks=[evaluation], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")  # fmt: skip
    trainer.fit(model, dm)
    r = evaluation.results
    retain = make()
    retain.load_state_dict(torch.load(retain_path, weights_only=True))
    net = model.backbone.eval()
    loss_f, _ = classifier_losses(net, dm.forget_dataloader())
    loss_h, _ = classifier_losses(net, dm.val_dataloader()["test"])
    retain_f, _ = classifier_losses(retain.eval(), dm.forget_dataloader())
    assert r["forget_quality"] == pytest.approx(ks_2samp(loss_f.numpy(), retain_f.numpy()).pvalue, abs=1e-9)
    auc = roc_auc_score([0] * len(loss_f) + [1] * len(loss_h), torch.cat([loss_f, loss_h]).numpy())
    assert r["mia_loss"] == pytest.approx(auc, abs=1e-9)
    assert set(r) == {"forget_acc", "retain_acc", "holdout_acc", "forget_quality", "mia_loss", "retain_mia_loss",
                      "privleak"}  # fmt: skip
    assert float(trainer.callback_metrics["unlearn/suite/forget_quality"]) == pytest.approx(r["forget_quality"])
