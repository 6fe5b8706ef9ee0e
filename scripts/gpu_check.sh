#!/usr/bin/env bash
# One-call GPU check: GPU tests, the flash-attn path, bf16 benchmarks and a short bf16
# training run, with a report under $OUT (default ./gpu_report).
#
#   bash scripts/gpu_check.sh [base|flash|all]     # default: all
#
# base: device info, GPU tests, bf16 benchmarks on SDPA, a short bf16 training run.
# flash: the flash-attn path (tests and benchmarks), once flash-attn is importable.
#
# Optional inputs, when the machine cannot reach a package index:
#   .whl/*.whl           wheels to install into /tmp/site (hydra-core, omegaconf, ...)
#   .whl/*.tar.xz        pre-installed package trees to unpack into /tmp/site (flash-attn-4)
#   .gpustage/*.part-*   pieces of such a tree too large for one transfer: pieces are kept in
#                        /tmp/stage across calls and unpacked once all have arrived
#   .gpudata/            a prepared data cache (ATTNKIT_DATA) with shakespeare/{train,val}.txt
set -uo pipefail
PHASE=${1:-all}
OUT=${OUT:-gpu_report}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
log() { echo "=== $*" | tee -a "$OUT/summary.txt"; }

if compgen -G ".whl/*.whl" >/dev/null || compgen -G ".whl/*.tar.xz" >/dev/null; then
  mkdir -p /tmp/site
  compgen -G ".whl/*.whl" >/dev/null && $PY -m pip install -q --no-index --no-deps \
    --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  for t in .whl/*.tar.xz; do [ -f "$t" ] && tar xJf "$t" -C /tmp/site; done
fi
mkdir -p /tmp/stage /tmp/site
compgen -G ".gpustage/*" >/dev/null && cp .gpustage/* /tmp/stage/
if [ "$PHASE" != base ] && compgen -G "/tmp/stage/*.part-*" >/dev/null; then
  for prefix in $(ls /tmp/stage/*.part-* | sed 's/\.part-.*//' | sort -u); do
    cat "$prefix".part-* | tar xJf - -C /tmp/site && echo "unpacked $prefix" \
      || echo "could not unpack $prefix (a piece missing?)"
  done
fi
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:${PYTHONPATH:-}
[ -d .gpudata ] && export ATTNKIT_DATA=$PWD/.gpudata

log "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
  --format=csv | tee -a "$OUT/summary.txt"
$PY - <<'EOF' 2>&1 | tee -a "$OUT/summary.txt"
import torch
from modules.attention import flash_available, _flash_module
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
ok = flash_available()
print("flash-attn usable:", ok)
if not ok:
    from modules.attention import _load_flash
    print("flash-attn import errors:", _load_flash())
    import traceback
    try:
        import flash_attn.cute  # noqa: F401
    except Exception:
        traceback.print_exc()
if ok:
    f, _, drop = _flash_module()
    print("flash module:", f.__module__, "dropout support:", drop)
EOF

if [ "$PHASE" = base ] || [ "$PHASE" = all ]; then
log "GPU tests (pytest -m gpu) and the CPU suite's attention/module tests on this machine"
timeout 240 $PY -m pytest -q -p no:cacheprovider -m "gpu or not slow" tests/test_attention.py \
  tests/test_modules.py 2>&1 | tail -n 15 | tee -a "$OUT/summary.txt"

log "attention benchmark, bf16"
timeout 300 $PY scripts/bench_attention.py --device cuda --dtype bfloat16 \
  --lengths 1024 4096 16384 --memory-lengths 4096 16384 --tokens 16384 --repeats 20 \
  --json "$OUT/bench_attention.json" 2>&1 | tee "$OUT/bench_attention.txt" | tail -n 60

log "LM benchmark, bf16 autocast, d1024 x 12 layers, GQA 16:4, seq 1024"
timeout 240 $PY scripts/bench_lm.py --device cuda --dtype bfloat16 --embed-dim 1024 --depth 12 \
  --heads 16 --kv-heads 4 --mlp 2816 --seq 1024 --batch 8 --vocab 32000 --repeats 15 \
  --new-tokens 128 --no-compile-generate 2>&1 | tee "$OUT/bench_lm.txt" | tail -n 20

log "lm task on the GPU preset (bf16-mixed, attention auto), 300 steps"
timeout 300 $PY -m tasks.lm experiment=lm_gpu trainer.max_steps=300 \
  trainer.val_check_interval=150 trainer.limit_val_batches=20 trainer.log_every_n_steps=50 \
  generate.max_new_tokens=60 run_dir=/tmp/lm_gpu 2>&1 | tail -n 40 | tee "$OUT/lm_gpu.txt"
cp /tmp/lm_gpu/results.json "$OUT/lm_gpu_results.json" 2>/dev/null
fi

if [ "$PHASE" = flash ] || [ "$PHASE" = all ]; then
log "flash: GPU tests against the math reference"
timeout 200 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_attention.py 2>&1 \
  | tail -n 15 | tee -a "$OUT/summary.txt"
log "flash: attention benchmark (attend auto = flash) vs SDPA, bf16"
timeout 200 $PY scripts/bench_attention.py --device cuda --dtype bfloat16 --cases plain causal \
  --lengths 4096 16384 --memory-lengths 16384 --tokens 16384 --repeats 20 \
  --json "$OUT/bench_attention_flash.json" 2>&1 | tee "$OUT/bench_attention_flash.txt" \
  | tail -n 30
log "flash: LM training step, bf16, attention auto (flash)"
timeout 150 $PY scripts/bench_lm.py --device cuda --dtype bfloat16 --embed-dim 1024 --depth 12 \
  --heads 16 --kv-heads 4 --mlp 2816 --seq 1024 --batch 8 --vocab 32000 --repeats 15 \
  --skip-generate 2>&1 | tee "$OUT/bench_lm_flash.txt" | tail -n 8
fi
log "done"
