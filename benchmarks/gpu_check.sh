#!/usr/bin/env bash
# GPU check, one CUDA GPU, designed to finish in under 8 minutes:
#   1. tests/test_gpu.py (fp16 GradScaler with SAM and UnlearningMask, bf16-mixed, EMA offloaded
#      to host memory, FSDP2 on one GPU, FSDP1/DeepSpeed refused at setup); fails if they skip;
#   2. benchmarks/sharpness.py on the GPU (the benchmark with a --device option).
# Usage, from the repository root in the project's environment:
#   bash benchmarks/gpu_check.sh            # writes runs/gpu_check/{env,tests,sharpness}.txt
# Not yet run on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/gpu_check
mkdir -p "$out"

python - <<'PY' | tee "$out/env.txt"
import torch, lightning
print("torch", torch.__version__, "lightning", lightning.__version__, "cuda", torch.version.cuda)
if not torch.cuda.is_available():
    raise SystemExit("no CUDA GPU visible: nothing to check")
print("gpu", torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
PY

status=0
# -rs lists skips (DeepSpeed when not installed); a fully skipped run counts as a failure.
timeout 300 python -m pytest -q -rs tests/test_gpu.py 2>&1 | tee "$out/tests.txt" || status=1
if grep -q "needs a CUDA GPU" "$out/tests.txt"; then
    echo "tests/test_gpu.py skipped on this machine" >&2
    status=1
fi

timeout 150 python benchmarks/sharpness.py --device cuda --steps 40 --rounds 3 --threads 4 2>&1 | tee "$out/sharpness.txt" || status=1

echo "gpu_check: $([ $status -eq 0 ] && echo passed || echo FAILED); logs in $out/"
exit $status
