#!/usr/bin/env bash
# The GPU check: run on an offline NVIDIA machine (torch 2.11+cu130, no vLLM, no network) from this checkout,
# with what scripts/gpu_bundle.sh puts in .gpu/ (docs/platforms.md). Never part of CI.
#
#   bash scripts/gpu_check.sh STEP...
#     setup          unpack the bundle into /tmp/site, install the plugin and deps there, run the bundle's first
#                    smoke stages (fatbin, ops, model: random bf16 weights in SmolLM2's shapes, /tmp/smollm2-random)
#     smoke:A,B      more of the bundle's smoke stages (vLLM alone: eager, fa3, compiled, serve, ...)
#     kernels        benchmarks/kernels.py (time per call, vs attention, bytes/s vs HBM peak)
#     llama8b        write a random-weight model in Llama-3.1-8B's shapes (bf16, generated on the GPU) to
#                    /tmp/llama8b-random, with SmolLM2's tokenizer
#     throughput     benchmarks/throughput.py --gpu on that model ($THROUGHPUT_ARGS, default: compiled, one round
#                    of vanilla, infokv and the ceiling, FLASH_ATTN), writing throughput-gpu.json
#     tests          python -m pytest tests/gpu (the GPU suite; PYTEST_ARGS adds options, e.g. -k)
#
# Every step is set up idempotently, so a later call on a fresh machine runs `setup` again first. Logs and
# results go to $OUT (default /tmp/out): gpu_check.log (every step's output), kernels.json, smoke_logs.txt.
set -uo pipefail

export OUT=${OUT:-/tmp/out}
SITE=/tmp/site
mkdir -p "$OUT"
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1
export VLLM_USE_FLASHINFER_SAMPLER=0  # flashinfer is not in the bundle
export TRITON_INTERPRET=0  # the test conftest defaults it to 1 for CPU machines; here the kernels compile
export INFOKV_GPU_MODEL=${INFOKV_GPU_MODEL:-/tmp/smollm2-random}
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

step_setup() {
  [ -f $SITE/vllm/__init__.py ] || python3 -c "import sys, tarfile
for f in sys.argv[1:]: tarfile.open(f).extractall('$SITE', filter='tar')" .gpu/vllm-site.tar.xz .gpu/vllm-fa3.tar.xz
  python3 -m pip install -q --no-deps --no-index --no-compile --upgrade --target $SITE .gpu/deps/*.whl \
    .gpu/infokv_vllm-*.whl
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 .gpu/smoke.py fatbin ops model
}

step_kernels() {
  timeout 300 python3 benchmarks/kernels.py && cp benchmarks/results/kernels.json "$OUT/"
}

LLAMA8B=/tmp/llama8b-random

step_llama8b() {  # after setup, which writes /tmp/smollm2-random (the tokenizer comes from there)
  timeout 300 python3 -m infokv_testing.random_models llama-3.1-8b --tokenizer /tmp/smollm2-random \
    --out $LLAMA8B --device cuda
}

step_throughput() {
  [ -f $LLAMA8B/model.safetensors.index.json ] || step_llama8b
  eval "local options=(${THROUGHPUT_ARGS:---mode compiled --repeats 1 --methods none,infokv --ample-methods none --attention-backend FLASH_ATTN})"
  timeout $((${GPU_CHECK_SECONDS:-590} - SECONDS)) python3 benchmarks/throughput.py --gpu --model $LLAMA8B \
    --name throughput-gpu "${options[@]}"
  local status=$?
  cp benchmarks/results/throughput-gpu.* "$OUT/" 2>/dev/null  # written after every run, also when cut short
  return $status
}

step_tests() {
  eval "local options=(${PYTEST_ARGS:-})"  # shell words, so that PYTEST_ARGS="-k 'not serve'" keeps its quotes
  # within the device tool's 10 minutes per call, whatever the earlier steps took
  timeout $((${GPU_CHECK_SECONDS:-590} - SECONDS)) python3 -m pytest tests/gpu -v -rA --timeout 400 -p no:cacheprovider "${options[@]}"
}

for step in "$@"; do
  start=$SECONDS
  echo "=== $step"
  case $step in
    smoke:*) stages=${step#smoke:}; python3 .gpu/smoke.py ${stages//,/ } ;;
    *) "step_$step" ;;
  esac
  echo "=== $step: rc=$? in $((SECONDS - start)) s"
done
