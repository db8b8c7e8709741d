#!/usr/bin/env bash
# One GPU session's check of pacs_kernels, in under 8 minutes, on a fresh machine:
#   1. install the baseline libraries from wheels carried in the working tree (.whl/, see fetch_wheels.sh);
#   2. print the machine and the library versions;
#   3. run the test suite on the GPU (Triton natively), bounded by a timeout;
#   4. run the benchmark suite at the real shapes, most important rows first, each stage under a timeout:
#        S1  D=4096 V=131072, 16k tokens, fwd_bwd then logprob: every implementation + the bare GEMM
#        S2  the same shape: entropy modes and the full pacs_loss
#        S3  Llama-3-8B, Qwen2.5-7B, Gemma-2-2B shapes at 16k tokens, fwd_bwd
#        S4  D=4096 V=131072 at 2k and 8k tokens, fwd_bwd (the time/memory-against-tokens plot)
#   5. rebuild results.{json,csv,md} and plot.png from every row measured.
# Everything lands in OUT_DIR: gpu_check.log (all output), results.jsonl/json/csv/md, plot.png (6 files).
#
#   bash benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine
#   bash benchmarks/gpu_check.sh OUT_DIR --dry-run  # here, on CPU: the same steps at tiny sizes, Triton interpreted
#
# Afterwards, on the development machine: copy OUT_DIR to benchmarks/results/<card>/ and run
#   python -m benchmarks.suite --report benchmarks/results/<card>   # updates benchmarks/RESULTS.md
set -uo pipefail
cd "$(dirname "$0")/.."

usage="usage: bash benchmarks/gpu_check.sh OUT_DIR [--dry-run]"
OUT=${1:?$usage}
DRY=0
[[ "${2:-}" == "--dry-run" ]] && DRY=1
[[ -n "${2:-}" && $DRY == 0 ]] && { echo "$usage" >&2; exit 2; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
T0=$(date +%s)
BUDGET=${PACS_GPU_CHECK_BUDGET:-465}  # seconds for the whole script; stages that would overrun are cut short
elapsed() { echo $(( $(date +%s) - T0 )); }
say() { printf '\n=== [%4ss] %s\n' "$(elapsed)" "$*"; }

# ---------------------------------------------------------------------------------------------- 1. wheels
WHEELS=${PACS_WHEELS:-.whl}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  say "installing carried wheels: $(cd "$WHEELS" && echo *.whl)"
  SITE=${PACS_SITE:-/tmp/site}
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/*.whl; then
    export PYTHONPATH="$PYTHONPATH:$SITE"
  else
    echo "wheel install failed: the baselines they hold will be skipped"
  fi
else
  say "no wheels in $WHEELS/: baselines that are not installed will be skipped"
fi

# ------------------------------------------------------------------------------------------ 2. machine
say "machine"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
  --format=csv
python3 - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
for name in ("triton", "liger-kernel", "cut-cross-entropy", "pytest", "pytest-benchmark", "matplotlib", "psutil"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name}: not installed")
EOF

if [[ $DRY == 1 ]]; then
  export TRITON_INTERPRET=1
  DEV=(--device cpu --isolate none --interpret --dtype bf16 --warmup 1 --reps 1 --acc-tokens 64)
  MAIN=tiny; OTHERS=tiny; BIG=256; SWEEP=64,128
  TESTS=(tests/test_linear_logprob.py tests/test_pacs_loss.py -k "unaligned or leading_dims or matches_float64_reference")
  T_TESTS=300
else
  DEV=(--device cuda --dtype bf16)
  MAIN=liger; OTHERS=llama3-8b,qwen2.5-7b,gemma2-2b; BIG=16k; SWEEP=2k,8k
  TESTS=(tests/ -k "not verify")
  T_TESTS=100
fi

# -------------------------------------------------------------------------------------------- 3. tests
say "tests: pytest ${TESTS[*]} (timeout ${T_TESTS}s)"
timeout -k 10 "$T_TESTS" python3 -m pytest -q -p no:cacheprovider --maxfail=10 "${TESTS[@]}"
echo "pytest exit code $? (124: timed out)"

# ------------------------------------------------------------------------------------ 4. benchmark suite
stage() {  # stage NAME SECONDS suite-args...: run unless the script's budget is spent; stop it at SECONDS
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET - $(elapsed) - 15 ))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then say "$name: skipped, budget spent"; return; fi
  say "$name (at most ${limit}s): $*"
  timeout -s INT -k 15 "$limit" python3 -m benchmarks.suite "${DEV[@]}" --out "$OUT" --no-results-md \
    --time-budget $(( limit - 25 > 10 ? limit - 25 : 10 )) --title "gpu_check" "$@"
  echo "$name exit code $? (124: timed out)"
}

ALL=gemm,ours_triton,naive,liger_flce,cce,cce_exact,liger_scaled,ours_torch,liger_selective,torch_lce,compiled_chunked,cce_compile
stage S1 150 --shapes $MAIN --tokens $BIG --modes fwd_bwd,logprob --impls $ALL
stage S2 75 --shapes $MAIN --tokens $BIG --modes fwd_bwd_entropy,logprob_entropy,pacs_loss \
  --impls gemm,ours_triton,naive,liger_scaled,liger_flce,cce,compiled_chunked
stage S3 75 --shapes $OTHERS --tokens $BIG --modes fwd_bwd --impls gemm,ours_triton,naive,liger_flce,cce
stage S4 60 --shapes $MAIN --tokens $SWEEP --modes fwd_bwd --impls gemm,ours_triton,naive,liger_flce,cce,liger_scaled

# ---------------------------------------------------------------------------------------------- 5. report
say "report"
python3 -m benchmarks.suite --report "$OUT" --no-results-md --title "gpu_check"
[[ -f "$OUT/results.md" ]] && sed -n '1,60p' "$OUT/results.md"
say "done in $(elapsed)s; files: $(cd "$OUT" && echo *)"
