"""Unlearner: method losses against closed forms, L1 schedule, MIA-efficacy, checkpoint loading,
metrics in TensorBoard, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from harness import fast_trainer, read_scalars, run_distributed, state_of
from lightning.pytorch import LightningModule, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from litplug.datamodules import Digits, ForgetRetain
from litplug.functional import npo_loss, random_other_labels
from litplug.modules import MLP, Classifier, Unlearner


def _mlp():
    return MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[16])


def _one_step(method, tmp_path, alpha=0.0, lr=1.0):
    seed_everything(0)
    model = Unlearner(_mlp(), None if method == "retrain" else str(tmp_path / "orig.pt"), method, alpha=alpha,
                      optimizer=lambda p: torch.optim.SGD(p, lr=lr))  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # float64: the l1_sparse and finetune steps are compared with each other
    trainer = fast_trainer(tmp_path, max_steps=1, limit_val_batches=0, precision="64-true")
    trainer.fit(model, ForgetRetain(Digits(batch_size=16), "class", [4]))
    return model, before


def test_l1_sparse_adds_alpha_sign(tmp_path):
    torch.save(_mlp().state_dict(), tmp_path / "orig.pt")
    finetuned, before = _one_step("finetune", tmp_path)
    sparse, _ = _one_step("l1_sparse", tmp_path, alpha=0.01)
    for n, p in sparse.named_parameters():
        # one SGD step (lr 1, alpha_0 = alpha at step 0): the extra move is -alpha sign(theta_0)
        torch.testing.assert_close(
            p.detach() - dict(finetuned.named_parameters())[n].detach(),
            -0.01 * before[n].sign().double(),
            atol=1e-12,
            rtol=0,
        )


def test_losses_match_definitions(tmp_path):
    torch.save(_mlp().state_dict(), tmp_path / "orig.pt")
    dm = ForgetRetain(Digits(batch_size=16), "class", [4])
    dm.setup()
    batch, _, _ = next(iter(dm.train_dataloader()))
    model = Unlearner(_mlp(), str(tmp_path / "orig.pt"), "gradient_difference", gamma=0.5)
    (xf, yf), (xr, yr) = batch["forget"], batch["retain"]
    ce_f, ce_r = F.cross_entropy(model(xf), yf), F.cross_entropy(model(xr), yr)
    torch.testing.assert_close(model.unlearning_loss(batch), -ce_f + 0.5 * ce_r)
    model.method = "gradient_ascent"
    torch.testing.assert_close(model.unlearning_loss(batch), -ce_f)
    for method in ("finetune", "l1_sparse"):
        model.method = method
        torch.testing.assert_close(model.unlearning_loss(batch), ce_r)
    # random_label: CE on random other labels + gamma CE(retain) (SalUn eq. 6, alpha = gamma)
    model.method = "random_label"
    y_rand = random_other_labels(yf, 10, torch.Generator().manual_seed(0))
    assert (y_rand != yf).all()
    ce_rand = F.cross_entropy(model(xf), y_rand)
    torch.testing.assert_close(model.unlearning_loss(batch), ce_rand + 0.5 * ce_r)
    model.gamma = 0.0
    torch.testing.assert_close(model.unlearning_loss(batch), ce_rand)
    model.gamma = 0.5
    npo = Unlearner(_mlp(), str(tmp_path / "orig.pt"), "npo", beta=0.3, gamma=0.0)
    # at the original weights log p = log p_ref, so NPO = (2 / beta) log 2
    assert npo.unlearning_loss(batch).item() == pytest.approx(2 / 0.3 * math.log(2), rel=1e-5)


def test_checkpoint_from_classifier_and_errors(tmp_path):
    clf = Classifier(_mlp())
    trainer = fast_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(clf, Digits())
    trainer.save_checkpoint(tmp_path / "clf.ckpt")
    model = Unlearner(_mlp(), str(tmp_path / "clf.ckpt"), "finetune")
    for key, value in clf.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value)
    with pytest.raises(ValueError, match="`checkpoint`: .*clf.ckpt.*shape"):
        Unlearner(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[32]), str(tmp_path / "clf.ckpt"), "finetune")
    with pytest.raises(ValueError, match="`checkpoint`"):
        Unlearner(_mlp(), str(tmp_path / "missing.ckpt"), "finetune")
    with pytest.raises(ValueError, match="`checkpoint` must be None"):
        Unlearner(_mlp(), str(tmp_path / "clf.ckpt"), "retrain")


def test_metrics_logged_and_forgetting_happens(tmp_path):
    seed_everything(0)
    clf = Classifier(_mlp(), optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
    trainer = fast_trainer(tmp_path, max_epochs=3, limit_val_batches=0)
    trainer.fit(clf, Digits())
    trainer.save_checkpoint(tmp_path / "clf.ckpt")
    model = Unlearner(_mlp(), str(tmp_path / "clf.ckpt"), "npo_rt", optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
    data = ForgetRetain(Digits(), "class", [4])
    trainer = fast_trainer(tmp_path, max_epochs=2, limit_train_batches=6, logger=TensorBoardLogger(tmp_path, name="tb"))
    start = trainer.validate(model, data, verbose=False)[0]
    trainer.fit(model, data)
    end = trainer.test(model, data, verbose=False)[0]
    assert start["unlearn/val/UA"] < 20 < 90 < end["unlearn/test/UA"]
    assert end["unlearn/test/forget_test_acc"] < 10 and end["unlearn/test/RA"] > 60 and end["unlearn/test/TA"] > 60
    scalars = read_scalars(tmp_path / "tb")
    for key in ("UA", "RA", "TA", "MIA", "forget_test_acc"):
        assert len(scalars[f"unlearn/val/{key}"]) >= 2 and f"unlearn/test/{key}" in scalars
    assert scalars["unlearn/run_time"][-1][1] > 0


def test_every_results_config_instantiates(tmp_path):
    from pathlib import Path

    from litplug.callbacks import UnlearningMask
    from litplug.cli import LitplugCLI

    root = Path(__file__).resolve().parents[2] / "configs" / "digits" / "unlearning"
    original = LitplugCLI(args=["--config", str(root / "original.yaml"), "--trainer.logger", "false"], run=False)
    assert isinstance(original.model, Classifier)
    torch.save(original.model.backbone.state_dict(), tmp_path / "orig.pt")
    rows = sorted((root / "methods").glob("*.yaml"))
    assert len(rows) == 11
    for scenario in ("class", "random"):
        # every row on class forgetting; random.yaml differs only in data, so two rows suffice there
        for row in (
            rows
            if scenario == "class"
            else [root / "methods" / "retrain.yaml", root / "methods" / "random_label_saliency.yaml"]
        ):
            extra = [] if row.stem == "retrain" else ["--model.init_args.checkpoint", str(tmp_path / "orig.pt")]
            args = [
                "--config",
                str(root / f"{scenario}.yaml"),
                "--config",
                str(row),
                "--trainer.logger",
                "false",
            ] + extra
            cli = LitplugCLI(args=args, run=False)
            assert isinstance(cli.model, Unlearner) and isinstance(cli.datamodule, ForgetRetain)
            assert cli.model.method == row.stem.replace("_saliency", "").replace("_attribution", "")
            assert cli.datamodule.scenario == scenario
            masks = [c for c in cli.trainer.callbacks if isinstance(c, UnlearningMask)]
            assert [m.criterion for m in masks] == [c for c in ("saliency", "attribution") if c in row.stem]


# --- language models ----------------------------------------------------------------------
def _lm():
    from litplug.modules import CausalTransformer

    return CausalTransformer(vocab_size=8, max_len=12, dim=16, depth=1, heads=2)


def _token_nll(net, tokens):
    logits = net(tokens)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def test_language_model_losses_match_definitions(tmp_path):
    from litplug.modules.language import sequence_log_likelihood

    torch.manual_seed(0)
    torch.save(_lm().state_dict(), tmp_path / "orig.pt")
    forget, retain = torch.randint(0, 8, (4, 12)), torch.randint(0, 8, (6, 12))
    batch = {"forget": forget, "retain": (retain,)}  # a bare tensor or a tuple of token ids
    model = Unlearner(_lm(), str(tmp_path / "orig.pt"), "gradient_difference", gamma=0.5, objective="causal_lm")
    nll_f, nll_r = _token_nll(model.backbone, forget), _token_nll(model.backbone, retain)
    torch.testing.assert_close(model.batch_loss(forget), nll_f)
    torch.testing.assert_close(model.unlearning_loss(batch), -nll_f + 0.5 * nll_r)
    model.method = "gradient_ascent"
    torch.testing.assert_close(model.unlearning_loss(batch), -nll_f)
    npo = Unlearner(_lm(), str(tmp_path / "orig.pt"), "npo", beta=0.3, gamma=0.0, objective="causal_lm")
    assert npo.unlearning_loss(batch).item() == pytest.approx(2 / 0.3 * math.log(2), rel=1e-5)
    with torch.no_grad():  # move away from the reference: NPO compares whole-sequence log-likelihoods
        for p in npo.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    logp = sequence_log_likelihood(npo.backbone(forget), forget)[0]
    logp_ref = sequence_log_likelihood(npo._reference[0](forget), forget)[0]
    assert logp.shape == (4,) and (logp - logp_ref).abs().min() > 1e-3
    torch.testing.assert_close(npo.unlearning_loss(batch), npo_loss(logp, logp_ref, 0.3))
    with pytest.raises(ValueError, match="random_label.*causal_lm"):
        Unlearner(_lm(), None, "random_label", objective="causal_lm")
    with pytest.raises(ValueError, match="objective"):
        Unlearner(_lm(), objective="seq2seq")


def test_hugging_face_causal_lm(tmp_path):
    transformers = pytest.importorskip("transformers")
    from torch.utils.data import TensorDataset

    config = transformers.GPT2Config(
        vocab_size=16, n_positions=24, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(config)  # random init, nothing downloaded
    torch.save(gpt2.state_dict(), tmp_path / "orig.pt")
    tokens = torch.randint(0, 16, (80, 24), generator=torch.Generator().manual_seed(0))
    data, held_out = TensorDataset(tokens[:64]), TensorDataset(tokens[64:])  # batches are [token ids]
    dm = ForgetRetain(data, "random", forget_fraction=0.25, held_out=held_out, batch_size=16)
    model = Unlearner(transformers.GPT2LMHeadModel(config), str(tmp_path / "orig.pt"), "npo", objective="causal_lm")
    dm.setup()
    batch = next(iter(dm.forget_dataloader()))
    # the token-level NLL is the model's own loss (Hugging Face shifts labels the same way)
    torch.testing.assert_close(model.batch_loss(batch), gpt2(batch[0], labels=batch[0]).loss)
    trainer = fast_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(model, dm)
    metrics = trainer.test(model, dm, verbose=False)[0]
    assert {k.split("/")[-1] for k in metrics} == {"forget_loss", "retain_loss", "test_loss", "MIA"}
    assert all(math.isfinite(v) for v in metrics.values())


LM_CORPUS = dict(vocab_size=16, seq_len=24, num_train=128, num_val=64, num_test=64, num_marked=8, marked_repeats=16)


def _small_lm():
    from litplug.modules import CausalTransformer

    return CausalTransformer(16, 24, dim=32, depth=2, heads=4)


def lm_recipe_worker(strategy, tmp_dir, checkpoint, method):
    """Step 2 of the language-model recipe, small, under ``strategy`` on 2 ranks: unlearn the 8
    marked sequences from the original model; returns the test metrics before and after."""
    from lightning.pytorch import Trainer

    from litplug.datamodules import MarkovText

    seed_everything(0)
    model = Unlearner(_small_lm(), checkpoint, method, gamma=5.0, beta=0.1, objective="causal_lm",
                      optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))  # fmt: skip
    data = ForgetRetain(MarkovText(**LM_CORPUS, batch_size=8), "class", [1])  # 8 per rank: global batch 16
    trainer = Trainer(strategy=strategy, accelerator="cpu", devices=2, max_steps=24,
                      logger=TensorBoardLogger(tmp_dir, name="tb"), enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                      limit_val_batches=0, log_every_n_steps=8)  # fmt: skip
    before = trainer.test(model, data, verbose=False)[0]
    trainer.fit(model, data)
    after = trainer.test(model, data, verbose=False)[0]
    return {"before": before, "after": after}


def _check_recipe(result):
    before = {k.split("/")[-1]: v for k, v in result["before"].items()}
    after = {k.split("/")[-1]: v for k, v in result["after"].items()}
    # the marked sequences are memorised: far below the loss of unseen sequences, recognised by loss
    assert before["forget_loss"] < 0.5 * before["test_loss"] and before["MIA"] > 99
    # after unlearning: forget loss at the level of unseen sequences, membership by loss near chance,
    # retain loss within 10% of the original's
    assert abs(after["forget_loss"] - after["test_loss"]) < 0.15 * after["test_loss"]
    assert 25 < after["MIA"] < 75
    assert after["retain_loss"] < 1.1 * before["retain_loss"]


def test_lm_recipe_under_ddp(tmp_path):
    from litplug.datamodules import MarkovText
    from litplug.modules import LanguageModel

    # step 1, one process: the marked sequences are seen 16x per epoch and memorised
    seed_everything(0)
    original = LanguageModel(_small_lm(), optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    fast_trainer(tmp_path, max_epochs=5, limit_val_batches=0).fit(original, MarkovText(**LM_CORPUS, batch_size=16))
    torch.save(original.backbone.state_dict(), tmp_path / "original.pt")
    r0, r1 = run_distributed(
        lm_recipe_worker, "ddp", tmp_path, checkpoint=str(tmp_path / "original.pt"), method="npo_rt"
    )
    assert r0 == r1  # metrics are gathered, then computed identically on every rank
    _check_recipe(r0)
    scalars = read_scalars(tmp_path / "dist_lm_recipe_worker_ddp" / "tb")
    for key in ("forget_loss", "retain_loss", "test_loss", "MIA"):
        assert scalars[f"unlearn/test/{key}"][-1][1] == pytest.approx(r0["after"][f"unlearn/test/{key}"])
    assert "unlearn/train_loss" in scalars


def test_lm_configs_instantiate(tmp_path):
    from pathlib import Path

    from litplug.callbacks import UnlearningMask
    from litplug.cli import LitplugCLI
    from litplug.modules import LanguageModel

    configs = Path(__file__).resolve().parents[2] / "configs"
    original = LitplugCLI(
        args=["--config", str(configs / "lm" / "original.yaml"), "--trainer.logger", "false"], run=False
    )
    assert isinstance(original.model, LanguageModel)
    torch.save(original.model.backbone.state_dict(), tmp_path / "orig.pt")
    rows = sorted((configs / "lm" / "unlearning").glob("*.yaml"))
    assert [r.stem for r in rows] == ["gradient_ascent", "gradient_difference", "npo", "npo_rt", "rmu", "simnpo"]
    for row in rows:
        for mask in (
            ([], ["--config", str(configs / "callbacks" / "unlearning_mask.yaml")]) if row.stem == "npo_rt" else ([],)
        ):
            args = ["--config", str(configs / "lm" / "unlearning.yaml"), "--config", str(row), *mask,
                    "--trainer.logger", "false", "--model.init_args.checkpoint", str(tmp_path / "orig.pt")]  # fmt: skip
            cli = LitplugCLI(args=args, run=False)
            assert cli.model.method == row.stem and cli.model.objective == "causal_lm"
            assert cli.datamodule.forget_classes == [1] and type(cli.datamodule.datamodule).__name__ == "MarkovText"
            assert len([c for c in cli.trainer.callbacks if isinstance(c, UnlearningMask)]) == len(mask) // 2


def test_lm_saliency_mask_scores_the_token_nll(tmp_path):
    from litplug.callbacks import UnlearningMask
    from litplug.datamodules import MarkovText
    from litplug.functional import topk_masks

    torch.manual_seed(0)
    torch.save(_lm().state_dict(), tmp_path / "orig.pt")
    model = Unlearner(
        _lm(), str(tmp_path / "orig.pt"), "gradient_difference", objective="causal_lm"
    ).double()  # no near-ties
    data = ForgetRetain(
        MarkovText(vocab_size=8, seq_len=12, num_train=48, num_val=8, num_test=8, num_marked=16, batch_size=8),
        "class",
        [1],
    )
    data.setup()
    forget = data.forget_set.dataset.tokens[data.forget_indices]
    named = [(n, p) for n, p in model.named_parameters() if p.dim() >= 2]
    grads = torch.autograd.grad(_token_nll(model.backbone, forget), [p for _, p in named])  # all 16 forget sequences
    expected = topk_masks([g.abs() for g in grads], int(0.3 * sum(p.numel() for _, p in named)))
    original = {n: p.detach().clone() for n, p in named}
    mask = UnlearningMask("saliency", ratio=0.3, scope="weights")
    fast_trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[mask], precision="64-true").fit(model, data)
    for (n, p), keep in zip(named, expected):
        assert torch.equal(mask.masks[n], keep)
        assert torch.equal(p.detach()[~keep], original[n][~keep]) and not torch.equal(
            p.detach()[keep], original[n][keep]
        )


def _tiny_gpt2(transformers):
    config = transformers.GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(config)


def test_hugging_face_checkpoints_load(tmp_path):
    """A save_pretrained folder, its model.safetensors (lm_head.weight tied to transformer.wte.weight,
    stored once) and a user's own Lightning checkpoint holding the model as ``self.model``."""
    transformers = pytest.importorskip("transformers", reason="the `lm` extra (transformers) is not installed")
    torch.manual_seed(0)
    original = _tiny_gpt2(transformers)
    original.save_pretrained(tmp_path / "hf")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # the tied weight is stored once

    class UserLM(LightningModule):
        def __init__(self):
            super().__init__()
            self.model = original

        def training_step(self, batch, batch_idx):
            return self.model(batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = fast_trainer(tmp_path, max_steps=0, limit_val_batches=0)
    trainer.strategy.connect(UserLM())
    trainer.save_checkpoint(tmp_path / "user.ckpt")
    want = original.state_dict()
    for path in (tmp_path / "hf", tmp_path / "hf" / "model.safetensors", tmp_path / "user.ckpt"):
        model = Unlearner(_tiny_gpt2(transformers), str(path), "finetune", objective="causal_lm")
        got = model.backbone.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), path
        assert model.backbone.lm_head.weight is model.backbone.transformer.wte.weight  # still tied


def test_checkpoint_prefix_found_or_named(tmp_path):
    """Modules written here: the prefix of any module holding the backbone is found; weights tied in
    the backbone may be stored once; otherwise one line names both key prefixes."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.body = nn.Linear(4, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    source = Tied()
    stored = {k: v for k, v in source.state_dict().items() if k != "head.weight"}
    torch.save({"state_dict": {f"net.inner.{k}": v for k, v in stored.items()}}, tmp_path / "nested.ckpt")
    model = Unlearner(Tied(), str(tmp_path / "nested.ckpt"), "finetune")
    assert torch.equal(model.backbone.head.weight, source.embed.weight)
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in _mlp().state_dict().items()}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError) as err:
        Unlearner(Tied(), str(tmp_path / "other.ckpt"), "finetune")
    message = str(err.value)
    assert "\n" not in message and "['embed.', 'body.', 'head.']" in message and "['encoder.']" in message


@pytest.mark.parametrize("objective", ["classification", "causal_lm"])
def test_npo_npo_rt_simnpo_rmu_in_the_unlearner(tmp_path, objective):
    from litplug.functional.unlearning import rmu_direction, rmu_loss, simnpo_loss
    from litplug.modules.language import sequence_log_likelihood

    torch.manual_seed(0)
    if objective == "causal_lm":
        make, layer = _lm, "blocks.layers.0"
        forget, retain = torch.randint(0, 8, (4, 12)), torch.randint(0, 8, (6, 12))
        batch = {"forget": forget, "retain": (retain,)}
    else:
        make, layer = _mlp, "1"
        forget, retain = (
            (torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))),
            (torch.randn(6, 1, 8, 8), torch.arange(6)),
        )
        batch = {"forget": forget, "retain": retain}
    torch.save(make().state_dict(), tmp_path / "orig.pt")
    kwargs = dict(objective=objective, beta=0.7, gamma=2.0)
    models = {m: Unlearner(make(), str(tmp_path / "orig.pt"), m, **kwargs) for m in ("npo", "npo_rt", "simnpo")}
    models["rmu"] = Unlearner(make(), str(tmp_path / "orig.pt"), "rmu", layer=layer, steering=3.0, seed=5, **kwargs)
    with torch.no_grad():
        for model in models.values():  # move away from the original weights, the same way for every method
            for p in model.backbone.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    net = models["npo"].backbone
    ref = models["npo"]._reference[0]

    def loglik(model, data):
        if objective == "causal_lm":
            return sequence_log_likelihood(model(data), data)
        x, y = data
        return -F.cross_entropy(model(x), y, reduction="none"), torch.ones(len(y))

    ce_r = models["npo"].batch_loss(batch["retain"])
    logp, count = loglik(net, forget)
    with torch.no_grad():
        logp_ref, _ = loglik(ref, forget)
    torch.testing.assert_close(models["npo"].unlearning_loss(batch), npo_loss(logp, logp_ref, 0.7))  # no retain term
    torch.testing.assert_close(models["npo_rt"].unlearning_loss(batch), npo_loss(logp, logp_ref, 0.7) + 2.0 * ce_r)
    torch.testing.assert_close(models["simnpo"].unlearning_loss(batch), simnpo_loss(logp, count, 0.7) + 2.0 * ce_r)
    # RMU: the layer's activations, read with a hook of our own
    rmu = models["rmu"]
    seen = []
    handle = rmu.backbone.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.append(o))
    inputs = (lambda d: d) if objective == "causal_lm" else (lambda d: d[0])
    for data in (forget, retain):
        rmu.backbone(inputs(data))
    handle.remove()
    reference_seen = []
    handle = rmu._reference[0].get_submodule(layer).register_forward_hook(lambda m, i, o: reference_seen.append(o))
    rmu._reference[0](inputs(retain))
    handle.remove()
    target = 3.0 * rmu_direction(seen[0].shape[-1], 5).float()
    expected = rmu_loss(seen[0], target, seen[1], reference_seen[0], 2.0)
    torch.testing.assert_close(rmu.unlearning_loss(batch), expected)
    assert (seen[1] - reference_seen[0]).abs().max() > 1e-4  # the retain term is not trivially zero
    loss = rmu.unlearning_loss(batch)
    loss.backward()
    # RMU trains the MLPs of the steered block and the blocks before it only (the whole layer of an MLP)
    trained = ("blocks.layers.0.linear1", "blocks.layers.0.linear2") if objective == "causal_lm" else ("0", "1")
    for name, p in rmu.backbone.named_parameters():
        assert (p.grad is not None) == name.startswith(trained) == p.requires_grad, name


def test_rmu_trains_three_blocks_mlps_and_nothing_else(tmp_path):
    """WMDP's RMU: the MLPs of the steered block and of the two blocks before it move; attention,
    norms, embeddings, the head and the earlier block stay bit-identical (AdamW with weight decay)."""
    from litplug.modules import CausalTransformer

    def make():
        return CausalTransformer(8, 12, dim=16, depth=4, heads=2)

    torch.manual_seed(0)
    torch.save(make().state_dict(), tmp_path / "orig.pt")
    model = Unlearner(make(), str(tmp_path / "orig.pt"), "rmu", layer="blocks.layers.2", objective="causal_lm",
                      steering=3.0, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1))  # fmt: skip
    trained = [f"blocks.layers.{i}.linear{j}" for i in (0, 1, 2) for j in (1, 2)]
    assert model.rmu_modules == trained
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    tokens = torch.randint(0, 8, (16, 12), generator=torch.Generator().manual_seed(0))
    pairs = [{"forget": tokens[i], "retain": tokens[8 + i]} for i in range(8)]
    loader = torch.utils.data.DataLoader(pairs, batch_size=4)
    fast_trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(model, loader)
    for name, p in model.backbone.named_parameters():
        moved = not torch.equal(p.detach(), before[name])
        assert moved == name.startswith(tuple(trained)), name
    # explicit modules: only those move (here the WMDP code's one tensor per layer, the MLP's output projection)
    explicit = Unlearner(make(), str(tmp_path / "orig.pt"), "rmu", layer="blocks.layers.2", objective="causal_lm",
                         rmu_modules=["blocks.layers.1.linear2", "blocks.layers.2.linear2"])  # fmt: skip
    assert {n for n, p in explicit.backbone.named_parameters() if p.requires_grad} == {
        f"blocks.layers.{i}.linear2.{w}" for i in (1, 2) for w in ("weight", "bias")
    }
    # a shallower network: the blocks that exist
    shallow = Unlearner(_lm(), None, "rmu", layer="blocks.layers.0", objective="causal_lm")
    assert shallow.rmu_modules == ["blocks.layers.0.linear1", "blocks.layers.0.linear2"]
    with pytest.raises(ValueError, match="`rmu_modules` must name a submodule of the backbone"):
        Unlearner(make(), None, "rmu", layer="blocks.layers.2", rmu_modules=["blocks.layers.9"])
    with pytest.raises(ValueError, match="`rmu_modules` is used by method='rmu' only"):
        Unlearner(make(), None, "npo", rmu_modules=["blocks.layers.1"])
    with pytest.raises(ValueError, match="hold no parameters"):
        Unlearner(make(), None, "rmu", layer="blocks.layers.2", rmu_modules=["blocks.layers.2.dropout"])
    with pytest.raises(ValueError, match="not inside a numbered block list"):
        Unlearner(make(), None, "rmu", layer="norm")
    with pytest.raises(TypeError, match="rmu_modules"):
        Unlearner(make(), None, "rmu", layer="blocks.layers.2", rmu_modules="blocks.layers.2")


def test_rmu_layer_and_new_arguments_are_checked():
    with pytest.raises(ValueError, match=r"`layer` must name a submodule of the backbone, one of \['0', '1'"):
        Unlearner(_mlp(), None, "rmu", layer="blocks.9")
    with pytest.raises(ValueError, match="`layer` is required by method='rmu'"):
        Unlearner(_mlp(), None, "rmu")
    with pytest.raises(ValueError, match="used by no other method"):
        Unlearner(_mlp(), None, "retrain", layer="1")
    with pytest.raises(ValueError, match="`steering`"):
        Unlearner(_mlp(), None, "rmu", layer="1", steering=0.0)
    with pytest.raises(ValueError, match="`delta`"):
        Unlearner(_mlp(), None, "simnpo", delta=-1.0)


@pytest.fixture(scope="module")
def qa_oracle(tmp_path_factory):
    from litplug.oracle import train_oracle

    return train_oracle(tmp_path_factory.mktemp("qa"), 10, seed=0, num_entities=20, epochs=1)


@pytest.mark.parametrize("method", ["npo", "npo_rt", "simnpo", "rmu"])
def test_methods_train_on_fictitious_qa_scored_by_unlearning_evaluation(qa_oracle, method):
    from lightning.pytorch import Trainer

    from litplug.callbacks import UnlearningEvaluation
    from litplug.datamodules import FictitiousQA
    from litplug.oracle import backbone

    paths = qa_oracle
    dm = FictitiousQA(num_entities=20, forget_percent=10)
    layer = {"layer": "blocks.layers.1"} if method == "rmu" else {}
    model = Unlearner(backbone(dm), str(paths["target"]), method, objective="causal_lm", **layer)
    evaluation = UnlearningEvaluation(str(paths["retain"]))
    trainer = Trainer(max_epochs=1, limit_train_batches=2, callbacks=[evaluation], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")  # fmt: skip
    start = [p.detach().clone() for p in model.backbone.parameters()]
    trainer.fit(model, ForgetRetain(dm, scenario="class", forget_classes=[1]))
    assert math.isfinite(evaluation.results["forget_quality"]) and "privleak" in evaluation.results
    assert any(not torch.equal(a, p) for a, p in zip(start, model.backbone.parameters()))


@pytest.mark.parametrize(
    ("split", "match"),
    [
        ({"scenario": "class", "forget_classes": [5]}, "gives an empty forget or retain split"),
        ({"scenario": "random", "forget_fraction": 0.01}, "forget_fraction.*empty split"),
    ],
)
def test_an_empty_forget_split_is_refused_before_any_training(tmp_path, split, match):
    from torch.utils.data import TensorDataset

    # 40 samples of classes 0..3: class 5 has none, and 1% of 40 rounds to no sample
    data = TensorDataset(torch.randn(40, 1, 8, 8), torch.arange(40) % 4)
    model = Unlearner(_mlp(), None, "retrain")
    start = [p.detach().clone() for p in model.parameters()]
    trainer = fast_trainer(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match=match):
        trainer.fit(model, ForgetRetain(data, label_fn=lambda s: int(s[1]), batch_size=8, **split))
    assert trainer.global_step == 0 and all(torch.equal(a, p) for a, p in zip(start, model.parameters()))


def test_forget_and_retain_splits_are_disjoint_and_cover_the_training_set():
    dm = ForgetRetain(Digits(), scenario="random", forget_fraction=0.1, seed=3)
    dm.setup()
    forget, retain = set(dm.forget_indices.tolist()), set(dm.retain_indices.tolist())
    assert forget and retain and not forget & retain and len(forget | retain) == len(dm.train_set)


# --- npo, npo_rt, simnpo, rmu: DDP equals one process; Hugging Face models -------------------------
NEW_METHODS = {"npo": {}, "npo_rt": {"gamma": 2.0}, "simnpo": {"gamma": 2.0}, "rmu": {"layer": "blocks.layers.0"}}


def _pair_loader(rank=None):
    """8 forget/retain pairs of token ids; rank r takes half of every global batch of 4 (same global
    batches as one process)."""
    tokens = torch.randint(0, 8, (16, 12), generator=torch.Generator().manual_seed(1))
    pairs = [{"forget": tokens[i], "retain": tokens[8 + i]} for i in range(8)]
    if rank is not None:
        pairs = [pairs[i] for i in torch.arange(8).view(2, 2, 2)[:, rank].flatten().tolist()]
    return torch.utils.data.DataLoader(pairs, batch_size=2 if rank is not None else 4)


def _new_method_run(tmp_dir, method, checkpoint, rank=None, strategy=None):
    seed_everything(0)
    # a float64 network (ModelParallelStrategy refuses precision="64-true"; token ids need no cast)
    model = Unlearner(_lm().double(), checkpoint, method, objective="causal_lm", beta=0.5, steering=2.0,
                      optimizer=lambda p: torch.optim.Adam(p, lr=1e-2), **NEW_METHODS[method])  # fmt: skip
    extra = {} if strategy is None else {"strategy": strategy, "devices": 2, "use_distributed_sampler": False}
    trainer = fast_trainer(tmp_dir / method, max_steps=2, limit_val_batches=0, **extra)
    trainer.fit(model, _pair_loader(rank))
    return state_of(model.backbone)


def new_methods_distributed_worker(strategy, tmp_dir, checkpoint):
    import os

    from harness import make_strategy
    from lightning.pytorch.strategies import ModelParallelStrategy

    rank = int(os.environ.get("LOCAL_RANK", 0))
    kind = "fsdp2" if isinstance(strategy, ModelParallelStrategy) else "ddp"
    out = {}
    for i, method in enumerate(NEW_METHODS):  # a Strategy instance serves one Trainer
        out[method] = _new_method_run(tmp_dir, method, checkpoint, rank, strategy if i == 0 else make_strategy(kind))
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_npo_npo_rt_simnpo_rmu_distributed_equal_one_process(tmp_path, strategy):
    # float64: the two ranks and one process sum the global batch's gradient in different orders;
    # under FSDP2 (ModelParallelStrategy) the backbone is sharded, the frozen reference model is not
    torch.manual_seed(0)
    torch.save(_lm().state_dict(), tmp_path / "orig.pt")
    r0, r1 = run_distributed(new_methods_distributed_worker, strategy, tmp_path, checkpoint=str(tmp_path / "orig.pt"))
    original = _lm().state_dict()
    for method in NEW_METHODS:
        single = _new_method_run(tmp_path, method, str(tmp_path / "orig.pt"))
        assert any(not torch.equal(single[k], original[k].double()) for k in single), method  # it trained
        for key, value in single.items():
            assert value.dtype == torch.float64
            assert torch.equal(r0[method][key], r1[method][key]), (method, key)
            torch.testing.assert_close(r0[method][key], value, rtol=0, atol=1e-10, msg=f"{method} {key}")


def _tiny_hf(transformers, kind):
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=16, n_positions=12, n_embd=16, n_layer=3, n_head=2,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
        return transformers.GPT2LMHeadModel(config), "transformer.h"
    config = transformers.LlamaConfig(
        vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=12,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config), "model.layers"


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_npo_npo_rt_simnpo_rmu_on_hugging_face_models(tmp_path, kind):
    """Each loss from the model's own outputs (Hugging Face's loss for the log-likelihoods, its
    hidden states for RMU's activations); RMU trains the MLPs of blocks 0 and 1 only."""
    from litplug.functional.unlearning import rmu_direction, rmu_loss, simnpo_loss

    transformers = pytest.importorskip("transformers", reason="the `lm` extra (transformers) is not installed")
    torch.manual_seed(0)
    original, blocks = _tiny_hf(transformers, kind)
    torch.save(original.state_dict(), tmp_path / "orig.pt")
    tokens = torch.randint(0, 16, (8, 12), generator=torch.Generator().manual_seed(0))
    forget, retain = tokens[:4], tokens[4:]
    batch = {"forget": {"input_ids": forget}, "retain": {"input_ids": retain}}
    layer = {"layer": f"{blocks}.1", "steering": 2.0}
    models = {m: Unlearner(_tiny_hf(transformers, kind)[0], str(tmp_path / "orig.pt"), m, objective="causal_lm",
                           beta=0.5, gamma=2.0, **(layer if m == "rmu" else {})) for m in NEW_METHODS}  # fmt: skip
    for model in models.values():
        with torch.no_grad():  # move away from the original weights, the same way for every method
            for p in model.backbone.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    net, ref = models["npo"].backbone, models["npo"]._reference[0]

    def loglik(model, data):  # Hugging Face's own mean token loss, times the 11 predicted tokens
        return torch.stack([-model(s[None], labels=s[None]).loss * 11 for s in data])

    logp = loglik(net, forget)
    with torch.no_grad():
        logp_ref = loglik(ref, forget)
    ce_r = net(retain, labels=retain).loss
    torch.testing.assert_close(models["npo"].unlearning_loss(batch), npo_loss(logp, logp_ref, 0.5))
    torch.testing.assert_close(models["npo_rt"].unlearning_loss(batch), npo_loss(logp, logp_ref, 0.5) + 2 * ce_r)
    torch.testing.assert_close(
        models["simnpo"].unlearning_loss(batch), simnpo_loss(logp, torch.full((4,), 11), 0.5) + 2 * ce_r
    )
    rmu = models["rmu"]
    assert rmu.rmu_modules == [f"{blocks}.0.mlp", f"{blocks}.1.mlp"]
    hidden = [rmu.backbone(d, output_hidden_states=True).hidden_states[2] for d in (forget, retain)]
    with torch.no_grad():
        hidden_ref = rmu._reference[0](retain, output_hidden_states=True).hidden_states[2]
    expected = rmu_loss(hidden[0], 2.0 * rmu_direction(16, 0).float(), hidden[1], hidden_ref, 2.0)
    torch.testing.assert_close(rmu.unlearning_loss(batch), expected)
    before = {n: p.detach().clone() for n, p in rmu.backbone.named_parameters()}
    trainer = fast_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    pairs = [{"forget": forget[i], "retain": retain[i]} for i in range(4)]
    trainer.fit(rmu, torch.utils.data.DataLoader(pairs, batch_size=2))
    for name, p in rmu.backbone.named_parameters():
        moved = not torch.equal(p.detach(), before[name])
        assert moved == name.startswith((f"{blocks}.0.mlp.", f"{blocks}.1.mlp.")), name
