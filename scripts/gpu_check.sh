#!/usr/bin/env bash
# The CUDA checks in one go, on a machine with a GPU, from the repository root:
#   scripts/gpu_check.sh            (figures into $OUT, default gpu-check/)
# 1. tests/test_cuda.py (the `cuda` marker): CPU and CUDA updates, C-EP's paths, the precision
#    policy, resume on CUDA, one NCCL rank;
# 2. `eprun bench --device cuda --json` on the MNIST-sized cases;
# 3. one MNIST epoch of ernoult2019/proto-mlp-1h-adam on CUDA (MNIST IDX files in $EPRUN_DATA,
#    default ./data).
# Each stage has a time limit; together they stay under 8 minutes on one H200.
set -u
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export EPRUN_OFFLINE=1 EPRUN_DATA=${EPRUN_DATA:-data}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import pytest" 2>/dev/null || export PYTHONPATH="$PYTHONPATH:$PWD/.gpu/site"  # a vendored pytest, if any

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
} > "$OUT/machine.txt" 2>&1

timeout 200 python -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py > "$OUT/pytest.txt" 2>&1
echo "exit code $?" >> "$OUT/pytest.txt"

timeout 150 python -m eprun bench --device cuda --json --batches 30 --warmup 5 \
    --only proto-mlp-1h --only eb-mlp-1h --only cep-mlp-1h --only bptt-mlp-1h --only proto-mlp-3h \
    --only conv-mnist > "$OUT/bench.json" 2> "$OUT/bench.log"
echo "exit code $?" >> "$OUT/bench.log"

timeout 90 python -m eprun train ernoult2019/proto-mlp-1h-adam -s device=cuda --out "$OUT/runs" -q \
    > "$OUT/epoch.txt" 2>&1
echo "exit code $?" >> "$OUT/epoch.txt"
tail -n 3 "$OUT"/pytest.txt "$OUT"/bench.log "$OUT"/epoch.txt
