"""Rank entry point for ``harness.run_distributed``: ``launch.py FILE FUNC STRATEGY OUT KWARGS``.

Lightning's launcher re-runs this same command line for the other ranks (LOCAL_RANK set)."""

import importlib.util
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from harness import make_strategy  # noqa: E402

from litplug.plumbing import end_distributed_run  # noqa: E402


def main() -> None:
    file, func, strategy, out, kwargs = sys.argv[1:6]
    spec = importlib.util.spec_from_file_location(f"_worker_{Path(file).stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.set_num_threads(1)
    result = getattr(module, func)(strategy=make_strategy(strategy), tmp_dir=Path(out), **json.loads(kwargs))
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.save(result, Path(out) / f"rank{rank}.pt")
    end_distributed_run()  # every rank has saved its result


if __name__ == "__main__":
    main()
