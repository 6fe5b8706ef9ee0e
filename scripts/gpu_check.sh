#!/usr/bin/env bash
# One-call GPU check: the flash-attn path and its numerics, the GPU tests, bf16 attention and
# LM benchmarks and a short bf16 training run of the GPU preset, with a report under $OUT
# (default ./gpu_report). Every section has its own time limit so the whole stays bounded.
#
#   bash scripts/gpu_check.sh
#   SECTIONS="tests vit" bash scripts/gpu_check.sh     # only some sections
#
# Sections: pad (padding-mask profile), sweep (flash head dims), tests (pytest -m gpu),
# attn (attention benchmark), lm (LM training benchmark, d1024), lmbig (d2048, seq 2048),
# lmgen (generation vs transformers), vit (ViT vs timm), speech (speech encoder vs
# torchaudio's Conformer), task (the lm GPU preset).
#
# Optional inputs, for a machine that cannot reach a package index:
#   .whl/*.whl      wheels installed into /tmp/site (hydra-core, omegaconf, flash-attn-4, ...)
#   .whl/*.tar.xz   package trees unpacked into /tmp/site (e.g. nvidia_cutlass_dsl/, the CuTe
#                   DSL that FlashAttention-4 compiles its kernels with)
#   .gpudata/       a prepared data cache (ATTNKIT_DATA) with shakespeare/{train,val}.txt
set -uo pipefail
OUT=${OUT:-gpu_report}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
T_PAD=${T_PAD:-60} T_SWEEP=${T_SWEEP:-90} T_TESTS=${T_TESTS:-100} T_ATTN=${T_ATTN:-120} T_LM=${T_LM:-40}
T_TASK=${T_TASK:-75} T_VIT=${T_VIT:-60} T_GEN=${T_GEN:-150} T_BIG=${T_BIG:-60}
T_SPEECH=${T_SPEECH:-60}
SECTIONS=${SECTIONS:-pad sweep tests attn lm task}
GEN_BATCHES=${GEN_BATCHES:-1 8} VIT_REPEATS=${VIT_REPEATS:-10}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
log() { echo "=== $* ($(date +%T))" | tee -a "$OUT/summary.txt"; }

mkdir -p /tmp/site
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | tail -n 3
fi
for t in .whl/*.tar.xz; do [ -f "$t" ] && tar xJf "$t" -C /tmp/site; done
# The CuTe DSL's wheel puts its packages on the path with a .pth file, which PYTHONPATH skips.
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/python_packages:${PYTHONPATH:-}
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa_cache
[ -d .gpudata ] && export ATTNKIT_DATA=$PWD/.gpudata

# torch-c-dlpack-ext is an optional speed-up of tvm-ffi built against one torch ABI: if the
# flash import fails with it, retry without it.
if ! $PY -c "import flash_attn.cute" 2>"$OUT/flash_import_error.txt"; then
  tail -n 3 "$OUT/flash_import_error.txt"
  rm -rf /tmp/site/torch_c_dlpack_ext*
fi

log "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
  | tee -a "$OUT/summary.txt"
$PY - <<'EOF' 2>&1 | tee -a "$OUT/summary.txt"
import torch
from modules.attention import flash_available, _load_flash
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
loaded = _load_flash()
print("flash-attn usable:", flash_available())
if isinstance(loaded, str):
    print("flash-attn import errors:", loaded)
else:
    print("flash module:", loaded[0].__module__, "dropout:", loaded[2], "used by auto:", loaded[3])
EOF

if want pad; then
log "key padding: host vs kernel time per call (direct SDPA, attend, zeroing V instead)"
timeout "$T_PAD" $PY scripts/profile_padding.py --lengths 1024 4096 2>&1 | grep -v Warning \
  | tee -a "$OUT/summary.txt"

fi

if want sweep; then
log "flash-attn numerics across head dims (vs float64 math, next to SDPA's error)"
timeout "$T_SWEEP" $PY scripts/flash_check.py --head-dims 32 256 64 96 128 2>&1 \
  | grep -v Warning | tee -a "$OUT/summary.txt"

fi

if want vit; then
for args in "--pool token" "--pool mean" "--pool token --embed-dim 768 --heads 12 --batch 128"; do
  log "ViT benchmark vs timm, bf16 autocast, batch 256 unless set: $args"
  timeout "$T_VIT" $PY scripts/bench_vit.py --device cuda --dtype bfloat16 --batch 256 \
    --repeats "$VIT_REPEATS" $args 2>&1 | grep -v Warning | tee -a "$OUT/bench_vit.txt" | tail -n 5
done
fi

if want speech; then
for args in "--batch 64 --frames 400" "--batch 32 --frames 1000 --embed-dim 256 --ffn 1024"; do
  log "speech encoder benchmark vs torchaudio Conformer, bf16 autocast: $args"
  timeout "$T_SPEECH" $PY scripts/bench_speech.py --device cuda --dtype bfloat16 $args 2>&1 \
    | grep -v Warning | tee -a "$OUT/bench_speech.txt" | tail -n 7
done
fi

if want lmbig; then
log "LM training benchmark, bf16 autocast, d2048 x 8, GQA 16:4, seq 2048, attention auto"
timeout "$T_BIG" $PY scripts/bench_lm.py --device cuda --dtype bfloat16 --embed-dim 2048 \
  --depth 8 --heads 16 --kv-heads 4 --mlp 5632 --seq 2048 --batch 4 --vocab 32000 \
  --repeats 6 --skip-generate 2>&1 | tee "$OUT/bench_lm_big.txt" | tail -n 6
fi

if want lmgen; then
log "LM generation benchmark, bf16, d1024 x 12, batch $GEN_BATCHES, eager and compiled"
timeout "$T_GEN" $PY scripts/bench_lm.py --device cuda --dtype bfloat16 --embed-dim 1024 \
  --depth 12 --heads 16 --kv-heads 4 --mlp 2816 --vocab 32000 --new-tokens 128 \
  --repeats 5 --skip-train --gen-batches $GEN_BATCHES 2>&1 | tee "$OUT/bench_lm_gen.txt" | grep -v Warning | tail -n 14
fi

if want tests; then
log "GPU tests: flash vs the math reference, flash LM vs SDPA LM, compiled decoding on CUDA"
timeout "$T_TESTS" $PY -m pytest -v -p no:cacheprovider -m gpu --tb=short -W ignore \
  tests/test_attention.py tests/test_modules.py > "$OUT/pytest_gpu.txt" 2>&1
grep -E "PASSED|FAILED|SKIPPED|^E |passed|failed" "$OUT/pytest_gpu.txt" | tail -n 40 \
  | tee -a "$OUT/summary.txt"

fi

if want attn; then
log "attention benchmark, bf16"
timeout "$T_ATTN" $PY scripts/bench_attention.py --device cuda --dtype bfloat16 \
  --lengths 1024 4096 16384 --memory-lengths 16384 --tokens 16384 --repeats 8 \
  --json "$OUT/bench_attention.json" 2>&1 | tee "$OUT/bench_attention.txt" | tail -n 90

fi

if want lm; then
for att in sdpa flash; do
  log "LM training benchmark, bf16 autocast, d1024 x 12, GQA 16:4, seq 1024, attention $att"
  timeout "$T_LM" $PY scripts/bench_lm.py --device cuda --dtype bfloat16 --embed-dim 1024 \
    --depth 12 --heads 16 --kv-heads 4 --mlp 2816 --seq 1024 --batch 8 --vocab 32000 \
    --repeats 8 --skip-generate --attention $att 2>&1 | tee "$OUT/bench_lm_$att.txt" | tail -n 6
done

fi

if want task; then
log "lm task, GPU preset (bf16-mixed, attention auto), 100 steps"
timeout "$T_TASK" $PY -m tasks.lm experiment=lm_gpu trainer.max_steps=100 \
  trainer.val_check_interval=50 trainer.limit_val_batches=10 trainer.log_every_n_steps=25 \
  generate.max_new_tokens=60 run_dir=/tmp/lm_gpu > "$OUT/lm_gpu_log.txt" 2>&1
tail -n 25 "$OUT/lm_gpu_log.txt"
cp /tmp/lm_gpu/results.json "$OUT/lm_gpu_results.json" 2>/dev/null
fi

log "done"
