#!/usr/bin/env bash
# The GPU benchmark, run through the device tool from the repository root:
#   benchmarks/gpu_benchmark.sh OUT_DIR [--sections layer,train,model] [key=value ...]
# 1. unless SKIP_KERNEL_TESTS is set, the kernel tests on the GPU (METEORA_KERNEL_TEST_DEVICE=cuda);
# 2. python -m benchmarks with conf/benchmark/gpu.yaml, writing OUT_DIR/<gpu>.json, .md and .log.
# Needs torch, triton, transformers, peft and omegaconf (pure Python: where the machine lacks it, put
# omegaconf and antlr4 in a folder and name it in PYDEPS); no Hydra, DVC or MLflow.
set -euo pipefail
out=${1:?usage: benchmarks/gpu_benchmark.sh OUT_DIR [benchmark args...]}
shift
mkdir -p "$out"
export PYTHONPATH="src:.${PYDEPS:+:$PYDEPS}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers, peft, omegaconf; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'omegaconf', omegaconf.__version__)" | tee -a "$out/gpu.txt"
if [ -z "${SKIP_KERNEL_TESTS:-}" ]; then
  METEORA_KERNEL_TEST_DEVICE=cuda python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -n 30 | tee -a "$out/gpu.txt" || echo "KERNEL TESTS FAILED" | tee -a "$out/gpu.txt"
fi
name=$(python3 -c "import re, torch; m = re.search(r'\b([A-Z]+[0-9]+[A-Z]*)\b', torch.cuda.get_device_name()); print(m.group(1).lower() if m else 'gpu')")
python3 -m benchmarks --config conf/benchmark/gpu.yaml --out "$out/$name.json" "$@" 2>&1 | tee "$out/$name.log"
