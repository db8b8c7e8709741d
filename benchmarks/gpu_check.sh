#!/usr/bin/env bash
# One GPU session's check of pacs, inside one 10-minute command (560 s by default, PACS_GPU_CHECK_BUDGET), on a
# fresh machine, the most important readings first. Every step runs under `timeout` with its own cap; a step that
# ends early leaves its time to the later ones, and each later step's cap stays reserved, so at the default budget
# no step is skipped. Every step streams what it measures into OUT as it goes (a killed step keeps it), and the log
# states each step's duration.
#
#   0. refuse a machine without CUDA (one sentence, exit 1) unless --dry-run: nothing is written;
#   1. install the baseline libraries from wheels carried in the working tree (.whl/, see fetch_wheels.sh) into
#      a fresh temporary folder ($PACS_SITE to choose one);
#   2. the card and the library versions;
#   3. the ceilings (benchmarks/ceilings.py): bf16 GEMM TFLOP/s at 8192^3, the full logits GEMM and the sliced
#      path's shapes, HBM copy GB/s, pacs_kernels._gemm.probe('cuda');
#   4. S1 ours: D=4096 V=131072, 16k tokens, random logits, EVERY mode of benchmarks.problems.MODES (fwd_bwd, logprob,
#      the entropy modes, pacs_loss, pacs_loss_onpolicy, and any mode added there later, e.g. replay), our
#      implementations with the bare GEMM and the naive path timed interleaved beside them; our gradient rows run
#      twice more and dH/dW are compared bitwise (the determinism check); the replay modes' kept-set rows with
#      the plain op timed beside them, and replay_full (k = V: N*V kept ids) at 2k tokens in S1_replay_full;
#   5. the kernel tests on CUDA (bf16 cases included), in parallel with pytest-xdist when it imports, under a cap
#      that covers ~100 cold Triton compiles; interrupted at the cap (SIGINT), pytest still prints its summary;
#   6. the trainer on CUDA: `torchrun --nproc_per_node 1 -m pacs train --preset smoke` (FSDP2, NCCL, bf16) and the
#      one-process `pacs train --preset smoke`, a few steps each, each in a fresh run directory under OUT; then the
#      packed varlen attention against sdpa with its packed mask (benchmarks/varlen_smoke.py: the CUDA kernel's
#      results for MHA/GQA/window/MQA, then a 4-layer model's step time and memory, interleaved) and a few LoRA
#      steps with varlen attention (`--lora-r 8 --attn varlen`; PEFT from the carried wheels);
#   7. S2 anchors: Liger, CCE, TRL's chunked log-prob, F.linear_cross_entropy against ours, the same shape, modes
#      in order of importance;
#   8. S3 more problems: peaked logits, the Llama-3-8B, Qwen2.5-7B and Gemma-2-2B heads, 2k and 8k tokens;
#   9. S4 compiled baselines (torch.compile: compiled_chunked, CCE's torch_compile) last, their compiles are slow;
#  10. the report: results.{json,csv,md} and plot.png from every row measured, with the ceilings and the goal
#      verdicts; on the GPU, when rows were measured, its section goes into benchmarks/RESULTS.md of this tree and
#      that file is copied to OUT (never an empty section).
# OUT gets: gpu_check.log (all output, with each step's duration), ceilings.json, results.jsonl (rows as they are
# measured), results.json/csv/md, plot.png, pytest.log, smoke_torchrun/, smoke_single/ and smoke_lora/ (run
# directories), varlen_smoke.jsonl, RESULTS.md.
#
#   bash benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine (device call: timeout_s 600)
#   bash benchmarks/gpu_check.sh OUT_DIR --dry-run  # on a CPU: the same steps at tiny sizes, Triton interpreted,
#                                                   # CPU stand-ins for the trainer smokes; the tree's RESULTS.md is
#                                                   # left alone (the section goes to OUT_DIR/RESULTS.md)
#
# Afterwards, on the development machine: copy OUT_DIR to benchmarks/results/<card>/ and run
#   python -m benchmarks.suite --report benchmarks/results/<card> --results-md --title "..."
set -uo pipefail
cd "$(dirname "$0")/.."

usage="usage: bash benchmarks/gpu_check.sh OUT_DIR [--dry-run]"
OUT=${1:-}
DRY=0
[[ -z "$OUT" || "$OUT" == -* ]] && { echo "$usage" >&2; exit 2; }
[[ "${2:-}" == "--dry-run" ]] && DRY=1
[[ $# -gt 2 || ( -n "${2:-}" && $DRY == 0 ) ]] && { echo "$usage" >&2; exit 2; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# ---------------------------------------------------------------------------------------- 0. CUDA or --dry-run
# no NVIDIA device node: refuse without starting Python; else ask torch (a CPU build of torch sees no CUDA either)
if [[ $DRY == 0 ]] && { [[ ! -e /dev/nvidiactl ]] ||
    ! python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2> /dev/null; }; then
  echo "gpu_check.sh: torch sees no CUDA device on this machine, so there is nothing to measure; run it on a GPU" \
    "machine, or rehearse it here with: bash benchmarks/gpu_check.sh $OUT --dry-run" >&2
  exit 1
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
T0=$(date +%s)
BUDGET=${PACS_GPU_CHECK_BUDGET:-560}  # seconds for the whole script
REPORT_RESERVE=15                     # kept for the report at the end
elapsed() { echo $(( $(date +%s) - T0 )); }
say() { printf '\n=== [%4ss] %s\n' "$(elapsed)" "$*"; }
STEPS=()  # "name: seconds (cap) exit" lines for the closing summary

COMMIT=$(git rev-parse --short HEAD 2> /dev/null || echo '?')
[[ -n "$(git status --porcelain -- pacs pacs_kernels benchmarks tests 2> /dev/null)" ]] &&
  COMMIT="$COMMIT + uncommitted changes"
say "gpu_check $( ((DRY)) && echo 'DRY RUN ')$(date -u '+%Y-%m-%d %H:%M UTC'), commit $COMMIT, budget ${BUDGET}s"

# Each step's cap in seconds, in the order they run. A step may run until the budget minus the caps of the steps
# after it (and the report's reserve): it gets at least its cap when the steps before it kept to theirs, and the
# time they left unused.
declare -A CAP=([ceilings]=30 [S1_ours]=110 [S1_replay_full]=20 [tests]=125 [smoke_torchrun]=40 [smoke_single]=30
  [varlen]=25 [smoke_lora]=25 [S2_anchors]=50 [S3_peaked]=15 [S3_shapes]=15 [S3_tokens]=10 [S4_compiled]=30)
ORDER=(ceilings S1_ours S1_replay_full tests smoke_torchrun smoke_single varlen smoke_lora S2_anchors S3_peaked
  S3_shapes S3_tokens S4_compiled)
limit_of() {  # limit_of STEP: seconds this step may take now
  local after=0 seen=0 s
  for s in "${ORDER[@]}"; do
    ((seen)) && after=$((after + CAP[$s]))
    [[ $s == "$1" ]] && seen=1
  done
  echo $(( BUDGET - $(elapsed) - after - REPORT_RESERVE ))
}
# run_step NAME CMD...: run CMD under the step's limit (SIGINT at the limit, so that the suite writes the rows it
# has and pytest prints its summary; KILL 15 s later), and log its duration. An argument @TIME_BUDGET@ becomes the
# limit minus 20 s (the suite's --time-budget: no new row starts after it).
run_step() {
  local name=$1 limit start code took
  shift
  limit=$(limit_of "$name")
  if (( limit < 10 )); then
    say "$name: skipped, ${limit}s left of the budget"
    STEPS+=("$name: skipped (budget spent)")
    return
  fi
  local args=("${@//@TIME_BUDGET@/$(( limit - 20 > 10 ? limit - 20 : 10 ))}")
  say "$name (cap ${CAP[$name]}s, may take ${limit}s): ${args[*]}"
  start=$(date +%s)
  timeout -s INT -k 15 "$limit" "${args[@]}"
  code=$?
  took=$(( $(date +%s) - start ))
  say "$name took ${took}s (limit ${limit}s), exit code $code$( ((code == 124)) && echo ' (stopped at its limit)')"
  STEPS+=("$(printf '%-15s %4ss of %4ss, exit code %s' "$name" "$took" "$limit" "$code")")
}

# ---------------------------------------------------------------------------------------------- 1. wheels
WHEELS=${PACS_WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  say "installing carried wheels: $(cd "$WHEELS" && echo *.whl)"
  if [[ -n "${PACS_SITE:-}" ]]; then SITE=$PACS_SITE; else
    SITE=$(mktemp -d "${TMPDIR:-/tmp}/pacs_site.XXXXXX")  # this run's own: a shared machine may run several
    trap 'rm -rf "$SITE"' EXIT
  fi
  if timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl; then
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
# The versions, and every mode the suite knows (benchmarks.problems.MODES), most important first (a step cut at its
# limit loses the last ones): a mode added there later (e.g. a replay mode) joins S1 and S2 without an edit here.
INFO=$(python3 - <<'EOF'
import importlib.metadata as md, os, platform, torch
cuda = torch.cuda.is_available()
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if cuda else "cpu",
      "| capability %d.%d" % torch.cuda.get_device_capability() if cuda else "",
      "| cpus", os.cpu_count(), "| load average", " ".join(f"{x:.2f}" for x in os.getloadavg()))
for name in ("triton", "liger-kernel", "cut-cross-entropy", "trl", "transformers", "nvidia-cutlass-dsl", "numpy",
             "pytest", "pytest-xdist", "matplotlib", "psutil"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name}: not installed")
from benchmarks.problems import MODES
first = ["fwd_bwd", "logprob", "pacs_loss", "pacs_loss_onpolicy", "fwd_bwd_entropy", "logprob_entropy"]
last = ["replay_full"]  # k = V: N*V kept ids, its own step at 2k tokens (S1_replay_full)
print("MODES=" + ",".join([m for m in first if m in MODES] + [m for m in MODES if m not in first + last]))
EOF
)
grep -v '^MODES=' <<< "$INFO"
ALL_MODES=$(sed -n 's/^MODES=//p' <<< "$INFO")
[[ -n "$ALL_MODES" ]] || ALL_MODES=fwd_bwd,logprob,pacs_loss,pacs_loss_onpolicy,fwd_bwd_entropy,logprob_entropy
echo "modes: $ALL_MODES"
STAMP=$(date -u +%H%M%S)
if [[ $DRY == 1 ]]; then
  export TRITON_INTERPRET=1
  DEV=(--device cpu --isolate none --interpret --dtype bf16 --warmup 1 --reps 2 --acc-tokens 64 --determinism ours)
  CEIL=(--device cpu --dry-run)
  MAIN=tiny; OTHERS=48x1031; BIG=256; SWEEP=64,128
  OURS=gemm,ours_sliced,ours_fused,ours_triton,ours_torch,ours_triton_2pass,ours_torch_2pass,naive
  OURS=$OURS,ours_triton_gather,ours_triton_masked,ours_triton_plain  # the replay modes' rows
  TEST_K=(-k "unaligned or leading_dims or matches_float64_reference or deterministic or forward_impl")
  TRAIN=(--device cpu --dtype float32)
  VARLEN=(--device cpu --tokens 256 --dtype float32 --reps 1)
  # the section goes into a copy of RESULTS.md in OUT; the tree's file is not touched
  cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
  export PACS_RESULTS_MD="$OUT/RESULTS.md"
else
  DEV=(--device cuda --dtype bf16 --determinism ours)
  CEIL=(--device cuda)
  MAIN=liger; OTHERS=llama3-8b,qwen2.5-7b,gemma2-2b; BIG=16k; SWEEP=2k,8k
  OURS=gemm,ours_sliced,ours_fused,ours_triton,ours_torch,ours_triton_2pass,naive
  OURS=$OURS,ours_triton_gather,ours_triton_masked,ours_triton_plain  # the replay modes' rows
  TEST_K=()
  TRAIN=(--device cuda --dtype bfloat16)
  VARLEN=(--device cuda --dtype bfloat16 --tokens 8192 --reps 5)
fi
ANCHORS=liger_flce,liger_scaled,cce,cce_exact,trl_chunked,torch_lce,liger_selective
COMPILED=compiled_chunked,cce_compile

# ------------------------------------------------------------------------------------------- 3. ceilings
run_step ceilings python3 -m benchmarks.ceilings "${CEIL[@]}" --out "$OUT/ceilings.json"

# ------------------------------------------------------------------------------------ 4. S1: ours, every mode
SUITE=(python3 -m benchmarks.suite "${DEV[@]}" --out "$OUT" --no-report --time-budget @TIME_BUDGET@)
run_step S1_ours "${SUITE[@]}" --shapes $MAIN --tokens $BIG --modes "$ALL_MODES" --logits random --impls $OURS
# (no forced gather at k = V: it would read a weight row per kept id, N*V*D*2 bytes = 2.2 TB at 2k tokens)
run_step S1_replay_full "${SUITE[@]}" --shapes $MAIN --tokens "${SWEEP%%,*}" --modes replay_full --logits random \
  --impls ours_triton,ours_triton_masked,ours_triton_plain,naive

# ------------------------------------------------------------------------------------------------ 5. tests
# The kernel tests, plus every test file with a GPU-only test; CPU-only tests skip themselves on a CUDA run.
K=tests/kernels
TESTS=($K/test_linear_logprob.py $K/test_pacs_loss.py $K/test_onpolicy.py $K/test_policy_losses.py $K/test_vocab_parallel.py
       $K/test_replay.py $K/test_replay_losses.py)
for f in $(grep -l "mark.gpu" tests/*/test_*.py 2> /dev/null); do
  [[ " ${TESTS[*]} " == *" $f "* ]] || TESTS+=("$f")
done
XDIST=()
if python3 -c 'import xdist' 2> /dev/null; then XDIST=(-n 4 --dist loadgroup); fi
# tee -i: the SIGINT at the cap reaches pytest (which then prints its summary), not the pipe that records it
run_step tests bash -c 'python3 -m pytest -q -p no:cacheprovider -p no:benchmark -rfE --durations=15 "$@" 2>&1 |
  tee -i "'"$OUT"'/pytest.log"; exit ${PIPESTATUS[0]}' _ "${XDIST[@]}" "${TESTS[@]}" "${TEST_K[@]}"
echo "pytest summary: $(grep -E '(passed|failed|error|skipped|no tests ran).* in [0-9.]+s' "$OUT/pytest.log" | tail -1)"

# ------------------------------------------------------------------------------------ 6. the trainer smokes
SMOKE=(--preset smoke --steps 3 "${TRAIN[@]}")
run_step smoke_torchrun python3 -m torch.distributed.run --standalone --nproc_per_node 1 -m pacs train \
  "${SMOKE[@]}" --out-dir "$OUT/smoke_torchrun_$STAMP"
tail -n 2 "$OUT/smoke_torchrun_$STAMP/metrics.jsonl" 2> /dev/null
run_step smoke_single python3 -m pacs train "${SMOKE[@]}" --out-dir "$OUT/smoke_single_$STAMP"
tail -n 2 "$OUT/smoke_single_$STAMP/metrics.jsonl" 2> /dev/null
run_step varlen python3 -m benchmarks.varlen_smoke "${VARLEN[@]}" --out "$OUT/varlen_smoke.jsonl"
if python3 -c 'import peft' 2> /dev/null; then
  run_step smoke_lora python3 -m pacs train "${SMOKE[@]}" --lora-r 8 --attn varlen --out-dir "$OUT/smoke_lora_$STAMP"
  tail -n 2 "$OUT/smoke_lora_$STAMP/metrics.jsonl" 2> /dev/null
else
  say "smoke_lora: skipped, peft is not installed (carry it: bash benchmarks/fetch_wheels.sh)"
  STEPS+=("smoke_lora: skipped (no peft)")
fi

# ---------------------------------------------------------------------------------------- 7.-9. the others
# anchors interleaved with ours, the bare GEMM and the naive path (the ratios are per-round medians)
run_step S2_anchors "${SUITE[@]}" --shapes $MAIN --tokens $BIG --modes "$ALL_MODES" --logits random \
  --impls gemm,ours_triton,ours_fused,naive,$ANCHORS
run_step S3_peaked "${SUITE[@]}" --shapes $MAIN --tokens $BIG --modes fwd_bwd,logprob --logits peaked \
  --impls gemm,ours_sliced,ours_fused,ours_triton,naive,liger_flce,cce,cce_exact,trl_chunked
run_step S3_shapes "${SUITE[@]}" --shapes $OTHERS --tokens $BIG --modes fwd_bwd --logits random \
  --impls gemm,ours_sliced,ours_fused,ours_triton,naive,liger_flce,cce
run_step S3_tokens "${SUITE[@]}" --shapes $MAIN --tokens $SWEEP --modes fwd_bwd --logits random \
  --impls gemm,ours_sliced,ours_fused,ours_triton,naive,liger_flce,cce
run_step S4_compiled "${SUITE[@]}" --shapes $MAIN --tokens $BIG --modes fwd_bwd,logprob --logits random \
  --impls gemm,ours_triton,naive,$COMPILED

# ---------------------------------------------------------------------------------------------- 10. report
say "report"
CARD="CPU dry run"
[[ $DRY == 0 ]] && CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null | head -1)
if grep -q '"status": "ok"' "$OUT/results.jsonl" 2> /dev/null; then
  timeout 60 python3 -m benchmarks.suite --report "$OUT" --results-md --title "gpu_check: $CARD, $(date -u '+%Y-%m-%d')"
  [[ $DRY == 0 ]] && cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
  [[ -f "$OUT/results.md" ]] && sed -n '1,60p' "$OUT/results.md"
else
  echo "no measured rows: no report, and RESULTS.md is left as it is"
fi
python3 - "$OUT/results.jsonl" <<'EOF'
import collections, json, sys
rows = {}
try:
    for line in open(sys.argv[1]):
        r = json.loads(line)
        if "_meta" not in r:
            rows[(r["impl"], r["mode"], r["shape"], r["n"], r.get("dist"))] = r
except OSError:
    pass
count = collections.Counter((r["family"], r["mode"], r["status"]) for r in rows.values())
print("rows measured (ok) / skipped or failed, per family and mode:")
for family in ("ours", "floor", "baseline"):
    for mode in sorted({m for f, m, _ in count if f == family}):
        ok = count[(family, mode, "ok")]
        other = sum(v for (f, m, s), v in count.items() if f == family and m == mode and s != "ok")
        print(f"  {family:<8} {mode:<20} {ok:3d} ok, {other:3d} other")
EOF

say "steps:"
printf '  %s\n' "${STEPS[@]}"
say "$( ((DRY)) && echo 'dry run ')done in $(elapsed)s of a ${BUDGET}s budget; files: $(cd "$OUT" && echo *)"
