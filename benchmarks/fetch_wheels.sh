#!/usr/bin/env bash
# Download the baseline libraries the GPU machine lacks (it has no network) as wheels into .whl/ (or $1), for
# benchmarks/gpu_check.sh to install there (.gitignore keeps .whl/ and wheels/ out of git). All are pure-Python
# wheels (liger-kernel ~0.9 MB, cut-cross-entropy ~23 kB, trl ~0.7 MB); their other needs (torch, triton,
# transformers) are on the machine. TRL's chunked log-prob imports trl.kernels only (transformers, packaging); its
# backward's ZeRO-3 helper lives in trl.trainer.utils (accelerate, datasets, pandas), which benchmarks/impls.py stubs
# where it does not import. Liger's sm90 CuTe-DSL kernel would need nvidia-cutlass-dsl (native, too large to carry).
#   bash benchmarks/fetch_wheels.sh          # then: device run with carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
LIGER=${LIGER_VERSION:-0.8.5}
CCE=${CCE_VERSION:-25.1.1}
TRL=${TRL_VERSION:-1.16.0}
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$DEST" \
  "liger-kernel==$LIGER" "cut-cross-entropy==$CCE" "trl==$TRL"
if [[ -n "$(git ls-files --others --exclude-standard -- "$DEST" 2> /dev/null)" ]]; then
  echo "note: $DEST is not git-ignored here; .gitignore ignores .whl/ and wheels/" >&2
fi
ls -l "$DEST"
