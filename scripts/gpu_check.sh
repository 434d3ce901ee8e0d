#!/usr/bin/env bash
# The CUDA checks, on a machine with a GPU, from the repository root:
#   scripts/gpu_check.sh                         every stage (figures into $OUT, default gpu-check/)
#   STAGES="tests bench" scripts/gpu_check.sh    some of them
# Stages:
#   tests   tests/test_cuda.py (the `cuda` marker): CPU and CUDA updates, C-EP's paths, the precision
#           policy, resume on CUDA, one NCCL rank, steps replayed from CUDA graphs against eager steps
#           for every net and rule, the fused Triton relaxation against torch's;
#   bench   `eprun bench --device cuda --json` on the MNIST-sized cases with steps replayed from CUDA
#           graphs (train.cuda_graphs auto) and eager (off), side by side; proto-mlp-1h at batch 500
#           both ways; the CIFAR-10 ConvNet replayed;
#   triton  proto-mlp-1h at batch 50 and 500 with the fused Triton relaxation (EPRUN_TRITON=1);
#   floor   the hand-written floor (benchmarks/gpu_step_floor.py), in the same session;
#   precision  EP's update under train.precision float32 / tf32 / bf16 against float64, per parameter,
#           with eager step times (benchmarks/precision_cuda.py), on the MNIST MLP and the CIFAR-10 ConvNet;
#   epoch   one MNIST epoch of ernoult2019/proto-mlp-1h-adam on CUDA, replayed (MNIST IDX files in
#           $EPRUN_DATA, default ./data).
# summary.txt gathers the figures. Each stage has a time limit; all of them together stay under
# 8 minutes (the limits sum to 465 s).
set -u
OUT=${OUT:-gpu-check}
STAGES=${STAGES:-tests bench triton floor precision epoch}
mkdir -p "$OUT"
export EPRUN_OFFLINE=1 EPRUN_DATA=${EPRUN_DATA:-data}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import pytest" 2>/dev/null || export PYTHONPATH="$PYTHONPATH:$PWD/.gpu/site"  # a vendored pytest, if any
stage() { [[ " $STAGES " == *" $1 "* ]]; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
} > "$OUT/machine.txt" 2>&1

if stage tests; then  # 120 s
  timeout 120 python -m pytest -q -s -p no:cacheprovider -m cuda tests/test_cuda.py > "$OUT/pytest.txt" 2>&1
  echo "exit code $?" >> "$OUT/pytest.txt"
fi

if stage bench; then  # 2 × (70 + 20) + 35 = 215 s
  CASES="--only proto-mlp-1h --only eb-mlp-1h --only cep-mlp-1h --only bptt-mlp-1h --only proto-mlp-3h --only conv-mnist"
  for graphs in auto off; do
    timeout 70 python -m eprun bench --device cuda --json --batches 30 --warmup 5 $CASES -s train.cuda_graphs=$graphs \
        > "$OUT/bench-$graphs.json" 2> "$OUT/bench-$graphs.log"
    echo "exit code $?" >> "$OUT/bench-$graphs.log"
    timeout 20 python -m eprun bench --device cuda --json --batches 100 --warmup 10 --only proto-mlp-1h \
        -s data.batch_size=500 -s train.cuda_graphs=$graphs > "$OUT/bench-b500-$graphs.json" 2>> "$OUT/bench-$graphs.log"
    echo "exit code $? (batch 500)" >> "$OUT/bench-$graphs.log"
  done
  timeout 35 python -m eprun bench --device cuda --json --batches 3 --warmup 2 --only conv-cifar10 \
      > "$OUT/bench-cifar-auto.json" 2> "$OUT/bench-cifar.log"
  echo "exit code $?" >> "$OUT/bench-cifar.log"
fi

if stage triton; then  # 2 × 20 s
  for batch in 50 500; do
    EPRUN_TRITON=1 timeout 20 python -m eprun bench --device cuda --json --batches 100 --warmup 10 --only proto-mlp-1h \
        -s data.batch_size=$batch > "$OUT/bench-triton-b$batch.json" 2>> "$OUT/bench-triton.log"
    echo "exit code $? (batch $batch)" >> "$OUT/bench-triton.log"
  done
fi

if stage floor; then  # 15 s
  timeout 15 python -m benchmarks.gpu_step_floor --batches 1000 > "$OUT/floor.txt" 2>&1
  echo "exit code $?" >> "$OUT/floor.txt"
fi

if stage precision; then  # 45 s
  timeout 45 python -m benchmarks.precision_cuda --batches 1 --rounds 1 > "$OUT/precision.txt" 2>&1
  echo "exit code $?" >> "$OUT/precision.txt"
fi

if stage epoch; then  # 30 s
  timeout 30 python -m eprun train ernoult2019/proto-mlp-1h-adam -s device=cuda --out "$OUT/runs" -q \
      > "$OUT/epoch.txt" 2>&1
  echo "exit code $?" >> "$OUT/epoch.txt"
fi

python - "$OUT" <<'PY' > "$OUT/summary.txt" 2>&1  # the figures in one place
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for name in sorted(out.glob("bench-*.json")):
    try:
        for r in json.loads(name.read_text()):
            print(name.stem, r["case"], "batch", r.get("batch"), f"train {r.get('train_eprun_samples_per_s', 0):,.0f}/s",
                  f"eval {r.get('eval_eprun_samples_per_s', 0):,.0f}/s", f"x{r.get('train_ratio', 0):.1f}",
                  r.get("cuda_graphs"), r.get("relax_engine"))
    except Exception as exc:
        print(name.stem, "unreadable:", exc)
for run in sorted(out.glob("runs/*/summary.json")):
    s = json.loads(run.read_text())
    print("epoch", s.get("status"), "test", s.get("test_accuracy"), f"{s.get('samples_per_s', 0):,.0f}/s",
          s.get("cuda_graphs"))
PY
tail -n 3 "$OUT"/*.txt "$OUT"/*.log 2>/dev/null | grep -v "^$"
cat "$OUT/summary.txt"
