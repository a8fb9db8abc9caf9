#!/usr/bin/env bash
# The accelerator checks in one command, for the first time a GPU or TPU is at hand (issue 19, item 6):
#   1. the device (nvidia-smi where there is one, jax.devices());
#   2. the parity tests of the fused attention kernels against XLA's einsum (cuDNN flash on GPUs, splash on TPUs);
#   3. bench/unet_train_step.py --preset=pcdm: our UNet training step and forward pass against diffusers' PyTorch
#      UNet at PCDMs stage-2 shapes in bf16, in the same run on the same device;
#   4. bench/attention_memory.py in bf16 at the 512x352 stage-2 canvas: compiled temp memory per kernel;
#   5. bench/sample_pcdm.py --preset=full: the three-stage PCDMs sampler (20 DDIM steps per stage, guidance 2)
#      against a PyTorch loop of the same full-size networks in bf16, in the same run on the same device;
#   6. bench/memory_plan.py: the compiled memory of the full-size PCDMs stage-2 training step at res 512, fp32,
#      per-device batch 1, no remat, chunked attention (against the CPU compiler's row in bench/RESULTS.md).
# Every step's output goes to <out>/accelerator.log; the script then appends a dated section with it to
# bench/RESULTS.md and copies that file to <out>. <out> is $OUT where set (the device tool), else
# bench/accelerator_out. Each step has its own time limit; the limits add up to 9.5 minutes (set from the first
# GPU run, 2026-12-04 on an H200: bench/RESULTS.md; a step that hits its limit keeps its output so far).
# SAMPLE_PRESET=none leaves out step 5.
#
#   bash bench/accelerator.sh                                 # on a machine with jax[cuda] or jax[tpu], torch, diffusers
#   UNET_PRESET=small ATTENTION_TOKENS=1024 SAMPLE_PRESET=small bash bench/accelerator.sh  # a dry run on a CPU
#
# Packages missing there (diffusers, importlib_metadata, ml_collections on this workplace's GPU machine; found by
# a dry run with every other package of .venv hidden) are installed from .whl/
# when that folder holds wheels: bench/accelerator_wheels.sh downloads them on a machine with network.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/accelerator_out}
mkdir -p "$out"
log=$out/accelerator.log
: >"$log"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/accelerator_site \
    .whl/*.whl || { echo "bench/accelerator.sh: installing the wheels in .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/accelerator_site${PYTHONPATH:+:$PYTHONPATH}
fi
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
# JAX picks the accelerator itself: JAX_PLATFORMS set but empty (tests/conftest.py picks the CPU where it is unset;
# naming the platform does not do: "gpu" also asks for ROCm, whose failing start is then fatal). JAX allocates GPU
# memory as it needs it instead of taking 75 % at start, so PyTorch in the same process finds room.
export JAX_PLATFORMS="" XLA_PYTHON_CLIENT_PREALLOCATE=false
backend=$($python -c "import jax; print(jax.default_backend())") || { echo "bench/accelerator.sh: jax does not import" >&2; exit 1; }
failed=0

step() {   # step <title> <seconds> <command...>: runs it with a time limit, its output into the log
  local title=$1 limit=$2
  shift 2
  echo "### $title" | tee -a "$log"
  echo '```' >>"$log"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local status=${PIPESTATUS[0]}
  echo '```' >>"$log"
  echo "($((SECONDS - start)) s of its ${limit} s)" | tee -a "$log"
  [ "$status" -eq 0 ] || { echo "(exit status $status)" | tee -a "$log"; failed=1; }
}

step "device" 15 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; \
  $python -c 'import jax; print(jax.__version__, jax.devices())'"
step "fused attention parity (tests)" 80 $python -m pytest -q -p no:cacheprovider -rs \
  tests/test_attention_kernels.py tests/test_nn_blocks.py tests/test_swin.py -k "cudnn or splash or auto"
step "UNet training step vs PyTorch, preset ${UNET_PRESET:-pcdm} (pcdm: PCDMs stage-2 shapes, bf16)" 230 \
  $python bench/unet_train_step.py --preset="${UNET_PRESET:-pcdm}"
step "attention memory per kernel, ${ATTENTION_TOKENS:-5632} tokens (5632: the 512x352 stage-2 canvas), bf16" 30 \
  $python bench/attention_memory.py --dtype=bfloat16 --tokens="${ATTENTION_TOKENS:-5632}"
if [ "${SAMPLE_PRESET:-full}" != none ]; then
  step "PCDMs three-stage sampler vs PyTorch, preset ${SAMPLE_PRESET:-full} (full: 512x512, SD 2.1-base UNets, bf16)" \
    100 $python bench/sample_pcdm.py --preset="${SAMPLE_PRESET:-full}" --steps=2
fi
# On a GPU without autotuning, which runs candidate kernels while compiling: the H200 compiled the batch-1 cell in
# 89 s so; with autotuning the batch-8 cell had not compiled after 130 s.
plan_flags=${XLA_FLAGS:-}
[ "$backend" = gpu ] && plan_flags="$plan_flags --xla_gpu_autotune_level=0"
step "memory plan: PCDMs stage 2, res 512, batch 1, fp32, no remat, chunked (GPU: no autotuning)" 110 \
  env XLA_FLAGS="$plan_flags" $python bench/memory_plan.py --stages=pcdm_inpaint --res=512 --batches=1 \
  --remats=none --kernels=chunked --compute_dtype=float32

{
  echo
  echo "## bench/accelerator.sh, $(date -u +%Y-%m-%d) ($backend)"
  echo
  cat "$log"
} >>bench/RESULTS.md
cp bench/RESULTS.md "$out/RESULTS.md"
echo "appended to bench/RESULTS.md (a copy in $out/RESULTS.md); log: $log"
exit $failed
