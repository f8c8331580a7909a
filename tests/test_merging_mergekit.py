"""litplug.merging against mergekit 0.1.5 (run through its Python API) on tiny GPT-2 and Llama
models built locally from random configs: bit-equal in float32 and bfloat16 for linear, SLERP,
task arithmetic, TIES, breadcrumbs and model stock; DARE and DELLA statistically (mergekit draws
from torch's global generator and rescales to the L1 norm)."""

import pytest
import torch

mergekit = pytest.importorskip("mergekit", reason="mergekit (a peer used in tests, in the `bench` extra) is absent")
transformers = pytest.importorskip("transformers", reason="transformers (pulled in by mergekit) is absent")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from litplug.merging import (  # noqa: E402
    breadcrumbs,
    dare,
    della,
    linear,
    model_stock,
    slerp,
    task_arithmetic,
    ties_merge,
)

FAMILIES = ("gpt2", "llama")
DTYPES = ("float32", "bfloat16")


def build(family: str, seed: int):
    torch.manual_seed(seed)
    if family == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per family and dtype: a base and three fine-tunes of it (the base plus 0.02 N(0, 1)),
    saved with save_pretrained; returns their folders and their safetensors state dicts."""
    root = tmp_path_factory.mktemp("mergekit")
    out = {}
    for family in FAMILIES:
        for dtype in DTYPES:
            paths = []
            for i in range(4):
                model = build(family, 0).to(getattr(torch, dtype))
                gen = torch.Generator().manual_seed(i)
                with torch.no_grad():
                    for p in model.parameters():
                        if i:
                            p.add_(0.02 * torch.randn(p.shape, generator=gen).to(p.dtype))
                path = root / f"{family}_{dtype}_{i}"
                model.save_pretrained(path)
                paths.append(str(path))
            out[family, dtype] = paths, [load_file(f"{p}/model.safetensors") for p in paths]
    return out, root


def run_mergekit(config: dict, out) -> dict:
    options = MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False)
    run_merge(MergeConfiguration.model_validate(config), str(out), options)
    return load_file(out / "model.safetensors")


def configs(paths, states, dtype):
    """mergekit's YAML (as a dict) and litplug's call for each deterministic method."""
    base, fts = paths[0], paths[1:]
    return {
        "linear": (
            {"merge_method": "linear",
             "models": [{"model": p, "parameters": {"weight": w}} for p, w in zip(fts, (1, 2, 3))]},
            lambda: linear(states[1:], [1.0, 2.0, 3.0]),
        ),
        "slerp": (
            {"merge_method": "slerp", "base_model": fts[0], "models": [{"model": fts[0]}, {"model": fts[1]}],
             "parameters": {"t": 0.3}},
            lambda: slerp(states[1], states[2], 0.3),
        ),
        "task_arithmetic": (
            {"merge_method": "task_arithmetic", "base_model": base,
             "models": [{"model": p, "parameters": {"weight": w}} for p, w in zip(fts[:2], (0.7, 0.4))]},
            lambda: task_arithmetic(states[0], states[1:3], [0.7, 0.4]),
        ),
        "ties": (
            {"merge_method": "ties", "base_model": base, "parameters": {"lambda": 0.8},
             "models": [{"model": p, "parameters": {"weight": 1.0, "density": 0.4}} for p in fts]},
            lambda: ties_merge(states[0], states[1:], density=0.4, scale=0.8, trim="tensor"),
        ),
        "breadcrumbs": (
            {"merge_method": "breadcrumbs", "base_model": base,
             "models": [{"model": p, "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05}} for p in fts]},
            lambda: breadcrumbs(states[0], states[1:], density=0.8, gamma=0.05, scale=0.5),
        ),
        "model_stock": (
            {"merge_method": "model_stock", "base_model": base, "models": [{"model": p} for p in fts]},
            lambda: model_stock(states[0], states[1:]),
        ),
    }  # fmt: skip


def tied_at_the_cut(states, name: str, density: float, gamma: float = 0.0) -> torch.Tensor:
    """Entries whose task-vector magnitude (in any fine-tune) equals the magnitude at a trim cut:
    which of them are kept is argsort's unspecified order among ties in mergekit."""
    tied = torch.zeros_like(states[0][name], dtype=torch.bool)
    for ft in states[1:]:
        mags = (ft[name] - states[0][name]).abs().float().flatten()
        d = mags.numel()
        ordered = mags.sort(descending=True).values
        for k in (int(gamma * d), int(gamma * d) + int(density * d)):
            if 0 < k <= d:
                tied |= (mags == ordered[k - 1]).reshape(tied.shape)
    return tied


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_merges_equal_mergekit(models, family, dtype, tmp_path):
    (paths, states), _ = models[0][family, dtype], None
    for method, (config, ours) in configs(paths, states, dtype).items():
        theirs = run_mergekit({**config, "dtype": dtype}, tmp_path / method)
        mine = ours()
        assert set(mine) == set(theirs), method
        compared = total = 0
        for name, value in theirs.items():
            assert mine[name].dtype == value.dtype, (method, name)
            if dtype == "bfloat16" and method in ("ties", "breadcrumbs"):
                # bf16 task vectors tie often: away from the ties at the trim cuts, bit-equal
                density, gamma = (0.4, 0.0) if method == "ties" else (0.8, 0.05)
                untied = ~tied_at_the_cut(states, name, density, gamma)
                assert torch.equal(mine[name][untied], value[untied]), (method, name)
                compared += int(untied.sum())
            else:
                assert torch.equal(mine[name], value), (method, name)
                compared += value.numel()
            total += value.numel()
        assert compared > 0.9 * total, method


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_drops_match_mergekit_statistically(models, method, tmp_path):
    """One fine-tune, density 0.5: both keep about half of every large tensor's task vector and
    scale the kept entries by about 1 / density (litplug exactly 1 / p, mergekit to the L1 norm),
    so the merged task vector's sum stays about the original's."""
    paths, states = models[0]["gpt2", "float32"]
    params = {"weight": 1.0, "density": 0.5} | ({"epsilon": 0.1} if method == "della_linear" else {})
    theirs = run_mergekit(
        {"merge_method": method, "base_model": paths[0], "models": [{"model": paths[1], "parameters": params}],
         "random_seed": 0, "dtype": "float32"},
        tmp_path / method,
    )  # fmt: skip
    if method == "dare_linear":
        mine = dare(states[0], [states[1]], density=0.5, seed=0)
    else:
        mine = della(states[0], [states[1]], density=0.5, epsilon=0.1, seed=0, consensus=False)
    for name, base in states[0].items():
        if base.numel() < 2000:
            continue
        tau = states[1][name] - base
        for merged in (mine[name], theirs[name]):
            delta = merged - base
            kept = delta != 0
            d = kept.numel()
            assert abs(kept.float().mean().item() - 0.5) < 5 * (0.25 / d) ** 0.5, name
            ratio = (delta[kept] / tau[kept]).median().item()
            assert ratio == pytest.approx(2.0, rel=0.1), name
            assert delta.sum().item() == pytest.approx(tau.sum().item(), abs=6 * tau.abs().mean().item() * d**0.5)
