#!/usr/bin/env bash
# The CUDA checks in one go, on a machine with a GPU, from the repository root:
#   scripts/gpu_check.sh            (figures into $OUT, default gpu-check/)
# 1. tests/test_cuda.py (the `cuda` marker): CPU and CUDA updates, C-EP's paths, the precision
#    policy, resume on CUDA, one NCCL rank;
# 2. `eprun bench --device cuda --json` on the MNIST-sized cases, proto-mlp-1h at batch 500 and the
#    CIFAR-10 ConvNet, with steps replayed from CUDA graphs (train.cuda_graphs auto) and eager (off);
# 3. proto-mlp-1h with the fused Triton relaxation (EPRUN_TRITON=1), and the hand-written floor
#    (benchmarks/gpu_step_floor.py);
# 4. one MNIST epoch of ernoult2019/proto-mlp-1h-adam on CUDA each way (MNIST IDX files in
#    $EPRUN_DATA, default ./data); summary.txt gathers the figures.
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

timeout 170 python -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py > "$OUT/pytest.txt" 2>&1
echo "exit code $?" >> "$OUT/pytest.txt"

CASES="--only proto-mlp-1h --only eb-mlp-1h --only cep-mlp-1h --only bptt-mlp-1h --only proto-mlp-3h --only conv-mnist"
for graphs in auto off; do  # steps replayed from CUDA graphs, then eager steps, side by side
  timeout 120 python -m eprun bench --device cuda --json --batches 30 --warmup 5 $CASES -s train.cuda_graphs=$graphs \
      > "$OUT/bench-$graphs.json" 2> "$OUT/bench-$graphs.log"
  echo "exit code $?" >> "$OUT/bench-$graphs.log"
  timeout 40 python -m eprun bench --device cuda --json --batches 100 --warmup 10 --only proto-mlp-1h \
      -s data.batch_size=500 -s train.cuda_graphs=$graphs > "$OUT/bench-b500-$graphs.json" 2>> "$OUT/bench-$graphs.log"
  timeout 60 python -m eprun bench --device cuda --json --batches 3 --warmup 2 --only conv-cifar10 \
      -s train.cuda_graphs=$graphs > "$OUT/bench-cifar-$graphs.json" 2>> "$OUT/bench-$graphs.log"
done

for batch in 50 500; do  # the fused Triton relaxation (EPRUN_TRITON=1), steps replayed from graphs
  EPRUN_TRITON=1 timeout 40 python -m eprun bench --device cuda --json --batches 100 --warmup 10 --only proto-mlp-1h \
      -s data.batch_size=$batch > "$OUT/bench-triton-b$batch.json" 2>> "$OUT/bench-triton.log"
  echo "exit code $?" >> "$OUT/bench-triton.log"
done

timeout 30 python -m benchmarks.gpu_step_floor --batches 1000 > "$OUT/floor.txt" 2>&1  # the hand-written floor
echo "exit code $?" >> "$OUT/floor.txt"

for graphs in auto off; do  # one MNIST epoch each way
  timeout 60 python -m eprun train ernoult2019/proto-mlp-1h-adam -s device=cuda -s train.cuda_graphs=$graphs \
      --out "$OUT/runs-$graphs" -q > "$OUT/epoch-$graphs.txt" 2>&1
  echo "exit code $?" >> "$OUT/epoch-$graphs.txt"
done
python - "$OUT" <<'PY' > "$OUT/summary.txt" 2>&1  # the figures in one place
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for name in sorted(out.glob("bench-*.json")):
    try:
        for r in json.loads(name.read_text()):
            print(name.stem, r["case"], r.get("batch"), f"train {r.get('train_eprun_samples_per_s', 0):,.0f}/s",
                  f"eval {r.get('eval_eprun_samples_per_s', 0):,.0f}/s", r.get("cuda_graphs"))
    except Exception as exc:
        print(name.stem, "unreadable:", exc)
for run in sorted(out.glob("runs-*/*/summary.json")):
    s = json.loads(run.read_text())
    print(run.parent.parent.name, s.get("status"), "test", s.get("test_accuracy"), f"{s.get('samples_per_s', 0):,.0f}/s",
          s.get("cuda_graphs"))
PY
tail -n 3 "$OUT"/pytest.txt "$OUT"/bench-*.log "$OUT"/floor.txt "$OUT"/epoch-*.txt
cat "$OUT/summary.txt"
