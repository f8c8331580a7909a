"""The weight-averaging formulas against their equations (EMA decay, the in-place update, SWA's
mean, the BatchNorm pass)."""

import math

import pytest
import torch
from harness import state_of

from litplug.functional import average_update_, ema_decay, update_bn_
from litplug.modules import MLP


def test_ema_decay_closed_form():
    assert ema_decay(0, 0.9) == 0.0 and ema_decay(5, 0.9) == 0.9
    for t in (1, 3, 10):
        assert ema_decay(t, 0.999, warmup=True, gamma=2.0, power=0.75) == pytest.approx(1 - (1 + t / 2.0) ** -0.75)
    assert ema_decay(10**6, 0.99, warmup=True) == 0.99


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_after_n_updates_matches_closed_form(warmup):
    gen = torch.Generator().manual_seed(0)
    snapshots = [
        [torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)]
        for _ in range(7)
    ]
    avg = [torch.empty(3, 4, dtype=torch.float64), torch.empty(5, dtype=torch.float64)]
    decays = [ema_decay(t, 0.8, warmup) for t in range(7)]
    for d, snap in zip(decays, snapshots):
        average_update_(avg, snap, 1 - d)
    # avg_n = sum_k (1 - d_k) prod_{j > k} d_j * w_k  (d_0 = 0: the first update copies)
    coef = [(1 - decays[k]) * math.prod(decays[k + 1 :]) for k in range(7)]
    assert sum(coef) == pytest.approx(1.0)
    for i in range(2):
        expected = sum(c * s[i] for c, s in zip(coef, snapshots))
        torch.testing.assert_close(avg[i], expected, rtol=1e-12, atol=1e-12)


def test_swa_update_is_the_arithmetic_mean():
    snapshots = [[torch.randn(4, 3), torch.randn(2)] for _ in range(5)]
    avg = [torch.empty(4, 3), torch.empty(2)]
    for n, snap in enumerate(snapshots):
        average_update_(avg, snap, 1 / (n + 1))
    for i in range(2):
        torch.testing.assert_close(avg[i], torch.stack([s[i] for s in snapshots]).mean(0), rtol=1e-6, atol=1e-6)


def test_fp32_average_keeps_updates_a_bf16_average_loses():
    live = [torch.full((8,), 1.0 + 2**-7, dtype=torch.bfloat16)]  # one bf16 ulp above 1
    avg16 = [torch.ones(8, dtype=torch.bfloat16)]
    avg32 = [torch.ones(8, dtype=torch.float32)]
    for _ in range(200):
        average_update_(avg16, live, 1 - 0.999)
        average_update_(avg32, live, 1 - 0.999)
    assert torch.equal(avg16[0], torch.ones(8, dtype=torch.bfloat16))  # every update rounded away
    expected = 1 + 2**-7 * (1 - 0.999**200)
    torch.testing.assert_close(avg32[0], torch.full((8,), expected), rtol=0, atol=1e-5)


def test_update_bn_matches_torch_swa_utils():
    torch.manual_seed(0)
    net = MLP(input_shape=[4], num_outputs=2, hidden=[8], batch_norm=True)
    ref = MLP(input_shape=[4], num_outputs=2, hidden=[8], batch_norm=True)
    ref.load_state_dict(net.state_dict())
    batches = [(torch.randn(5, 4) * 3 + 1, torch.zeros(5)) for _ in range(3)]
    assert update_bn_(net, batches)
    torch.optim.swa_utils.update_bn(batches, ref)
    a, b = state_of(ref), state_of(net)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert not update_bn_(torch.nn.Linear(2, 2), batches)


# ----------------------------------------------------------------------------- bad input
