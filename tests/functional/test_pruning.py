"""EL2N, GraNd and forgetting events against their definitions computed one sample at a time."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

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


def test_scores_refuse_batches_that_are_not_inputs_and_classes():
    model = _model()
    with pytest.raises(ValueError, match=r"\(inputs, targets\) batches"):
        el2n_scores(model, [torch.randn(2, 5)])
    with pytest.raises(ValueError, match="logits"):
        grand_scores(model, [(torch.randn(2, 5), torch.zeros(2, 3))])


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
