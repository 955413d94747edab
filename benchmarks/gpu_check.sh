#!/usr/bin/env bash
# GPU check of issues 3, 4 and 19, for a session whose task is lent a device (about 10 minutes).
# Prepare here:   bash benchmarks/fetch_gpu_wheels.sh          (monai + pydantic wheels -> .whl/)
# Run there:      device run: command "bash benchmarks/gpu_check.sh", carry [".whl"], timeout_s 600
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

echo "== SMC kernels (issue 19): reference / compiled / triton, N in {8, 32, 128}, 32^3..128^3, fp32/bf16/fp16 =="
# The JSON file is rewritten after every row, so a run cut short by the timeout keeps what it measured:
# the exactness checks first (resampling indices of compiled and triton against the reference on this
# device), then the weight kernels, then the states from the issue's N = 32, 64^3 outwards. 110 s keeps
# the whole script within ~9 minutes.
timeout 110 python3 benchmarks/bench_kernels.py --device cuda --full --sizes 64 128 32 --particles 32 128 8 \
  --max-gb 48 --repeats 5 --threads 8 --json "$OUT/kernels.json" >/dev/null
python3 - "$OUT/kernels.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(json.dumps({k: d.get(k) for k in ("device", "bandwidth", "implementations", "exactness")}, indent=1))
for r in d["rows"]:
    if "seconds" in r:
        print(r["kernel"], r["n"], r["side"], r["dtype"], {k: f"{v * 1e3:.3f} ms, {r['roofline_fraction'][k]:.2f} roof" for k, v in r["seconds"].items()})
    else:
        print(r["kernel"], r["n"], r["side"], r["dtype"], r["skipped"])
PY

echo "== channels_last_3d against the default layout (issue 19, item 5): the shipped networks, bf16 autocast =="
# The shipped checkpoints are tracked files, so they travel with the working tree.
timeout 60 python3 benchmarks/bench_memory_format.py --device cuda --bf16 --batch 8 --repeats 10 \
  --json "$OUT/memory_format.json" 2>/dev/null | tail -n +1 >/dev/null
cat "$OUT/memory_format.json" 2>/dev/null
