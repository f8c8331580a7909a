"""Speed of certified (IBP, CROWN-IBP) training and evaluation, measured side by side in one run.

    python benchmarks/certified.py --steps 3 --batch 8   # CNN7 (the paper's cnn_7layer_bn2), CPU

Rows: plain training step (cross-entropy), litplug IBP training step (CertifiedClassifier at the
target eps, without and with the warmup regularizers of the ramp), litplug CROWN-IBP step (in the
eps ramp, both bounds mixed), and auto_LiRPA's IBP and CROWN-IBP steps (the peer) when auto_LiRPA
is importable, else the rows say why not. Its newest PyPI release, 0.3, declares torch<1.13 and
needs numpy<2: install it without its dependencies into a folder of its own (this keeps the torch
you have; the script puts back the two torch internals it calls, see
``_torch_compat_for_auto_lirpa``) and put that folder first on the path, from the repository root:

    pip install --no-deps --target /tmp/lirpa auto_LiRPA==0.3 'numpy<2' appdirs tqdm
    PYTHONPATH=/tmp/lirpa python benchmarks/certified.py --steps 3 --batch 8

Then evaluation throughput in samples/s: plain forward, CertifiedClassifier.certify (verified
accuracy) with IBP and with CROWN-IBP, and ``crown_bounds(method="crown-ibp")`` of the margins
(the verification bound alone). Times are medians of ``--steps`` forward+backward passes on fixed
weights, the rows interleaved round by round. The engine lays image boxes out channels-last; one
row of each table reruns the IBP step and ``certify`` with row-major boxes and prints the ratio
(wall clock, and CPU time of the process).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from litplug.bounds import Interval, crown_bounds, margin_spec
from litplug.modules import CNN7, CertifiedClassifier


def median_times(fns: list[Callable[[], object]], steps: int, warmup: int = 2, cpu: list | None = None) -> list[float]:
    """Median seconds per call of each function, calls interleaved round by round so that load
    changes on a shared machine hit every row alike; ``cpu`` receives the medians of the process's
    CPU time per call (less sensitive to other processes on the machine)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    cpu_times: list[list[float]] = [[] for _ in fns]
    for _ in range(steps):
        for fn, out, out_cpu in zip(fns, times, cpu_times):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            out.append(time.perf_counter() - start)
            out_cpu.append(time.process_time() - start_cpu)
    if cpu is not None:
        cpu[:] = [statistics.median(t) for t in cpu_times]
    return [statistics.median(t) for t in times]


@contextlib.contextmanager
def row_major_boxes() -> Iterator[None]:
    """Input boxes in row-major layout instead of channels-last (:meth:`litplug.bounds.Interval.input`):
    the comparison rows of the engine's layout."""
    saved = Interval.__dict__["input"]
    Interval.input = classmethod(
        lambda cls, lower, upper, clean=None: cls.of((upper + lower) / 2, (upper - lower) / 2, clean)
    )
    try:
        yield
    finally:
        Interval.input = saved


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

    # Forward + backward on fixed weights (no optimizer step): every row times the same network,
    # and weights drifting under different losses cannot skew the comparison.
    def natural() -> None:
        model.zero_grad()
        F.cross_entropy(model.backbone(x), y).backward()

    def ibp(regularizer_weight: float) -> Callable[[], None]:
        def step() -> None:
            model.current_eps, model.regularizer_weight = args.eps, regularizer_weight
            model.zero_grad()
            model.training_step((x, y), 0).backward()

        return step

    def row_major(fn: Callable[[], None]) -> Callable[[], None]:
        def step() -> None:
            with row_major_boxes():
                fn()

        return step

    def crown_ibp() -> None:
        # in the eps ramp (0 < beta < 1): IBP and CROWN-IBP margins, mixed; the cost is the same for any beta > 0
        model.bound, model.current_eps, model.regularizer_weight = "crown-ibp", args.eps / 2, 0.0
        model.zero_grad()
        model.training_step((x, y), 0).backward()
        model.bound = "ibp"

    peer = auto_lirpa_step(model.backbone, x, y, args.eps)
    peer_crown = auto_lirpa_step(model.backbone, x, y, args.eps, crown_ibp=True)
    fns = [natural, ibp(0.0), ibp(0.25), crown_ibp, row_major(ibp(0.0))]
    fns += [f for f in (peer, peer_crown) if callable(f)]
    cpu: list[float] = []
    times = median_times(fns, args.steps, cpu=cpu)
    peer_times = iter(times[5:])
    rows: list[tuple[str, float | str]] = [
        ("plain training step (cross-entropy)", times[0]),
        ("litplug IBP step (after warmup)", times[1]),
        ("litplug IBP step + warmup regularizers", times[2]),
        ("litplug CROWN-IBP step (in the ramp)", times[3]),
        ("auto_LiRPA IBP step", next(peer_times) if callable(peer) else peer),
        ("auto_LiRPA CROWN-IBP step", next(peer_times) if callable(peer_crown) else peer_crown),
    ]

    print(
        f"\nCNN7(width={args.width}, linear={args.linear}) input {args.shape}, batch {args.batch}, "
        f"{args.threads} CPU threads"
    )
    print(f"{'training step':42s} {'ms':>9s} {'x plain':>8s}")
    base = times[0]
    for name, value in rows:
        if isinstance(value, str):
            print(f"{name:42s} {'-':>9s} {'-':>8s}  ({value})")
        else:
            print(f"{name:42s} {value * 1e3:9.1f} {value / base:8.2f}")
    print(f"{'CROWN-IBP step / IBP step':42s} {'':9s} {times[3] / times[1]:8.2f}")
    print(
        f"{'IBP step, channels-last / row-major boxes':42s} {'':9s} {times[1] / times[4]:8.2f}  "
        f"(CPU time {cpu[1] / cpu[4]:.2f})"
    )
    if callable(peer_crown):
        print(f"{'CROWN-IBP step / auto_LiRPA CROWN-IBP step':42s} {'':9s} {times[3] / times[-1]:8.2f}")

    model.eval()
    xe = torch.rand(4 * args.batch, *args.shape)
    ye = torch.randint(0, 10, (4 * args.batch,))
    lower, upper = model.box(xe, args.eps)
    spec = margin_spec(ye, 10)
    with torch.no_grad():
        t_plain, t_cert, t_crown_ibp, t_bounds, t_cert_row = median_times(
            [
                lambda: model.backbone(xe),
                lambda: model.certify(xe, ye),
                lambda: model.certify(xe, ye, "crown-ibp"),
                lambda: crown_bounds(model.backbone, lower, upper, "crown-ibp", spec),
                row_major(lambda: model.certify(xe, ye)),
            ],
            args.steps,
            cpu=cpu,
        )
    print(f"\n{'evaluation (batch %d)' % len(xe):42s} {'samples/s':>9s} {'x plain':>8s}")
    print(f"{'plain forward':42s} {len(xe) / t_plain:9.0f} {1.0:8.2f}")
    print(f"{'CertifiedClassifier.certify (verified, IBP)':42s} {len(xe) / t_cert:9.1f} {t_plain / t_cert:8.2f}")
    print(f"{'certify(method=crown-ibp)':42s} {len(xe) / t_crown_ibp:9.1f} {t_plain / t_crown_ibp:8.2f}")
    print(f"{'crown_bounds(method=crown-ibp), margins':42s} {len(xe) / t_bounds:9.1f} {t_plain / t_bounds:8.2f}")
    print(
        f"{'certify, channels-last / row-major boxes':42s} {'':9s} {t_cert / t_cert_row:8.2f}  "
        f"(CPU time {cpu[1] / cpu[4]:.2f}; time per call)"
    )


def _torch_compat_for_auto_lirpa() -> None:
    """auto_LiRPA 0.3 (2022, the newest release on PyPI) targets torch < 1.13 and calls two torch
    internals that later torch removed; restore them in torch (auto_LiRPA's code is untouched):
    ``torch.onnx.symbolic_helper._set_opset_version`` and ``torch._C.Node.__getitem__`` (what
    torch's own ``_node_get`` does)."""
    import torch.onnx.symbolic_helper as helper

    if not hasattr(helper, "_set_opset_version"):
        try:
            from torch.onnx._globals import GLOBALS  # torch 1.13 - 2.8
        except ImportError:
            from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

        def _set_opset_version(version: int) -> None:
            GLOBALS.export_onnx_opset_version = version

        helper._set_opset_version = _set_opset_version
    if not hasattr(torch._C.Node, "__getitem__"):
        torch._C.Node.__getitem__ = lambda node, key: getattr(node, node.kindOf(key))(key)


def auto_lirpa_step(
    backbone: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, crown_ibp: bool = False
) -> Callable[[], None] | str:
    """auto_LiRPA's IBP training step as in Shi et al. 2021's code: a clean forward (which sets the
    train-mode batch-norm statistics from the clean batch, as litplug does), IBP lower bounds of the
    9 margins ``z_y - z_j`` with the spec folded into the last linear layer, robust cross-entropy,
    backward. Margins agree with litplug's ``margin_bounds`` to float rounding in eval and train mode.
    ``crown_ibp``: its CROWN-IBP step as in its examples/vision/simple_training.py, in the ramp:
    IBP bounds, then CROWN bounds on them (``method="backward"``, lower only), mixed half and half."""
    import importlib.util

    if importlib.util.find_spec("auto_LiRPA") is None:
        return "auto_LiRPA not installed; see this script's docstring for its side venv"
    try:
        _torch_compat_for_auto_lirpa()
        from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
    except Exception as err:  # noqa: BLE001 - any import failure means "peer unavailable"
        return f"auto_LiRPA unavailable: {type(err).__name__}: {err}"[:120]
    import copy

    # Convert an eval-mode copy (auto_LiRPA's advice for batch norm), then train. The BoundedModule
    # shares the copy's parameters and keeps its own running statistics.
    net = copy.deepcopy(backbone).eval()
    bounded = BoundedModule(net, torch.zeros_like(x))
    bounded.train()
    eye = torch.eye(10)
    spec = eye[y].unsqueeze(1) - eye.unsqueeze(0)
    spec = spec[(eye[y] == 0)].view(len(y), 9, 10)

    def step() -> None:
        net.zero_grad()  # not bounded.zero_grad(): BoundedModule.parameters() fails on torch >= 2.0
        box = BoundedTensor(
            x, PerturbationLpNorm(norm=float("inf"), eps=eps, x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1))
        )
        bounded(box)
        lower, _ = bounded.compute_bounds(x=(box,), C=spec, method="IBP", bound_upper=False)
        if crown_ibp:
            crown, _ = bounded.compute_bounds(IBP=False, C=spec, method="backward", bound_upper=False)
            lower = 0.5 * crown + 0.5 * lower
        F.cross_entropy(torch.cat([torch.zeros_like(lower[:, :1]), -lower], 1), torch.zeros_like(y)).backward()

    return step


if __name__ == "__main__":
    main()
