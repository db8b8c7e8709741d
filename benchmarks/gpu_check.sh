#!/usr/bin/env bash
# One GPU session's check of pacs_kernels, in under 8 minutes (465 s, PACS_GPU_CHECK_BUDGET), on a fresh machine,
# the most important readings first:
#   1. install the baseline libraries from wheels carried in the working tree (.whl/, see fetch_wheels.sh);
#   2. print the card and the library versions;
#   3. the ceilings (benchmarks/ceilings.py, ~20 s): bf16 GEMM TFLOP/s at 8192^3, the full logits GEMM and the
#      sliced path's shapes, HBM copy GB/s, pacs_kernels._gemm.probe('cuda');
#   4. the op's tests natively (bf16 cases included): tests/test_linear_logprob.py, tests/test_pacs_loss.py (100 s cap);
#   5. the benchmark suite, each stage under a timeout (the rows stream into OUT/results.jsonl as they finish):
#        S1  D=4096 V=131072, 16k tokens, random logits, fwd_bwd then logprob: every implementation + the bare GEMM;
#            pacs' gradient rows are run twice more and dH/dW compared bitwise (the determinism check)
#        S1p the same with the peaked, language-model-like logits (CCE's filtering has something to skip)
#        S4  2k and 8k tokens there, fwd_bwd (memory independent of N; the time/memory-against-tokens plot)
#        S2  entropy modes and the full pacs_loss there
#        S3  Llama-3-8B, Qwen2.5-7B, Gemma-2-2B shapes at 16k tokens, fwd_bwd
#   6. report: results.{json,csv,md} and plot.png from every row measured, with the ceilings and the goal verdicts;
#      the section is written into benchmarks/RESULTS.md of this tree and that file is copied to OUT_DIR.
# OUT_DIR gets 8 files: gpu_check.log (all output), ceilings.json, results.jsonl/json/csv/md, plot.png, RESULTS.md.
#
#   bash benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine
#   bash benchmarks/gpu_check.sh OUT_DIR --dry-run  # on CPU: the same steps at tiny sizes, Triton interpreted; the
#                                                   # tree's RESULTS.md is left alone (the section goes to OUT_DIR)
#
# Afterwards, on the development machine: copy OUT_DIR to benchmarks/results/<card>/ and run
#   python -m benchmarks.suite --report benchmarks/results/<card> --title "..."   # its section in RESULTS.md
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
say "gpu_check $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2> /dev/null || echo '?')$(
  [[ -n "$(git status --porcelain -- pacs_kernels benchmarks tests 2> /dev/null)" ]] && echo ' + uncommitted changes')"

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
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
      "| capability %d.%d" % torch.cuda.get_device_capability() if torch.cuda.is_available() else "")
for name in ("triton", "liger-kernel", "cut-cross-entropy", "trl", "transformers", "nvidia-cutlass-dsl", "numpy",
             "pytest", "matplotlib", "psutil"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name}: not installed")
EOF

if [[ $DRY == 1 ]]; then
  export TRITON_INTERPRET=1
  DEV=(--device cpu --isolate none --interpret --dtype bf16 --warmup 1 --reps 1 --acc-tokens 64 --determinism ours)
  CEIL=(--device cpu --dry-run)
  MAIN=tiny; OTHERS=tiny; BIG=256; SWEEP=64,128
  TESTS=(tests/test_linear_logprob.py tests/test_pacs_loss.py
         -k "unaligned or leading_dims or matches_float64_reference or deterministic or forward_impl")
  T_TESTS=300
  # the section goes into a copy of RESULTS.md in OUT; the tree's file is not touched
  cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
  export PACS_RESULTS_MD="$OUT/RESULTS.md"
else
  DEV=(--device cuda --dtype bf16 --determinism ours)
  CEIL=(--device cuda)
  MAIN=liger; OTHERS=llama3-8b,qwen2.5-7b,gemma2-2b; BIG=16k; SWEEP=2k,8k
  TESTS=(tests/test_linear_logprob.py tests/test_pacs_loss.py)
  T_TESTS=100
fi

# ------------------------------------------------------------------------------------------- 3. ceilings
say "ceilings (at most 60s)"
timeout -k 10 60 python3 -m benchmarks.ceilings "${CEIL[@]}" --out "$OUT/ceilings.json"
echo "ceilings exit code $? (124: timed out)"

# -------------------------------------------------------------------------------------------- 4. tests
say "tests: pytest ${TESTS[*]} (timeout ${T_TESTS}s)"
timeout -k 10 "$T_TESTS" python3 -m pytest -q -p no:cacheprovider --maxfail=10 "${TESTS[@]}"
echo "pytest exit code $? (124: timed out)"

# ------------------------------------------------------------------------------------ 5. benchmark suite
stage() {  # stage NAME SECONDS suite-args...: run unless the script's budget is spent; stop it at SECONDS
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET - $(elapsed) - 30 ))  # 30 s kept for the report
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then say "$name: skipped, budget spent"; return; fi
  say "$name (at most ${limit}s): $*"
  timeout -s INT -k 15 "$limit" python3 -m benchmarks.suite "${DEV[@]}" --out "$OUT" --no-report \
    --time-budget $(( limit - 25 > 10 ? limit - 25 : 10 )) --title "gpu_check" "$@"
  echo "$name exit code $? (124: timed out)"
}

# Most important first within a stage too: pacs, the fastest anchors, then those that compile (torch.compile).
ALL=gemm,ours_sliced,ours_fused,ours_triton,naive,liger_scaled,cce,cce_exact,liger_flce,trl_chunked,torch_lce
ALL=$ALL,ours_torch,liger_selective,compiled_chunked,cce_compile
PEAKED=gemm,ours_sliced,ours_fused,ours_triton,naive,liger_scaled,cce,cce_exact,liger_flce,trl_chunked,torch_lce
OURS=gemm,ours_sliced,ours_fused,ours_triton
stage S1 150 --shapes $MAIN --tokens $BIG --modes fwd_bwd,logprob --logits random --impls $ALL
stage S1p 90 --shapes $MAIN --tokens $BIG --modes fwd_bwd,logprob --logits peaked --impls $PEAKED
ANCHORS=naive,liger_scaled,cce,liger_flce
stage S4 45 --shapes $MAIN --tokens $SWEEP --modes fwd_bwd --logits random --impls $OURS,$ANCHORS
stage S2 60 --shapes $MAIN --tokens $BIG --modes fwd_bwd_entropy,logprob_entropy,pacs_loss --logits random \
  --impls $OURS,naive,liger_scaled,trl_chunked,cce,compiled_chunked
stage S3 60 --shapes $OTHERS --tokens $BIG --modes fwd_bwd --logits random --impls $OURS,$ANCHORS

# ---------------------------------------------------------------------------------------------- 6. report
say "report"
CARD="CPU dry run"
[[ $DRY == 0 ]] && CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null | head -1)
python3 -m benchmarks.suite --report "$OUT" --title "gpu_check: $CARD, $(date -u '+%Y-%m-%d')"
if [[ $DRY == 0 ]]; then cp benchmarks/RESULTS.md "$OUT/RESULTS.md"; fi
[[ -f "$OUT/results.md" ]] && sed -n '1,80p' "$OUT/results.md"
say "done in $(elapsed)s; files: $(cd "$OUT" && echo *)"
