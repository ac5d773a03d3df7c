#!/usr/bin/env bash
# The GPU run of issue 5, made through the device tool from the repository root:
#   scripts/gpu_benchmark.sh "$OUT" [--sections layer,train,model] [--set layer.tokens=[1,16] ...]
# 1. the kernel tests compiled on the GPU (tests/test_kernels.py with METEORA_KERNEL_TEST_DEVICE=cuda);
# 2. python -m meteora.benchmark with conf/benchmark/gpu.yaml, writing OUT/<gpu>.json (+ .md, .log).
# Needs only torch, triton, transformers and peft on that machine (no Hydra, DVC or MLflow).
set -euo pipefail
out=${1:?usage: scripts/gpu_benchmark.sh OUT_DIR [benchmark args...]}
shift
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/gpu.txt"
if [ -z "${SKIP_KERNEL_TESTS:-}" ]; then
  METEORA_KERNEL_TEST_DEVICE=cuda python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -n 30 | tee -a "$out/gpu.txt" || echo "KERNEL TESTS FAILED" | tee -a "$out/gpu.txt"
fi
name=$(python3 -c "import re, torch; m = re.search(r'\b([A-Z]+[0-9]+[A-Z]*)\b', torch.cuda.get_device_name()); print(m.group(1).lower() if m else 'gpu')")
python3 -m meteora.benchmark --config conf/benchmark/gpu.yaml --out "$out/$name.json" "$@" 2>&1 | tee "$out/$name.log"
python3 -m meteora.benchmark --markdown "$out/$name.json" > "$out/$name.md"
