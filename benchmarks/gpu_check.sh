#!/usr/bin/env bash
# GPU check of issues 3 and 4, for a session whose task is lent a device (about 5 minutes).
# Prepare here:   bash benchmarks/fetch_gpu_wheels.sh          (monai + pydantic wheels -> .whl/)
# Run there:      device run: command "bash benchmarks/gpu_check.sh", carry [".whl"], timeout_s 420
# It prints JSON from each step and copies it to $OUT. Not yet run on a device (see the note in
# docs/benchmarks.md): the first session with a GPU should run it and record what it printed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, monai; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'monai', monai.__version__)"

echo "== sampling: medidiff vs MONAI LatentDiffusionInferer (DDIM), fp32 and bf16 =="
timeout 150 python3 benchmarks/bench_sampling.py --device cuda --steps 50 --n 4 --repeats 3 --threads 8 \
  --no-equal-quality 2>&1 | tee "$OUT/sampling.json"

echo "== training: bf16, fp16 + GradScaler, fp32 (throughput, peak memory, non-finite steps) =="
timeout 120 python3 benchmarks/gpu_train_check.py --device cuda --steps 40 2>&1 | tee "$OUT/train.json"

echo "== reconstruction scaling: particles N in {1, 4, 16, 64}, fp32 and bf16 (pixel-space demo UNet) =="
# runs/ and demo_out/ are not in git, so the device has no checkpoint: time the demo pixel model's
# networks with random weights on a phantom (the cost does not depend on the weights).
timeout 150 python3 benchmarks/bench_scaling.py --device cuda --random-prior configs/model_pixel_demo.yaml \
  --steps 10 --threads 8 --workdir /tmp/bench_scaling 2>&1 | tee "$OUT/scaling.json"
