#!/usr/bin/env bash
# Every GPU check and measurement still open (issues #11 and #12), in one prepared run for a GPU
# machine (docs/benchmarks.md lists them as gaps until someone runs this):
#   1. the GPU tests: nvJPEG parity for training and serving, AMP, compile  (pytest -m gpu)
#   2. benchmarks/gpu_train.py --ray-data: the model alone and end to end per input mode
#   3. the real job, rayjobs/train.py --gpu, once per input mode, on 4,000 sample JPEGs at 256 px
#   4. benchmarks/serve.py with GPU replicas (nvJPEG decode, batching, 16 images per request, gRPC)
# Each step has its own time limit and log; a failing step does not stop the others.
#
#   scripts/gpu_checks.sh OUT_DIR          # on the GPU machine, in the repo root
#   scripts/gpu_checks.sh OUT_DIR --dry    # print the commands only
#   ONLY="gpu-tests gpu-train" scripts/gpu_checks.sh OUT_DIR   # some steps (a device call may
#                                          # last at most 10 minutes: run the rest in a second one)
# Steps: gpu-tests, gpu-train, train-decode-cpu, train-decode-gpu, train-ray-data, serve.
#
# Where Ray is not installed (the lent GPU machine), unpack the Ray pack first
# (../shared/docs/gpu-machine.md):
#   mkdir -p /tmp/site && tar -xJf .devpack/raypack.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: scripts/gpu_checks.sh OUT_DIR [--dry]}"
DRY="${2:-}"
PY="${PYTHON:-python3}"
# Where the project is not installed (pip install -e .), its root goes on PYTHONPATH, as Ray's
# working_dir does for `ray job submit`: the scripts below import placesnet and serving.
"$PY" -c "import placesnet" 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
export PLACESNET_CACHE="${PLACESNET_CACHE:-$OUT/cache}" RAY_USAGE_STATS_ENABLED=0

step() {  # step NAME SECONDS COMMAND...
  local name="$1" limit="$2"
  shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
    return 0
  fi
  echo "== $name (at most ${limit}s): $*"
  [ "$DRY" = "--dry" ] && return 0
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "   exit $? after $((SECONDS - start))s; log $OUT/$name.log; its end:"
  tail -n 30 "$OUT/$name.log" | sed 's/^/   | /'
}

SAMPLE=(--sample-classes 8 --sample-train-per-class 500 --sample-val-per-class 50 --image-size 256)
step gpu-tests 240 "$PY" -m pytest -p no:xdist -m gpu -q tests/test_engine.py tests/test_gpudecode.py
step gpu-train 300 "$PY" benchmarks/gpu_train.py --ray-data
for mode in "decode-cpu --decode cpu" "decode-gpu --decode gpu" "ray-data --input ray-data"; do
  set -- $mode
  name="$1"
  shift
  step "train-$name" 240 "$PY" rayjobs/train.py --gpu --num-workers 1 "${SAMPLE[@]}" --batch-size 256 \
    --epochs 3 --storage-path "$OUT/runs" --name "$name" "$@"
done
step serve 300 "$PY" benchmarks/serve.py --gpus 0.25 --cpus 2 --image-size 256
echo "== done: the logs are in $OUT; copy the tables into docs/benchmarks.md"
