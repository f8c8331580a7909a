"""Speed of certified (IBP) training and evaluation, measured side by side in one run.

    PYTHONPATH=. python benchmarks/certified.py            # CNN7 (the paper's cnn_7layer_bn2), batch 32, CPU
    python -m litplug ... is not needed: the script builds the modules directly.

Rows: plain training step (Classifier, cross-entropy), litplug IBP training step
(CertifiedClassifier at the target eps with the warmup regularizers on), and auto_LiRPA's IBP step
when auto_LiRPA imports (the peer; its 0.3 release does not import with numpy 2, in which case the
row says so). Then evaluation throughput: plain forward vs CertifiedClassifier.certify (verified
accuracy) in samples/s. Times are medians of ``--steps`` steps after warmup steps.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from litplug.modules import CNN7, CertifiedClassifier


def median_time(fn: Callable[[], object], steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--linear", type=int, default=512)
    parser.add_argument("--shape", type=int, nargs=3, default=[3, 32, 32])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(args.batch, *args.shape)
    y = torch.randint(0, 10, (args.batch,))

    model = CertifiedClassifier(
        CNN7(args.shape, 10, args.width, args.linear), eps=args.eps, mean=(0.0,), std=(1.0,), pixel_range=(0.0, 1.0)
    ).train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)

    def natural() -> None:
        opt.zero_grad()
        F.cross_entropy(model.backbone(x), y).backward()
        opt.step()

    def ibp() -> None:
        model.current_eps, model.regularizer_weight = args.eps, 0.25
        opt.zero_grad()
        model.training_step((x, y), 0).backward()
        opt.step()

    rows = [("plain training step (cross-entropy)", median_time(natural, args.steps))]
    rows.append(("litplug IBP step (CertifiedClassifier)", median_time(ibp, args.steps)))
    peer = auto_lirpa_step(model.backbone, x, y, args.eps)
    rows.append(("auto_LiRPA IBP step", median_time(peer, args.steps) if callable(peer) else peer))

    print(f"\nCNN7(width={args.width}, linear={args.linear}) input {args.shape}, batch {args.batch}, {args.threads} CPU threads")
    print(f"{'training step':42s} {'ms':>9s} {'x plain':>8s}")
    base = rows[0][1]
    for name, value in rows:
        if isinstance(value, str):
            print(f"{name:42s} {'-':>9s} {'-':>8s}  ({value})")
        else:
            print(f"{name:42s} {value * 1e3:9.1f} {value / base:8.2f}")

    model.eval()
    xe = torch.rand(4 * args.batch, *args.shape)
    ye = torch.randint(0, 10, (4 * args.batch,))
    with torch.no_grad():
        t_plain = median_time(lambda: model.backbone(xe), args.steps)
        t_cert = median_time(lambda: model.certify(xe, ye), args.steps)
    print(f"\n{'evaluation (batch %d)' % len(xe):42s} {'samples/s':>9s} {'x plain':>8s}")
    print(f"{'plain forward':42s} {len(xe) / t_plain:9.0f} {1.0:8.2f}")
    print(f"{'CertifiedClassifier.certify (verified)':42s} {len(xe) / t_cert:9.0f} {t_plain / t_cert:8.2f}")


def auto_lirpa_step(backbone: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> Callable[[], None] | str:
    try:
        from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
    except Exception as err:  # noqa: BLE001 - any import failure means "peer unavailable"
        return f"auto_LiRPA unavailable: {type(err).__name__}: {err}"[:120]
    import copy

    net = copy.deepcopy(backbone).train()
    bounded = BoundedModule(net, torch.zeros_like(x))
    opt = torch.optim.Adam(bounded.parameters(), lr=5e-4)
    eye = torch.eye(10)
    spec = eye[y].unsqueeze(1) - eye.unsqueeze(0)
    spec = spec[(eye[y] == 0)].view(len(y), 9, 10)

    def step() -> None:
        opt.zero_grad()
        box = BoundedTensor(x, PerturbationLpNorm(norm=float("inf"), eps=eps, x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1)))
        bounded(box)
        lower, _ = bounded.compute_bounds(x=(box,), C=spec, method="IBP", bound_upper=False)
        F.cross_entropy(torch.cat([torch.zeros_like(lower[:, :1]), -lower], 1), torch.zeros_like(y)).backward()
        opt.step()

    return step


if __name__ == "__main__":
    main()
