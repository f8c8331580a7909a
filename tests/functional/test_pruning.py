"""EL2N, GraNd (its closed form for linear, convolution, embedding and normalisation layers and its
general torch.func path) and forgetting events against their definitions computed one sample at a time."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import litplug.functional.pruning as pruning
from litplug.functional import el2n_scores, forgetting_events, forgetting_scores, grand_scores


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3))
    model[1].running_mean.normal_()  # eval-mode statistics that are not the identity
    model[1].running_var.uniform_(0.5, 2.0)
    model[0].bias.requires_grad_(False)  # frozen parameters do not count in GraNd
    return model.eval()


def _loader():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 5, generator=g), torch.randint(0, 3, (10,), generator=g)
    return [(x[:4], y[:4]), (x[4:], y[4:])], x, y


def test_el2n_is_the_norm_of_the_softmax_error():
    model = _model()
    loader, x, y = _loader()
    got = el2n_scores(model, loader)
    with torch.no_grad():
        want = torch.stack([(model(x[i : i + 1]).softmax(-1)[0] - F.one_hot(y[i], 3)).norm() for i in range(10)])
    assert got.shape == (10,)
    torch.testing.assert_close(got, want.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss", [None, lambda z, t: F.cross_entropy(z, t, label_smoothing=0.2)])
def test_grand_is_the_per_sample_gradient_norm(loss):
    model = _model()
    loader, x, y = _loader()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = grand_scores(model, loader, loss)
    want = []
    for i in range(10):
        model.zero_grad()
        (loss or F.cross_entropy)(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        want.append(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-6, atol=1e-6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


def _per_sample_grand(model, x, y, loss=F.cross_entropy):
    want = []
    for i in range(len(y)):
        model.zero_grad()
        loss(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        want.append(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    model.zero_grad()
    return torch.stack(want)


class Tied(nn.Module):
    """A linear layer whose weight is also used outside its forward (the closed form would miss it)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(self.fc(x) + x @ self.fc.weight)


class Twice(nn.Module):
    """A layer called twice per forward: its per-sample gradient is the sum of the calls' (the
    closed form takes the positions of both calls together)."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.out(self.fc(torch.tanh(self.fc(x))))


class Tokens(nn.Module):
    """Linear layers on [batch, tokens, features] inputs, mean-pooled: both closed forms (2 tokens
    take the token-pair form, 12 the per-sample outer product)."""

    def __init__(self, tokens):
        super().__init__()
        self.tokens = tokens
        self.wide, self.narrow = nn.Linear(5, 40), nn.Linear(40, 3)
        self.narrow.bias.requires_grad_(False)

    def forward(self, x):
        return self.narrow(torch.tanh(self.wide(x.view(len(x), self.tokens, 5)))).mean(1)


@pytest.mark.parametrize("name", ["mlp", "tokens", "long_tokens", "tied", "twice", "train_mode"])
def test_grand_closed_form_and_its_fallbacks_match_the_definition(name, monkeypatch):
    general = []  # batches scored by the general torch.func path
    make = pruning._per_sample_norms
    monkeypatch.setattr(pruning, "_per_sample_norms", lambda *a: (general.append(name), make(*a))[1])
    torch.manual_seed(0)
    width = {"tokens": 2, "long_tokens": 12}.get(name, 1)
    model = {
        "mlp": lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)),
        "tokens": lambda: Tokens(2),
        "long_tokens": lambda: Tokens(12),
        "tied": Tied,
        "twice": Twice,
        "train_mode": lambda: nn.Sequential(nn.Linear(5, 7), nn.Dropout(0.0), nn.Linear(7, 3)).train(),
    }[name]()
    if name != "train_mode":
        model.eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 5 * width, generator=g), torch.randint(0, 3, (10,), generator=g)
    got = grand_scores(model, [(x[:6], y[:6]), (x[6:], y[6:])])
    torch.testing.assert_close(got, _per_sample_grand(model, x, y), rtol=1e-6, atol=1e-6)
    assert bool(general) == (name in ("tied", "train_mode")), "the closed form is used exactly where it applies"


class CNN(nn.Module):
    """Convolutions (stride, padding, dilation, "same", no bias, Conv1d), BatchNorm in eval mode with
    running statistics that are not the identity, a linear head; ``conv`` is the second 2-d
    convolution (grouped, circular padding)."""

    def __init__(self, conv):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = conv
        self.c3 = nn.Conv2d(conv.out_channels, 3, 2, padding="same", bias=False)
        self.c4 = nn.Conv1d(3, 4, 3, padding=2, dilation=2)
        self.bn1 = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 3)
        with torch.no_grad():
            for bn in (self.bn, self.bn1):
                bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0), bn.weight.normal_(), bn.bias.normal_()

    def forward(self, x):
        h = torch.tanh(self.c3(torch.tanh(self.c2(torch.tanh(self.bn(self.c1(x)))))))
        h = torch.tanh(self.bn1(self.c4(h.flatten(2))))
        return self.out(h.mean(2))


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv2d(4, 4, 3, padding=(2, 1), dilation=(2, 1)),
        lambda: nn.Conv2d(4, 4, (1, 2), stride=(1, 2), padding=(0, 1)),
        lambda: nn.Conv2d(4, 16, 3, stride=3, padding=1),  # 2 positions, 36 x 16 weight: the position-pair form
        lambda: nn.Conv2d(4, 4, 3, padding=1, groups=2),
        lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"),
    ],
    ids=["dilated", "strided", "pairs", "grouped", "circular"],
)
@pytest.mark.parametrize("max_memory", [256 * 2**20, 1])  # 1: one sample per chunk
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_grand_closed_form_for_convolutions_and_batch_norm(
    conv,
    max_memory,
    monkeypatch,
):
    general = []
    make = pruning._per_sample_norms
    monkeypatch.setattr(pruning, "_per_sample_norms", lambda *a: (general.append(1), make(*a))[1])
    torch.manual_seed(0)
    model = CNN(conv()).double().eval()
    model.c1.bias.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 2, 7, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (7,), generator=g)
    got = grand_scores(model, [(x[:4], y[:4]), (x[4:], y[4:])], max_memory=max_memory)
    torch.testing.assert_close(got, _per_sample_grand(model, x, y), rtol=1e-6, atol=1e-6)
    assert not general, "the closed form covers every layer here"


class Sequences(nn.Module):
    """Embeddings (a padding row, tokens repeated within a sample), LayerNorm (its weight frozen), a
    linear layer on every token followed by an in-place ReLU (the closed form reads the layer's own
    output)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 6, padding_idx=0)
        self.norm = nn.LayerNorm(6)
        self.fc, self.out = nn.Linear(6, 5), nn.Linear(5, 3)
        self.norm.weight.requires_grad_(False)

    def forward(self, tokens):
        return self.out(torch.relu_(self.fc(self.norm(self.embed(tokens)))).mean(1))


class Volumes(nn.Module):
    """Conv3d (its weight frozen), GroupNorm, a grouped Conv3d with reflected "same" padding, a
    linear head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(2, 4, 3, stride=(1, 2, 1), padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.c2 = nn.Conv3d(4, 6, (3, 1, 2), groups=2, padding="same", padding_mode="reflect", dilation=(1, 1, 2))
        self.out = nn.Linear(6, 3)
        self.c1.weight.requires_grad_(False)
        with torch.no_grad():
            self.gn.weight.normal_(), self.gn.bias.normal_()

    def forward(self, x):
        return self.out(torch.tanh(self.c2(torch.tanh(self.gn(self.c1(x))))).mean((2, 3, 4)))


@pytest.mark.parametrize("name", ["sequences", "volumes"])
def test_grand_closed_form_for_embeddings_norms_and_conv3d(name, monkeypatch):
    general = []
    make = pruning._per_sample_norms
    monkeypatch.setattr(pruning, "_per_sample_norms", lambda *a: (general.append(1), make(*a))[1])
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "sequences":
        model = Sequences().double().eval()
        x = torch.randint(0, 7, (9, 8), generator=g)  # 8 tokens of 7: repeats in every sample, padding in some
    else:
        model = Volumes().double().eval()
        x = torch.randn(9, 2, 4, 5, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=g)
    got = grand_scores(model, [(x[:5], y[:5]), (x[5:], y[5:])])
    torch.testing.assert_close(got, _per_sample_grand(model, x, y), rtol=1e-6, atol=1e-6)
    assert not general, "the closed form covers every layer here"


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1),
        lambda: nn.Conv2d(4, 6, 3, stride=(2, 3), dilation=(2, 1), padding=(1, 2), groups=2, padding_mode="reflect"),
        lambda: nn.Conv2d(4, 6, (3, 2), stride=2, padding=1, padding_mode="replicate"),
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, padding_mode="circular", bias=False),
        lambda: nn.Conv2d(4, 6, 1, stride=2),
        lambda: nn.Conv3d(4, 6, 3, stride=(2, 1, 2), padding=1, groups=2),
    ],
    ids=["conv1d", "grouped-dilated-reflect", "replicate", "circular", "1x1", "conv3d"],
)
def test_strided_convolution_input_gradient_is_the_adjoint_of_the_patch_gather(conv):
    torch.manual_seed(0)
    conv = conv().double()
    x = torch.randn(3, 4, *([7] * (conv.weight.dim() - 2)), dtype=torch.float64, requires_grad=True)
    out = conv(x)
    g = torch.randn_like(out)
    (want,) = torch.autograd.grad(out, x, g)
    (got,) = torch.autograd.grad(pruning._InputGradient.apply(x, out.detach(), conv), x, g)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert conv.weight.grad is None


def test_grand_on_a_convnet_takes_the_gathered_input_gradient_after_the_first_batch(monkeypatch):
    from litplug.modules import ConvNet

    used = []
    gathered = pruning._gathered_input_gradient
    monkeypatch.setattr(pruning, "_gathered_input_gradient", lambda m, x: used.append(gathered(m, x)) or used[-1])
    torch.manual_seed(0)
    model = ConvNet(input_shape=(1, 8, 8), channels=(4, 6), hidden=5, num_outputs=3).double().eval()
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.normal_(), m.running_var.uniform_(0.5, 2.0), m.weight.data.normal_()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(9, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,), generator=g)
    got = grand_scores(model, [(x[:3], y[:3]), (x[3:6], y[3:6]), (x[6:], y[6:])])
    torch.testing.assert_close(got, _per_sample_grand(model, x, y), rtol=1e-6, atol=1e-6)
    assert any(used), "the strided convolution's input gradient is the gather's adjoint after the check"


def test_grand_in_bfloat16_and_under_autocast(monkeypatch):
    """A bfloat16 model takes the closed form (norms summed in float32) within its precision of the
    float64 scores; autocast is off inside the scores, so they equal the float32 model's."""
    from litplug.modules import ConvNet

    general = []
    make = pruning._per_sample_norms
    monkeypatch.setattr(pruning, "_per_sample_norms", lambda *a: (general.append(1), make(*a))[1])
    torch.manual_seed(0)
    model = ConvNet(input_shape=(1, 8, 8), channels=(4, 6), hidden=5, num_outputs=3).eval()
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 3, (12,))
    loader = [(x[:6], y[:6]), (x[6:], y[6:])]
    want = grand_scores(model.double(), [(a.double(), b) for a, b in loader])
    single, errors = grand_scores(model.float(), loader), el2n_scores(model, loader)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(grand_scores(model, loader), single)
        assert torch.equal(el2n_scores(model, loader), errors)
    half = grand_scores(model.bfloat16(), [(a.bfloat16(), b) for a, b in loader])
    torch.testing.assert_close(half, want, rtol=2e-2, atol=0)
    assert not general, "the closed form covers the bfloat16 model"


class Scaled(nn.Module):
    """A linear layer times a learnable scalar (a parameter of shape [])."""

    def __init__(self):
        super().__init__()
        self.fc, self.scale = nn.Linear(5, 3), nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return self.fc(x) * self.scale


def test_grand_general_path_takes_scalar_parameters():
    torch.manual_seed(0)
    model = Scaled().double().eval()
    loader, x, y = _loader()
    loader = [(a.double(), b) for a, b in loader]
    want = _per_sample_grand(model, x.double(), y)
    torch.testing.assert_close(grand_scores(model, loader), want, rtol=1e-6, atol=1e-6)


def test_grand_general_path_in_memory_sized_chunks():
    model = _model()
    loader, x, y = _loader()
    want = grand_scores(model, loader)
    torch.testing.assert_close(grand_scores(model, loader, max_memory=1), want, rtol=1e-6, atol=1e-6)  # one by one
    with pytest.raises(ValueError, match="`max_memory`"):
        grand_scores(model, loader, max_memory=0)


def test_scores_refuse_batches_that_are_not_inputs_and_classes():
    model = _model()
    with pytest.raises(ValueError, match=r"\(inputs, targets\) batches"):
        el2n_scores(model, [torch.randn(2, 5)])
    with pytest.raises(ValueError, match="logits"):
        grand_scores(model, [(torch.randn(2, 5), torch.zeros(2, 3))])
    for scores in (el2n_scores, grand_scores):
        with pytest.raises(ValueError, match="integer class targets, got torch.float32"):
            scores(model, [(torch.randn(2, 5), torch.zeros(2))])
        with pytest.raises(ValueError, match=r"class targets in \[0, 3\), got targets from 0 to 3"):
            scores(model, [(torch.randn(2, 5), torch.tensor([0, 3]))])
    with pytest.raises(ValueError, match=r"class targets in \[0, 3\), got targets from -1 to 1"):
        el2n_scores(model, [(torch.randn(2, 5), torch.tensor([-1, 1]))])  # not an index from the end
    with pytest.raises(ValueError, match=r"class targets in \[0, 3\), got targets from -1 to 1"):
        grand_scores(model, [(torch.randn(2, 5), torch.tensor([-1, 1]))])  # not ignored as cross-entropy would
    with pytest.raises(ValueError, match="class targets not negative, got targets from -1 to 1"):  # the general path
        grand_scores(nn.Sequential(nn.Linear(5, 3), nn.Dropout(0.0)), [(torch.randn(2, 5), torch.tensor([-1, 1]))])
    grand_scores(model, [(torch.randn(2, 5), torch.zeros(2))], loss=lambda z, t: (z[:, 0] - t).square().sum())
    with pytest.raises(ValueError, match="BatchNorm layer '1' is in train mode.*model.eval"):
        grand_scores(model.train(), [(torch.randn(2, 5), torch.tensor([0, 1]))])


def test_forgetting_events_follow_toneva():
    # a sample: correct, wrong (event), correct, wrong (event); another never correct; one always correct
    history = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    last = torch.full((3,), -1)
    counts = torch.zeros(3, dtype=torch.long)
    learned = torch.zeros(3, dtype=torch.bool)
    for correct in history:
        counts += forgetting_events(last, correct).long()
        last = correct.long()
        learned |= correct
    assert counts.tolist() == [2, 0, 0]
    assert forgetting_scores(counts, learned).tolist() == [2.0, float("inf"), 0.0]
